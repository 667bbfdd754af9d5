//! Catalog records can be deleted: the key is gone at once and after a restart, a deletion of
//! a missing key says so, the key can be written again, and compaction of every segment leaves
//! neither the old records nor the deletion behind — the key stays gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::CompactOptions;

fn keys_of(store: &cwm::store::Store) -> Vec<u128> {
    let mut k: Vec<u128> = store
        .meta_with_seq()
        .unwrap()
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    k.sort_unstable();
    k
}

#[test]
fn deleted_catalog_records_stay_deleted_through_restarts_and_compaction() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut cfg = config(&dir);
    cfg.segment_size = 128 << 10;
    {
        let (store, _) = cwm::store::Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
        store.put_meta(1, br#"{"v":1}"#).unwrap();
        store.put_meta(2, br#"{"v":2}"#).unwrap();
        // Windows in between: the records of key 1 end up in different segments.
        for w in 0..6u128 {
            put(&store, &format!("w{w}"), &keys(10 + w, 2), 16384);
        }
        store.put_meta(1, br#"{"v":11}"#).unwrap();
        for w in 6..12u128 {
            put(&store, &format!("w{w}"), &keys(10 + w, 2), 16384);
        }
        assert!(store.delete_meta(1).unwrap());
        assert!(!store.delete_meta(1).unwrap(), "deleted twice");
        assert!(!store.delete_meta(99).unwrap(), "never written");
        assert_eq!(keys_of(&store), [2]);
    }
    {
        let (store, _) = cwm::store::Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
        assert_eq!(
            keys_of(&store),
            [2],
            "the deletion did not survive a restart"
        );
        // Every window deleted, everything compacted: the old records of key 1 and then its
        // deletion can go; key 1 must stay gone.
        for w in 0..12u128 {
            store.delete_window(&format!("w{w}"), None).unwrap();
        }
        let opts = CompactOptions {
            live_ratio: 1.0,
            ..Default::default()
        };
        for _ in 0..3 {
            store.compact(&opts, &mut |_| {}).unwrap();
        }
        assert!(store.check_invariants().unwrap().is_empty());
        assert_eq!(keys_of(&store), [2]);
    }
    {
        let (store, _) = cwm::store::Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
        assert_eq!(
            keys_of(&store),
            [2],
            "compaction brought a deleted key back"
        );
        store.put_meta(1, br#"{"v":3}"#).unwrap();
    }
    let (store, _) = cwm::store::Store::open_with_engine(cfg, engine).unwrap();
    let m = store.meta_with_seq().unwrap();
    let one = m
        .iter()
        .find(|(k, _, _)| *k == 1)
        .expect("key 1 written again");
    assert_eq!(one.2, br#"{"v":3}"#);
}

/// The deletion of a catalog key sits in a segment compaction empties, while an older record
/// of the key lives on in a segment compaction keeps: the deletion must be kept — also when
/// the segments were scanned at the open (no checkpoints), which is where recovery learns
/// which segments hold records of which catalog keys.
#[test]
fn a_deletion_outlives_its_segment_while_an_older_record_of_the_key_remains() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let mut cfg = config(&dir);
    cfg.segment_size = 1 << 20;
    cfg.use_checkpoints = false;
    let len = 64 << 10;
    let open = || {
        cwm::store::Store::open_with_engine(cfg.clone(), engine.clone())
            .unwrap()
            .0
    };
    {
        let store = open();
        // Segment 1: key 1 and a live window that keeps the segment from compaction.
        store.put_meta(1, br#"{"v":1}"#).unwrap();
        put(&store, "x", &keys(1, 12), len);
        // Segment 2: a window deleted again, and the deletion of key 1.
        put(&store, "d", &keys(2, 14), len);
        assert!(store.delete_meta(1).unwrap());
        store.delete_window("d", None).unwrap();
        // Segment 3: segment 2 sealed.
        put(&store, "y", &keys(3, 14), len);
        assert!(segments(&dir).len() >= 3, "{:?}", segments(&dir));
    }
    let first = segments(&dir)[0].clone();
    {
        let store = open();
        assert_eq!(keys_of(&store), Vec::<u128>::new());
        let rep = store
            .compact(
                &CompactOptions {
                    live_ratio: 0.5,
                    ..CompactOptions::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert!(!rep.segments_removed.is_empty(), "{rep:?}");
        assert!(first.exists(), "segment 1 (live) compacted: {rep:?}");
        assert_eq!(keys_of(&store), Vec::<u128>::new());
    }
    let store = open();
    assert_eq!(
        keys_of(&store),
        Vec::<u128>::new(),
        "the deleted key came back from the segment compaction kept"
    );
    check(&store, "x", &keys(1, 12), len);
}
