//! Session metadata stays bounded: a DELETED session stays listed (state DELETED) for the
//! idempotency TTL (`--idempotency-ttl`), then is forgotten — gone from `session.list`, its
//! catalog record deleted from the log, so a restart does not bring it back and the store
//! holds no record of it. Sessions in any other state stay whatever their age, and an id
//! forgotten this way can be opened again, its new record surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, register_req, start};

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::{json, Value};

fn ids(c: &mut Client) -> Vec<(String, String)> {
    let v = c.call_final(json!({"op": "session.list"})).unwrap();
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The session ids with a catalog record in the data directory (daemon stopped).
fn session_records(data: &std::path::Path) -> Vec<String> {
    let (store, _) = common::open_scanned(data);
    store
        .meta_with_seq()
        .unwrap()
        .into_iter()
        .filter_map(|(_, _, bytes)| serde_json::from_slice::<Value>(&bytes).ok())
        .filter(|v| v["kind"] == "session")
        .map(|v| v["session"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_deleted_session_is_forgotten_after_the_ttl_in_memory_and_in_the_log() {
    let args = ["--idempotency-ttl", "1", "--eviction-interval-ms", "100"];
    let mut f = fixture(&args);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    for s in ["gone", "kept"] {
        let v = c
            .call_final(json!({"op": "session.open", "session": s}))
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
    }
    let v = c
        .call_final(json!({"op": "session.delete", "session": "gone"}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert!(ids(&mut c).contains(&("gone".into(), "DELETED".into())));
    let t = Instant::now();
    while ids(&mut c).iter().any(|(id, _)| id == "gone") {
        assert!(t.elapsed() < Duration::from_secs(15), "never forgotten");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Older than the TTL but ACTIVE: stays.
    assert_eq!(ids(&mut c), [("kept".to_string(), "ACTIVE".to_string())]);

    // Stopped (kill -9: nothing written at exit), the log holds no record of it.
    f.daemon.child.kill().unwrap();
    f.daemon.child.wait().unwrap();
    let data = f.tmp.path().join("data");
    assert_eq!(session_records(&data), ["kept"]);

    // The id can be opened again, and its new record is what a restart finds.
    let d = start(
        &data,
        &f.tmp.path().join("cwm.sock"),
        &f.tmp.path().join("shm"),
        &args,
    );
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(code(&c.call_final(register_req(&f.paths)).unwrap()), "OK");
    assert_eq!(ids(&mut c), [("kept".to_string(), "ACTIVE".to_string())]);
    let v = c
        .call_final(json!({"op": "session.open", "session": "gone"}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    std::thread::sleep(Duration::from_millis(1500));
    let mut listed = ids(&mut c);
    listed.sort();
    assert_eq!(
        listed,
        [
            ("gone".to_string(), "ACTIVE".to_string()),
            ("kept".to_string(), "ACTIVE".to_string())
        ]
    );
    drop(c);
    drop(d);
    let mut recs = session_records(&data);
    recs.sort();
    assert_eq!(recs, ["gone", "kept"]);
}
