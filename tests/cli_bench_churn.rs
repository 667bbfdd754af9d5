//! `cwm bench churn` runs concurrent clients against an in-process daemon and reports
//! acknowledged freezes, the raw-disk ceiling of the same run, the ceiling of the same I/O
//! shape (a freeze's writes and syncs as bare O_DIRECT I/O, same clients) and lookup latencies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn churn_reports_freezes_beside_the_raw_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "bench",
            "churn",
            "--clients",
            "3",
            "--seconds",
            "2",
            "--json",
            "--dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["clients"], 3);
    assert!(v["freezes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["raw_write_gbps"].as_f64().unwrap() > 0.0, "{v}");
    let r = v["freeze_ratio"].as_f64().unwrap();
    let want = v["freeze_gbps"].as_f64().unwrap() / v["raw_write_gbps"].as_f64().unwrap();
    assert!((r - want).abs() < 1e-9, "{v}");
    let shaped = v["shaped_write_gbps"].as_f64().unwrap();
    assert!(shaped > 0.0, "{v}");
    let r = v["freeze_ratio_of_shaped"].as_f64().unwrap();
    assert!(
        (r - v["freeze_gbps"].as_f64().unwrap() / shaped).abs() < 1e-9,
        "{v}"
    );
    assert!(v["lookup_p99_us"].as_f64().unwrap() >= v["lookup_p50_us"].as_f64().unwrap());
}
