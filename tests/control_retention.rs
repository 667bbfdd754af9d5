//! Capacity in the daemon: `freeze` with `class` and `ttl`, the `pin` / `unpin` / `ttl` ops,
//! `list` showing class, TTL, hits and last use; a window whose TTL passes disappears and is
//! counted; unnamed windows frozen past the budget are evicted in the background (and the
//! space given back by compaction) while freezes keep being served and the pinned window
//! stays whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, TIGHT_BUDGET};

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

fn tokens(w: u32) -> Vec<u32> {
    (0..64).map(|t| w * 1000 + t).collect()
}

fn metric(c: &mut Client, series: &str) -> f64 {
    let v = c.call_final(json!({"op": "metrics"})).unwrap();
    let text = v["text"].as_str().unwrap().to_string();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no series {series}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ttl_pin_and_eviction_under_a_budget() {
    let f = fixture(&TIGHT_BUDGET);
    let l = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let freeze = |c: &mut Client, name: &str, w: u32, extra: Value| -> Value {
        let mut req = json!({"op": "freeze", "engine": "e1", "window": name,
            "tokens": tokens(w), "block_ids": [0, 1, 2, 3]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        c.call_final(req).unwrap()
    };
    let keep_bytes: Vec<Vec<u8>> = (0..4)
        .map(|b| cwm::device::read_block(&l, &f.mem, b).unwrap())
        .collect();
    assert_eq!(code(&freeze(&mut c, "keep", 1, json!({}))), "OK");

    // Bad retention arguments.
    for bad in [
        json!({"class": "bogus"}),
        json!({"ttl": 0}),
        json!({"ttl": "x"}),
    ] {
        assert_eq!(
            code(&freeze(&mut c, "bad", 2, bad.clone())),
            "VALIDATION",
            "{bad}"
        );
    }
    let v = c
        .call_final(json!({"op": "ttl", "window": "keep"}))
        .unwrap();
    assert_eq!(code(&v), "VALIDATION", "{v}");
    let v = c
        .call_final(json!({"op": "pin", "window": "nope"}))
        .unwrap();
    assert_eq!(code(&v), "NOT_FOUND", "{v}");

    // pin / unpin / ttl.
    let v = c
        .call_final(json!({"op": "unpin", "window": "keep"}))
        .unwrap();
    assert_eq!(v["window"]["class"], "unnamed", "{v}");
    let v = c
        .call_final(json!({"op": "ttl", "window": "keep", "seconds": 3600}))
        .unwrap();
    assert!(v["window"]["expires_unix_ms"].as_i64().unwrap() > cwm::clock::now_unix_ms());
    assert_eq!(v["window"]["class"], "unnamed");
    let v = c
        .call_final(json!({"op": "pin", "window": "keep"}))
        .unwrap();
    assert_eq!(v["window"]["class"], "pinned", "{v}");
    assert_eq!(v["window"]["expires_unix_ms"], Value::Null, "{v}");

    // A TTL of one second: gone, and counted.
    let v = freeze(&mut c, "short", 3, json!({"ttl": 1}));
    assert_eq!(code(&v), "OK", "{v}");
    assert!(v["window"]["expires_unix_ms"].is_i64(), "{v}");
    wait_for("the TTL to pass", || {
        code(
            &c.call_final(json!({"op": "stat", "window": "short"}))
                .unwrap(),
        ) == "NOT_FOUND"
    });
    wait_for("the expiry to be counted", || {
        metric(&mut c, "cwm_expiries_total") >= 1.0
    });

    // 60 unnamed windows of 4 blocks (~5 MiB of records) into a 2 MiB budget: the evictor and
    // compaction keep room; a freeze refused for room meanwhile is retried.
    for w in 0..60u32 {
        let t = Instant::now();
        loop {
            let v = freeze(
                &mut c,
                &format!("auto-{w}"),
                100 + w,
                json!({"class": "unnamed"}),
            );
            match code(&v) {
                "OK" => break,
                "QUOTA_EXCEEDED" if t.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => panic!("auto-{w}: {other}: {v}"),
            }
        }
    }
    wait_for("evictions", || {
        metric(&mut c, "cwm_evictions_total{reason=\"capacity\"}") > 0.0
    });
    assert!(metric(&mut c, "cwm_evicted_bytes_total{reason=\"capacity\"}") > 0.0);
    let list = c.call_final(json!({"op": "list", "limit": 1000})).unwrap();
    let names: Vec<&str> = list["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"keep"), "{names:?}");
    assert!(names.len() < 61, "nothing was evicted: {names:?}");
    // The newest unnamed window is still there (LRU takes the oldest first).
    assert!(names.contains(&"auto-59"), "{names:?}");
    let keep = list["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "keep")
        .unwrap();
    assert_eq!(keep["class"], "pinned");
    assert!(
        keep["last_use_unix_ms"].is_i64() && keep["hits"] == 0,
        "{keep}"
    );
    assert!(metric(&mut c, "cwm_class_bytes{class=\"pinned\"}") >= 4.0 * 16384.0);

    // The pinned window thaws bit-exactly, and the thaw is counted as a use.
    let v = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "keep",
            "block_ids": [60, 61, 62, 63]}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    for (i, b) in (60..64).enumerate() {
        assert_eq!(
            cwm::device::read_block(&l, &f.mem, b).unwrap(),
            keep_bytes[i]
        );
    }
    let v = c
        .call_final(json!({"op": "stat", "window": "keep"}))
        .unwrap();
    assert_eq!(v["window"]["hits"], 1, "{v}");
    let check = c.call_final(json!({"op": "check"})).unwrap();
    assert_eq!(check["violations"], json!([]), "{check}");

    // Pinned windows fill the budget: eviction cannot help, the freeze is refused before a
    // byte is written and says how much is pinned (EC-020).
    let mut refused = None;
    for w in 0..200u32 {
        let v = freeze(&mut c, &format!("pinned-{w}"), 1000 + w, json!({}));
        if code(&v) != "OK" {
            refused = Some(v);
            break;
        }
    }
    let v = refused.expect("pinned windows never filled a 2 MiB budget");
    assert_eq!(code(&v), "QUOTA_EXCEEDED", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("held by pinned windows"), "{msg}");
    assert!(names.contains(&"keep"));
}
