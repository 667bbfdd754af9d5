//! A block image handed to the writer is a reused staging slot: past the payload it may hold
//! whatever an earlier, longer block left there. None of those bytes reach the disk — the
//! padding after the payload, up to the record's last page, is written as zeros — for a
//! payload that starts on its own page and for one inline after the header, with both engines.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::format::{payload_offset, record_len};
use cwm::store::BlockImage;

/// What the slot held before: a byte random payloads do not repeat 64 times in a row.
const STALE: u8 = 0xEE;

#[test]
fn stale_bytes_in_a_reused_image_never_reach_the_disk() {
    for (ename, engine) in engines() {
        // 5,000 and 20,000 bytes start on the page after the header; 1,000 inline.
        for len in [5_000u64, 20_000, 1_000] {
            let what = format!("{ename} {len} B");
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            let k = keys(7, 3);
            {
                let (store, _) = open(&dir, &engine);
                let mut w = store.begin_window(spec("w", &k, len)).unwrap();
                for (i, &key) in k.iter().enumerate() {
                    let p = payload(key as u64, len as usize);
                    // The slot is sized for a much longer block and full of its bytes.
                    let mut img = cwm::io::AlignedBuf::zeroed(record_len(64 << 10) as usize);
                    img.fill(STALE);
                    let po = payload_offset(len);
                    img[po..po + p.len()].copy_from_slice(&p);
                    w.write_blocks(&mut [BlockImage {
                        index: i,
                        image: &mut img[..record_len(len) as usize],
                        checksum: None,
                    }])
                    .unwrap();
                }
                w.commit().unwrap();
                check(&store, "w", &k, len);
            }
            let mut seen = 0;
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if !p.to_string_lossy().ends_with(".log") {
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap();
                let run = bytes
                    .windows(64)
                    .position(|x| x.iter().all(|&b| b == STALE));
                assert_eq!(run, None, "{what}: stale bytes in {}", p.display());
                seen += 1;
            }
            assert!(seen > 0, "{what}: no segment file");
            // And the window reads back after a reopen.
            let (store, _) = open(&dir, &engine);
            check(&store, "w", &k, len);
        }
    }
}
