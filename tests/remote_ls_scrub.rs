//! The shared tier as an operator sees it: `cwm ls --remote` on another instance lists every
//! window published there (pinned windows; unnamed ones are published as blocks only), with
//! generation and size; `cwm scrub --remote` reports a window whose block Redis no longer
//! holds (here deleted, as an eviction would) as partial, naming the first missing block, and
//! the intact one as ok; a thaw of that window elsewhere restores its valid prefix. No tier
//! configured: UNAVAILABLE.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use cwm::control::client::Client;
use serde_json::json;

#[test]
fn ls_and_scrub_of_the_remote_tier_show_published_windows_and_lost_blocks() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&["--remote", &urls]);
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    for (name, class, first, blocks) in [
        ("w1", "pinned", 0u32, vec![0u64, 1, 2]),
        ("w2", "pinned", 100, vec![3, 4]),
        ("auto-x", "unnamed", 200, vec![5]),
    ] {
        let tokens: Vec<u32> = (first..first + 16 * blocks.len() as u32).collect();
        let r = ca
            .call_final(
                json!({"op": "freeze", "engine": "e1", "session": name, "window": name,
                "tokens": tokens, "block_ids": blocks, "class": class}),
            )
            .unwrap();
        assert_eq!(code(&r), "OK", "{r}");
    }

    let o = cli(&b.daemon.socket, &["ls", "--remote", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let w = v["windows"].as_array().unwrap();
    let names: Vec<&str> = w.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["w1", "w2"], "{v}");
    assert_eq!(
        (
            &w[0]["generation"],
            &w[0]["blocks"],
            &w[0]["tokens"],
            &w[0]["bytes"]
        ),
        (&json!(1), &json!(3), &json!(48), &json!(3 * 16384)),
        "{v}"
    );
    let o = cli(&b.daemon.socket, &["ls", "--remote"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("w2 ") && l.contains(" 2 ")),
        "{text}"
    );

    // w2's second block goes (as `volatile-lfu` would evict it).
    let keys = ca
        .call_final(
            json!({"op": "lookup", "engine": "e1", "tokens": (100..132).collect::<Vec<u32>>()}),
        )
        .unwrap()["block_keys"]
        .clone();
    let gone = cluster.cmd(&["DEL", &format!("cwm:v1:b:{}", keys[1].as_str().unwrap())]);
    assert_eq!(gone.trim(), "1", "{gone}");
    let o = cli(&b.daemon.socket, &["scrub", "--remote", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["problems"], 1, "{v}");
    let w = v["windows"].as_array().unwrap();
    assert_eq!(
        (&w[0]["name"], &w[0]["status"]),
        (&json!("w1"), &json!("ok")),
        "{v}"
    );
    assert_eq!(
        (
            &w[1]["name"],
            &w[1]["status"],
            &w[1]["missing"],
            &w[1]["first_missing"]
        ),
        (&json!("w2"), &json!("partial"), &json!(1), &json!(1)),
        "{v}"
    );
    let o = cli(&b.daemon.socket, &["scrub", "--remote"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("1 of 2 blocks gone, the first is block 1"),
        "{text}"
    );

    // A thaw of w2 on B: the pull fails on the missing block, so the valid prefix (block 0)
    // is stored as a fill window and restored; the engine recomputes the rest.
    let mut cb = Client::connect(&b.daemon.socket).unwrap();
    let r = cb
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "w2",
            "block_ids": [40, 41]}))
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["partial_of"], "w2", "{r}");
    assert_eq!(r["filled"]["blocks"], 1, "{r}");
    assert!(r["filled"]["stopped"].is_string(), "{r}");
    assert_eq!(r["report"]["blocks_restored"], 1, "{r}");
    let layout = cwm::layout::Layout::flash_2nbhd(2, 64, 16, 2, 64, cwm::layout::Dtype::Bf16);
    assert!(
        cwm::device::read_block(&layout, &a.mem, 3).unwrap()
            == cwm::device::read_block(&layout, &b.mem, 40).unwrap(),
        "w2's first block restored bit-exact"
    );
    assert!(
        cb.call_final(json!({"op": "stat", "window": "w2"}))
            .unwrap()["ok"]
            != true
    );

    // An instance without a tier says so.
    let c = fixture(&[]);
    let o = cli(&c.daemon.socket, &["ls", "--remote"]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("UNAVAILABLE"),
        "{o:?}"
    );
}
