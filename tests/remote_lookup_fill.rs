//! Automatic lookups through the shared tier: two `cwm serve` instances and one real Redis
//! Cluster. B's lookup of a prompt that only A froze finds it in the tier (after a definite
//! miss it remembered until A's publish announced the blocks), names a fill window, and the thaw of that name
//! fetches the blocks by their keys, verified, into B's log and scatters them bit-exact. A
//! byte flipped in the tier (`SETRANGE`) ends the next fill at the valid prefix; a paused
//! cluster makes lookups answer from the local store within the lookup timeout, never caching
//! that as a miss. An unnamed window is published as blocks only (no head to pull by name).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::device::host::ShmMemory;
use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

fn lookup(c: &mut Client, tokens: &[u32]) -> Value {
    let r = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": tokens}))
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    r
}

fn outcome(r: &Value) -> &str {
    r["remote"]["outcome"].as_str().unwrap_or("none")
}

/// Freezes and publishes (sync) a window: a pinned one under its name (generation 1), an
/// unnamed one as blocks only (generation 0: no head, lookups find its blocks by key).
fn freeze(c: &mut Client, window: &str, class: &str, tokens: &[u32], block_ids: &[u64]) {
    let r = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "session": window, "window": window,
            "tokens": tokens, "block_ids": block_ids, "class": class}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let generation = if class == "pinned" { 1 } else { 0 };
    assert_eq!(r["remote"]["generation"], generation, "published: {r}");
}

fn same_block(layout: &Layout, a: &ShmMemory, x: u64, b: &ShmMemory, y: u64) {
    assert!(
        read_block(layout, a, x).unwrap() == read_block(layout, b, y).unwrap(),
        "A's block {x} differs from B's block {y}"
    );
}

#[test]
fn a_prompt_frozen_on_one_instance_is_found_and_thawed_through_the_tier_by_another() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&[
        "--remote",
        &urls,
        "--remote-negative-ttl",
        "60",
        "--remote-lookup-timeout-ms",
        "100",
    ]);
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    let mut cb = Client::connect(&b.daemon.socket).unwrap();
    let t3: Vec<u32> = (0..48).collect();
    let t6: Vec<u32> = (0..96).collect();

    // Nothing anywhere: a definite miss, then remembered (no request to the tier).
    let r = lookup(&mut cb, &t3);
    assert_eq!(
        (r["blocks_matched"].as_u64(), outcome(&r)),
        (Some(0), "miss"),
        "{r}"
    );
    assert_eq!(outcome(&lookup(&mut cb, &t3)), "cached_miss");

    // A's publish announces the blocks: B's remembered miss (TTL 60 s) ends at once.
    freeze(&mut ca, "w1", "unnamed", &t3, &[0, 1, 2]);
    let t = Instant::now();
    let r = loop {
        let r = lookup(&mut cb, &t3);
        if outcome(&r) == "hit" {
            break r;
        }
        assert_eq!(outcome(&r), "cached_miss", "{r}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the announcement never came: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r["blocks_matched"], 3, "{r}");
    assert_eq!(r["remote"]["blocks"], 3, "{r}");
    let fill = r["window"].as_str().unwrap().to_string();
    assert!(fill.starts_with("fill-3-"), "{r}");

    // The thaw of the fill name stores the blocks (class unnamed) and scatters them.
    let r = cb
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": fill, "tokens": t3,
            "block_ids": [10, 11, 12], "prefix": true}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["filled"]["blocks"], 3, "{r}");
    assert_eq!(r["filled"]["fetched"], 3, "{r}");
    assert_eq!(r["report"]["blocks_restored"], 3, "{r}");
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    for (x, y) in [(0, 10), (1, 11), (2, 12)] {
        same_block(&layout, &a.mem, x, &b.mem, y);
    }
    // A fill name no prompt can match is refused, typed, before anything is fetched.
    let huge = format!("fill-{}-{}", usize::MAX, &fill[fill.len() - 32..]);
    let r = cb
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": huge, "tokens": t3,
            "block_ids": [10, 11, 12], "prefix": true}),
        )
        .unwrap();
    assert_eq!(code(&r), "VALIDATION", "{r}");
    let s = cb
        .call_final(json!({"op": "stat", "window": fill}))
        .unwrap();
    assert_eq!(s["window"]["class"], "unnamed", "{s}");
    // Now held here: answered locally, the tier not asked.
    let r = lookup(&mut cb, &t3);
    assert_eq!(
        (r["blocks_matched"].as_u64(), outcome(&r)),
        (Some(3), "none"),
        "{r}"
    );
    assert_eq!(r["window"], fill.as_str(), "{r}");
    // The unnamed w1 has no head in the tier: not pullable by name.
    let r = cb
        .call_final(json!({"op": "pull", "window": "w1"}))
        .unwrap();
    assert_eq!(code(&r), "NOT_FOUND", "{r}");

    // A's longer window shares those 3 blocks; its 5th block's value is then damaged in the
    // tier. B's lookup finds all 6 (3 here, 3 there); the fill stops at the damaged block:
    // blocks 0..4 are stored and restored, the rest is the engine's to recompute.
    freeze(&mut ca, "w2", "pinned", &t6, &[20, 21, 22, 23, 24, 25]);
    let keys = lookup(&mut ca, &t6)["block_keys"].clone();
    let k4 = keys[4].as_str().unwrap();
    let flipped = cluster.cmd(&["SETRANGE", &format!("cwm:v1:b:{k4}"), "100", "X"]);
    assert!(flipped.trim().parse::<u64>().is_ok(), "{flipped}");
    let r = lookup(&mut cb, &t6);
    assert_eq!(
        (r["blocks_matched"].as_u64(), outcome(&r)),
        (Some(6), "hit"),
        "{r}"
    );
    let fill6 = r["window"].as_str().unwrap().to_string();
    let r = cb
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": fill6, "tokens": t6,
            "block_ids": [30, 31, 32, 33, 34, 35], "prefix": true}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["filled"]["blocks"], 4, "{r}");
    assert_eq!(r["filled"]["fetched"], 1, "{r}");
    assert!(
        r["filled"]["stopped"].as_str().unwrap().contains("refused"),
        "{r}"
    );
    assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
    // (A's w2 refers to w1's records for the shared blocks: their bytes are A's blocks 0..2.)
    for (x, y) in [(0, 30), (1, 31), (2, 32), (23, 33)] {
        same_block(&layout, &a.mem, x, &b.mem, y);
    }

    assert_series(
        &metrics_text(&b.daemon.socket),
        &[
            r#"cwm_remote_operations_total{op="lookup",outcome="miss"} 1"#,
            r#"cwm_remote_operations_total{op="lookup",outcome="cached_miss"}"#,
            r#"cwm_remote_operations_total{op="fill",outcome="ok"} 2"#,
            r#"cwm_remote_operation_seconds_count{op="fill"} 2"#,
            r#"cwm_storage_utilization_ratio{tier="redis"}"#,
        ],
    );

    // Every master paused: lookups answer from the local store within the lookup timeout and
    // never remember the silence as a miss; once it is back, the tier answers again.
    let fresh: Vec<u32> = (5000..5048).collect();
    let masters = cluster.masters(0);
    for &m in &masters {
        cluster.pause(m);
    }
    let r = lookup(&mut cb, &fresh);
    for &m in &masters {
        cluster.resume(m);
    }
    assert_eq!(r["blocks_matched"], 0, "{r}");
    assert_eq!(outcome(&r), "timeout", "{r}");
    cluster.wait_ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = lookup(&mut cb, &fresh);
        match outcome(&r) {
            "miss" => break,
            "cached_miss" => panic!("a timeout was remembered as a miss: {r}"),
            o => assert!(
                Instant::now() < deadline,
                "still {o} after the master returned: {r}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
