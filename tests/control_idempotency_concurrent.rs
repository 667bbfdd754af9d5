//! Requests with one idempotency key run one at a time: four identical freezes sent at once
//! under one key give one freeze and three replays of its success (not ALREADY_EXISTS or BUSY
//! for the three, nor a second version).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::fixture;

use cwm::control::client::Client;
use serde_json::json;

#[test]
fn concurrent_requests_with_one_key_run_once() {
    let f = fixture(&[]);
    let tokens: Vec<u32> = (0..64).collect();
    let req = json!({"op": "freeze", "engine": "e1", "window": "once", "tokens": tokens,
        "block_ids": [0, 1, 2, 3], "idempotency_key": "k-once"});
    let barrier = std::sync::Barrier::new(4);
    let finals: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (req, barrier, sock) = (req.clone(), &barrier, &f.daemon.socket);
                s.spawn(move || {
                    let mut c = Client::connect(sock).unwrap();
                    barrier.wait();
                    c.call_final(req).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for v in &finals {
        assert_eq!(v["status"], "durable", "{finals:?}");
        assert_eq!(v["window"]["version"], 1, "{finals:?}");
    }
    let replays = finals.iter().filter(|v| v["replayed"] == true).count();
    assert_eq!(replays, 3, "{finals:?}");
}
