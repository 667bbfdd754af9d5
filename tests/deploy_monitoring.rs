//! The monitoring kit in `deploy/`: the alert rules pass the real `promtool check rules` and
//! their unit tests (`promtool test rules`: series that fire each alert and series that must
//! not), and every metric the rules and the Grafana dashboard read is exported by a live
//! `cwm serve`. `.ci/run` installs promtool (Debian's `prometheus` package).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use cwm::control::client::Client;
use serde_json::json;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool is needed: install Debian's prometheus package (.ci/run does)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `cwm_…` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("cwm_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn alert_rules_pass_promtool_and_every_metric_they_and_the_dashboard_use_is_exported() {
    promtool(&["check", "rules", "cwm-alerts.yml"]);
    promtool(&["test", "rules", "cwm-alerts.test.yml"]);

    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let text = c.call_final(json!({"op": "metrics"})).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for file in [
        "deploy/prometheus/cwm-alerts.yml",
        "deploy/grafana/cwm.json",
    ] {
        let used = metric_names(&std::fs::read_to_string(root().join(file)).unwrap());
        assert!(used.len() >= 5, "{file}: {used:?}");
        let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} reads {missing:?}, which cwm serve does not export:\n{text}"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/cwm.json")).unwrap(),
    )
    .unwrap();
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "latency",
        "hit ratio",
        "utilization",
        "Integrity",
        "Edge cases",
        "Concurrent",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "{want}: {titles:?}"
        );
    }
}
