//! EC-052 on a real full file system: a 64 MiB tmpfs (mounted by the test; skipped, saying so,
//! where mounting is not allowed) filled through the store. The freeze that does not fit fails
//! cleanly with NO_SPACE, nothing of it is visible (before or after a reopen), every earlier
//! window still reads back; deleting windows and compacting gives the space back, and the next
//! freeze succeeds. tmpfs refuses O_DIRECT, so this also runs the buffered fallback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

use std::path::Path;

use cwm::store::{Store, StoreConfig};

const LEN: u64 = 64 << 10;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 8 << 20;
    c
}

fn window(store: &Store, i: u128) -> Result<(), cwm::store::StoreError> {
    let k = keys(100 + i, 16);
    let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
    let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
    store
        .put_window(spec(&format!("w{i}"), &k, LEN), &refs)
        .map(|_| ())
}

#[test]
fn ec_052_disk_full_on_tmpfs() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_guard) = mount_tmpfs(&mnt, "64m") else {
        return;
    };
    for (name, engine) in engines() {
        let dir = mnt.join(name);
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            let (n, err) = fill_until_error(100, |i| window(&store, i));
            assert_eq!(err.code(), "NO_SPACE", "{name}: {err}");
            assert!(n >= 3, "{name}: only {n} windows fitted");
            let full = format!("w{n}");
            assert!(
                store.get(&full).is_err(),
                "{name}: the failed window is visible"
            );
            assert_eq!(store.list().unwrap().len() as u128, n, "{name}");
            for i in 0..n {
                check(&store, &format!("w{i}"), &keys(100 + i, 16), LEN);
            }
            // Still full: the same freeze fails the same way, and leaves nothing either.
            assert_eq!(window(&store, n).unwrap_err().code(), "NO_SPACE", "{name}");
            drop(store);
            let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            assert!(rep.incomplete_windows.is_empty(), "{name}: {rep:?}");
            assert_eq!(
                store.list().unwrap().len() as u128,
                n,
                "{name}: after reopen"
            );
            assert!(
                store.get(&full).is_err(),
                "{name}: the failed window appeared"
            );
            // Delete the oldest half, compact: segments go back to the file system. Each
            // tombstone takes two pages; when even those run out (NO_SPACE), compaction of what
            // is already deleted makes room, and deleting goes on.
            let compact = || compact_everything(&store);
            for i in 0..n / 2 {
                if let Err(e) = store.delete_window(&format!("w{i}"), None) {
                    assert_eq!(e.code(), "NO_SPACE", "{name}: {e}");
                    assert!(!compact().segments_removed.is_empty(), "{name}");
                    store.delete_window(&format!("w{i}"), None).unwrap();
                }
            }
            let rep = compact();
            assert!(!rep.segments_removed.is_empty(), "{name}: {rep:?}");
            window(&store, n).unwrap_or_else(|e| panic!("{name}: after compaction: {e}"));
            check(&store, &full, &keys(100 + n, 16), LEN);
            for i in n / 2..n {
                check(&store, &format!("w{i}"), &keys(100 + i, 16), LEN);
            }
            assert_eq!(
                store.check_invariants().unwrap(),
                Vec::<String>::new(),
                "{name}"
            );
            drop(store);
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            check(&store, &full, &keys(100 + n, 16), LEN);
            assert_eq!(store.list().unwrap().len() as u128, n - n / 2 + 1, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
