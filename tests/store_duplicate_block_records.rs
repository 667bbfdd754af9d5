//! An original block record and its compaction copy (a crash between a compaction's copy and
//! the removal of its source leaves both): recovery reads the newest one whose bytes verify,
//! so a damaged copy costs nothing while the original is intact — also among three copies
//! (two crashes inside compactions of one record). A key deleted and written again with other
//! bytes, a copy of its old record beside the new one, resolves to the new record.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::format::{record_len, RecordHeader, SegmentHeader, PAGE};
use std::path::Path;

const P: usize = PAGE as usize;

fn reopen(dir: &Path) -> (cwm::store::Store, cwm::store::RecoveryReport) {
    open_scanned(dir)
}

#[test]
fn a_damaged_compaction_copy_falls_back_to_its_intact_original() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (store, _) = reopen(dir);
        put(&store, "a", &keys(1, 3), 8192);
        // A second window holding the same blocks (and one more).
        let mut k = keys(1, 3);
        k.push(keys(9, 1)[0]);
        put(&store, "b", &k, 8192);
    }
    let seg = segments(dir).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let gen = SegmentHeader::decode(&b[..P]).unwrap().generation;
    let mut off = 2 * P;
    let mut recs = Vec::new();
    while let Ok(h) = RecordHeader::decode(&b[off..off + P], gen) {
        let len = record_len(h.payload_len) as usize;
        recs.push((off, len, h));
        off += len;
    }
    let end = off;
    // Window a's second block, copied to the end of the log as compaction copies it.
    let (o, len, h) = *recs
        .iter()
        .find(|(_, _, h)| h.key == keys(1, 3)[1])
        .unwrap();
    let copy = RecordHeader { copied: true, ..h };
    let mut rec = b[o..o + len].to_vec();
    copy.encode(gen, &mut rec[..P]);
    // The copy's payload damaged; its header intact.
    rec[P + 100] ^= 0x40;
    b[end..end + len].copy_from_slice(&rec);
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(dir);
    assert!(rep.incomplete_windows.is_empty(), "{rep:?}");
    check(&store, "a", &keys(1, 3), 8192);
    let mut k = keys(1, 3);
    k.push(keys(9, 1)[0]);
    check(&store, "b", &k, 8192);
    drop(store);
    // The copy intact and the original damaged: the copy serves.
    let mut b2 = b.clone();
    b2[end + P + 100] ^= 0x40;
    b2[o + P + 100] ^= 0x40;
    std::fs::write(&seg, &b2).unwrap();
    let (store, rep) = reopen(dir);
    assert!(rep.incomplete_windows.is_empty(), "{rep:?}");
    check(&store, "a", &keys(1, 3), 8192);
    check(&store, "b", &k, 8192);
}

/// The records of segment `seg`: (offset, length, header).
fn records(b: &[u8], gen: u64) -> Vec<(usize, usize, RecordHeader)> {
    let mut off = 2 * P;
    let mut v = Vec::new();
    while let Ok(h) = RecordHeader::decode(&b[off..off + P], gen) {
        let len = record_len(h.payload_len) as usize;
        v.push((off, len, h));
        off += len;
    }
    v
}

/// Appends a compaction copy of the record at `o` after the last record (optionally damaged).
fn append_copy(b: &mut [u8], gen: u64, o: usize, len: usize, h: RecordHeader, damage: bool) {
    let end = records(b, gen).last().map_or(2 * P, |(o, l, _)| o + l);
    let mut rec = b[o..o + len].to_vec();
    RecordHeader { copied: true, ..h }.encode(gen, &mut rec[..P]);
    if damage {
        rec[P + 100] ^= 0x40;
    }
    b[end..end + len].copy_from_slice(&rec);
}

#[test]
fn of_three_copies_the_newest_intact_one_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (store, _) = reopen(dir);
        put(&store, "a", &keys(1, 3), 8192);
    }
    let seg = segments(dir).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let gen = SegmentHeader::decode(&b[..P]).unwrap().generation;
    let (o, len, h) = *records(&b, gen)
        .iter()
        .find(|(_, _, h)| h.key == keys(1, 3)[1])
        .unwrap();
    // Two compactions' copies (two crashes before their sources went): the newest damaged.
    append_copy(&mut b, gen, o, len, h, false);
    append_copy(&mut b, gen, o, len, h, true);
    // The original damaged too: only the middle copy verifies.
    b[o + P + 100] ^= 0x40;
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(dir);
    assert!(rep.incomplete_windows.is_empty(), "{rep:?}");
    check(&store, "a", &keys(1, 3), 8192);
}

#[test]
fn a_key_written_again_after_a_delete_is_resolved_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k = keys(1, 2);
    {
        let (store, _) = reopen(dir);
        put(&store, "a", &k, 8192);
        store.delete_window("a", None).unwrap();
        // The same keys again, other bytes (a different length): new records.
        put(&store, "b", &k, 4096);
    }
    let seg = segments(dir).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let gen = SegmentHeader::decode(&b[..P]).unwrap().generation;
    // A compaction copy of a's first block record (still in the log beside its tombstone).
    let (o, len, h) = *records(&b, gen)
        .iter()
        .find(|(_, _, h)| h.key == k[0] && h.payload_len == 8192)
        .unwrap();
    append_copy(&mut b, gen, o, len, h, false);
    std::fs::write(&seg, &b).unwrap();
    let (store, rep) = reopen(dir);
    assert!(rep.incomplete_windows.is_empty(), "{rep:?}");
    check(&store, "b", &k, 4096);
}
