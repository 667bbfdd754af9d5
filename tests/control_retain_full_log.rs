//! `pin`, `unpin` and `ttl` on a full log: their record is small, but a log the freezes filled
//! refused it (QUOTA_EXCEEDED) although unnamed windows could be evicted — pinning is what one
//! does under pressure. Now eviction makes room first, as for a freeze. Unnamed windows are
//! frozen until the log has been full many times over (no background pass: each freeze that
//! does not fit evicts inline, leaving the log as full as the freezes make it); a TTL change
//! of a named window after each must always succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture};

use cwm::control::client::Client;
use serde_json::json;

#[test]
fn retention_changes_on_a_full_log_make_room_instead_of_failing() {
    let f = fixture(&[
        "--capacity",
        "2MiB",
        "--segment-size",
        "1MiB",
        "--eviction-interval-ms",
        "0",
    ]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let freeze = |c: &mut Client, w: &str, n: u32, class: &str| {
        let blocks = n as usize;
        c.call_final(json!({"op": "freeze", "engine": "e1", "window": w, "class": class,
            "tokens": (0..16 * n).map(|t| t + 100_000 * w.len() as u32 + 7919 * n).collect::<Vec<u32>>(),
            "block_ids": (0..blocks).collect::<Vec<usize>>()}))
            .unwrap()
    };
    let v = freeze(&mut c, "named", 2, "pinned");
    assert_eq!(code(&v), "OK", "{v}");
    let mut evicted = 0;
    for i in 0..150u32 {
        let name = format!("u{i}");
        let v = c
            .call_final(
                json!({"op": "freeze", "engine": "e1", "window": name, "class": "unnamed",
                "tokens": (0..16 * (1 + i % 5)).map(|t| t + 1_000 * i).collect::<Vec<u32>>(),
                "block_ids": (0..(1 + i % 5) as usize).collect::<Vec<usize>>()}),
            )
            .unwrap();
        assert_eq!(code(&v), "OK", "freeze {i}: {v}");
        let v = c
            .call_final(json!({"op": "ttl", "window": "named", "seconds": 3600 + i}))
            .unwrap();
        assert_eq!(code(&v), "OK", "ttl after freeze {i}: {v}");
        let s = c.call_final(json!({"op": "stat", "window": "u0"})).unwrap();
        if code(&s) == "NOT_FOUND" {
            evicted += 1;
        }
    }
    assert!(evicted > 0, "the log never filled");
    let v = c
        .call_final(json!({"op": "pin", "window": "named"}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
}
