//! Torn tail: cut the log at every 4 KiB boundary inside the last window's records (and
//! zero-fill instead of cutting, as a preallocated file would look) and reopen: the earlier
//! window is intact and verified, the torn one invisible unless its manifest's first copy is
//! whole (then it is complete, and its second copy is written again), and the store keeps
//! working.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use cwm::store::Store;

#[test]
fn torn_tail_at_every_page() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let a = keys(1, 3);
        let b = keys(2, 3);
        let (start, end, seg) = {
            let (store, _) = open(&base, &engine);
            put(&store, "first", &a, 16 * 1024);
            let start = store.stats().unwrap().used_bytes;
            put(&store, "second", &b, 10 * 1024);
            let end = store.stats().unwrap().used_bytes;
            (start, end, segments(&base)[0].clone())
        };
        assert_eq!(segments(&base).len(), 1);
        let seg_name = seg.file_name().unwrap().to_owned();
        let mut cut = start;
        while cut <= end {
            for zero_fill in [false, true] {
                let d = tmp.path().join(format!("cut-{cut}-{zero_fill}"));
                copy_dir(&base, &d);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(&seg_name))
                    .unwrap();
                if zero_fill {
                    use std::os::unix::fs::FileExt;
                    let len = f.metadata().unwrap().len().max(end);
                    f.write_all_at(&vec![0u8; (len - cut) as usize], cut)
                        .unwrap();
                } else {
                    f.set_len(cut).unwrap();
                }
                drop(f);
                as_after_kill(&d);
                let (store, report) = open(&d, &engine);
                check(&store, "first", &a, 16 * 1024);
                // The manifest's second copy is the last page.
                let whole = cut >= end - 4096;
                if whole {
                    check(&store, "second", &b, 10 * 1024);
                    assert_eq!(report.torn_tails.is_empty(), cut == end, "{name} {cut}");
                } else {
                    assert_eq!(
                        store.get("second").unwrap_err().code(),
                        "NOT_FOUND",
                        "{name}: cut at {cut} exposed a torn window"
                    );
                    // Blocks of the torn window are not referenced and not deduplicated against.
                    for k in &b {
                        assert!(!store.contains_block(*k).unwrap());
                    }
                }
                assert_eq!(report.windows, if whole { 2 } else { 1 });
                // A whole window's log is whole again after the open (its manifest's second
                // copy rewritten when the cut took it), and the space accounting says so.
                let used_after_open = store.stats().unwrap().used_bytes;
                if whole {
                    assert_eq!(used_after_open, end, "{name} cut {cut}: used bytes");
                }
                // The store stays usable: the torn window can be frozen again.
                if !whole {
                    put(&store, "second", &b, 10 * 1024);
                }
                drop(store);
                let (store, report) = open(&d, &engine);
                assert!(
                    report.torn_tails.is_empty(),
                    "{name} cut {cut}: {:?}",
                    report.torn_tails
                );
                check(&store, "first", &a, 16 * 1024);
                check(&store, "second", &b, 10 * 1024);
                if whole {
                    assert_eq!(
                        store.stats().unwrap().used_bytes,
                        used_after_open,
                        "{name} cut {cut}: the accounting after a heal matches the files"
                    );
                }
            }
            cut += 4096;
        }
    }
}

#[test]
fn strict_mode_refuses_a_torn_tail() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = open(dir, &engine);
            put(&store, "first", &keys(1, 2), 8192);
            put(&store, "second", &keys(2, 2), 8192);
        }
        // Garble both copies of the manifest header of "second" (the last record).
        let seg = segments(dir)[0].clone();
        let (store, _) = open(dir, &engine);
        let used = store.stats().unwrap().used_bytes;
        drop(store);
        flip_bit(&seg, used - 2 * 4096 + 9, 3);
        flip_bit(&seg, used - 4096 + 9, 3);
        as_after_kill(dir);
        let mut cfg = config(dir);
        cfg.recovery = cwm::store::RecoveryMode::Strict;
        let err = cwm::store::Store::open_with_engine(cfg, engine.clone())
            .err()
            .unwrap();
        assert_eq!(err.code(), "CORRUPTION");
        assert!(err.to_string().contains("strict"), "{err}");
        let (store, report) = open(dir, &engine);
        assert_eq!(report.torn_tails.len(), 1);
        check(&store, "first", &keys(1, 2), 8192);
        assert!(store.get("second").is_err());
    }
}

/// The manifest's second copy is rewritten at open only where the newest segment keeps a page
/// to spare after it; in a segment that the rewrite would fill up, the window stays whole
/// with its one intact copy and the segment is not written past its end.
#[test]
fn a_missing_copy_is_not_rewritten_into_a_segment_without_room() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (keys(1, 3), keys(2, 3));
        let write = |dir: &std::path::Path, segment_size: u64| {
            let mut c = config(dir);
            c.segment_size = segment_size;
            let (store, _) = Store::open_with_engine(c, engine.clone()).unwrap();
            put(&store, "first", &a, 16 * 1024);
            put(&store, "second", &b, 10 * 1024);
            store.stats().unwrap().used_bytes
        };
        let end = write(&tmp.path().join("probe"), 4 << 20);
        // A segment one page longer than the log: cut the last page (the manifest's second
        // copy) and the open finds the copy missing with exactly two pages left.
        let size = end + 4096;
        let d = tmp.path().join("tight");
        assert_eq!(
            write(&d, size),
            end,
            "{name}: same layout in the tight segment"
        );
        assert_eq!(segments(&d).len(), 1, "{name}");
        let seg = segments(&d)[0].clone();
        cut_to(&seg, end - 4096);
        let mut c = config(&d);
        c.segment_size = size;
        let (store, report) = Store::open_with_engine(c, engine.clone()).unwrap();
        assert_eq!(report.windows, 2, "{name}");
        check(&store, "first", &a, 16 * 1024);
        check(&store, "second", &b, 10 * 1024);
        assert_eq!(
            store.stats().unwrap().used_bytes,
            end - 4096,
            "{name}: no copy rewritten without a page to spare"
        );
        assert!(std::fs::metadata(&seg).unwrap().len() <= size, "{name}");
    }
}

/// A missing manifest copy rewritten at open is part of the active segment's record list:
/// the checkpoint a clean stop then writes tiles the segment up to its frontier, so the next
/// open uses it (and finds both windows whole) instead of ignoring it and scanning.
#[test]
fn a_rewritten_copy_is_in_the_checkpoint_of_the_next_clean_stop() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (keys(1, 3), keys(2, 3));
        let d = tmp.path().join("d");
        let end = {
            let (store, _) = open(&d, &engine);
            put(&store, "first", &a, 16 * 1024);
            put(&store, "second", &b, 10 * 1024);
            store.stats().unwrap().used_bytes
        };
        // The manifest's second copy (the last page) never reached the file.
        cut_to(&segments(&d)[0], end - 4096);
        {
            let (store, _) = open(&d, &engine);
            assert_eq!(
                store.stats().unwrap().used_bytes,
                end,
                "{name}: the copy is written again"
            );
        }
        let (store, report) = open(&d, &engine);
        assert_eq!(report.windows, 2, "{name}");
        assert!(
            report.ignored_checkpoints.is_empty(),
            "{name}: {:?}",
            report.ignored_checkpoints
        );
        assert_eq!(report.checkpointed_segments, 1, "{name}: {report:?}");
        check(&store, "first", &a, 16 * 1024);
        check(&store, "second", &b, 10 * 1024);
        // Appends go on right after the rewritten copy; the next open finds three whole
        // windows and no damage (a frontier set wrong by the rewrite would misplace them).
        let c = keys(3, 2);
        put(&store, "third", &c, 8 * 1024);
        drop(store);
        as_after_kill(&d);
        let (store, report) = open(&d, &engine);
        assert_eq!(report.windows, 3, "{name}: {report:?}");
        assert!(report.damaged_regions.is_empty(), "{name}: {report:?}");
        assert!(report.torn_tails.is_empty(), "{name}: {report:?}");
        check(&store, "third", &c, 8 * 1024);
        check(&store, "first", &a, 16 * 1024);
    }
}

/// The open that writes a torn-off second copy again puts the segment's frontier right after
/// it: the same session's next freeze goes there (no new segment, no gap), and the next open
/// finds every window whole and no damage.
#[test]
fn the_session_that_rewrites_a_copy_appends_right_after_it() {
    let (name, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (keys(1, 3), keys(2, 3), keys(3, 2));
    let d = tmp.path().join("d");
    let end = {
        let (store, _) = open(&d, &engine);
        put(&store, "first", &a, 16 * 1024);
        put(&store, "second", &b, 10 * 1024);
        store.stats().unwrap().used_bytes
    };
    cut_to(&segments(&d)[0], end - 4096);
    {
        let (store, _) = open(&d, &engine);
        assert_eq!(store.stats().unwrap().used_bytes, end, "{name}");
        put(&store, "third", &c, 8 * 1024);
        assert_eq!(segments(&d).len(), 1, "{name}: the next freeze rotated");
        assert!(store.stats().unwrap().used_bytes > end, "{name}");
    }
    as_after_kill(&d);
    let (store, report) = open(&d, &engine);
    assert_eq!(report.windows, 3, "{name}: {report:?}");
    assert!(report.damaged_regions.is_empty(), "{name}: {report:?}");
    assert!(report.torn_tails.is_empty(), "{name}: {report:?}");
    check(&store, "first", &a, 16 * 1024);
    check(&store, "second", &b, 10 * 1024);
    check(&store, "third", &c, 8 * 1024);
}

/// Cuts the file at `path` to `len` bytes.
fn cut_to(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}
