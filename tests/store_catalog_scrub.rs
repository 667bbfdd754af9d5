//! Scrub re-verifies the catalog too: a session record whose bytes rot on disk is written
//! again from memory (so the next open finds it, not an older one), and a rotten tombstone is
//! reported (its window could come back at the next open).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

/// Offset of the last occurrence of `needle` in `file`.
fn last_offset(file: &std::path::Path, needle: &[u8]) -> u64 {
    let data = std::fs::read(file).unwrap();
    data.windows(needle.len())
        .rposition(|w| w == needle)
        .expect("bytes in the log") as u64
}

#[test]
fn scrub_rewrites_rotten_catalog_records_and_reports_rotten_tombstones() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let record = b"session chat-42: FROZEN, window support-bot".to_vec();
        {
            let (store, _) = open(dir, &engine);
            store
                .put_meta(5, b"an older record of the same key")
                .unwrap();
            store.put_meta(5, &record).unwrap();
            put(&store, "gone-window", &keys(1, 2), 8192);
            store.delete_window("gone-window", None).unwrap();
            let clean = store.scrub_catalog().unwrap();
            assert_eq!((clean.records, clean.rewritten), (2, 0), "{name}");
            assert!(clean.bad_tombstones.is_empty());
        }
        let seg = segments(dir)[0].clone();
        flip_bit(&seg, last_offset(&seg, &record) + 3, 2);
        // The tombstone is the last record naming the window.
        flip_bit(&seg, last_offset(&seg, b"gone-window") + 1, 0);
        // Found only at the next open, the rot costs the newest record: recovery falls back to
        // the older one. Scrub, finding it while the record is still in memory, prevents that.
        let (store, _) = open(dir, &engine);
        let meta = store.meta().unwrap();
        assert_eq!(
            meta[0].1,
            b"an older record of the same key".to_vec(),
            "{name}"
        );
        drop(store);
        // Again, with the rot found while the daemon runs.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, _) = open(dir, &engine);
        store
            .put_meta(5, b"an older record of the same key")
            .unwrap();
        store.put_meta(5, &record).unwrap();
        put(&store, "gone-window", &keys(1, 2), 8192);
        store.delete_window("gone-window", None).unwrap();
        let seg = segments(dir)[0].clone();
        flip_bit(&seg, last_offset(&seg, &record) + 3, 2);
        flip_bit(&seg, last_offset(&seg, b"gone-window") + 1, 0);
        let found = store.scrub_catalog().unwrap();
        assert_eq!(found.rewritten, 1, "{name}: {found:?}");
        assert_eq!(found.bad_tombstones.len(), 1, "{found:?}");
        let again = store.scrub_catalog().unwrap();
        assert_eq!(again.rewritten, 0, "the rewritten record verifies");
        drop(store);
        let (store, _) = open(dir, &engine);
        assert_eq!(store.meta().unwrap(), vec![(5, record.clone())], "{name}");
    }
}
