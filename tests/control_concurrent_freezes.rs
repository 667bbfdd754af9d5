//! Freezes sent to the daemon at once run at once and stay independent: eight clients freeze
//! eight windows that share their first 16 tokens (one block key, gathered from eight different
//! engine blocks, so different bytes); all are durable and thaw verified, the shared block
//! stored once; and four clients freezing one new name at once get one window and three
//! ALREADY_EXISTS. Afterwards the daemon's consistency check finds nothing and health is ok.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

/// Sends `reqs` from one client each, all released at once; the final answers in order.
fn at_once(sock: &std::path::Path, reqs: Vec<Value>) -> Vec<Value> {
    let barrier = std::sync::Barrier::new(reqs.len());
    std::thread::scope(|s| {
        let hs: Vec<_> = reqs
            .into_iter()
            .map(|req| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut c = Client::connect(sock).unwrap();
                    barrier.wait();
                    c.call_final(req).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn eight_freezes_at_once_are_all_durable_and_verified() {
    let f = fixture(&[]);
    let sock = &f.daemon.socket;
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let tokens =
        |i: u32| -> Vec<u32> { (0..16).chain((0..48).map(|t| 1000 * (i + 1) + t)).collect() };
    let reqs: Vec<Value> = (0..8u32)
        .map(|i| {
            let ids: Vec<u64> = (u64::from(i) * 4..u64::from(i) * 4 + 4).collect();
            json!({"op": "freeze", "engine": "e1", "window": format!("w{i}"),
                "tokens": tokens(i), "block_ids": ids})
        })
        .collect();
    for v in at_once(sock, reqs) {
        assert_eq!(v["status"], "durable", "{v}");
    }
    let mut c = Client::connect(sock).unwrap();
    let mut first_blocks = Vec::new();
    for i in 0..8u64 {
        let v = c
            .call_final(
                json!({"op": "thaw", "engine": "e1", "window": format!("w{i}"),
                "block_ids": [40, 41, 42, 43]}),
            )
            .unwrap();
        assert_eq!(v["status"], "loaded", "{v}");
        assert_eq!(v["report"]["blocks_restored"], 4, "{v}");
        // Its own blocks come back as they were gathered...
        for b in 1..4u64 {
            assert_eq!(
                cwm::device::read_block(&layout, &f.mem, 40 + b).unwrap(),
                cwm::device::read_block(&layout, &f.mem, i * 4 + b).unwrap(),
                "w{i} block {b}"
            );
        }
        first_blocks.push(cwm::device::read_block(&layout, &f.mem, 40).unwrap());
    }
    // ...and the shared first block is one record: the same bytes for all, those of one of
    // the eight freezes.
    assert!(first_blocks.windows(2).all(|w| w[0] == w[1]));
    assert!((0..8u64)
        .any(|i| cwm::device::read_block(&layout, &f.mem, i * 4).unwrap() == first_blocks[0]));
    let check = c.call_final(json!({"op": "check"})).unwrap();
    assert_eq!(check["violations"], json!([]), "{check}");
    let h = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(h["status"], "ok", "{h}");
}

#[test]
fn one_new_name_frozen_four_times_at_once_is_stored_once() {
    let f = fixture(&[]);
    let reqs: Vec<Value> = (0..4u64)
        .map(|i| {
            let tokens: Vec<u32> = (0..32).map(|t| 500 * (i as u32 + 1) + t).collect();
            json!({"op": "freeze", "engine": "e1", "window": "same", "tokens": tokens,
                "block_ids": [i * 2, i * 2 + 1]})
        })
        .collect();
    let finals = at_once(&f.daemon.socket, reqs);
    let durable = finals.iter().filter(|v| v["status"] == "durable").count();
    let exists = finals
        .iter()
        .filter(|v| code(v) == "ALREADY_EXISTS")
        .count();
    assert_eq!((durable, exists), (1, 3), "{finals:?}");
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let v = c
        .call_final(json!({"op": "stat", "window": "same"}))
        .unwrap();
    assert_eq!(v["window"]["version"], 1, "{v}");
    let check = c.call_final(json!({"op": "check"})).unwrap();
    assert_eq!(check["violations"], json!([]), "{check}");
}
