//! Bytes from an earlier use of a segment never validate: the header checksum is seeded with
//! the segment's generation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use std::os::unix::fs::FileExt;

#[test]
fn stale_bytes_from_an_earlier_segment_never_validate() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("old");
        let new = tmp.path().join("new");
        let used_old = {
            let (store, _) = open(&old, &engine);
            put(&store, "old-window", &keys(1, 6), 8192);
            put(&store, "old-small", &keys(2, 1), 100);
            store.stats().unwrap().used_bytes
        };
        let used_new = {
            let (store, _) = open(&new, &engine);
            put(&store, "new-window", &keys(3, 1), 8192);
            store.stats().unwrap().used_bytes
        };
        assert!(used_new < used_old);
        // Lay the old segment's bytes over the new one past its last record, at the same
        // offsets (what an earlier use of the file would have left there), and also over the
        // whole file from the first record on, in a copy.
        let old_seg = std::fs::read(&segments(&old)[0]).unwrap();
        let seg = segments(&new)[0].clone();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&old_seg[used_new as usize..used_old as usize], used_new)
            .unwrap();
        drop(f);
        let (store, report) = open(&new, &engine);
        assert_eq!(report.records, 2, "{name}: stale records were accepted");
        assert!(store.get("old-window").is_err());
        assert!(store.get("old-small").is_err());
        check(&store, "new-window", &keys(3, 1), 8192);
        drop(store);
        // Old records copied at an offset where the new segment has none: still rejected.
        let copy = tmp.path().join("copy");
        copy_dir(&new, &copy);
        let seg = segments(&copy)[0].clone();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&old_seg[4096..used_old as usize], 4096)
            .unwrap();
        drop(f);
        // The log alone (a full scan) holds no valid record any more.
        let mut full = config(&copy);
        full.use_checkpoints = false;
        let (store, report) = cwm::store::Store::open_with_engine(full, engine.clone()).unwrap();
        assert_eq!(report.windows, 0, "{name}");
        assert!(store.list().unwrap().is_empty());
        drop(store);
        // An open through the segment's checkpoint (written at the clean stop, before the
        // damage) took new-window's manifest from it; the walk after it reports that the log
        // no longer holds what the checkpoint lists, and removes the checkpoint, so the next
        // open sees the log alone again.
        let (store, report) = open(&copy, &engine);
        assert!(!report.damaged_regions.is_empty(), "{name}: {report:?}");
        assert!(store.read_window("new-window").is_err(), "{name}");
        drop(store);
        let (store, report) = open(&copy, &engine);
        assert_eq!(report.windows, 0, "{name}: {report:?}");
        assert!(store.list().unwrap().is_empty());
    }
}
