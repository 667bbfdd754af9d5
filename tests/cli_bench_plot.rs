//! `cwm bench … --plot FILE.svg` draws the figures it measured, each beside its ceiling, and
//! `cwm plot` refuses a file that is not a report.

use std::process::Command;

#[test]
fn bench_plot_draws_the_measured_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("store.svg");
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "bench",
            "store",
            "--bytes",
            "16MiB",
            "--block-bytes",
            "1MiB",
            "--runs",
            "1",
            "--json",
            "--dir",
        ])
        .arg(tmp.path())
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    for label in [
        "store write",
        "store read",
        "raw O_DIRECT write",
        "raw O_DIRECT read",
    ] {
        assert!(text.contains(label), "{label} missing from the plot");
    }
    // The ratio printed on the plot is the report's.
    let ratio = format!("{:.3} x ceiling", report["write_ratio"].as_f64().unwrap());
    assert!(text.contains(&ratio), "{ratio} missing from the plot");

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"hello": 1}"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .arg("plot")
        .arg(&bad)
        .arg("--out")
        .arg(tmp.path().join("bad.svg"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a report of cwm bench"));
}
