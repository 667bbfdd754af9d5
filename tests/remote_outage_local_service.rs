//! Shared tier down: an instance configured with a cluster that does not answer starts, freezes
//! and thaws locally as ever; `push` fails fast with UNAVAILABLE and `health` reports the remote
//! tier degraded (the instance itself stays ok) until the tier answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

#[test]
fn a_dead_cluster_degrades_the_remote_tier_only() {
    let port = common::redis::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let f = fixture(&[
        "--remote",
        &url,
        "--remote-timeout-ms",
        "300",
        "--remote-write",
        "off",
    ]);
    let sock = &f.daemon.socket;
    let o = cli_freeze(sock, "w1", "0,1,2");
    assert!(o.status.success(), "{o:?}");
    let t = std::time::Instant::now();
    let o = cli(sock, &["push", "w1"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("UNAVAILABLE"),
        "{o:?}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "push waited {:?}",
        t.elapsed()
    );
    let mut c = cwm::control::client::Client::connect(sock).unwrap();
    let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["remote"]["status"], "degraded", "{h}");
    let degraded = || {
        metrics_text(sock)
            .lines()
            .find_map(|l| l.strip_prefix("cwm_remote_degraded "))
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert_eq!(degraded(), "1");
    assert!(
        h["remote"]["error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{h}"
    );
    let o = cli(
        sock,
        &["thaw", "w1", "--engine", "e1", "--block-ids", "10,11,12"],
    );
    assert!(o.status.success(), "{o:?}");

    // The tier comes up (one node holding every slot): the next push succeeds and health
    // says ok again.
    let node = common::redis::Cluster::single_at(port, &[]);
    let o = cli(sock, &["push", "w1"]);
    drop(node);
    assert!(o.status.success(), "{o:?}");
    let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
    assert_eq!(h["remote"]["status"], "ok", "{h}");
    assert_eq!(degraded(), "0");
}
