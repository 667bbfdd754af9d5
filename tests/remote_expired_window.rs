//! A window frozen with a TTL and published to the shared tier is gone for every instance
//! once the TTL passes, not only for the one that froze it: a thaw or a `pull` on another
//! instance answers NOT_FOUND and stores nothing (before: the pull stored the window already
//! expired, and a thaw streamed it into the engine and answered `loaded`), and the window is
//! not found by name through the tier. Its name is then free again in the tier as in the
//! store: frozen anew, it publishes and thaws elsewhere. Two `cwm serve` instances, one real
//! Redis Cluster.
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
    // Listed in the tier as expired (its head stays), the other as live.
    let remote = call(&mut cb, json!({"op": "remote.list"}));
    let expired = |w: &str| {
        remote["windows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == w)
            .map(|x| x["expired"].clone())
    };
    assert_eq!(expired("brief"), Some(json!(true)), "{remote}");
    assert_eq!(expired("kept"), Some(json!(false)), "{remote}");
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

    // The expired name is free again in the tier too: frozen anew on a third instance and
    // pushed as a new name (insert-only), it publishes — generation 2: readers never see a
    // generation go back — and thaws on B. The manifest the head no longer names expires
    // after a grace, so does a refused publish's; the current ones never do.
    let c = fixture(&["--remote", &urls, "--remote-write", "off"]);
    let mut cc = Client::connect(&c.daemon.socket).unwrap();
    let head = |w: &str| format!("cwm:v1:w:{{{:032x}}}:head", cwm::store::name_key(w));
    let manifest =
        |w: &str, tok: &str| format!("cwm:v1:w:{{{:032x}}}:m:{tok}", cwm::store::name_key(w));
    let first = cluster
        .cmd(&["HGET", &head("brief"), "token"])
        .trim()
        .to_string();
    call(
        &mut cc,
        json!({"op": "freeze", "engine": "e1", "window": "brief",
            "tokens": tokens, "block_ids": [4, 5, 6, 7], "ttl": 30}),
    );
    let r = call(&mut cc, json!({"op": "push", "window": "brief"}));
    assert_eq!(r["push"]["generation"], 2, "{r}");
    let r = call(
        &mut cb,
        json!({"op": "thaw", "engine": "e1", "window": "brief", "tokens": tokens,
            "block_ids": [20, 21, 22, 23]}),
    );
    assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
    // Not expired, the name is taken again.
    let r = cc
        .call_final(json!({"op": "push", "window": "brief"}))
        .unwrap();
    assert_eq!(code(&r), "ALREADY_EXISTS", "{r}");
    let pttl = |k: &str| -> i64 { cluster.cmd(&["PTTL", k]).trim().parse().unwrap() };
    let second = cluster
        .cmd(&["HGET", &head("brief"), "token"])
        .trim()
        .to_string();
    assert_ne!(first, second);
    let old = pttl(&manifest("brief", &first));
    assert!(old > 0 && old <= 60_000, "superseded manifest: PTTL {old}");
    // The manifest a head names never expires (Redis could evict it under volatile-lfu);
    // the refused push's (its token is the last one the fence counter gave) does.
    assert_eq!(
        pttl(&manifest("brief", &second)),
        -1,
        "the current manifest"
    );
    let fence = format!("cwm:v1:w:{{{:032x}}}:fence", cwm::store::name_key("brief"));
    let refused = cluster.cmd(&["GET", &fence]).trim().to_string();
    assert_ne!(refused, second);
    let r = pttl(&manifest("brief", &refused));
    assert!(
        r > 0 && r <= 60_000,
        "a refused publish's manifest: PTTL {r}"
    );
    let kept = cluster
        .cmd(&["HGET", &head("kept"), "token"])
        .trim()
        .to_string();
    assert_eq!(pttl(&manifest("kept", &kept)), -1, "a window without a TTL");
}
