//! With concurrent freezes, a crash can leave room that was handed out to one freeze but never
//! written, followed by block records another freeze did write. Metadata records are appended
//! only once every block record handed out before them is written, so such room can only lie
//! after the newest segment's last metadata record, where nothing acknowledged is: recovery cuts
//! it off as a torn tail (reported as such, not as damage, and gone after the next open). A hole
//! before a metadata record stays what it is: damage, reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Store, StoreConfig};

const LEN: u64 = 16 << 10;

/// Windows a and b, then four block records of a freeze that never committed (what a crash
/// leaves of freezes in flight). Returns the record header offsets of the segment.
fn build(dir: &std::path::Path, engine: &std::sync::Arc<dyn cwm::io::IoEngine>) -> Vec<u64> {
    let (store, _) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
    put(&store, "a", &keys(1, 3), LEN);
    put(&store, "b", &keys(2, 3), LEN);
    let wk = keys(3, 4);
    let mut w = store.begin_window(spec("w", &wk, LEN)).unwrap();
    for (i, k) in wk.iter().enumerate() {
        write_block(&mut w, i, *k as u64, LEN);
    }
    drop(w);
    drop(store);
    // Freezes in flight at a crash: what kill -9 leaves.
    as_after_kill(dir);
    // a: 3 blocks + 2 manifest copies; b: the same; then the 4 blocks.
    let pages = record_pages(&segments(dir)[0]);
    assert_eq!(pages.len(), 14);
    pages
}

#[test]
fn unwritten_room_after_the_last_manifest_is_a_torn_tail() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pages = build(dir, &engine);
        // The first of the four was never written; the next three were (another freeze's).
        let hole = pages[10];
        zero(&segments(dir)[0], hole, 4096);
        let (store, rep) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{engine_name}: {rep:?}");
        assert_eq!(rep.torn_tails.len(), 1, "{engine_name}: {rep:?}");
        assert_eq!(rep.torn_tails[0].1, hole);
        assert!(rep.torn_tails[0].2.contains("never written"), "{rep:?}");
        check(&store, "a", &keys(1, 3), LEN);
        check(&store, "b", &keys(2, 3), LEN);
        // Appends resume at the hole; the next open finds nothing wrong.
        put(&store, "c", &keys(4, 2), LEN);
        drop(store);
        let (store, rep) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{engine_name}: {rep:?}"
        );
        assert_eq!(store.list().unwrap().len(), 3);
        check(&store, "c", &keys(4, 2), LEN);
        assert!(store.check_invariants().unwrap().is_empty());
    }
}

#[test]
fn a_hole_before_the_last_manifest_is_damage() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pages = build(dir, &engine);
        // b's first block record: b's manifest follows it.
        let hole = pages[5];
        zero(&segments(dir)[0], hole, 4096);
        let (store, rep) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
        assert_eq!(rep.damaged_regions.len(), 1, "{engine_name}: {rep:?}");
        assert_eq!(rep.damaged_regions[0].1, hole);
        check(&store, "a", &keys(1, 3), LEN);
        // b stays listed; it thaws up to the lost block (none of it here).
        assert!(store.get("b").is_ok());
    }
}

/// The same with one-page block records: the damaged page right before the last manifest is
/// still damage (the barrier is where that manifest ends, not a record length before it), and
/// the manifest after it stays.
#[test]
fn a_damaged_page_just_before_the_last_manifest_is_damage() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) =
                Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
            put(&store, "a", &keys(1, 3), 1024);
            put(&store, "b", &keys(2, 3), 1024);
        }
        // As a kill -9 leaves it (no checkpoint of the active segment: the open scans it).
        as_after_kill(dir);
        // a: 3 one-page blocks + its manifest; b: the same. The last block record (kind 1)
        // is b's last block, the page right before b's manifest.
        let seg = std::fs::read(&segments(dir)[0]).unwrap();
        let pages = record_pages(&segments(dir)[0]);
        let blocks: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|p| seg[*p as usize + 6] == 1)
            .collect();
        assert_eq!(blocks.len(), 6, "{engine_name}: {pages:?}");
        let hole = blocks[5];
        assert!(pages.contains(&(hole + 4096)), "{engine_name}: {pages:?}");
        assert_ne!(
            seg[hole as usize + 4096 + 6],
            1,
            "{engine_name}: a manifest follows"
        );
        zero(&segments(dir)[0], hole, 4096);
        let (store, rep) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
        assert_eq!(rep.damaged_regions.len(), 1, "{engine_name}: {rep:?}");
        assert!(rep.torn_tails.is_empty(), "{engine_name}: {rep:?}");
        check(&store, "a", &keys(1, 3), 1024);
        assert!(
            store.get("b").is_ok(),
            "{engine_name}: b's manifest was cut off"
        );
    }
}

/// Only the newest, unsealed segment can hold room handed out and never written. An older
/// segment sealed by a failure (its sealed length never recorded: 0 in its header) that ends
/// with block records of a window committed in the next segment keeps a hole among them as
/// what it is — damage, reported — not a torn tail cut off.
#[test]
fn a_hole_among_an_older_segments_last_block_records_is_damage() {
    let (_, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut cfg = StoreConfig::new(dir);
    cfg.segment_size = 1 << 20;
    cfg.use_checkpoints = false;
    let len = 64 << 10;
    {
        let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
        put(&store, "w0", &keys(1, 1), len);
        // Its blocks fill segment 1 and spill into segment 2, where its manifest is.
        put(&store, "a", &keys(2, 20), len);
    }
    let segs = segments(dir);
    assert!(segs.len() >= 2, "{segs:?}");
    let mut b = std::fs::read(&segs[0]).unwrap();
    let h = cwm::store::format::SegmentHeader::decode(&b[..4096]).unwrap();
    assert!(h.sealed_len > 0);
    let unsealed = cwm::store::format::SegmentHeader { sealed_len: 0, ..h };
    unsealed.encode(&mut b[..4096]);
    unsealed.encode(&mut b[4096..8192]);
    // A block record of a, after w0's manifest and before segment 1's last record: zeroed.
    let pages = record_pages(&segs[0]);
    let victim = pages[pages.len() - 4] as usize;
    b[victim..victim + 4096].fill(0);
    std::fs::write(&segs[0], &b).unwrap();
    let (store, rep) = Store::open_with_engine(cfg, engine).unwrap();
    assert!(rep.torn_tails.is_empty(), "{rep:?}");
    assert_eq!(rep.truncated_bytes, 0, "{rep:?}");
    assert_eq!(rep.damaged_regions.len(), 1, "{rep:?}");
    assert_eq!(rep.damaged_regions[0].1, victim as u64, "{rep:?}");
    check(&store, "w0", &keys(1, 1), len);
    assert!(rep.incomplete_windows.contains(&"a".to_string()), "{rep:?}");
}
