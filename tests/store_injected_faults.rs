//! ENOSPC and EIO injected in the middle of a window's blocks and in its manifest, torn (short)
//! writes, and fdatasync failures: a clean typed error, no visible partial window, and the
//! store still usable afterwards (and after a reopen).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use cwm::io::fault::FaultPlan;
use cwm::io::IoEngine;
use std::sync::Arc;

const LEN: u64 = 16 * 1024;

#[test]
fn write_failures_in_blocks_and_manifest() {
    for (name, engine) in engines() {
        for errno in [libc::ENOSPC, libc::EIO] {
            for torn in [false, true] {
                // 4 blocks = write ops 0..3, the manifest = write op 4.
                for at in 0..=4u64 {
                    let tmp = tempfile::tempdir().unwrap();
                    let dir = tmp.path();
                    let f = fault(&engine);
                    let fe: Arc<dyn IoEngine> = f.clone();
                    {
                        let (store, _) = open(dir, &fe);
                        put(&store, "before", &keys(1, 2), LEN);
                        f.set_plan(FaultPlan {
                            fail_write: Some(at),
                            write_errno: errno,
                            torn,
                            ..Default::default()
                        });
                        let payloads: Vec<Vec<u8>> = keys(2, 4)
                            .iter()
                            .map(|&k| payload(k as u64, LEN as usize))
                            .collect();
                        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
                        let err = store
                            .put_window(spec("victim", &keys(2, 4), LEN), &refs)
                            .unwrap_err();
                        let want = if errno == libc::ENOSPC {
                            "NO_SPACE"
                        } else {
                            "IO_ERROR"
                        };
                        assert_eq!(err.code(), want, "{name} at {at}: {err}");
                        assert!(
                            store.get("victim").is_err(),
                            "{name}: partial window visible"
                        );
                        f.clear();
                        // Still usable: the failed segment is sealed, writes go on elsewhere.
                        put(&store, "after", &keys(3, 2), LEN);
                        check(&store, "before", &keys(1, 2), LEN);
                        check(&store, "after", &keys(3, 2), LEN);
                        put(&store, "victim", &keys(2, 4), LEN);
                    }
                    let (store, report) = open(dir, &engine);
                    assert!(report.incomplete_windows.is_empty(), "{name}: {report:?}");
                    check(&store, "before", &keys(1, 2), LEN);
                    check(&store, "after", &keys(3, 2), LEN);
                    check(&store, "victim", &keys(2, 4), LEN);
                }
            }
        }
    }
}

#[test]
fn fdatasync_failure_is_fatal_for_the_segment() {
    for (name, engine) in engines() {
        // fsync 0 = the segment header of the first segment, 1 = first window's blocks, ...
        // Count from after "before" is committed: 0 = victim's blocks, 1 = victim's manifest.
        for at in 0..=1u64 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let f = fault(&engine);
            let fe: Arc<dyn IoEngine> = f.clone();
            {
                let (store, _) = open(dir, &fe);
                put(&store, "before", &keys(1, 2), LEN);
                f.set_plan(FaultPlan {
                    fail_fsync: Some(at),
                    fsync_errno: libc::EIO,
                    ..Default::default()
                });
                let payloads: Vec<Vec<u8>> = keys(2, 3)
                    .iter()
                    .map(|&k| payload(k as u64, LEN as usize))
                    .collect();
                let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
                let err = store
                    .put_window(spec("victim", &keys(2, 3), LEN), &refs)
                    .unwrap_err();
                assert_eq!(err.code(), "IO_ERROR", "{name}: {err}");
                assert!(store.get("victim").is_err());
                let stats = store.stats().unwrap();
                assert!(
                    stats.segments.iter().any(|s| s.failed),
                    "{name}: segment not marked failed"
                );
                f.clear();
                put(&store, "after", &keys(3, 1), LEN);
            }
            let (store, _) = open(dir, &engine);
            check(&store, "before", &keys(1, 2), LEN);
            check(&store, "after", &keys(3, 1), LEN);
            // After a failed manifest fsync the manifest may or may not be on disk; if it is,
            // the window must be complete and verify.
            if store.get("victim").is_ok() {
                check(&store, "victim", &keys(2, 3), LEN);
            }
        }
    }
}

#[test]
fn read_error_bounds_the_intact_prefix() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fault(&engine);
        let fe: Arc<dyn IoEngine> = f.clone();
        let (store, _) = open(tmp.path(), &fe);
        let k = keys(1, 5);
        put(&store, "w", &k, LEN);
        let r = store.open_window("w").unwrap();
        let mut bufs: Vec<cwm::io::AlignedBuf> = (0..5)
            .map(|_| cwm::io::AlignedBuf::zeroed(r.record_len(0) as usize))
            .collect();
        // A bad sector inside block 2 (records: 4 KiB segment header, then 4 KiB + LEN each).
        let bad = 4096 + 2 * (4096 + LEN) + 5000;
        f.set_plan(FaultPlan {
            bad_sector: Some(bad),
            read_errno: libc::EIO,
            ..Default::default()
        });
        let mut imgs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        match store.read_blocks(&r, 0, &mut imgs).unwrap_err() {
            cwm::store::StoreError::Corruption {
                block,
                intact_blocks,
                detail,
                ..
            } => {
                assert_eq!((block, intact_blocks), (2, 2), "{name}");
                assert!(detail.contains("unreadable"), "{detail}");
            }
            e => panic!("{name}: {e}"),
        }
        for i in 0..2 {
            assert_eq!(
                r.payload(i, &bufs[i]),
                &payload(k[i] as u64, LEN as usize)[..]
            );
        }
        // Once the sector reads again, the whole window verifies.
        f.clear();
        check(&store, "w", &k, LEN);
    }
}
