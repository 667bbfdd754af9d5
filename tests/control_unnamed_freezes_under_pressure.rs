//! Many clients freezing unnamed windows at once into a log far smaller than what they write:
//! a freeze refused for room is answered only after eviction made room for it, and it is
//! tried again while eviction keeps giving room back — other freezes finishing meanwhile may
//! take the room one eviction freed first. No freeze of an unnamed window is refused while
//! unnamed data is there to give up (before, about 2 % of the churn bench's freezes were).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, TIGHT_BUDGET};

use cwm::control::client::Client;
use serde_json::json;

const CLIENTS: u32 = 6;
const FREEZES: u32 = 25;

#[test]
fn concurrent_unnamed_freezes_past_the_budget_are_all_served() {
    // 150 windows of 4 blocks (~13 MiB of records) into a 2 MiB log, freezing six at a time.
    let f = fixture(&TIGHT_BUDGET);
    let socket = f.daemon.socket.clone();
    let refused: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let socket = socket.clone();
                s.spawn(move || {
                    let mut cl = Client::connect(&socket).unwrap();
                    let mut refused = Vec::new();
                    for w in 0..FREEZES {
                        let id = c * 1000 + w;
                        let v = cl
                            .call_final(json!({"op": "freeze", "engine": "e1",
                                "window": format!("u-{id}"), "class": "unnamed",
                                "tokens": (0..64).map(|t| id * 100 + t).collect::<Vec<u32>>(),
                                "block_ids": [0, 1, 2, 3]}))
                            .unwrap();
                        if code(&v) != "OK" {
                            refused.push(format!("u-{id}: {v}"));
                        }
                    }
                    refused
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        refused.is_empty(),
        "{} of {} freezes refused: {refused:?}",
        refused.len(),
        CLIENTS * FREEZES
    );
    // They were served by evicting others (the log holds a fraction of them).
    let mut c = Client::connect(&socket).unwrap();
    let v = c.call_final(json!({"op": "metrics"})).unwrap();
    let text = v["text"].as_str().unwrap().to_string();
    let evicted: f64 = text
        .lines()
        .find(|l| l.starts_with("cwm_evictions_total{reason=\"capacity\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    assert!(evicted > 0.0, "no eviction counted");
    let list = c.call_final(json!({"op": "list", "limit": 1000})).unwrap();
    let n = list["windows"].as_array().map_or(0, Vec::len);
    assert!(
        n > 0 && n < (CLIENTS * FREEZES) as usize,
        "{n} windows listed"
    );
}
