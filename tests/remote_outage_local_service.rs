//! Shared tier down: an instance configured with a cluster that does not answer starts, freezes
//! and thaws locally as ever; `push` fails fast with UNAVAILABLE and `health` reports the remote
//! tier degraded (the instance itself stays ok) until the tier answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

#[test]
fn a_dead_cluster_degrades_the_remote_tier_only() {
    let port = free_loopback_port();
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
    let dir = tempfile::tempdir().unwrap();
    let mut node = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
        ])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let redis_cli = |args: &[&str]| {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let t = std::time::Instant::now();
    while redis_cli(&["PING"]).trim() != "PONG" {
        assert!(t.elapsed().as_secs() < 20, "redis-server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    redis_cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    while !redis_cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        assert!(t.elapsed().as_secs() < 20, "cluster did not come up");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = cli(sock, &["push", "w1"]);
    let _ = node.kill();
    let _ = node.wait();
    assert!(o.status.success(), "{o:?}");
    let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
    assert_eq!(h["remote"]["status"], "ok", "{h}");
}
