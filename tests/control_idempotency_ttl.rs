//! Idempotent outcomes expire (`--idempotency-ttl`): within the TTL a retry with the same key
//! gets the first answer back (replayed); after it the key is forgotten, in memory and in the
//! log, so the same request runs again (and, the window existing, is refused).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture};

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::json;

#[test]
fn an_outcome_is_replayed_within_its_ttl_and_forgotten_after() {
    let f = fixture(&["--idempotency-ttl", "1", "--eviction-interval-ms", "100"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let req = json!({"op": "freeze", "engine": "e1", "window": "w1",
        "tokens": (0..64).collect::<Vec<u32>>(), "block_ids": [0, 1, 2, 3],
        "idempotency_key": "k-1"});
    let v = c.call_final(req.clone()).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert!(v.get("replayed").is_none(), "{v}");
    let v = c.call_final(req.clone()).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert_eq!(v["replayed"], true, "{v}");
    // Forgotten after a second: the request runs again and meets the window it made.
    let t = Instant::now();
    loop {
        let v = c.call_final(req.clone()).unwrap();
        if code(&v) == "ALREADY_EXISTS" {
            break;
        }
        assert_eq!(v["replayed"], true, "{v}");
        assert!(t.elapsed() < Duration::from_secs(15), "never forgotten");
        std::thread::sleep(Duration::from_millis(200));
    }
}
