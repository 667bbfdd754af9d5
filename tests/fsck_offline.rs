//! `cwm fsck`: a clean directory passes (exit 0); a flipped payload bit makes the window
//! "damaged" with its intact prefix (exit 5); a running daemon's directory is refused (exit 4).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use std::process::Command;

fn fsck(dir: &std::path::Path) -> (i32, serde_json::Value) {
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["fsck", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code().unwrap_or(-1), v)
}

#[test]
fn fsck_reports_ok_damaged_and_refuses_a_live_directory() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let len = 8192u64;
    {
        let (store, _) = open(&dir, &engine);
        put(&store, "good", &keys(1, 3), len);
        put(&store, "bad", &keys(2, 5), len);
    }
    let (rc, v) = fsck(&dir);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["windows"].as_array().unwrap().len(), 2);
    // As a table, with progress as plain lines on stderr (not a terminal).
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["fsck", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("verifying: 2/2 windows"), "{err}");
    // Block 3 of "bad": after the segment header pages, "good" (3 blocks + the manifest's two
    // copies), then blocks 0..2 of "bad".
    let off = 8192 + 3 * (4096 + len) + 8192 + 3 * (4096 + len) + 4096 + 10;
    flip_bit(&segments(&dir)[0], off, 1);
    let (rc, v) = fsck(&dir);
    assert_eq!(rc, 5, "{v}");
    let w: Vec<&serde_json::Value> = v["windows"].as_array().unwrap().iter().collect();
    let bad = w.iter().find(|x| x["name"] == "bad").unwrap();
    assert_eq!(
        (
            bad["status"].as_str().unwrap(),
            bad["intact_blocks"].as_u64().unwrap()
        ),
        ("damaged", 3)
    );
    let good = w.iter().find(|x| x["name"] == "good").unwrap();
    assert_eq!(good["status"], "ok");
    // A directory in use is refused.
    let (_store, _) = open(&dir, &engine);
    assert_eq!(fsck(&dir).0, 4);
}
