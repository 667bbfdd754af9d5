//! EC-052, the last bytes of a full file system (a tmpfs mounted by the test; skipped, saying
//! so, where mounting is not allowed): once a full-size segment no longer fits, a deletion
//! (a two-page tombstone) still succeeds — in a small segment of 16 pages shared by the next
//! deletions when 64 KiB are free, or in a segment sized for its one record when even that is
//! not — and what it deleted stays deleted after a reopen while every other window reads back.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::path::Path;

use cwm::store::{Store, StoreConfig};

const LEN: u64 = 16 << 10;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = no_checkpoints(dir);
    c.segment_size = 1 << 20;
    c
}

fn window(store: &Store, i: u128) -> Result<(), cwm::store::StoreError> {
    let k = keys(1000 * (i + 1), 4);
    let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
    let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
    store
        .put_window(spec(&format!("w{i}"), &k, LEN), &refs)
        .map(|_| ())
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.starts_with("segment-") && n.ends_with(".log")
        })
        .count()
}

#[test]
fn deletions_go_on_in_the_last_kilobytes_of_a_full_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_guard) = mount_tmpfs(&mnt, "8m") else {
        return;
    };
    let dir = mnt.join("store");
    // Space set aside now and given back later, whatever the fill leaves.
    let reserve = mnt.join("reserve");
    std::fs::write(&reserve, vec![0u8; 100 << 10]).unwrap();
    let (_, engine) = engines().remove(0);
    let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
    let (n, err) = fill_until_error(1000, |i| window(&store, i));
    assert_eq!(err.code(), "NO_SPACE", "{err}");
    assert!(n >= 8, "only {n} windows fitted");

    // Leave 20 KiB: no 64 KiB segment fits, a header and one tombstone (16 KiB) do. (The
    // checkpoints of the segments sealed by the fill are written in the background: once
    // they are all there, the free space measured stays what it is.)
    store.wait_checkpoints();
    let filler = mnt.join("filler");
    let room = free(&mnt);
    assert!(room > 20 << 10, "{room}");
    std::fs::write(&filler, vec![0u8; (room - (20 << 10)) as usize]).unwrap();
    let before = segments(&dir);
    store
        .delete_window("w0", None)
        .expect("a deletion in a segment of its own size");
    assert_eq!(segments(&dir), before + 1);

    // Give back 100 KiB: a 64 KiB segment fits now (a 1 MiB one still does not) and takes
    // the next three tombstones.
    std::fs::remove_file(&reserve).unwrap();
    assert!(free(&mnt) < 1 << 20);
    let before = segments(&dir);
    for i in 1..4 {
        store
            .delete_window(&format!("w{i}"), None)
            .unwrap_or_else(|e| panic!("deleting w{i}: {e}"));
    }
    assert_eq!(
        segments(&dir),
        before + 1,
        "three tombstones share one small segment"
    );

    drop(store);
    let (store, rep) = Store::open_with_engine(cfg(&dir), engine).unwrap();
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    for i in 0..4 {
        assert!(store.get(&format!("w{i}")).is_err(), "w{i} came back");
    }
    for i in 4..n {
        check(&store, &format!("w{i}"), &keys(1000 * (i + 1), 4), LEN);
    }
    assert_eq!(store.list().unwrap().len() as u128, n - 4);
}
