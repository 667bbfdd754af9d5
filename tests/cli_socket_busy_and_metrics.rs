//! Two first-run traps: a second `cwm serve` on a socket a daemon answers on is refused
//! before it opens (or creates, or locks) its data directory; `cwm metrics --json` answers one
//! JSON object of series and values, not the text wrapped in JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

#[test]
fn a_busy_socket_refuses_serve_before_the_store_and_metrics_json_is_an_object() {
    let f = fixture(&[]);
    let fresh = f.tmp.path().join("never-created");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["serve", "--data-dir"])
        .arg(&fresh)
        .arg("--socket")
        .arg(&f.daemon.socket)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{o:?}"
    );
    assert!(
        !fresh.exists(),
        "the refused daemon created its data directory"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["metrics", "--json", "--socket"])
        .arg(&f.daemon.socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = v.as_object().expect("an object");
    assert!(m.get("text").is_none(), "{v}");
    assert!(
        m.iter()
            .any(|(k, n)| k.starts_with("cwm_requests") && n.as_f64().is_some_and(|x| x >= 1.0)),
        "{v}"
    );
}
