//! A window that comes from the shared tier goes into the RAM tier as it is stored: the thaw
//! that follows a pull (of a named window) or a fill (of a prefix found by a lookup) scatters
//! every block from memory — no read of the log it was just written to — bit-exact. Two
//! `cwm serve` instances with a RAM tier beside one without, one real Redis Cluster.
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
fn a_thaw_after_a_pull_or_a_fill_reads_nothing_back_from_the_disk() {
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
    for (cl, from_tier) in [(&mut cb, 4), (&mut cc, 0)] {
        let r = call(
            cl,
            json!({"op": "thaw", "engine": "e1", "window": "chat", "tokens": t4,
                "block_ids": [10, 11, 12, 13]}),
        );
        assert_eq!(r["pulled"]["fetched"], 4, "{r}");
        assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
        assert_eq!(r["report"]["blocks_from_tier"], from_tier, "{r}");
    }
    for (x, y) in [(0, 10), (1, 11), (2, 12), (3, 13)] {
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
    assert_eq!(r["report"]["blocks_from_tier"], 3, "{r}");
    for (x, y) in [(4, 20), (5, 21), (6, 22)] {
        assert!(
            read_block(&layout, &a.mem, x).unwrap() == read_block(&layout, &b.mem, y).unwrap(),
            "fill {x}->{y}"
        );
    }
}
