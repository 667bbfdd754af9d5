//! A freeze no longer holds the appender lock from begin to commit, so deletes, evictions and
//! compactions run while it writes. What it relies on must survive them: the stored blocks it
//! deduplicated against when it began (held in the index until it commits or gives up), and its
//! own block records, written but not yet published (their segment stays on disk while it is
//! in progress, even when compaction is asked to rewrite it).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{CompactOptions, Store, StoreConfig};

const LEN: u64 = 16 << 10;

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 256 << 10;
    c
}

fn compact_all(store: &Store) {
    store.seal_active().unwrap();
    let opts = CompactOptions {
        live_ratio: 1.0,
        ..CompactOptions::default()
    };
    let ids: Vec<u64> = store
        .stats()
        .unwrap()
        .segments
        .iter()
        .map(|s| s.id)
        .collect();
    let rep = store.compact_segments(&ids, &opts, &mut |_| {}).unwrap();
    assert!(rep.segments_skipped.is_empty(), "{rep:?}");
}

#[test]
fn deduplicated_blocks_outlive_a_delete_and_a_compaction_during_the_freeze() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let wk = [1u128, 2, 3, 9];
        {
            let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
            put(&store, "x", &wk[..3], LEN);
            let mut w = store.begin_window(spec("w", &wk, LEN)).unwrap();
            assert_eq!(w.blocks_to_write(), 1, "{engine_name}: 1, 2, 3 are stored");
            // The only window holding 1, 2, 3 goes, and everything is compacted...
            store.delete_window("x", None).unwrap();
            compact_all(&store);
            assert!(store.check_invariants().unwrap().is_empty());
            // ...yet the freeze that counted on them commits a window that reads back whole.
            write_block(&mut w, 3, 9, LEN);
            w.commit().unwrap();
            check(&store, "w", &wk, LEN);
            assert_eq!(store.block_refs(1).unwrap(), 1);
            assert!(store.check_invariants().unwrap().is_empty());
        }
        let (store, rep) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{engine_name}: {rep:?}");
        check(&store, "w", &wk, LEN);
        assert!(store.get("x").is_err());
        assert!(store.check_invariants().unwrap().is_empty());
    }
}

#[test]
fn a_freeze_that_gives_up_releases_what_it_held() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine).unwrap();
    put(&store, "x", &[1, 2], LEN);
    let w = store.begin_window(spec("w", &[1, 2, 3], LEN)).unwrap();
    store.delete_window("x", None).unwrap();
    // Held: still indexed (no window refers to them).
    assert_eq!(store.block_refs(1).unwrap(), 0);
    assert!(store.contains_block(1).unwrap());
    drop(w);
    assert!(!store.contains_block(1).unwrap(), "released: garbage now");
    assert!(store.check_invariants().unwrap().is_empty());
    compact_all(&store);
    assert_eq!(store.garbage_bytes().unwrap(), 0);
}

#[test]
fn a_segment_with_unpublished_records_stays_through_compaction() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let vk = [20u128, 21, 22];
        {
            let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
            put(&store, "old", &[30, 31], LEN);
            let mut v = store.begin_window(spec("v", &vk, LEN)).unwrap();
            write_block(&mut v, 0, 20, LEN);
            write_block(&mut v, 1, 21, LEN);
            // Its segment is sealed and holds garbage; compaction is asked to rewrite it.
            store.delete_window("old", None).unwrap();
            compact_all(&store);
            write_block(&mut v, 2, 22, LEN);
            v.commit().unwrap();
            check(&store, "v", &vk, LEN);
            assert!(store.check_invariants().unwrap().is_empty());
            // Published now: the next compaction may move its records and drop the segment.
            compact_all(&store);
            check(&store, "v", &vk, LEN);
            assert!(store.check_invariants().unwrap().is_empty());
        }
        let (store, rep) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{engine_name}: {rep:?}");
        check(&store, "v", &vk, LEN);
    }
}
