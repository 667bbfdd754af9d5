//! An outcome recorded before idempotency keys were scoped by uid (catalog key
//! xxh3-128("cwm-idem\0" + key), no uid, no fingerprint) and a newer one of the same key by
//! the daemon's uid (key "uid/key"): at start the newer stands — a different request under the
//! key is refused, not answered with the legacy outcome — and the legacy record is deleted
//! from the log, not left to shadow the newer one at every start.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, engine_files, start};

use cwm::control::client::Client;
use cwm::store::{Store, StoreConfig};
use serde_json::json;

fn record_key(name: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(format!("cwm-idem\0{name}").as_bytes())
}

#[test]
fn a_legacy_outcome_yields_to_a_newer_one_of_its_key_and_is_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let (_paths, _mem) = engine_files(&shm);
    // SAFETY: a plain getter.
    let uid = unsafe { libc::getuid() };
    let now = cwm::clock::now_unix_ms();
    let (legacy, newer) = (record_key("k"), record_key(&format!("{uid}/k")));
    {
        let mut cfg = StoreConfig::new(&data);
        cfg.segment_size = 4 << 20;
        let (store, _) = Store::open(cfg).unwrap();
        let line = |s: &str| json!([{"ok": true, "final": true, "status": s}]);
        let old = json!({"kind": "idem", "key": "k", "at_ms": now - 1_000,
            "lines": line("legacy")});
        store.put_meta(legacy, old.to_string().as_bytes()).unwrap();
        let new = json!({"kind": "idem", "key": "k", "uid": uid, "op": "freeze",
            "fingerprint": "0".repeat(32), "at_ms": now, "lines": line("newer")});
        store.put_meta(newer, new.to_string().as_bytes()).unwrap();
    }
    let mut d = start(&data, &tmp.path().join("cwm.sock"), &shm, &[]);
    let mut c = Client::connect(&d.socket).unwrap();
    let v = c
        .call_final(json!({"op": "hello", "idempotency_key": "k"}))
        .unwrap();
    assert_eq!(code(&v), "VALIDATION", "the newer outcome stands: {v}");
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let mut cfg = StoreConfig::new(&data);
    cfg.segment_size = 4 << 20;
    let (store, _) = Store::open(cfg).unwrap();
    let keys: Vec<u128> = store.meta().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&newer), "{keys:?}");
    assert!(
        !keys.contains(&legacy),
        "the legacy record was left in the log"
    );
}
