//! A crash between a freeze's commit and its session's FROZEN record (the window is durable,
//! the session record still says ACTIVE or THAWED): the daemon finds the window newer than the
//! session's newest record at start and marks the session FROZEN; sessions whose records are
//! newer than their windows keep their state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::*;
use common::*;
use cwm::control::client::Client;
use cwm::store::Store;
use serde_json::json;

fn session_record(id: &str, state: &str, seq: u64) -> Vec<u8> {
    json!({"kind": "session", "session": {"id": id, "state": state, "generating": false,
        "freezing": false, "tokens": 0, "max_context": null, "created_unix_ms": 0, "seq": seq}})
    .to_string()
    .into_bytes()
}

/// Writes a window from a spec (payloads as `common::put` makes them).
fn put_spec(store: &Store, s: cwm::store::WindowSpec) {
    let payloads: Vec<Vec<u8>> = s
        .blocks
        .iter()
        .map(|b| payload(b.key as u64, b.len as usize))
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    store.put_window(s, &refs).unwrap();
}

fn key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(format!("cwm-session\0{id}").as_bytes())
}

#[test]
fn window_newer_than_the_session_record_means_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    {
        let (store, _) = Store::open(config(&data)).unwrap();
        // "crashed": ACTIVE record, then its window committed, no FROZEN record after it.
        store
            .put_meta(key("crashed"), &session_record("crashed", "ACTIVE", 1))
            .unwrap();
        let mut s = spec("w-crashed", &keys(1 << 80, 2), 4096);
        s.session = "crashed".into();
        put_spec(&store, s);
        // "thawed": frozen earlier, then thawed (its THAWED record is newer than its window).
        let mut s = spec("w-thawed", &keys(2 << 80, 2), 4096);
        s.session = "thawed".into();
        put_spec(&store, s);
        store
            .put_meta(key("thawed"), &session_record("thawed", "THAWED", 2))
            .unwrap();
        // "idle": ACTIVE, no window.
        store
            .put_meta(key("idle"), &session_record("idle", "ACTIVE", 3))
            .unwrap();
    }
    let d = start(&data, &tmp.path().join("cwm.sock"), &shm, &[]);
    let mut c = Client::connect(&d.socket).unwrap();
    let list = c.call_final(json!({"op": "session.list"})).unwrap();
    let state = |id: &str| {
        list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state("crashed"), "FROZEN", "{list}");
    assert_eq!(state("thawed"), "THAWED", "{list}");
    assert_eq!(state("idle"), "ACTIVE", "{list}");
    drop(c);
    drop(d);
    // The reconciliation itself was written: it holds after another restart.
    let d = start(&data, &tmp.path().join("cwm.sock"), &shm, &[]);
    let mut c = Client::connect(&d.socket).unwrap();
    let list = c.call_final(json!({"op": "session.list"})).unwrap();
    let crashed = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "crashed")
        .cloned()
        .unwrap();
    assert_eq!(crashed["state"], "FROZEN");
}
