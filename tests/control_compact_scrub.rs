//! The daemon's `compact` and `scrub` ops and `cwm compact` / `cwm scrub`: after deletes,
//! compaction deletes sparse segments and every surviving window still thaws bit-exactly; a
//! bit flipped on disk while serving is found by a scrub pass (window reported damaged,
//! counted in cwm_scrub_problems), and the background scrubber finds it too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::{code, fixture};

use std::process::Command;
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

#[test]
fn compact_then_scrub_finds_a_flipped_bit() {
    let f = fixture(&[
        "--compact-interval",
        "0",
        "--scrub-interval",
        "1",
        "--scrub-rate",
        "0",
    ]);
    let l = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    // 120 windows of 4 blocks (distinct tokens): several 4 MiB segments.
    let mut want = Vec::new();
    for w in 0..120u32 {
        let tokens: Vec<u32> = (0..64).map(|t| w * 1000 + t).collect();
        let src: Vec<u64> = (0..4).map(|b| u64::from(w % 16) * 4 + b).collect();
        let bytes: Vec<Vec<u8>> = src
            .iter()
            .map(|&b| cwm::device::read_block(&l, &f.mem, b).unwrap())
            .collect();
        let v = c
            .call_final(
                json!({"op": "freeze", "engine": "e1", "window": format!("w{w}"),
                "tokens": tokens, "block_ids": src}),
            )
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
        want.push(bytes);
    }
    for w in (0..120).filter(|w| w % 5 != 0) {
        let v = c
            .call_final(json!({"op": "delete", "window": format!("w{w}")}))
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["compact", "--json", "--live-ratio", "0.9", "--socket"])
        .arg(&f.daemon.socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let removed = v["report"]["segments_removed"].as_array().unwrap().len();
    assert!(removed > 0, "{v}");
    let check = c.call_final(json!({"op": "check"})).unwrap();
    assert_eq!(check["violations"], json!([]), "{check}");
    for w in (0..120u32).filter(|w| w % 5 == 0) {
        let dst: Vec<u64> = (60..64).collect();
        let v = c
            .call_final(
                json!({"op": "thaw", "engine": "e1", "window": format!("w{w}"), "block_ids": dst}),
            )
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
        for (i, &b) in dst.iter().enumerate() {
            assert_eq!(
                cwm::device::read_block(&l, &f.mem, b).unwrap(),
                want[w as usize][i],
                "w{w} block {i}"
            );
        }
    }
    // Progress lines come before the final answer; the last one counts every window.
    let lines = c.call(json!({"op": "scrub"})).unwrap();
    let (v, progress) = lines.split_last().unwrap();
    assert_eq!(v["problems"], 0, "{v}");
    let last = progress.last().expect("scrub progress lines");
    assert_eq!(last["status"], "scrubbing", "{last}");
    assert_eq!(last["progress"]["windows_total"], 24, "{last}");
    assert_eq!(last["progress"]["windows_done"], 24, "{last}");

    // Flip one payload bit of every block record of the newest segment while serving.
    let mut segs: Vec<_> = std::fs::read_dir(f.tmp.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    let seg = segs.last().unwrap();
    let bytes = std::fs::read(seg).unwrap();
    let mut off = 8192usize; // after the segment header and its copy
    let mut flipped = 0;
    while off + 4096 <= bytes.len() && &bytes[off..off + 4] == b"CWMR" {
        let plen = u64::from_le_bytes(bytes[off + 32..off + 40].try_into().unwrap()) as usize;
        let rlen = if plen <= 4032 {
            4096
        } else {
            4096 + plen.div_ceil(4096) * 4096
        };
        if bytes[off + 6] == 1 {
            common::flip_bit(seg, (off + 4096 + 100) as u64, 2);
            flipped += 1;
        }
        off += rlen;
    }
    assert!(flipped > 0);
    let v = c.call_final(json!({"op": "scrub"})).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    let problems = v["problems"].as_u64().unwrap();
    assert!(problems >= 1, "{v}");
    let bad: Vec<&serde_json::Value> = v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["status"] != "ok")
        .collect();
    assert_eq!(bad.len() as u64, problems, "{v}");
    assert!(bad.iter().all(|b| b["status"] == "damaged"), "{v}");
    // The background scrubber (every second) counts it as well.
    let t = Instant::now();
    loop {
        let m = c.call_final(json!({"op": "metrics"})).unwrap();
        let text = m["text"].as_str().unwrap().to_string();
        let passes_with_problem = text
            .lines()
            .find(|l| l.starts_with("cwm_scrub_problems_total"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
        if passes_with_problem >= 2 * problems {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no background scrub: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["scrub", "--socket"])
        .arg(&f.daemon.socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("damaged"));
    // Not a terminal: progress as plain lines on stderr, the last one complete.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("scrubbing: 24/24 windows"), "{err}");
}
