//! EC-052 at open: the newest segment's preallocation was given back (its tail cut) and the
//! file system is full when the store reopens. The open succeeds, the newest segment stays
//! sealed at its last record, every window reads back, and a freeze gets NO_SPACE — never a
//! store that refuses to open. A 16 MiB tmpfs is mounted by the test (skipped, saying so,
//! where mounting is not allowed).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::io::Write;

use cwm::store::Store;

#[test]
fn ec_052_b_reopen_on_a_full_file_system_keeps_the_newest_segment_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_guard) = mount_tmpfs(&mnt, "16m") else {
        return;
    };
    for (name, engine) in engines() {
        let dir = mnt.join(name);
        let (a, b) = (keys(1, 3), keys(2, 3));
        let used = {
            let (store, _) = Store::open_with_engine(config(&dir), engine.clone()).unwrap();
            put(&store, "first", &a, 16 * 1024);
            put(&store, "second", &b, 10 * 1024);
            store.stats().unwrap().used_bytes
        };
        // The newest segment without its preallocation, then not a byte free.
        let seg = segments(&dir).last().unwrap().clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(used)
            .unwrap();
        let filler = mnt.join(format!("filler-{name}"));
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        drop(f);
        let (store, report) = Store::open_with_engine(config(&dir), engine.clone())
            .unwrap_or_else(|e| panic!("{name}: a full file system must not stop the open: {e}"));
        assert_eq!(report.windows, 2, "{name}");
        check(&store, "first", &a, 16 * 1024);
        check(&store, "second", &b, 10 * 1024);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            used,
            "{name}: sealed where it was"
        );
        let k = keys(3, 2);
        let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, 8192)).collect();
        let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
        let err = store
            .put_window(spec("third", &k, 8192), &refs)
            .unwrap_err();
        assert_eq!(err.code(), "NO_SPACE", "{name}: {err}");
        drop(store);
        // Space back: the store appends again (into a new segment) and nothing was lost.
        std::fs::remove_file(&filler).unwrap();
        let (store, _) = Store::open_with_engine(config(&dir), engine.clone()).unwrap();
        put(&store, "third", &k, 8192);
        check(&store, "first", &a, 16 * 1024);
        check(&store, "third", &k, 8192);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
