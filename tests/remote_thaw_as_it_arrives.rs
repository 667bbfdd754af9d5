//! A thaw of a window this instance does not hold scatters each block into the engine as it
//! arrives from the shared tier, verified, beside its write to the local log — no read-back
//! of what was just written — bit-exact, for a pull (a named window) and a fill (a prefix
//! found by a lookup); the blocks also go into the RAM tier, so the next thaw of the window
//! reads nothing from the disk either. Blocks of the range held locally already (a prefix of
//! it) are thawed from the log after the commit, the rest streamed. Where the stream cannot
//! restore its part (a block the tier lacks), the ordinary thaw of the committed window does,
//! as before. Three `cwm serve` instances (one with a RAM tier), one real Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

fn call(c: &mut Client, req: Value) -> Value {
    let r = c.call_final(req).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    r
}

#[test]
fn a_thaw_from_the_shared_tier_scatters_blocks_as_they_arrive() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&["--remote", &urls, "--tier", "4MiB"]);
    let c = fixture(&["--remote", &urls]);
    let (mut ca, mut cb, mut cc) = (
        Client::connect(&a.daemon.socket).unwrap(),
        Client::connect(&b.daemon.socket).unwrap(),
        Client::connect(&c.daemon.socket).unwrap(),
    );
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);

    // A named window, frozen and published on A, thawed on B (RAM tier) and C (none).
    let t4: Vec<u32> = (0..64).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "chat", "window": "chat",
            "tokens": t4, "block_ids": [0, 1, 2, 3]}),
    );
    assert_eq!(r["remote"]["generation"], 1, "{r}");
    for cl in [&mut cb, &mut cc] {
        let r = call(
            cl,
            json!({"op": "thaw", "engine": "e1", "window": "chat", "tokens": t4,
                "block_ids": [10, 11, 12, 13]}),
        );
        assert_eq!(r["pulled"]["fetched"], 4, "{r}");
        assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
        assert_eq!(r["report"]["blocks_streamed"], 4, "{r}");
        assert_eq!(r["report"]["blocks_from_tier"], 0, "{r}");
        assert_eq!(r["report"]["tokens_to_recompute"], 0, "{r}");
    }
    // The window is stored now: thawed again, from the RAM tier on B, from the log on C.
    for (cl, from_tier) in [(&mut cb, 4), (&mut cc, 0)] {
        let r = call(
            cl,
            json!({"op": "thaw", "engine": "e1", "window": "chat", "tokens": t4,
                "block_ids": [14, 15, 16, 17]}),
        );
        assert!(r.get("pulled").is_none(), "{r}");
        assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
        assert_eq!(r["report"]["blocks_streamed"], 0, "{r}");
        assert_eq!(r["report"]["blocks_from_tier"], from_tier, "{r}");
    }
    for (x, y) in [
        (0, 10),
        (1, 11),
        (2, 12),
        (3, 13),
        (0, 14),
        (1, 15),
        (2, 16),
        (3, 17),
    ] {
        let want = read_block(&layout, &a.mem, x).unwrap();
        assert!(
            want == read_block(&layout, &b.mem, y).unwrap(),
            "B {x}->{y}"
        );
        assert!(
            want == read_block(&layout, &c.mem, y).unwrap(),
            "C {x}->{y}"
        );
    }

    // An unnamed prompt frozen on A, found by B's lookup, filled and thawed from memory.
    let t3: Vec<u32> = (1000..1048).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "p", "window": "p",
            "tokens": t3, "block_ids": [4, 5, 6], "class": "unnamed"}),
    );
    assert_eq!(r["remote"]["generation"], 0, "{r}");
    let t = Instant::now();
    let fill = loop {
        let r = call(
            &mut cb,
            json!({"op": "lookup", "engine": "e1", "tokens": t3}),
        );
        if r["blocks_matched"] == 3 {
            break r["window"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never found: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let r = call(
        &mut cb,
        json!({"op": "thaw", "engine": "e1", "window": fill, "tokens": t3,
            "block_ids": [20, 21, 22], "prefix": true}),
    );
    assert_eq!(r["filled"]["fetched"], 3, "{r}");
    assert_eq!(r["report"]["blocks_restored"], 3, "{r}");
    assert_eq!(r["report"]["blocks_streamed"], 3, "{r}");
    for (x, y) in [(4, 20), (5, 21), (6, 22)] {
        assert!(
            read_block(&layout, &a.mem, x).unwrap() == read_block(&layout, &b.mem, y).unwrap(),
            "fill {x}->{y}"
        );
    }

    // A window whose first blocks C holds already (the named window's prefix): only the
    // rest is fetched and streamed; the local prefix is thawed from the log once the window
    // is committed — bit-exact either way.
    let t6: Vec<u32> = (0..96).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "chat6", "window": "chat6",
            "tokens": t6, "block_ids": [0, 1, 2, 3, 7, 8]}),
    );
    assert_eq!(r["remote"]["generation"], 1, "{r}");
    let r = call(
        &mut cc,
        json!({"op": "thaw", "engine": "e1", "window": "chat6", "tokens": t6,
            "block_ids": [30, 31, 32, 33, 34, 35]}),
    );
    assert_eq!(r["pulled"]["fetched"], 2, "{r}");
    assert_eq!(r["report"]["blocks_restored"], 6, "{r}");
    assert_eq!(r["report"]["blocks_streamed"], 2, "{r}");
    assert_eq!(r["report"]["tokens_to_recompute"], 0, "{r}");
    for (x, y) in [(0, 30), (1, 31), (2, 32), (3, 33), (7, 34), (8, 35)] {
        assert!(
            read_block(&layout, &a.mem, x).unwrap() == read_block(&layout, &c.mem, y).unwrap(),
            "partly local {x}->{y}"
        );
    }

    // A prefix found by a lookup whose last block the tier loses before the thaw: the stream
    // restores what arrived, the fill keeps the valid prefix, and the thaw of that prefix
    // reports the rest for recompute (as without the stream).
    let t5: Vec<u32> = (2000..2080).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "q", "window": "q",
            "tokens": t5, "block_ids": [40, 41, 42, 43, 44], "class": "unnamed"}),
    );
    assert_eq!(r["remote"]["generation"], 0, "{r}");
    let t = Instant::now();
    let fill = loop {
        let r = call(
            &mut cc,
            json!({"op": "lookup", "engine": "e1", "tokens": t5}),
        );
        if r["blocks_matched"] == 5 {
            break r["window"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never found: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let keys = call(
        &mut ca,
        json!({"op": "lookup", "engine": "e1", "tokens": t5}),
    )["block_keys"]
        .clone();
    let gone = cluster.cmd(&["DEL", &format!("cwm:v1:b:{}", keys[4].as_str().unwrap())]);
    assert_eq!(gone.trim(), "1", "{gone}");
    let r = call(
        &mut cc,
        json!({"op": "thaw", "engine": "e1", "window": fill, "tokens": t5,
            "block_ids": [50, 51, 52, 53, 54], "prefix": true}),
    );
    assert_eq!(r["filled"]["blocks"], 4, "{r}");
    assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
    assert_eq!(r["report"]["blocks_streamed"], 0, "{r}");
    for (x, y) in [(40, 50), (41, 51), (42, 52), (43, 53)] {
        assert!(
            read_block(&layout, &a.mem, x).unwrap() == read_block(&layout, &c.mem, y).unwrap(),
            "fill prefix {x}->{y}"
        );
    }
}
