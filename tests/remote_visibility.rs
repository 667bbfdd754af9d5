//! Visibility delays of the shared tier: a thaw naming a window another instance has not
//! published yet waits for it up to `--remote-visibility-timeout` (and without one answers
//! NOT_FOUND at once); a lookup restricted to a window only the tier holds (the connector's
//! `{"cwm": {"thaw": NAME}}`) matches against its published manifest, never waiting.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::Duration;

use cwm::control::client::Client;
use serde_json::json;

#[test]
fn a_thaw_waits_for_a_window_not_yet_visible_within_its_budget() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&["--remote", &urls, "--remote-visibility-timeout", "30"]);
    let c = fixture(&["--remote", &urls]);
    let tokens: Vec<u32> = (0..48).collect();

    // C has no visibility budget: NOT_FOUND at once.
    let mut cc = Client::connect(&c.daemon.socket).unwrap();
    let r = cc
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "late",
            "block_ids": [10, 11, 12]}))
        .unwrap();
    assert_eq!(code(&r), "NOT_FOUND", "{r}");

    // B's thaw starts before A has frozen the window; A publishes it a second later.
    let sock = b.daemon.socket.clone();
    let waiter = std::thread::spawn(move || {
        let mut cb = Client::connect(&sock).unwrap();
        cb.call_final(json!({"op": "thaw", "engine": "e1", "window": "late",
            "block_ids": [10, 11, 12]}))
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    let r = ca
        .call_final(
            json!({"op": "freeze", "engine": "e1", "session": "s", "window": "late",
            "tokens": tokens, "block_ids": [0, 1, 2]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert!(r["remote"]["generation"].is_u64(), "{r}");
    let r = waiter.join().unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["pulled"]["fetched"], 3, "{r}");
    assert_eq!(r["report"]["blocks_restored"], 3, "{r}");

    // C's lookup restricted to the window, which C does not hold: matched against the
    // published manifest (2 of the prompt's 3 blocks are the window's), the window named.
    let mut prompt = tokens[..32].to_vec();
    prompt.extend(1000..1016);
    let r = cc
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": prompt, "window": "late"}))
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["blocks_matched"], 2, "{r}");
    assert_eq!(r["window"], "late", "{r}");
    assert_eq!(r["remote"]["outcome"], "hit", "{r}");
    // A name the tier does not hold either: a miss, no window.
    let r = cc
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": prompt, "window": "nope"}))
        .unwrap();
    assert_eq!(
        (r["blocks_matched"].as_u64(), r["window"].is_null()),
        (Some(0), true),
        "{r}"
    );
    assert_eq!(r["remote"]["outcome"], "miss", "{r}");
}
