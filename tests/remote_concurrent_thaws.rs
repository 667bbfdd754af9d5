//! Several thaws at once of one window this instance does not hold — a shared system prompt
//! published by another instance, restored into different destination blocks by requests
//! that arrive together on a fresh replica; a prefix found by a lookup, thawed by requests
//! sharing it — all succeed, bit-exact: the window is fetched from the shared tier once, the
//! other thaws wait for that fetch and restore the stored window (before: each fetched it,
//! and every commit after the first failed ALREADY_EXISTS). Two `cwm serve` instances, one
//! real Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

/// Threads thawing one window at once.
const THAWS: u64 = 6;
/// Blocks of each window.
const BLOCKS: u64 = 32;

fn call(c: &mut Client, req: Value) -> Value {
    let r = c.call_final(req).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    r
}

/// Runs `THAWS` thaws of `window` on the daemon at `socket` at once (thread `t` into
/// destination blocks `base + t * BLOCKS ..`), returning every answer.
fn thaw_at_once(
    socket: &std::path::Path,
    window: &str,
    tokens: &[u32],
    base: u64,
    prefix: bool,
) -> Vec<Value> {
    let go = Arc::new(Barrier::new(THAWS as usize));
    let threads: Vec<_> = (0..THAWS)
        .map(|t| {
            let (socket, window, tokens, go) = (
                socket.to_path_buf(),
                window.to_string(),
                tokens.to_vec(),
                go.clone(),
            );
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let ids: Vec<u64> = (0..BLOCKS).map(|i| base + t * BLOCKS + i).collect();
                go.wait();
                c.call_final(json!({"op": "thaw", "engine": "e1", "window": window,
                    "tokens": tokens, "block_ids": ids, "prefix": prefix}))
                    .unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn ec_002_thaws_at_once_of_a_window_held_only_by_the_tier_all_succeed_and_fetch_it_once() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let total = 2 * BLOCKS + THAWS * BLOCKS;
    let a = fixture_n(&["--remote", &urls, "--remote-write", "sync"], total);
    let b = fixture_n(&["--remote", &urls], total);
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    let layout = Layout::flash_2nbhd(2, total, 16, 2, 64, Dtype::Bf16);
    let check = |src: u64, base: u64, what: &str| {
        for t in 0..THAWS {
            for i in 0..BLOCKS {
                assert!(
                    read_block(&layout, &a.mem, src + i).unwrap()
                        == read_block(&layout, &b.mem, base + t * BLOCKS + i).unwrap(),
                    "{what}: thaw {t}, block {i}"
                );
            }
        }
    };

    // Named windows published by A (several, so the thaws overlap in at least one round).
    for round in 0..3u32 {
        let name = format!("system-{round}");
        let tokens: Vec<u32> = (0..BLOCKS as u32 * 16).map(|t| t + round * 7919).collect();
        let r = call(
            &mut ca,
            json!({"op": "freeze", "engine": "e1", "session": name, "window": name,
                "tokens": tokens, "block_ids": (0..BLOCKS).collect::<Vec<_>>()}),
        );
        assert_eq!(r["remote"]["generation"], 1, "{r}");
        let base = 2 * BLOCKS;
        let answers = thaw_at_once(&b.daemon.socket, &name, &tokens, base, false);
        for r in &answers {
            assert_eq!(code(r), "OK", "{name}: {r}");
            assert_eq!(r["report"]["blocks_restored"], BLOCKS, "{r}");
            assert_eq!(r["report"]["tokens_to_recompute"], 0, "{r}");
        }
        let pulls: Vec<&Value> = answers.iter().filter_map(|r| r.get("pulled")).collect();
        assert_eq!(pulls.len(), 1, "{name}: fetched once, not {pulls:?}");
        assert_eq!(pulls[0]["fetched"], BLOCKS, "{pulls:?}");
        check(0, base, &name);
    }

    // A prefix A stored unnamed, found by B's lookup, thawed by requests that share it.
    let tokens: Vec<u32> = (50_000..50_000 + BLOCKS as u32 * 16).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "p", "window": "p",
            "tokens": tokens, "block_ids": (BLOCKS..2 * BLOCKS).collect::<Vec<_>>(),
            "class": "unnamed"}),
    );
    assert_eq!(r["remote"]["generation"], 0, "{r}");
    let mut cb = Client::connect(&b.daemon.socket).unwrap();
    let t = Instant::now();
    let fill = loop {
        let r = call(
            &mut cb,
            json!({"op": "lookup", "engine": "e1", "tokens": tokens}),
        );
        if r["blocks_matched"] == BLOCKS {
            break r["window"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never found: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let base = 2 * BLOCKS;
    let answers = thaw_at_once(&b.daemon.socket, &fill, &tokens, base, true);
    for r in &answers {
        assert_eq!(code(r), "OK", "fill: {r}");
        assert_eq!(r["report"]["blocks_restored"], BLOCKS, "{r}");
    }
    let fetched: u64 = answers
        .iter()
        .filter_map(|r| r.pointer("/filled/fetched").and_then(Value::as_u64))
        .sum();
    assert_eq!(fetched, BLOCKS, "the prefix fetched once: {answers:?}");
    check(BLOCKS, base, "fill");
}

/// Two fills of one published prefix into one store at once (a thaw falling back to the
/// valid prefix of a damaged window beside a thaw of the same prefix found by a lookup): the
/// one that commits second finds the window the first stored — the same blocks, since the
/// name is the prefix's — and reports it, not ALREADY_EXISTS.
#[test]
fn two_fills_of_one_prefix_at_once_both_report_the_stored_window() {
    use cwm::remote::{fill_published_prefix, push_window, Expect, Remote, RemoteConfig};
    let cluster = common::redis::Cluster::start(3, 0);
    let (_, engine) = common::engines().remove(0);
    let r = Remote::connect(RemoteConfig {
        nodes: cluster.urls(),
        ..Default::default()
    })
    .unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(a_dir.path(), &engine);
    for round in 0..4u128 {
        let keys: Vec<u128> = (0..64).map(|k| 1_000 * (round + 1) + k).collect();
        let name = format!("w{round}");
        // (A real layout: a fill reads the block size from it. 16 tokens of 64 KiB a block.)
        let layout = Layout::flash_2nbhd(2, 64, 16, 8, 64, Dtype::Bf16);
        assert_eq!(layout.block_bytes(), 64 * 1024);
        common::put_laid_out(&a, &name, &keys, &layout);
        push_window(&a, &r, &name, Some(Expect::New)).unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let (b, _) = common::open(b_dir.path(), &engine);
        let go = Barrier::new(2);
        let reports: Vec<_> = std::thread::scope(|s| {
            let fills: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        go.wait();
                        fill_published_prefix(
                            &b,
                            &r,
                            &name,
                            |n, k| format!("fill-{n}-{k:032x}"),
                            None,
                        )
                    })
                })
                .collect();
            fills.into_iter().map(|f| f.join().unwrap()).collect()
        });
        for f in &reports {
            let f = f.as_ref().unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(f.blocks, 64, "{f:?}");
            assert_eq!(f.name, reports[0].as_ref().unwrap().name, "{f:?}");
        }
        let (m, blocks) = b.read_window(&reports[0].as_ref().unwrap().name).unwrap();
        assert_eq!(m.blocks.len(), 64);
        for (i, got) in blocks.iter().enumerate() {
            assert!(
                *got == common::payload(keys[i] as u64, 64 * 1024),
                "block {i}"
            );
        }
    }
}
