//! Resynchronising after damage looks for the next record that can continue the log — a valid
//! header of this segment, with a sequence number above the last one read, whose record fits
//! in the segment — and nothing else. Decoys inside a damaged region (another segment's
//! record, an old sequence number, a record running past the end) do not split the region;
//! a lone record in the last page after unwritten space is found; bytes that are no record
//! after a zeroed page are a torn tail, not a clean end; records missing without damage are
//! a sequence gap reported exactly where they were.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::format::{record_len, RecordHeader, SegmentHeader, PAGE};
use std::path::{Path, PathBuf};

const P: usize = PAGE as usize;

fn reopen(dir: &Path) -> (cwm::store::Store, cwm::store::RecoveryReport) {
    open_scanned(dir)
}

struct Rec {
    off: usize,
    len: usize,
    h: RecordHeader,
}

/// Three windows of two 8 KiB blocks each in the one (active) segment; its bytes, generation
/// and records in order (a metadata record's second copy is a record of its own here).
fn build(dir: &Path) -> (PathBuf, Vec<u8>, u64, Vec<Rec>) {
    {
        let (store, _) = reopen(dir);
        for i in 0..3u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 2), 8192);
        }
    }
    let seg = segments(dir).pop().unwrap();
    let b = std::fs::read(&seg).unwrap();
    let gen = SegmentHeader::decode(&b[..P]).unwrap().generation;
    let mut recs = Vec::new();
    let mut off = 2 * P;
    while let Ok(h) = RecordHeader::decode(&b[off..off + P], gen) {
        let len = record_len(h.payload_len) as usize;
        recs.push(Rec { off, len, h });
        off += len;
    }
    assert!(recs.len() >= 9, "{}", recs.len());
    (seg, b, gen, recs)
}

/// The middle window's first block record (a two-page payload after its header page).
fn victim(recs: &[Rec]) -> usize {
    recs.iter()
        .position(|r| r.h.key == keys(2, 2)[0])
        .expect("w1's first block")
}

fn regions(rep: &cwm::store::RecoveryReport) -> Vec<(u64, u64)> {
    rep.damaged_regions.iter().map(|d| (d.1, d.2)).collect()
}

#[test]
fn decoys_inside_a_damaged_region_do_not_split_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, orig, gen, recs) = build(tmp.path());
    let k = victim(&recs);
    assert!(recs[k].len >= 3 * P);
    let (from, to) = (recs[k].off as u64, recs[k + 1].off as u64);
    let last_seq = recs[k - 1].h.seq;
    let big = recs.last().unwrap().h.seq + 1000;
    let decoys = [
        ("another segment's record", {
            let mut h = recs[k].h;
            h.segment_id += 1;
            h.seq = big;
            h
        }),
        ("an old sequence number", {
            let mut h = recs[k].h;
            h.seq = last_seq;
            h
        }),
        ("a record running past the end", {
            let mut h = recs[k].h;
            h.seq = big;
            h.payload_len = 1 << 40;
            h
        }),
    ];
    for (what, d) in decoys {
        let mut b = orig.clone();
        b[recs[k].off..recs[k].off + P].fill(0);
        d.encode(gen, &mut b[recs[k].off + P..recs[k].off + 2 * P]);
        std::fs::write(&seg, &b).unwrap();
        let (store, rep) = reopen(tmp.path());
        assert_eq!(regions(&rep), vec![(from, to)], "{what}: {rep:?}");
        check(&store, "w0", &keys(1, 2), 8192);
        check(&store, "w2", &keys(3, 2), 8192);
        assert!(rep.incomplete_windows.contains(&"w1".to_string()), "{what}");
        drop(store);
        std::fs::write(&seg, &orig).unwrap();
    }
}

#[test]
fn a_lone_record_in_the_last_page_after_unwritten_space_is_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, mut b, gen, recs) = build(tmp.path());
    let last = recs.last().unwrap();
    let end_of_log = (last.off + last.len) as u64;
    assert_eq!(b.len(), 4 << 20, "preallocated");
    // The newest window's manifest again, one sequence number on, alone in the last page.
    let m = recs
        .iter()
        .rev()
        .find(|r| r.len == P && !r.h.ditto && r.h.kind == cwm::store::format::RecordKind::Manifest)
        .expect("a one-page manifest");
    let mut h = m.h;
    h.seq = last.h.seq + 1;
    let mut page = b[m.off..m.off + P].to_vec();
    h.encode(gen, &mut page);
    let at = b.len() - P;
    b[at..].copy_from_slice(&page);
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(tmp.path());
    assert_eq!(regions(&rep), vec![(end_of_log, at as u64)], "{rep:?}");
    for i in 0..3u128 {
        check(&store, &format!("w{i}"), &keys(i + 1, 2), 8192);
    }
}

#[test]
fn bytes_that_are_no_record_after_a_zeroed_page_are_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, mut b, _, recs) = build(tmp.path());
    let last = recs.last().unwrap();
    let end_of_log = last.off + last.len;
    // A zeroed page, then a page of bytes that decode as nothing.
    for (i, x) in b[end_of_log + P..end_of_log + 2 * P].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(7) | 1;
    }
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(tmp.path());
    assert_eq!(rep.torn_tails.len(), 1, "{rep:?}");
    assert_eq!(rep.torn_tails[0].1, end_of_log as u64, "{rep:?}");
    assert!(rep.torn_tails[0].2.contains("no record"), "{rep:?}");
    for i in 0..3u128 {
        check(&store, &format!("w{i}"), &keys(i + 1, 2), 8192);
    }
}

#[test]
fn records_missing_without_damage_are_a_gap_reported_where_they_were() {
    let tmp = tempfile::tempdir().unwrap();
    let (seg, b, _, recs) = build(tmp.path());
    let k = victim(&recs);
    // The record cut out of the file, everything after it moved up.
    let mut cut = b[..recs[k].off].to_vec();
    cut.extend_from_slice(&b[recs[k].off + recs[k].len..]);
    std::fs::write(&seg, &cut).unwrap();
    let (store, rep) = reopen(tmp.path());
    let at = recs[k].off as u64;
    assert_eq!(regions(&rep), vec![(at, at)], "{rep:?}");
    assert!(rep.damaged_regions[0].3.contains("sequence gap"), "{rep:?}");
    assert!(
        rep.incomplete_windows.contains(&"w1".to_string()),
        "{rep:?}"
    );
    check(&store, "w0", &keys(1, 2), 8192);
    check(&store, "w2", &keys(3, 2), 8192);
}
