//! Compaction writes a batch of copies into the newest segment all at once, concurrently (in a
//! reused file ext4 overwrites in place, in any order), and syncs the batch before its source
//! segment may be removed. A kill -9 in between can leave one copy of the batch unwritten and a
//! later one written. While the source segment still stands, nothing is lost: recovery cuts the
//! batch off as a torn tail (reported as such, not as damage) and the windows read from the
//! originals. Once the source is gone the batch was synced, and a hole before a copy is damage,
//! reported as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::path::{Path, PathBuf};

use cwm::store::{Store, StoreConfig};

const LEN: u64 = 64 << 10;
const LIVE: [u128; 3] = [1, 5, 7];
const DELETED: [u128; 5] = [0, 2, 3, 4, 6];

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 2 << 20;
    c.use_checkpoints = false;
    c
}

/// Windows w0..w7 (4 blocks each) fill segment 1 and spill into segment 2; all but w1, w5 and
/// w7 are deleted; segment 1 is compacted (its live records copied into the newest segment, then it
/// is removed). Returns segment 1's path and bytes as they were before the compaction, the
/// newest segment, and the offsets of the pages of copies written into it.
fn build(dir: &Path) -> (PathBuf, Vec<u8>, PathBuf, Vec<u64>) {
    let (_, engine) = engines().remove(0);
    let (store, _) = Store::open_with_engine(cfg(dir), engine.clone()).unwrap();
    for i in 0..8u128 {
        put(&store, &format!("w{i}"), &keys(100 * (i + 1), 4), LEN);
    }
    for i in DELETED {
        store.delete_window(&format!("w{i}"), None).unwrap();
    }
    drop(store);
    let segs = segments(dir);
    assert!(segs.len() >= 2, "{segs:?}");
    let source = segs[0].clone();
    let source_bytes = std::fs::read(&source).unwrap();
    let pages_before: Vec<(PathBuf, Vec<u64>)> =
        segs.iter().map(|s| (s.clone(), record_pages(s))).collect();
    let (store, _) = Store::open_with_engine(cfg(dir), engine).unwrap();
    let rep = store
        .compact(
            &cwm::store::CompactOptions {
                live_ratio: 1.0,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(rep.records_copied > 0, "{rep:?}");
    drop(store);
    assert!(!source.exists(), "segment 1 was compacted away");
    // The copies' pages in the newest segment (where compaction's last batch went).
    let newest = segments(dir).last().unwrap().clone();
    let before: Vec<u64> = pages_before
        .into_iter()
        .find(|(p, _)| *p == newest)
        .map(|(_, v)| v)
        .unwrap_or_default();
    let copies: Vec<u64> = record_pages(&newest)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(copies.len() >= 4, "{copies:?}");
    (source, source_bytes, newest, copies)
}

fn check_live(store: &Store) {
    for i in LIVE {
        check(store, &format!("w{i}"), &keys(100 * (i + 1), 4), LEN);
    }
    for i in DELETED {
        assert!(store.get(&format!("w{i}")).is_err(), "w{i} came back");
    }
}

#[test]
fn a_copy_left_unwritten_while_its_source_stands_is_a_torn_tail() {
    for lost in ["first", "middle"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (source, source_bytes, newest, copies) = build(dir);
        // The crash came before the batch was synced and the source removed.
        std::fs::write(&source, &source_bytes).unwrap();
        let hole = if lost == "first" {
            copies[0]
        } else {
            copies[copies.len() / 2]
        };
        zero(&newest, hole, 4096);
        let (_, engine) = engines().remove(0);
        let (store, rep) = Store::open_with_engine(cfg(dir), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{lost}: {rep:?}");
        assert_eq!(rep.torn_tails.len(), 1, "{lost}: {rep:?}");
        assert_eq!(rep.torn_tails[0].1, hole, "{lost}: {rep:?}");
        assert!(rep.incomplete_windows.is_empty(), "{lost}: {rep:?}");
        check_live(&store);
        assert!(store.check_invariants().unwrap().is_empty());
        // Compaction runs again; the next open finds nothing wrong.
        compact_everything(&store);
        check_live(&store);
        drop(store);
        let (store, rep) = Store::open_with_engine(cfg(dir), engine).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{lost}: {rep:?}"
        );
        check_live(&store);
    }
}

#[test]
fn a_lost_copy_whose_source_is_gone_is_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, _, newest, copies) = build(dir);
    zero(&newest, copies[0], 4096);
    let (_, engine) = engines().remove(0);
    let (store, rep) = Store::open_with_engine(cfg(dir), engine).unwrap();
    assert_eq!(rep.damaged_regions.len(), 1, "{rep:?}");
    assert_eq!(rep.damaged_regions[0].1, copies[0], "{rep:?}");
    assert!(rep.torn_tails.is_empty(), "{rep:?}");
    // The lost block ends its window's usable prefix; the window stays listed.
    assert_eq!(rep.incomplete_windows.len(), 1, "{rep:?}");
    assert!(store.get(&rep.incomplete_windows[0]).is_ok());
}
