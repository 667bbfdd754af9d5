//! A rotation seals the old segment in the background: appends go on in the new segment while
//! block records handed out in the old one are still being written, and its sealed length is
//! recorded only once they are. A crash meanwhile leaves the old segment unsealed behind a newer
//! one, possibly with room handed out and never written among its last block records. Recovery
//! cuts that off as a torn tail (not damage) when nothing after it had to wait for it — every
//! later segment unsealed and holding only freezes' block records — records the old segment's
//! sealed length, and the next open finds nothing wrong. Once a later segment was sealed (or
//! holds a metadata record: `store_unwritten_tail.rs`), the same hole is damage, reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::format::SegmentHeader;
use cwm::store::{Store, StoreConfig};

const LEN: u64 = 64 << 10;

/// Window w0, then `blocks` block records of a freeze that never committed, spread over the
/// next segments (1 MiB each); returns the store's config.
fn build(dir: &std::path::Path, blocks: usize) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir);
    cfg.segment_size = 1 << 20;
    cfg.use_checkpoints = false;
    cfg.recycle_segments = 0;
    let (store, _) = Store::open(cfg.clone()).unwrap();
    put(&store, "w0", &keys(1, 1), LEN);
    let wk = keys(2, blocks);
    let mut w = store.begin_window(spec("x", &wk, LEN)).unwrap();
    for (i, k) in wk.iter().enumerate() {
        write_block(&mut w, i, *k as u64, LEN);
    }
    drop(w);
    drop(store);
    as_after_kill(dir);
    cfg
}

fn header(path: &std::path::Path) -> SegmentHeader {
    let b = std::fs::read(path).unwrap();
    SegmentHeader::decode(&b[..4096]).unwrap()
}

/// Segment `path` as a crash during its rotation's seal leaves it: no sealed length recorded,
/// and the block record at `victim` never written.
fn unseal_with_hole(path: &std::path::Path, victim: u64) {
    let mut b = std::fs::read(path).unwrap();
    let h = SegmentHeader::decode(&b[..4096]).unwrap();
    assert!(h.sealed_len > 0, "{h:?}");
    let unsealed = SegmentHeader { sealed_len: 0, ..h };
    unsealed.encode(&mut b[..4096]);
    unsealed.encode(&mut b[4096..8192]);
    let v = victim as usize;
    b[v..v + 4096].fill(0);
    std::fs::write(path, &b).unwrap();
}

#[test]
fn a_crash_during_a_rotations_seal_leaves_a_torn_tail_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = build(dir, 20);
    let segs = segments(dir);
    assert_eq!(segs.len(), 2, "{segs:?}");
    // Among x's block records in segment 1, before its last one: never written.
    let pages = record_pages(&segs[0]);
    let victim = pages[pages.len() - 3];
    unseal_with_hole(&segs[0], victim);
    let (store, rep) = Store::open(cfg.clone()).unwrap();
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    assert_eq!(rep.torn_tails.len(), 1, "{rep:?}");
    assert_eq!(rep.torn_tails[0].1, victim, "{rep:?}");
    assert!(rep.torn_tails[0].2.contains("never written"), "{rep:?}");
    check(&store, "w0", &keys(1, 1), LEN);
    assert_eq!(store.list().unwrap().len(), 1);
    drop(store);
    // Its sealed length was recorded at the open, where its records now end.
    assert_eq!(header(&segs[0]).sealed_len, victim);
    let (store, rep) = Store::open(cfg).unwrap();
    assert!(
        rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
        "{rep:?}"
    );
    check(&store, "w0", &keys(1, 1), LEN);
    put(&store, "y", &keys(40, 3), LEN);
    check(&store, "y", &keys(40, 3), LEN);
}

#[test]
fn a_hole_behind_a_sealed_later_segment_is_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = build(dir, 40);
    let segs = segments(dir);
    assert!(segs.len() >= 3, "{segs:?}");
    // Segment 2's seal was recorded: everything handed out in segment 1 had been written.
    assert!(header(&segs[1]).sealed_len > 0);
    let pages = record_pages(&segs[0]);
    let victim = pages[pages.len() - 3];
    unseal_with_hole(&segs[0], victim);
    let (store, rep) = Store::open(cfg).unwrap();
    assert!(rep.torn_tails.is_empty(), "{rep:?}");
    assert_eq!(rep.damaged_regions.len(), 1, "{rep:?}");
    assert_eq!(rep.damaged_regions[0].1, victim, "{rep:?}");
    check(&store, "w0", &keys(1, 1), LEN);
    // Damaged: no sealed length is vouched for.
    drop(store);
    assert_eq!(header(&segs[0]).sealed_len, 0);
}

/// A crash while the rotation created the next segment (its file preallocated, its header not
/// yet written): the open removes that empty file and makes the unsealed older segment the
/// append segment again — so it records no sealed length in it, and appends after the open
/// are no damage at the next one.
#[test]
fn an_older_segment_that_becomes_the_append_segment_again_is_not_sealed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cfg = StoreConfig::new(dir);
    cfg.segment_size = 1 << 20;
    {
        let (store, _) = Store::open(cfg.clone()).unwrap();
        put(&store, "a", &keys(1, 3), LEN);
    }
    let segs = segments(dir);
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(header(&segs[0]).sealed_len, 0);
    // The next segment, created and preallocated, its header never written.
    let next = dir.join("segment-0000000002.log");
    std::fs::write(&next, vec![0u8; 1 << 20]).unwrap();
    let (store, rep) = Store::open(cfg.clone()).unwrap();
    assert_eq!(rep.removed_empty_segments, vec![2], "{rep:?}");
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    assert_eq!(header(&segs[0]).sealed_len, 0, "the append segment again");
    put(&store, "b", &keys(2, 3), LEN);
    drop(store);
    as_after_kill(dir);
    let (store, rep) = Store::open(cfg).unwrap();
    assert!(
        rep.damaged_regions.is_empty() && rep.ignored_checkpoints.is_empty(),
        "{rep:?}"
    );
    check(&store, "a", &keys(1, 3), LEN);
    check(&store, "b", &keys(2, 3), LEN);
}
