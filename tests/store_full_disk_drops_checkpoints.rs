//! EC-052 with checkpoints on (a tmpfs mounted by the test; skipped, saying so, where mounting
//! is not allowed): when a new segment does not fit but would once the segment checkpoints are
//! gone, the checkpoints are removed (they only save scans) and the freeze goes on; the next
//! open scans those segments and finds every window.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::path::Path;

use cwm::store::{Store, StoreConfig};

const SEGMENT: u64 = 1 << 20;
/// Inline blocks: one page a record, so a segment's checkpoint holds hundreds of entries.
const SMALL: u64 = 1_000;
/// The window that needs the new segment: records of three pages (no small-segment fallback).
const BIG: u64 = 8 << 10;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = SEGMENT;
    c
}

fn checkpoint_bytes(dir: &Path) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".ckpt") {
            n += 1;
            bytes += e.metadata().unwrap().len().next_multiple_of(4096);
        }
    }
    (n, bytes)
}

#[test]
fn a_full_file_system_takes_the_checkpoints_room_for_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_guard) = mount_tmpfs(&mnt, "16m") else {
        return;
    };
    let dir = mnt.join("store");
    let (_, engine) = engines().remove(0);
    let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
    // About four segments of one-page records, each sealed segment checkpointed.
    for i in 0..60u128 {
        put(&store, &format!("s{i}"), &keys(100 * (i + 1), 16), SMALL);
    }
    store.seal_active().unwrap();
    store.wait_checkpoints();
    let (n, ckpt) = checkpoint_bytes(&dir);
    assert!(
        n >= 3 && ckpt >= 48 << 10,
        "{n} checkpoints of {ckpt} bytes"
    );

    // Leave less than a segment, but a segment once the checkpoints are gone.
    let filler = mnt.join("filler");
    let room = free(&mnt);
    let leave = SEGMENT - ckpt / 2 / 4096 * 4096;
    assert!(room > leave, "{room}");
    std::fs::write(&filler, vec![0u8; (room - leave) as usize]).unwrap();
    assert_eq!(free(&mnt), leave);

    put(&store, "big", &keys(1, 4), BIG);
    assert_eq!(checkpoint_bytes(&dir).0, 0, "the checkpoints stayed");
    check(&store, "big", &keys(1, 4), BIG);
    drop(store);

    let (store, rep) = Store::open_with_engine(cfg(&dir), engine).unwrap();
    assert!(rep.ignored_checkpoints.is_empty(), "{rep:?}");
    check(&store, "big", &keys(1, 4), BIG);
    for i in 0..60u128 {
        check(&store, &format!("s{i}"), &keys(100 * (i + 1), 16), SMALL);
    }
}
