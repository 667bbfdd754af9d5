//! The two header pages of a segment, case by case: bytes after a version 2 header are damage;
//! a copy that differs is damage over exactly page 1; a seal torn between its two header
//! writes (page 0 sealed, page 1 still as created) is healed without a report; a version 1
//! segment (one header page, records from page 1) opens without reading a copy; a zeroed
//! page 0 over a copy that is no version 2 header fails the open. And what `fsck --repair`
//! sets aside: a segment bearing another segment's header, an older segment whose header
//! pages are zeroed — but not the newest one when nothing was appended to it. `verify_log`
//! reports copies that differ.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::format::SegmentHeader;
use std::path::Path;

const PAGE: usize = 4096;

fn reopen(dir: &Path) -> (cwm::store::Store, cwm::store::RecoveryReport) {
    open_scanned(dir)
}

fn header(bytes: &[u8], at: usize) -> SegmentHeader {
    SegmentHeader::decode(&bytes[at..at + PAGE]).expect("header")
}

/// A data dir with one window `w` in one (active) segment.
fn one_window(dir: &Path) -> std::path::PathBuf {
    let (store, _) = reopen(dir);
    put(&store, "w", &keys(1, 3), 8192);
    drop(store);
    segments(dir).pop().expect("a segment")
}

#[test]
fn bytes_after_a_version_2_header_in_page_0_are_damage_and_the_copy_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let mut b = std::fs::read(&seg).unwrap();
    assert!(header(&b, 0).version >= 2);
    b[SegmentHeader::LEN + 10] = 0xAA;
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(tmp.path());
    check(&store, "w", &keys(1, 3), 8192);
    let r: Vec<(u64, u64)> = rep.damaged_regions.iter().map(|d| (d.1, d.2)).collect();
    assert_eq!(r, vec![(0, PAGE as u64)], "{rep:?}");
    assert!(
        rep.damaged_regions[0].3.contains("non-zero bytes"),
        "{rep:?}"
    );
}

#[test]
fn a_header_copy_that_differs_is_damage_over_exactly_page_1() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let mut b = std::fs::read(&seg).unwrap();
    let mut h = header(&b, PAGE);
    assert_eq!(h.sealed_len, 0, "the active segment is not sealed");
    h.created_unix_ms += 1;
    h.encode(&mut b[PAGE..2 * PAGE]);
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(tmp.path());
    check(&store, "w", &keys(1, 3), 8192);
    let r: Vec<(u64, u64)> = rep.damaged_regions.iter().map(|d| (d.1, d.2)).collect();
    assert_eq!(r, vec![(PAGE as u64, 2 * PAGE as u64)], "{rep:?}");
    assert!(rep.damaged_regions[0].3.contains("differs"), "{rep:?}");
    // Reported, not rewritten: which copy is right is not for the open to guess.
    drop(store);
    assert_eq!(
        std::fs::read(&seg).unwrap()[PAGE..2 * PAGE],
        b[PAGE..2 * PAGE]
    );
}

#[test]
fn a_seal_torn_between_its_two_header_writes_is_healed_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (store, _) = reopen(dir);
        for i in 0..80u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 1), 64 << 10);
        }
    }
    let segs = segments(dir);
    assert!(segs.len() >= 2, "{segs:?}");
    let seg = &segs[0];
    let mut b = std::fs::read(seg).unwrap();
    let sealed = header(&b, 0);
    assert!(sealed.sealed_len > 0, "{sealed:?}");
    // A crash after page 0 took the seal and before page 1 did.
    SegmentHeader {
        sealed_len: 0,
        ..sealed
    }
    .encode(&mut b[PAGE..2 * PAGE]);
    std::fs::write(seg, &b).unwrap();
    let (store, rep) = reopen(dir);
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    assert_eq!(store.list().unwrap().len(), 80);
    drop(store);
    let after = std::fs::read(seg).unwrap();
    assert_eq!(
        after[PAGE..2 * PAGE],
        after[..PAGE],
        "the copy is written again"
    );
}

#[test]
fn a_version_1_segment_opens_without_looking_for_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let b = std::fs::read(&seg).unwrap();
    // The same records under a version 1 header: one header page, records from page 1.
    let mut v1 = b[..PAGE].to_vec();
    SegmentHeader {
        version: 1,
        ..header(&b, 0)
    }
    .encode(&mut v1[..PAGE]);
    v1.extend_from_slice(&b[2 * PAGE..]);
    std::fs::write(&seg, &v1).unwrap();
    let (store, rep) = reopen(tmp.path());
    check(&store, "w", &keys(1, 3), 8192);
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    assert!(rep.damaged_records.is_empty(), "{rep:?}");
}

#[test]
fn a_zeroed_page_0_over_a_copy_that_is_no_version_2_header_fails_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let mut b = std::fs::read(&seg).unwrap();
    let h = header(&b, 0);
    b[..PAGE].fill(0);
    SegmentHeader { version: 1, ..h }.encode(&mut b[PAGE..2 * PAGE]);
    std::fs::write(&seg, &b).unwrap();
    let (_, engine) = engines().remove(0);
    let err = cwm::store::Store::open_with_engine(no_checkpoints(tmp.path()), engine)
        .err()
        .expect("refused");
    assert_eq!(err.code(), "CORRUPTION", "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), b, "nothing rewritten");
}

/// Three segments of windows `w0..w79`; returns their paths.
fn three_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    {
        let (store, _) = reopen(dir);
        for i in 0..130u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 1), 64 << 10);
        }
    }
    let segs = segments(dir);
    assert!(segs.len() >= 3, "{segs:?}");
    segs
}

/// The id of the newest of `segs` (from its file name).
fn newest_id(segs: &[std::path::PathBuf]) -> u64 {
    let last = segs.last().unwrap().file_name().unwrap().to_string_lossy();
    last["segment-".len()..last.len() - ".log".len()]
        .parse()
        .unwrap()
}

fn repair(dir: &Path) -> Vec<String> {
    cwm::fsck::repair(no_checkpoints(dir), &|_, _, _| {})
        .expect("repair")
        .changes
}

#[test]
fn repair_sets_aside_a_segment_bearing_another_segments_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let segs = three_segments(dir);
    // The middle segment's file, renamed past the newest: its header names its old id.
    let n = newest_id(&segs);
    let moved = dir.join(format!("segment-{:010}.log", n + 5));
    std::fs::rename(&segs[1], &moved).unwrap();
    let changes = repair(dir);
    let all = changes.join("\n");
    assert!(all.contains("has the header of segment"), "{all}");
    assert!(moved.with_extension("log.damaged").exists(), "{all}");
    let (store, _) = reopen(dir);
    assert!(store.check_invariants().unwrap().is_empty());
}

#[test]
fn repair_sets_aside_an_older_segment_whose_header_pages_are_zeroed_and_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let segs = three_segments(dir);
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::write(&segs[1], vec![0u8; len as usize]).unwrap();
    let all = repair(dir).join("\n");
    assert!(all.contains("invalid header"), "{all}");
    assert!(segs[1].with_extension("log.damaged").exists(), "{all}");
    let (store, _) = reopen(dir);
    assert!(store.check_invariants().unwrap().is_empty());
}

#[test]
fn repair_leaves_a_newest_segment_created_but_never_written_to_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let segs = three_segments(dir);
    let n = newest_id(&segs);
    // A crash while creating the next segment: its file exists, all zeros.
    let fresh = dir.join(format!("segment-{:010}.log", n + 1));
    std::fs::write(&fresh, vec![0u8; 4 << 20]).unwrap();
    let all = repair(dir).join("\n");
    assert!(!all.contains("set aside"), "{all}");
    assert!(!fresh.with_extension("log.damaged").exists(), "{all}");
    let (store, _) = reopen(dir);
    assert_eq!(store.list().unwrap().len(), 130);
    assert!(store.check_invariants().unwrap().is_empty());
}

#[test]
fn a_zeroed_header_copy_is_damage_over_exactly_page_1() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let mut b = std::fs::read(&seg).unwrap();
    b[PAGE..2 * PAGE].fill(0);
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(tmp.path());
    check(&store, "w", &keys(1, 3), 8192);
    let r: Vec<(u64, u64)> = rep.damaged_regions.iter().map(|d| (d.1, d.2)).collect();
    assert_eq!(r, vec![(PAGE as u64, 2 * PAGE as u64)], "{rep:?}");
    assert!(rep.damaged_regions[0].3.contains("copy"), "{rep:?}");
}

/// `verify_log` (fsck, the damage sweep) compares the two copies too: a copy that verifies on
/// its own but says something else than page 0 is reported.
#[test]
fn verify_log_reports_header_copies_that_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = one_window(tmp.path());
    let (store, rep) = reopen(tmp.path());
    assert!(rep.damaged_regions.is_empty(), "{rep:?}");
    assert!(store.verify_log().unwrap().is_empty());
    let mut b = std::fs::read(&seg).unwrap();
    let mut h = header(&b, PAGE);
    h.created_unix_ms += 1;
    h.encode(&mut b[PAGE..2 * PAGE]);
    std::fs::write(&seg, &b).unwrap();
    let problems = store.verify_log().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].offset, PAGE as u64, "{problems:?}");
    assert!(problems[0].what.contains("differ"), "{problems:?}");
}
