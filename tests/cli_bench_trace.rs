//! `cwm bench trace`: the real store, replaying a trace with automatic saving and LRU eviction,
//! serves the prefix hit ratio the simulation of the same policy predicts; Belady's offline
//! bound is above every policy; a bad trace gets a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn the_store_replay_matches_its_simulation_and_belady_bounds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "bench",
            "trace",
            "--synthetic",
            "chats",
            "--requests",
            "400",
            "--capacity-fraction",
            "0.05,0.2",
            "--replay-at",
            "0.2",
            "--json",
            "--dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["requests"], 400);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for p in points {
        let h = |k: &str| p[k]["block_ratio"].as_f64().unwrap();
        for k in ["lru", "s3fifo", "fifo", "block_lru"] {
            assert!(h("belady") + 1e-9 >= h(k), "{k} above Belady: {p}");
            assert!(h(k) > 0.0, "{k} served nothing: {p}");
        }
    }
    let p = &points[1];
    let store = p["store"]["hits"]["block_ratio"].as_f64().unwrap();
    let sim = p["lru"]["block_ratio"].as_f64().unwrap();
    assert!(
        (store - sim).abs() < 0.02,
        "store {store} vs simulation {sim}: {p}"
    );
    assert!(p["store"]["evicted"].as_u64().unwrap() > 0, "{p}");
    assert!(points[0]["store"].is_null());

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"timestamp\": 0, \"hash_ids\": [1, \"x\"]}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["bench", "trace", "--trace"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an integer"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
