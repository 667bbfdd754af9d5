//! A background publish that meets an outage is not lost: a freeze while the shared tier is
//! down is answered at once (`remote.status: pending`) and published by the background
//! publisher, retrying with backoff, once the tier answers — with no command.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

/// The node, killed when the test ends (also when it fails).
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_freeze_made_while_the_tier_is_down_is_published_when_it_returns() {
    let port = free_loopback_port();
    let url = format!("redis://127.0.0.1:{port}");
    let f = fixture(&["--remote", &url, "--remote-timeout-ms", "300"]);
    let sock = &f.daemon.socket;
    let mut c = cwm::control::client::Client::connect(sock).unwrap();
    let tokens: Vec<u32> = (0..48).collect();
    let r = c
        .call_final(
            serde_json::json!({"op": "freeze", "engine": "e1", "session": "s",
            "window": "w1", "tokens": tokens, "block_ids": [0, 1, 2]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["remote"]["status"], "pending", "{r}");
    // The publisher meets the outage (health says so) and keeps the window.
    let t = Instant::now();
    loop {
        let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
        if h["remote"]["status"] == "degraded" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{h}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The tier comes up (one node holding every slot).
    let dir = tempfile::tempdir().unwrap();
    let _node = Node(
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let redis_cli = |args: &[&str]| {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let t = Instant::now();
    while redis_cli(&["PING"]).trim() != "PONG" {
        assert!(t.elapsed().as_secs() < 20, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    redis_cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    // Published without any command: listed in the tier, health ok.
    let t = Instant::now();
    let listed = loop {
        let r = c
            .call_final(serde_json::json!({"op": "remote.list"}))
            .unwrap();
        if code(&r) == "OK" && r["windows"].as_array().is_some_and(|w| !w.is_empty()) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never published: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
    assert_eq!(listed["windows"][0]["name"], "w1", "{listed}");
    assert_eq!(listed["windows"][0]["generation"], 1, "{listed}");
    assert_eq!(h["remote"]["status"], "ok", "{h}");
}
