//! Scrub re-verifies the catalog too: a session record one of whose two copies rots on disk is
//! written again from memory (so it is kept twice again), and a rotten tombstone copy is
//! reported. Rot of one copy, found only at the next open, costs nothing: the other copy is
//! read, and the damage is reported.
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

const OLDER: &[u8] = b"an older record of the same key";
const RECORD: &[u8] = b"session chat-42: FROZEN, window support-bot";

/// Two catalog records of one key, and a deleted window (its tombstone).
fn populate(store: &cwm::store::Store) {
    store.put_meta(5, OLDER).unwrap();
    store.put_meta(5, RECORD).unwrap();
    put(store, "gone-window", &keys(1, 2), 8192);
    store.delete_window("gone-window", None).unwrap();
}

/// Rots one copy (the second) of the newest catalog record and of the tombstone.
fn rot(dir: &std::path::Path) {
    let seg = segments(dir)[0].clone();
    flip_bit(&seg, last_offset(&seg, RECORD) + 3, 2);
    flip_bit(&seg, last_offset(&seg, b"gone-window") + 1, 0);
}

#[test]
fn scrub_rewrites_rotten_catalog_records_and_reports_rotten_tombstones() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = open(dir, &engine);
            populate(&store);
            let clean = store.scrub_catalog().unwrap();
            assert_eq!((clean.records, clean.rewritten), (2, 0), "{name}");
            assert!(clean.bad_tombstones.is_empty());
        }
        rot(dir);
        // Found only at the next open, the rot costs nothing: the first copies are read, the
        // bad copies reported, and the deleted window stays deleted.
        let (store, report) = open(dir, &engine);
        let meta = store.meta().unwrap();
        assert_eq!(meta[0].1, RECORD.to_vec(), "{name}");
        assert_eq!(report.damaged_regions.len(), 2, "{name}: {report:?}");
        assert_eq!(store.get("gone-window").unwrap_err().code(), "NOT_FOUND");
        drop(store);
        // Again, with the rot found while the daemon runs.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (store, _) = open(dir, &engine);
        populate(&store);
        rot(dir);
        let found = store.scrub_catalog().unwrap();
        assert_eq!(found.rewritten, 1, "{name}: {found:?}");
        assert_eq!(found.bad_tombstones.len(), 1, "{found:?}");
        let again = store.scrub_catalog().unwrap();
        assert_eq!(again.rewritten, 0, "the rewritten record verifies");
        drop(store);
        let (store, _) = open(dir, &engine);
        assert_eq!(store.meta().unwrap(), vec![(5, RECORD.to_vec())], "{name}");
    }
}
