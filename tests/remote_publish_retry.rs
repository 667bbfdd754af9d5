//! A background publish that meets an outage is not lost: a freeze while the shared tier is
//! down is answered at once (`remote.status: pending`) and published by the background
//! publisher, retrying with backoff, once the tier answers — with no command.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

#[test]
fn a_freeze_made_while_the_tier_is_down_is_published_when_it_returns() {
    let port = common::redis::free_port();
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
    let _node = common::redis::Cluster::single_at(port, &[]);
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
