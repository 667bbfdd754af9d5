//! A daemon started on a store whose segments are checkpointed opens without reading their
//! record headers, then walks them in the background: damage there (a zeroed block header,
//! a manifest copy) turns `health` degraded like damage found at the open, and every intact
//! window stays listed and thaws.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use std::time::{Duration, Instant};

use common::daemon::{code, start};
use common::*;
use cwm::control::client::Client;
use cwm::store::Store;
use serde_json::{json, Value};

const LEN: u64 = 256 << 10;

fn health(c: &mut Client) -> Value {
    let v = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    v
}

#[test]
fn damage_under_a_checkpoint_turns_health_degraded_after_the_background_walk() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    {
        // 4 MiB segments, as the daemon's test default: the first is sealed and checkpointed
        // at rotation, the second at the clean stop.
        let (store, _) = Store::open(config(&data)).unwrap();
        for i in 0..12u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 2), LEN);
        }
    }
    let segs = segments(&data);
    assert_eq!(segs.len(), 2);
    assert!(segs[0].with_extension("ckpt").exists());
    // w0's first block header.
    let first = record_pages(&segs[0])[0];
    zero(&segs[0], first, 512);
    let d = start(
        &data,
        &tmp.path().join("cwm.sock"),
        &tmp.path().join("shm"),
        &[],
    );
    let mut c = Client::connect(&d.socket).unwrap();
    let t = Instant::now();
    // `health` says when the walk is over; then the damage it found is reported.
    let v = loop {
        let v = health(&mut c);
        if v["integrity"]["verifying_checkpoints"] == false {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the walk never ended: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["status"], "degraded", "{v}");
    let problems = v["integrity"]["problems"].to_string();
    assert!(
        problems.contains("segment 1") && problems.contains("damaged"),
        "{problems}"
    );
    assert!(problems.contains("w0"), "{problems}");
    // Every window is still listed.
    let ls = c.call_final(json!({"op": "list"})).unwrap();
    assert_eq!(code(&ls), "OK", "{ls}");
    assert_eq!(ls["windows"].as_array().map(Vec::len), Some(12), "{ls}");
}
