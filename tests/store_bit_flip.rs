//! EC-050-a: a flipped bit in a block header or payload is detected, never returned; the intact prefix is
//! reported. A flipped header in the middle of a segment does not hide later windows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

fn block_offset(i: u64, len: u64) -> u64 {
    // Fresh store: segment header pages, then block records of 4096 + len bytes.
    8192 + i * (4096 + len)
}

#[test]
fn ec_050_a_payload_bit_flip_detected_with_intact_prefix() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let k = keys(1, 6);
        let len = 8192u64;
        {
            let (store, _) = open(dir, &engine);
            put(&store, "w", &k, len);
        }
        let seg = segments(dir)[0].clone();
        flip_bit(&seg, block_offset(3, len) + 4096 + 100, 5);
        let (store, _) = open(dir, &engine);
        let err = store.read_window("w").unwrap_err();
        match err {
            cwm::store::StoreError::Corruption {
                window,
                block,
                intact_blocks,
                ..
            } => {
                assert_eq!(
                    (window.as_str(), block, intact_blocks),
                    ("w", 3, 3),
                    "{name}"
                );
            }
            e => panic!("{name}: expected CORRUPTION, got {e}"),
        }
        // The prefix still reads.
        let r = store.open_window("w").unwrap();
        let mut img = cwm::io::AlignedBuf::zeroed(r.record_len(0) as usize);
        for i in 0..3 {
            store.read_blocks(&r, i, &mut [&mut img[..]]).unwrap();
            assert_eq!(r.payload(i, &img), &payload(k[i] as u64, len as usize)[..]);
        }
        assert_eq!(
            store
                .read_blocks(&r, 3, &mut [&mut img[..]])
                .unwrap_err()
                .code(),
            "CORRUPTION"
        );
    }
}

#[test]
fn header_bit_flip_detected_and_later_windows_survive() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let len = 8192u64;
        let a = keys(1, 4);
        let b = keys(2, 2);
        {
            let (store, _) = open(dir, &engine);
            put(&store, "a", &a, len);
            put(&store, "b", &b, len);
        }
        let seg = segments(dir)[0].clone();
        // Every byte of the header of block 1 of "a": corrupting any one is detected.
        for byte in [0u64, 6, 8, 16, 31, 32, 40, 48, 56, 63] {
            let d = tmp.path().join(format!("flip-{byte}"));
            copy_dir(dir, &d);
            let s = d.join(seg.file_name().unwrap());
            flip_bit(&s, block_offset(1, len) + byte, 0);
            let (store, report) = open(&d, &engine);
            // The damaged region is skipped, not taken for the end of the log.
            assert_eq!(report.damaged_regions.len(), 1, "{name} byte {byte}");
            // "a" is still listed; its thaw stops at the lost block (the intact prefix is
            // usable), and no byte of it is served.
            assert_eq!(report.incomplete_windows, ["a"], "{name} byte {byte}");
            match store.read_window("a").unwrap_err() {
                cwm::store::StoreError::Corruption { intact_blocks, .. } => {
                    assert_eq!(intact_blocks, 1, "{name} byte {byte}")
                }
                e => panic!("{name}: {e}"),
            }
            check(&store, "b", &b, len);
        }
    }
}
