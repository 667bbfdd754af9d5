//! EC-051 (the metadata store corrupted): cwm's only database is its log, so corruption there
//! is what `health` must report. A block rotting while the daemon serves is found by a scrub
//! and a manifest rotting while it is stopped is found at the next start; either way `health`
//! answers `status: "degraded"` with the problems and what to do, and every intact window
//! still thaws bit-exactly. What a scrub found is cleared by a clean scrub once the damaged
//! window is deleted; damage found at start stays reported until the documented procedure
//! (stop, `cwm fsck --repair`, restart) has removed it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, register_req, start};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

const KEPT: &str = "kept-window-051";
const HURT: &str = "hurt-window-051";

fn health(c: &mut Client) -> Value {
    let v = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    v
}

fn problems(v: &Value) -> Vec<String> {
    v["integrity"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["source"].as_str().unwrap(),
                p["what"].as_str().unwrap()
            )
        })
        .collect()
}

/// Offset of the last occurrence of `needle` in `file`.
fn last_offset(file: &std::path::Path, needle: &[u8]) -> u64 {
    let data = std::fs::read(file).unwrap();
    data.windows(needle.len())
        .rposition(|w| w == needle)
        .expect("bytes in the log") as u64
}

/// Offset of the payload of the last block record in `file`.
fn last_block_payload(file: &std::path::Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let mut off = 8192usize; // after the segment header and its copy
    let mut last = None;
    while off + 4096 <= bytes.len() && &bytes[off..off + 4] == b"CWMR" {
        let plen = u64::from_le_bytes(bytes[off + 32..off + 40].try_into().unwrap()) as usize;
        if bytes[off + 6] == 1 {
            last = Some(off + 4096);
        }
        off += if plen <= 4032 {
            4096
        } else {
            4096 + plen.div_ceil(4096) * 4096
        };
    }
    last.expect("a block record") as u64
}

/// A daemon on the fixture's data directory, socket and shared-memory directory.
fn restart(tmp: &tempfile::TempDir) -> common::daemon::Daemon {
    let p = tmp.path();
    start(&p.join("data"), &p.join("cwm.sock"), &p.join("shm"), &[])
}

#[test]
fn ec_051_a_simulated_corruption_is_reported_by_health_and_cleared_after_repair() {
    let mut f = fixture(&[]);
    let l = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let src: Vec<u64> = (0..4).collect();
    let want: Vec<Vec<u8>> = src
        .iter()
        .map(|&b| cwm::device::read_block(&l, &f.mem, b).unwrap())
        .collect();
    for (k, w) in [KEPT, HURT].iter().enumerate() {
        let tokens: Vec<u32> = (0..64).map(|t| k as u32 * 1000 + t).collect();
        let v = c
            .call_final(json!({"op": "freeze", "engine": "e1", "window": w,
                "tokens": tokens, "block_ids": src}))
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
    }
    let v = health(&mut c);
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["integrity"]["ok"], true);
    let data = f.tmp.path().join("data");
    let seg = {
        let mut s: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        s.sort();
        s.pop().unwrap()
    };

    // A block of HURT (written last) rots while the daemon serves: a scrub finds it.
    common::flip_bit(&seg, last_block_payload(&seg) + 100, 3);
    let v = c.call_final(json!({"op": "scrub"})).unwrap();
    assert_eq!(v["problems"], 1, "{v}");
    let v = health(&mut c);
    assert_eq!(v["status"], "degraded", "{v}");
    let p = problems(&v);
    assert!(
        p.len() == 1 && p[0].starts_with("scrub") && p[0].contains(HURT),
        "{p:?}"
    );
    assert!(
        v["integrity"]["recovery"]
            .as_str()
            .unwrap()
            .contains("fsck"),
        "{v}"
    );
    let m = c.call_final(json!({"op": "metrics"})).unwrap();
    assert!(
        m["text"]
            .as_str()
            .unwrap()
            .contains("cwm_integrity_problems 1"),
        "{m}"
    );
    // Nothing else is lost: the intact window thaws bit-exactly.
    let dst: Vec<u64> = (40..44).collect();
    let t = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": KEPT, "block_ids": dst}))
        .unwrap();
    assert_eq!(code(&t), "OK", "{t}");
    for (i, &b) in dst.iter().enumerate() {
        assert_eq!(cwm::device::read_block(&l, &f.mem, b).unwrap(), want[i]);
    }
    // Removing the damage, then a clean scrub, clears the report.
    let v = c
        .call_final(json!({"op": "delete", "window": HURT}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    let v = c.call_final(json!({"op": "scrub"})).unwrap();
    assert_eq!(v["problems"], 0, "{v}");
    let v = health(&mut c);
    assert_eq!(v["status"], "ok", "{v}");
    assert!(v["integrity"]["problems_total"].as_u64().unwrap() >= 1);
    drop(c);

    // One copy of KEPT's manifest rots while the daemon is stopped: the next start reports
    // it, and KEPT is still served from the other copy.
    f.daemon.child.kill().unwrap();
    f.daemon.child.wait().unwrap();
    common::flip_bit(&seg, last_offset(&seg, KEPT.as_bytes()) + 2, 1);
    f.daemon = restart(&f.tmp);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let v = health(&mut c);
    assert_eq!(v["status"], "degraded", "{v}");
    let p = problems(&v);
    assert!(
        p.iter().any(|p| p.starts_with("open")
            && p.contains("damaged")
            && p.contains("payload checksum")),
        "{p:?}"
    );
    // The daemon serves: an engine registers, and KEPT thaws bit-exactly.
    assert_eq!(code(&c.call_final(register_req(&f.paths)).unwrap()), "OK");
    let t = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": KEPT, "block_ids": dst}))
        .unwrap();
    assert_eq!(code(&t), "OK", "{t}");
    for (i, &b) in dst.iter().enumerate() {
        assert_eq!(cwm::device::read_block(&l, &f.mem, b).unwrap(), want[i]);
    }
    // A scrub reads only what windows reference: clean, but the damage is still in the log.
    let v = c.call_final(json!({"op": "scrub"})).unwrap();
    assert_eq!(v["problems"], 0, "{v}");
    assert_eq!(health(&mut c)["status"], "degraded");
    drop(c);
    // Stop, repair, restart: healthy.
    f.daemon.child.kill().unwrap();
    f.daemon.child.wait().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["fsck", "--repair", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    f.daemon = restart(&f.tmp);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let v = health(&mut c);
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["integrity"]["problems_total"], 0);
}
