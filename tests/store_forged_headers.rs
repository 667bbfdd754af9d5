//! Record headers that verify but must not be taken as they are (mutation testing found the
//! scan's guards untested): a header naming another segment, a jump in the sequence numbers
//! with no hole to explain it, and a page whose header bytes are zero but whose rest is not.
//! Each is reported, never silently accepted or taken for the clean end of the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::os::unix::fs::FileExt;

use cwm::store::format::{record_len, RecordHeader, SegmentHeader};
use cwm::store::{Store, StoreConfig};

const LEN: u64 = 16 << 10;

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 1 << 20;
    c
}

/// Window a in segment 1 (then sealed), window b in segment 2. Returns the segment files.
fn two_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let (store, _) = Store::open(cfg(dir)).unwrap();
    put(&store, "a", &keys(1, 3), LEN);
    store.seal_active().unwrap();
    put(&store, "b", &keys(2, 3), LEN);
    drop(store);
    let s = segments(dir);
    assert_eq!(s.len(), 2);
    s
}

/// (generation, record header offsets) of a segment file.
fn headers(path: &std::path::Path) -> (u64, Vec<u64>) {
    let bytes = std::fs::read(path).unwrap();
    let g = SegmentHeader::decode(&bytes[..4096]).unwrap().generation;
    let offs = (0..bytes.len() / 4096)
        .filter(|p| &bytes[p * 4096..p * 4096 + 4] == b"CWMR")
        .map(|p| (p * 4096) as u64)
        .collect();
    (g, offs)
}

fn header_at(path: &std::path::Path, gen: u64, off: u64) -> RecordHeader {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, off).unwrap();
    RecordHeader::decode(&b, gen).unwrap()
}

fn write_page(path: &std::path::Path, off: u64, page: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(page, off).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_record_naming_another_segment_is_not_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let segs = two_segments(tmp.path());
    let (gen, offs) = headers(&segs[1]);
    let last_off = *offs.last().unwrap();
    let last = header_at(&segs[1], gen, last_off);
    let end = last_off + record_len(last.payload_len);
    // A block record after the last one, valid for this segment's generation, but naming
    // segment 1.
    let forged = RecordHeader {
        kind: cwm::store::format::RecordKind::Block,
        seq: last.seq + 1,
        key: 999,
        payload_len: 4096,
        payload_xxh3: 0,
        segment_id: 1,
        copied: false,
        ditto: false,
    };
    let mut page = vec![0u8; 4096];
    forged.encode(gen, &mut page);
    write_page(&segs[1], end, &page);
    let (store, rep) = verified(Store::open(cfg(tmp.path())).unwrap());
    assert!(
        rep.torn_tails
            .iter()
            .any(|(s, o, why)| *s == 2 && *o == end && why.contains("another segment")),
        "{rep:?}"
    );
    check(&store, "a", &keys(1, 3), LEN);
    check(&store, "b", &keys(2, 3), LEN);
}

#[test]
fn a_sequence_gap_without_a_hole_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let segs = two_segments(tmp.path());
    // Segment 1 (sealed): a's 3 blocks, then its manifest's two copies. The second copy's
    // sequence number jumps by ten: it no longer pairs with the first, and records in
    // between are missing that no hole explains.
    let (gen, offs) = headers(&segs[0]);
    assert_eq!(offs.len(), 5);
    let mut h = header_at(&segs[0], gen, offs[4]);
    assert!(h.ditto);
    h.seq += 10;
    let f = std::fs::File::open(&segs[0]).unwrap();
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, offs[4]).unwrap();
    h.encode(gen, &mut page);
    write_page(&segs[0], offs[4], &page);
    let (store, rep) = verified(Store::open(cfg(tmp.path())).unwrap());
    assert!(
        rep.damaged_regions
            .iter()
            .any(|(s, _, _, why)| *s == 1 && why.contains("sequence gap")),
        "{rep:?}"
    );
    // Either copy still carries the window.
    check(&store, "a", &keys(1, 3), LEN);
    check(&store, "b", &keys(2, 3), LEN);
}

#[test]
fn a_zero_header_with_bytes_after_it_is_no_clean_end() {
    let tmp = tempfile::tempdir().unwrap();
    let segs = two_segments(tmp.path());
    let (gen, offs) = headers(&segs[1]);
    let last_off = *offs.last().unwrap();
    let last = header_at(&segs[1], gen, last_off);
    let end = last_off + record_len(last.payload_len);
    // Header bytes zero, the rest of the page not: a torn write, not the end of the log.
    let mut page = vec![0xABu8; 4096];
    page[..64].fill(0);
    write_page(&segs[1], end, &page);
    let (store, rep) = verified(Store::open(cfg(tmp.path())).unwrap());
    assert!(
        rep.torn_tails.iter().any(|(s, o, why)| *s == 2
            && *o == end
            && why.contains("zeros where a header belongs")),
        "{rep:?}"
    );
    check(&store, "b", &keys(2, 3), LEN);
}
