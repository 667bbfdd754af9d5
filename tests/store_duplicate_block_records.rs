//! An original block record and its compaction copy (a crash between a compaction's copy and
//! the removal of its source leaves both): recovery reads the newest one whose bytes verify,
//! so a damaged copy costs nothing while the original is intact — the same choice for every
//! window that holds the block.
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
