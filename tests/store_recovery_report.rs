//! What recovery counts and refuses, exactly (a mutation run left these unchecked): the
//! report's segment, record and window counts and the bytes a torn tail cost; a segment file
//! whose header names another segment; the size boundaries of a crash while creating the
//! newest segment; recovery modes parsed strictly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::{RecoveryMode, Store};

/// A fresh directory of 12 windows "w0".."w11", each two blocks of the returned length, over
/// two 4 MiB segments (the first sealed at rotation), closed; and the engine.
fn two_segments() -> (
    tempfile::TempDir,
    std::sync::Arc<dyn cwm::io::IoEngine>,
    u64,
) {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let len = 256 << 10;
    let (store, _) = open(tmp.path(), &engine);
    for i in 0..12u128 {
        put(&store, &format!("w{i}"), &keys(i + 1, 2), len);
    }
    (tmp, engine, len)
}

/// A fresh directory holding one window "w" of two blocks, closed; and the engine.
fn one_window() -> (tempfile::TempDir, std::sync::Arc<dyn cwm::io::IoEngine>) {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &engine);
    put(&store, "w", &keys(1, 2), 8192);
    (tmp, engine)
}

#[test]
fn the_report_counts_segments_records_windows_and_cut_bytes() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let len = 256 << 10;
        {
            let (store, report) = open(dir, &engine);
            assert_eq!((report.segments, report.records, report.windows), (0, 0, 0));
            // 4 MiB segments: 12 windows of 2 blocks (plus a manifest) span two segments.
            for i in 0..12u128 {
                put(&store, &format!("w{i}"), &keys(i + 1, 2), len);
            }
        }
        let segs = segments(dir);
        assert_eq!(segs.len(), 2, "{name}");
        let (store, report) = open(dir, &engine);
        assert_eq!(report.segments, 2, "{name}");
        // 24 block records and 12 manifests (each one record of two copies).
        assert_eq!(report.records, 36, "{name}");
        assert_eq!(report.windows, 12, "{name}");
        assert_eq!(report.truncated_bytes, 0, "{name}");
        assert!(report.torn_tails.is_empty() && report.damaged_regions.is_empty());
        let used = store.stats().unwrap().used_bytes;
        drop(store);
        // Garble the header page of the last window's manifest (both copies: the log then ends
        // at that record, a torn tail). The cut bytes are counted exactly: from that offset to
        // the end of the (preallocated) newest segment file.
        let last = segs[1].clone();
        let file_len = std::fs::metadata(&last).unwrap().len();
        let seg_used = used - std::fs::metadata(&segs[0]).unwrap().len();
        let manifest_at = seg_used - 2 * 4096;
        flip_bit(&last, manifest_at + 8, 0);
        flip_bit(&last, manifest_at + 4096 + 8, 0);
        as_after_kill(dir);
        let (_, report) = open(dir, &engine);
        assert_eq!(report.torn_tails.len(), 1, "{name}: {report:?}");
        assert_eq!(report.torn_tails[0].1, manifest_at, "{name}");
        assert_eq!(report.truncated_bytes, file_len - manifest_at, "{name}");
        assert_eq!(report.windows, 11, "{name}");
    }
}

#[test]
fn a_segment_file_holding_another_segments_header_is_refused() {
    let (tmp, engine) = one_window();
    let dir = tmp.path();
    let seg = segments(dir)[0].clone();
    // Segment 1's file renamed as segment 7: its header (both copies) still says 1.
    std::fs::rename(&seg, dir.join("segment-0000000007.log")).unwrap();
    let err = Store::open_with_engine(config(dir), engine.clone())
        .err()
        .expect("refused");
    assert_eq!(err.code(), "CORRUPTION");
    assert!(err.to_string().contains("another segment"), "{err}");
}

#[test]
fn newest_segment_files_of_zero_one_and_two_pages_of_zeros_are_crashes_at_creation() {
    for pages in [0u64, 1, 2, 3] {
        let (tmp, engine) = one_window();
        let dir = tmp.path();
        let next = dir.join("segment-0000000002.log");
        let f = std::fs::File::create(&next).unwrap();
        f.set_len(pages * 4096).unwrap();
        drop(f);
        let (store, report) = open(dir, &engine);
        assert_eq!(report.removed_empty_segments, vec![2], "{pages} pages");
        assert!(!next.exists());
        check(&store, "w", &keys(1, 2), 8192);
    }
    // Part of a page, not zero: no crash leaves that; refused, never removed.
    let (tmp, engine) = one_window();
    let dir = tmp.path();
    let next = dir.join("segment-0000000002.log");
    std::fs::write(&next, vec![7u8; 2048]).unwrap();
    assert!(Store::open_with_engine(config(dir), engine.clone()).is_err());
    assert!(next.exists());
}

#[test]
fn recovery_modes_parse_strictly() {
    assert_eq!("strict".parse::<RecoveryMode>(), Ok(RecoveryMode::Strict));
    assert_eq!(
        "tolerate-tail".parse::<RecoveryMode>(),
        Ok(RecoveryMode::TolerateTail)
    );
    for bad in ["", "Strict", "tolerate", "lenient"] {
        assert!(bad.parse::<RecoveryMode>().is_err(), "{bad:?}");
    }
}

#[test]
fn an_empty_segment_file_that_is_not_the_newest_is_refused_never_removed() {
    let (tmp, engine) = one_window();
    let dir = tmp.path();
    // Segment 1 holds the window; an all-zero segment 0 before it is no crash at creation
    // (only the newest segment can be one).
    let zero = dir.join("segment-0000000000.log");
    std::fs::write(&zero, vec![0u8; 3 * 4096]).unwrap();
    let err = Store::open_with_engine(config(dir), engine.clone())
        .err()
        .expect("refused");
    assert_eq!(err.code(), "CORRUPTION", "{err}");
    assert!(zero.exists(), "removed");
}

#[test]
fn a_newest_segment_with_zeroed_headers_and_a_record_in_its_last_page_is_kept() {
    let (tmp, engine) = one_window();
    let dir = tmp.path();
    // Three pages: both header pages zero, the first record page (the file's last) not.
    let next = dir.join("segment-0000000002.log");
    let mut bytes = vec![0u8; 3 * 4096];
    bytes[2 * 4096..2 * 4096 + 4].copy_from_slice(b"CWMR");
    std::fs::write(&next, &bytes).unwrap();
    assert!(Store::open_with_engine(config(dir), engine.clone()).is_err());
    assert_eq!(std::fs::read(&next).unwrap(), bytes, "untouched");
}

#[test]
fn a_tombstone_stays_while_a_segment_read_at_open_holds_a_manifest_it_shadows() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut cfg = cwm::store::StoreConfig::new(dir);
        cfg.segment_size = 1 << 20;
        let open = || {
            Store::open_with_engine(cfg.clone(), engine.clone())
                .unwrap()
                .0
        };
        let len = 64 << 10;
        {
            let store = open();
            // Segment 1: W (kept alive by X beside it), then enough to seal segment 2, in
            // which W's tombstone lies among dead data.
            put(&store, "w", &keys(1, 1), len);
            put(&store, "x", &keys(2, 12), len);
            put(&store, "junk", &keys(3, 12), len);
            store.delete_window("w", None).unwrap();
            store.delete_window("junk", None).unwrap();
            put(&store, "y", &keys(4, 14), len);
            assert!(segments(dir).len() >= 3, "{name}");
        }
        // Reopened: what segment 1 holds (W's manifest) is known from the scan alone. Compacting
        // segment 2 must keep W's tombstone, or W comes back at the next open.
        let store = open();
        let rep = store
            .compact(
                &cwm::store::CompactOptions {
                    live_ratio: 0.5,
                    ..Default::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert!(rep.segments_removed.contains(&2), "{name}: {rep:?}");
        drop(store);
        let store = open();
        assert_eq!(store.get("w").unwrap_err().code(), "NOT_FOUND", "{name}");
        check(&store, "x", &keys(2, 12), len);
    }
}

#[test]
fn a_sealed_segments_torn_tail_is_cut_once() {
    let (tmp, engine, len) = two_segments();
    let dir = tmp.path();
    let first = segments(dir)[0].clone();
    let sealed = std::fs::metadata(&first).unwrap().len();
    // Bytes that are no record after the sealed end (a torn write past the last record).
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&first)
            .unwrap();
        f.write_all(&[0xA5u8; 4096]).unwrap();
    }
    let (_, report) = open(dir, &engine);
    assert_eq!(report.torn_tails.len(), 1, "{report:?}");
    assert_eq!(report.torn_tails[0].0, 1);
    assert_eq!(std::fs::metadata(&first).unwrap().len(), sealed, "cut back");
    let (store, report) = open(dir, &engine);
    assert!(report.torn_tails.is_empty(), "cut once: {report:?}");
    check(&store, "w0", &keys(1, 2), len);
}

#[test]
fn a_newest_segment_sealed_at_rotation_is_never_appended_to_again() {
    let (tmp, engine, _) = two_segments();
    let dir = tmp.path();
    let segs = segments(dir);
    assert_eq!(segs.len(), 2);
    // The second segment goes (as if never created): the first, sealed at rotation with room
    // left, is the newest now.
    std::fs::remove_file(&segs[1]).unwrap();
    let sealed = std::fs::metadata(&segs[0]).unwrap().len();
    assert!(sealed + 4096 < 4 << 20, "room left in the sealed segment");
    let (store, _) = open(dir, &engine);
    put(&store, "after", &keys(99, 1), 8192);
    drop(store);
    assert_eq!(
        std::fs::metadata(&segs[0]).unwrap().len(),
        sealed,
        "appended to a sealed segment"
    );
    let (store, report) = open(dir, &engine);
    assert!(report.damaged_regions.is_empty(), "{report:?}");
    check(&store, "after", &keys(99, 1), 8192);
}
