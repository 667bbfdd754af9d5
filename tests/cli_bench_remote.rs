//! `cwm bench remote` runs end to end on a local cluster it starts itself, moves every byte
//! through cwm and through the raw client, and reports the ratios of the same run (no timing
//! is asserted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn bench_remote_reports_push_and_pull_against_the_raw_client() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "bench",
            "remote",
            "--bytes",
            "8MiB",
            "--block",
            "1MiB",
            "--max-value",
            "256KiB",
            "--lookup-windows",
            "300",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cluster"], "local");
    assert_eq!(v["bytes"], 8 << 20);
    for k in [
        "push_gbps",
        "raw_set_gbps",
        "pull_gbps",
        "raw_get_gbps",
        "raw_disk_write_gbps",
        "fill_gbps",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    let r = v["push_gbps"].as_f64().unwrap() / v["raw_set_gbps"].as_f64().unwrap();
    assert!((r - v["push_ratio"].as_f64().unwrap()).abs() < 1e-9, "{v}");
    // Lookups through an in-process daemon: every hit matched 4 blocks in the tier, every
    // first miss was a miss and its repeat remembered (the bench fails otherwise).
    assert_eq!(v["lookup"]["windows"], 300, "{v}");
    assert_eq!(v["lookup"]["lookups"], 300, "{v}");
    for k in [
        "hit_p99_ms",
        "miss_p99_ms",
        "cached_miss_p99_ms",
        "local_only_p99_ms",
    ] {
        assert!(v["lookup"][k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    // The bench cleans up after itself: only its temporary directory was used.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
