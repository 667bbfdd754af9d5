//! Prefix thaws over the wire (what the vLLM connector sends): `lookup` names the window and
//! estimates thaw vs recompute; `thaw` without a window restores the longest stored prefix of
//! the tokens from a given block on; a session that cannot become THAWED is refused before any
//! block is written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::*;
use common::kv::block_bytes_of;
use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

#[test]
fn prefix_thaw_through_the_daemon() {
    let f = fixture(&[]);
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let toks: Vec<u32> = (0..64).collect(); // 4 blocks
    let r = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "window": "sys", "session": "s-old",
            "tokens": toks, "block_ids": [1, 2, 3, 4]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let orig: Vec<Vec<u8>> = (1..=4)
        .map(|b| block_bytes_of(&layout, &f.mem, b))
        .collect();
    let mut prompt = toks.clone();
    prompt.extend(900..940);

    let lk = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": prompt}))
        .unwrap();
    assert_eq!(lk["tokens_matched"], 64, "{lk}");
    assert_eq!(lk["window"], "sys");
    assert_eq!(lk["thaw_wins"], true);
    assert!(lk["estimated_recompute_secs"].is_null());
    let lk = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": prompt,
            "prefill_tokens_per_s": 1e12}))
        .unwrap();
    assert_eq!(lk["thaw_wins"], false, "{lk}");
    let lk = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": prompt, "window": "other"}))
        .unwrap();
    assert_eq!(lk["tokens_matched"], 0);
    assert!(lk["window"].is_null());

    // No window named: the longest stored prefix, window blocks 1..3 into 40..42.
    let r = c
        .call_final(
            json!({"op": "thaw", "engine": "e1", "tokens": prompt, "prefix": true,
            "first_block": 1, "block_ids": [40, 41, 42]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(r["report"]["blocks_restored"], 3);
    for i in 0..3 {
        assert_eq!(block_bytes_of(&layout, &f.mem, 40 + i as u64), orig[1 + i]);
    }

    // An ACTIVE session cannot become THAWED: refused, nothing written.
    c.call_final(json!({"op": "session.open", "session": "live"}))
        .unwrap();
    let before = block_bytes_of(&layout, &f.mem, 50);
    let r = c
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": "sys", "session": "live",
            "block_ids": [50, 51, 52, 53]}),
        )
        .unwrap();
    assert_eq!(code(&r), "INVALID_STATE_TRANSITION", "{r}");
    assert_eq!(block_bytes_of(&layout, &f.mem, 50), before);

    // Tokens that match nothing: NOT_FOUND.
    let r = c
        .call_final(
            json!({"op": "thaw", "engine": "e1", "tokens": [7, 7, 7], "prefix": true,
            "block_ids": [60]}),
        )
        .unwrap();
    assert_eq!(code(&r), "NOT_FOUND", "{r}");
}

#[test]
fn lookup_says_when_the_prefix_is_in_the_ram_tier() {
    let f = fixture(&["--tier", "64MiB"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let toks: Vec<u32> = (0..64).collect();
    let r = c
        .call_final(json!({"op": "freeze", "engine": "e1", "window": "t",
            "tokens": toks, "block_ids": [1, 2, 3, 4]}))
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let lk = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": toks}))
        .unwrap();
    assert_eq!(lk["from_tier"], true, "{lk}");
    let none = c
        .call_final(json!({"op": "lookup", "engine": "e1", "tokens": [5, 5, 5]}))
        .unwrap();
    assert_eq!(none["from_tier"], false);
    assert_eq!(none["thaw_wins"], false, "nothing matched: nothing to thaw");
}
