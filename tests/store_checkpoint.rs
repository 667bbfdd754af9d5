//! Segment checkpoints (start-up that scales with what is stored): an open after a clean stop
//! reads each segment's checkpoint instead of its record headers and finds exactly what a full
//! scan finds; a checkpoint that does not match its segment is ignored, reported and written
//! again; records appended after a checkpoint (a kill -9 after a restart) are scanned; damage
//! under a checkpoint is found by the walk that follows the open, by reads and by fsck.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use std::path::Path;
use std::sync::Arc;

use common::*;
use cwm::io::IoEngine;
use cwm::store::Store;

const LEN: u64 = 256 << 10;

/// 12 windows of 2 blocks over two 4 MiB segments (the first sealed), cleanly stopped.
fn build(dir: &Path, engine: &Arc<dyn IoEngine>) {
    let (store, _) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    for i in 0..12u128 {
        put(&store, &format!("w{i}"), &keys(i + 1, 2), LEN);
    }
}

fn full_scan(dir: &Path, engine: &Arc<dyn IoEngine>) -> (Store, cwm::store::RecoveryReport) {
    let mut cfg = config(dir);
    cfg.use_checkpoints = false;
    Store::open_with_engine(cfg, engine.clone()).unwrap()
}

/// Zeroes the first 512 bytes of the first record of segment file `i` (a block header);
/// returns its offset.
fn zero_first_record(dir: &Path, i: usize) -> u64 {
    let seg = segments(dir)[i].clone();
    let first = record_pages(&seg)[0];
    zero(&seg, first, 512);
    first
}

fn check_all(store: &Store) {
    for i in 0..12u128 {
        check(store, &format!("w{i}"), &keys(i + 1, 2), LEN);
    }
}

#[test]
fn a_clean_reopen_reads_checkpoints_and_finds_what_a_full_scan_finds() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        assert_eq!(segments(dir).len(), 2, "{name}");
        // One per segment: the sealed one (at rotation) and the active one (at the stop).
        assert_eq!(checkpoint_files(dir).len(), 2, "{name}");
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.checkpointed_segments, 2, "{name}: {rep:?}");
        assert!(rep.ignored_checkpoints.is_empty(), "{name}: {rep:?}");
        let (records, windows, used) = (rep.records, rep.windows, store.used_bytes());
        let list = store.list().unwrap();
        check_all(&store);
        // The walk of what the checkpoints cover finds every record they list, nothing wrong.
        let v = store.verify_checkpoints().unwrap();
        assert_eq!((v.segments, v.records), (2, records), "{name}: {v:?}");
        assert!(v.damaged_regions.is_empty() && v.incomplete_windows.is_empty());
        drop(store);
        let (store, rep) = full_scan(dir, &engine);
        assert_eq!(rep.checkpointed_segments, 0);
        assert_eq!((rep.records, rep.windows), (records, windows), "{name}");
        assert_eq!(store.used_bytes(), used, "{name}");
        assert_eq!(store.list().unwrap(), list, "{name}");
        assert!(store.check_invariants().unwrap().is_empty());
    }
}

#[test]
fn a_damaged_checkpoint_is_ignored_reported_and_written_again() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        let ck = checkpoint_files(dir)[0].clone();
        let len = std::fs::metadata(&ck).unwrap().len();
        // Any byte: the header, an entry, the trailing checksum.
        for at in [0, 20, 64 + 70, len - 1] {
            let d = tmp.path().join(format!("flip-{at}"));
            copy_dir(dir, &d);
            flip_bit(&d.join(ck.file_name().unwrap()), at, 2);
            let (store, rep) = Store::open_with_engine(config(&d), engine.clone()).unwrap();
            assert_eq!(rep.checkpointed_segments, 1, "{name} byte {at}: {rep:?}");
            assert_eq!(
                rep.ignored_checkpoints.len(),
                1,
                "{name} byte {at}: {rep:?}"
            );
            assert_eq!(rep.ignored_checkpoints[0].0, 1);
            assert!(rep.damaged_regions.is_empty(), "{name}: {rep:?}");
            check_all(&store);
            drop(store);
            // Written again from the scan: the next open reads it.
            let (_, rep) = Store::open_with_engine(config(&d), engine.clone()).unwrap();
            assert_eq!(rep.checkpointed_segments, 2, "{name} byte {at}: {rep:?}");
            assert!(rep.ignored_checkpoints.is_empty(), "{name}: {rep:?}");
        }
    }
}

#[test]
fn a_checkpoint_of_another_segment_or_generation_is_ignored() {
    let (name, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, &engine);
    let cks = checkpoint_files(dir);
    // Segment 1's checkpoint under segment 2's name (a segment id reused after a crash at
    // creation would look the same: another generation).
    std::fs::copy(&cks[0], &cks[1]).unwrap();
    let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    assert_eq!(rep.ignored_checkpoints.len(), 1, "{name}: {rep:?}");
    assert_eq!(rep.ignored_checkpoints[0].0, 2);
    assert!(
        rep.ignored_checkpoints[0].1.contains("segment 1"),
        "{rep:?}"
    );
    check_all(&store);
}

#[test]
fn records_appended_after_a_checkpoint_are_scanned() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        let active = checkpoint_files(dir)[1].clone();
        let old = std::fs::read(&active).unwrap();
        {
            let (store, _) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
            put(&store, "after", &keys(99, 2), LEN);
            store.delete_window("w0", None).unwrap();
        }
        // A kill -9 after the restart: the active segment's checkpoint is the one the first
        // clean stop wrote; what came after is only in the log.
        std::fs::write(&active, &old).unwrap();
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.checkpointed_segments, 2, "{name}: {rep:?}");
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{name}: {rep:?}"
        );
        check(&store, "after", &keys(99, 2), LEN);
        assert!(store.get("w0").is_err(), "{name}: the delete was lost");
        let (records, list) = (rep.records, store.list().unwrap());
        drop(store);
        let (store, rep) = full_scan(dir, &engine);
        assert_eq!(rep.records, records, "{name}");
        assert_eq!(store.list().unwrap(), list, "{name}");
    }
}

#[test]
fn a_block_damaged_under_a_checkpoint_is_found_by_the_walk_the_read_and_fsck() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        // w0's first block: the first record of the sealed segment.
        let first = zero_first_record(dir, 0);
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        // The open itself took the segment from its checkpoint and read no block header...
        assert_eq!(rep.checkpointed_segments, 2, "{name}: {rep:?}");
        assert!(rep.damaged_regions.is_empty(), "{name}: {rep:?}");
        // ...but a read verifies: w0 serves no byte of the damaged block.
        let err = store.read_window("w0").unwrap_err();
        assert_eq!(err.code(), "CORRUPTION", "{name}: {err}");
        // The walk that follows the open reports what a full scan reports, and the index
        // then treats the block as lost (as a full-scan open does).
        let v = store.verify_checkpoints().unwrap();
        assert_eq!(v.damaged_regions.len(), 1, "{name}: {v:?}");
        assert_eq!(v.damaged_regions[0].0, 1);
        assert_eq!(v.damaged_regions[0].1, first);
        assert_eq!(v.incomplete_windows, ["w0"], "{name}: {v:?}");
        assert!(!store.contains_block(keys(1, 2)[0]).unwrap());
        for i in 1..12u128 {
            check(&store, &format!("w{i}"), &keys(i + 1, 2), LEN);
        }
        assert!(store.check_invariants().unwrap().is_empty());
        drop(store);
        // Its checkpoint is gone: the next open scans the segment and reports the damage.
        let (_, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.checkpointed_segments, 1, "{name}: {rep:?}");
        assert_eq!(rep.damaged_regions.len(), 1, "{name}: {rep:?}");
        assert_eq!(rep.incomplete_windows, ["w0"], "{name}: {rep:?}");
        // fsck never uses checkpoints.
        let f = cwm::fsck::check(config(dir), &|_, _| {}).unwrap();
        assert_eq!(f.recovery.damaged_regions.len(), 1, "{name}");
    }
}

#[test]
fn a_truncated_segment_is_not_hidden_by_its_checkpoint() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        let seg = segments(dir)[0].clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        // The checkpoint covers more than the file holds: ignored, and the scan reports the
        // truncation as a full scan does.
        assert_eq!(rep.ignored_checkpoints.len(), 1, "{name}: {rep:?}");
        assert!(
            rep.damaged_regions
                .iter()
                .any(|(s, _, _, why)| *s == 1 && why.contains("sealed at")),
            "{name}: {rep:?}"
        );
        assert!(!rep.incomplete_windows.is_empty(), "{name}: {rep:?}");
        drop(store);
    }
}

#[test]
fn orphan_checkpoints_and_unfinished_ones_are_removed() {
    let (_, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, &engine);
    let cks = checkpoint_files(dir);
    let orphan = dir.join("segment-0000000099.ckpt");
    let unfinished = dir.join("segment-0000000001.ckpt.tmp");
    std::fs::copy(&cks[0], &orphan).unwrap();
    std::fs::write(&unfinished, b"half").unwrap();
    let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    assert_eq!(rep.checkpointed_segments, 2);
    assert!(!orphan.exists() && !unfinished.exists());
    check_all(&store);
}

#[test]
fn a_segment_removed_by_compaction_takes_its_checkpoint_along() {
    let (name, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, &engine);
    let (store, _) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    // Every window of the sealed segment deleted: compaction removes it.
    let first: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .filter(|w| w.seq < 20)
        .map(|w| w.name)
        .collect();
    for w in &first {
        store.delete_window(w, None).unwrap();
    }
    store.seal_active().unwrap();
    let opts = cwm::store::CompactOptions {
        live_ratio: 1.0,
        ..Default::default()
    };
    store.compact(&opts, &mut |_| {}).unwrap();
    store.wait_checkpoints();
    let segs = segments(dir);
    assert!(
        !segs.iter().any(|s| s.ends_with("segment-0000000001.log")),
        "{name}"
    );
    assert!(
        !dir.join("segment-0000000001.ckpt").exists(),
        "{name}: {:?}",
        checkpoint_files(dir)
    );
    drop(store);
    let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    assert!(rep.ignored_checkpoints.is_empty(), "{rep:?}");
    assert_eq!(store.list().unwrap().len(), 12 - first.len());
}

#[test]
fn the_walk_leaves_records_appended_after_the_open_alone() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        build(dir, &engine);
        // Damage under the active segment's checkpoint (written at the clean stop).
        let _ = zero_first_record(dir, 1);
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.checkpointed_segments, 2, "{name}: {rep:?}");
        // Frozen after the open: appended to the active segment, past what it covered.
        put(&store, "late", &keys(77, 2), LEN);
        let v = store.verify_checkpoints().unwrap();
        assert_eq!(v.damaged_regions.len(), 1, "{name}: {v:?}");
        assert_eq!(v.damaged_regions[0].0, 2);
        assert!(!v.incomplete_windows.contains(&"late".to_string()), "{v:?}");
        check(&store, "late", &keys(77, 2), LEN);
        assert!(store.check_invariants().unwrap().is_empty());
        drop(store);
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.damaged_regions.len(), 1, "{name}: {rep:?}");
        check(&store, "late", &keys(77, 2), LEN);
    }
}

#[test]
fn a_truncated_checkpoint_is_ignored() {
    let (name, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, &engine);
    let ck = checkpoint_files(dir)[0].clone();
    let whole = std::fs::read(&ck).unwrap();
    // Shorter than a header and a checksum, down to nothing; and cut in the entries.
    for len in [0, 5, 40, 71, 72, 200] {
        std::fs::write(&ck, &whole[..len]).unwrap();
        let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
        assert_eq!(rep.ignored_checkpoints.len(), 1, "{name} {len}: {rep:?}");
        check_all(&store);
        drop(store);
        // Written again whole by that open.
        assert_eq!(
            std::fs::read(&ck).unwrap().len(),
            whole.len(),
            "{name} {len}"
        );
    }
}

#[test]
fn a_checkpoint_naming_another_generation_of_its_segment_is_ignored() {
    // What a segment id reused after a crash at creation would meet: a well-formed checkpoint
    // of the same id, another generation (its entries still verify: they are the segment's).
    let (name, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    build(dir, &engine);
    let ck = checkpoint_files(dir)[0].clone();
    let mut b = std::fs::read(&ck).unwrap();
    b[16] ^= 1; // generation
    let n = b.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..n]);
    b[n..].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&ck, &b).unwrap();
    let (store, rep) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
    assert_eq!(rep.ignored_checkpoints.len(), 1, "{name}: {rep:?}");
    assert!(
        rep.ignored_checkpoints[0].1.contains("generation"),
        "{rep:?}"
    );
    check_all(&store);
}
