//! EC-050-b and EC-050-c: a segment file truncated inside a window (while it is served, and at
//! the next open) and a block record holding another block's bytes are detected and never
//! served: reading answers CORRUPTION (for wrong bytes naming the block, with the intact prefix
//! still readable); a window whose commit record is cut off is not exposed, and one whose
//! block records are out of order thaws only up to the first block not found in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

use cwm::store::{Store, StoreError};

const LEN: u64 = 8192;

fn block_offset(i: u64) -> u64 {
    // Fresh store: segment header pages, then block records of 4096 + LEN bytes.
    8192 + i * (4096 + LEN)
}

/// `read_window` fails at `block` with `intact` blocks before it, which still read.
fn expect_corrupt_at(store: &Store, k: &[u128], block: usize, what: &str) {
    match store.read_window("w") {
        Err(StoreError::Corruption {
            window,
            block: b,
            intact_blocks,
            ..
        }) => assert_eq!(
            (window.as_str(), b, intact_blocks),
            ("w", block, block),
            "{what}"
        ),
        Err(e) => panic!("{what}: expected CORRUPTION, got {e}"),
        Ok(_) => panic!("{what}: a damaged window read back"),
    }
    let r = store.open_window("w").unwrap();
    let mut img = cwm::io::AlignedBuf::zeroed(r.record_len(0) as usize);
    for i in 0..block {
        store.read_blocks(&r, i, &mut [&mut img[..]]).unwrap();
        assert_eq!(
            r.payload(i, &img),
            &payload(k[i] as u64, LEN as usize)[..],
            "{what}"
        );
    }
    let e = store
        .read_blocks(&r, block, &mut [&mut img[..]])
        .unwrap_err();
    assert_eq!(e.code(), "CORRUPTION", "{what}: {e}");
}

#[test]
fn ec_050_b_a_truncated_segment_is_detected_never_served() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let k = keys(1, 6);
        let (store, _) = open(dir, &engine);
        put(&store, "w", &k, LEN);
        // The file loses everything from the middle of block 3's payload on, while the
        // window is served: its blocks and its commit record (after them) are gone.
        let seg = segments(dir)[0].clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(block_offset(3) + 4096 + 100)
            .unwrap();
        match store.read_window("w") {
            Err(StoreError::Corruption { window, detail, .. }) => {
                assert_eq!(window, "w");
                assert!(detail.contains("cut short"), "{name}: {detail}");
            }
            Err(e) => panic!("{name}: expected CORRUPTION, got {e}"),
            Ok(_) => panic!("{name}: a truncated window read back"),
        }
        drop(store);
        // At the next open the cut is a torn tail: the window's commit record went with it,
        // so the window is not exposed (never a partial, unverified one).
        let (store, report) = open(dir, &engine);
        assert!(!report.torn_tails.is_empty(), "{name}: {report:?}");
        assert_eq!(store.get("w").unwrap_err().code(), "NOT_FOUND", "{name}");
    }
}

#[test]
fn ec_050_c_another_blocks_bytes_detected_with_intact_prefix() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let k = keys(1, 6);
        {
            let (store, _) = open(dir, &engine);
            put(&store, "w", &k, LEN);
        }
        // Block 4's payload is written over block 2's (headers intact): well-formed records,
        // wrong data.
        let seg = segments(dir)[0].clone();
        let mut bytes = std::fs::read(&seg).unwrap();
        let (from, to) = (
            (block_offset(4) + 4096) as usize,
            (block_offset(2) + 4096) as usize,
        );
        let src = bytes[from..from + LEN as usize].to_vec();
        bytes[to..to + LEN as usize].copy_from_slice(&src);
        std::fs::write(&seg, &bytes).unwrap();
        let (store, _) = open(dir, &engine);
        expect_corrupt_at(&store, &k, 2, name);
        // Whole records swapped instead (each header with its own payload): sequence numbers
        // no longer increase along the segment, so the scan reports a damaged region; the
        // window, missing blocks 1..=4, is listed and serves block 0 only, never out of order.
        drop(store);
        let mut bytes = std::fs::read(&seg).unwrap();
        let rec = (4096 + LEN) as usize;
        let (a, b) = (block_offset(1) as usize, block_offset(5) as usize);
        let ra = bytes[a..a + rec].to_vec();
        let rb = bytes[b..b + rec].to_vec();
        bytes[a..a + rec].copy_from_slice(&rb);
        bytes[b..b + rec].copy_from_slice(&ra);
        std::fs::write(&seg, &bytes).unwrap();
        let (store, report) = open(dir, &engine);
        assert!(!report.damaged_regions.is_empty(), "{name}: {report:?}");
        assert_eq!(report.incomplete_windows, ["w"], "{name}: {report:?}");
        expect_corrupt_at(&store, &k, 1, name);
    }
}
