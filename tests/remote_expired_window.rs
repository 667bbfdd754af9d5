//! A window frozen with a TTL and published to the shared tier is gone for every instance
//! once the TTL passes, not only for the one that froze it: a thaw or a `pull` on another
//! instance answers NOT_FOUND and stores nothing (before: the pull stored the window already
//! expired, and a thaw streamed it into the engine and answered `loaded`), and the window is
//! not found by name through the tier. Two `cwm serve` instances, one real Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::{json, Value};

fn call(c: &mut Client, req: Value) -> Value {
    let r = c.call_final(req).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    r
}

#[test]
fn a_published_window_whose_ttl_passed_is_gone_on_every_instance() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&["--remote", &urls]);
    let (mut ca, mut cb) = (
        Client::connect(&a.daemon.socket).unwrap(),
        Client::connect(&b.daemon.socket).unwrap(),
    );
    let tokens: Vec<u32> = (0..64).collect();
    let frozen = Instant::now();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "brief", "window": "brief",
            "tokens": tokens, "block_ids": [0, 1, 2, 3], "ttl": 1}),
    );
    assert_eq!(r["remote"]["generation"], 1, "{r}");
    // A window without a TTL, published beside it: still there afterwards.
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "kept", "window": "kept",
            "tokens": tokens, "block_ids": [0, 1, 2, 3]}),
    );
    assert_eq!(r["remote"]["generation"], 1, "{r}");
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(frozen.elapsed()));

    let r = cb
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "brief",
            "tokens": tokens, "block_ids": [10, 11, 12, 13]}))
        .unwrap();
    assert_eq!(code(&r), "NOT_FOUND", "{r}");
    let r = cb
        .call_final(json!({"op": "pull", "window": "brief"}))
        .unwrap();
    assert_eq!(code(&r), "NOT_FOUND", "{r}");
    assert!(r.to_string().contains("TTL"), "{r}");
    let listed = call(&mut cb, json!({"op": "list"}));
    assert!(
        !listed.to_string().contains("brief"),
        "nothing of it stored: {listed}"
    );

    // The one without a TTL thaws as before.
    let r = call(
        &mut cb,
        json!({"op": "thaw", "engine": "e1", "window": "kept", "tokens": tokens,
            "block_ids": [10, 11, 12, 13]}),
    );
    assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
}
