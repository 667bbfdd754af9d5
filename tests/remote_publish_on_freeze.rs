//! Shared tier without commands: a freeze on instance A is published in the background once
//! durable (`--remote-write async`, the default; its answer says `remote.status: pending`), and
//! a thaw on instance B of a name B does not hold pulls it from the tier first and restores the
//! same bytes. With `--remote-write sync`, the freeze's answer carries the publish's outcome.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use cwm::control::client::Client;
use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

fn freeze(c: &mut Client, window: &str, first_token: u32, blocks: &[u64]) -> serde_json::Value {
    let tokens: Vec<u32> = (first_token..first_token + blocks.len() as u32 * 16).collect();
    c.call_final(
        json!({"op": "freeze", "engine": "e1", "session": "s", "window": window,
        "tokens": tokens, "block_ids": blocks}),
    )
    .unwrap()
}

#[test]
fn a_freeze_is_published_and_a_thaw_elsewhere_pulls_it() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls]);
    let b = fixture(&["--remote", &urls]);
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    let mut cb = Client::connect(&b.daemon.socket).unwrap();
    let v = freeze(&mut ca, "w1", 0, &[0, 1, 2]);
    assert_eq!(v["status"], "durable", "{v}");
    assert_eq!(v["remote"]["status"], "pending", "{v}");

    // B has never seen w1: its thaw pulls it (once A's background publish is done).
    let t = std::time::Instant::now();
    let thawed = loop {
        let v = cb
            .call_final(
                json!({"op": "thaw", "engine": "e1", "window": "w1", "block_ids": [10, 11, 12]}),
            )
            .unwrap();
        if code(&v) == "OK" {
            break v;
        }
        assert_eq!(code(&v), "NOT_FOUND", "{v}");
        assert!(t.elapsed().as_secs() < 20, "never published: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(thawed["status"], "loaded", "{thawed}");
    assert_eq!(thawed["pulled"]["fetched"], 3, "{thawed}");
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    for (x, y) in [(0, 10), (1, 11), (2, 12)] {
        assert_eq!(
            read_block(&layout, &a.mem, x).unwrap(),
            read_block(&layout, &b.mem, y).unwrap()
        );
    }
    // Now local on B: the next thaw reads its own log (nothing pulled).
    let v = cb
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": "w1", "block_ids": [20, 21, 22]}),
        )
        .unwrap();
    assert_eq!(v["status"], "loaded", "{v}");
    assert!(v.get("pulled").is_none(), "{v}");
    // A name in neither place: NOT_FOUND, saying so.
    let v = cb
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "nowhere", "block_ids": [30]}))
        .unwrap();
    assert_eq!(code(&v), "NOT_FOUND", "{v}");
    assert!(v.to_string().contains("remote tier"), "{v}");

    // sync: the answer says the publish happened (generation 1 of a new name; other tokens,
    // so none of its blocks is in the tier yet — a prefix of w1's tokens would be).
    let c = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let mut cc = Client::connect(&c.daemon.socket).unwrap();
    let v = freeze(&mut cc, "w2", 1000, &[3, 4]);
    assert_eq!(v["status"], "durable", "{v}");
    assert_eq!(v["remote"]["generation"], 1, "{v}");
    assert_eq!(v["remote"]["written"], 2, "{v}");
}
