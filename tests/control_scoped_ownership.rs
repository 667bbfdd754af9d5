//! A connection owns exactly the engine its own `register` (scope "connection") inserted: a
//! replayed registration (same idempotency key) owns nothing, so closing that connection does
//! not unregister the engine another connection registered under the name since.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, register_req};

use cwm::control::client::Client;
use serde_json::json;

fn engines(c: &mut Client) -> serde_json::Value {
    c.call_final(json!({"op": "health"})).unwrap()["engines"].clone()
}

fn wait_engines(c: &mut Client, n: u64) {
    let t = std::time::Instant::now();
    while engines(c) != json!(n) {
        assert!(
            t.elapsed().as_secs() < 10,
            "engines: {} (want {n})",
            engines(c)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_replayed_scoped_registration_owns_nothing() {
    let f = fixture(&[]); // engine e1, daemon scope
    let mut admin = Client::connect(&f.daemon.socket).unwrap();
    let mut scoped = register_req(&f.paths);
    scoped["engine"] = json!("e2");
    scoped["scope"] = json!("connection");
    scoped["idempotency_key"] = json!("reg-e2");
    {
        let mut a = Client::connect(&f.daemon.socket).unwrap();
        assert_eq!(code(&a.call_final(scoped.clone()).unwrap()), "OK");
        wait_engines(&mut admin, 2);
    }
    wait_engines(&mut admin, 1); // A's engine went with A
                                 // B registers e2 for good (daemon scope).
    let mut daemon_scoped = register_req(&f.paths);
    daemon_scoped["engine"] = json!("e2");
    assert_eq!(code(&admin.call_final(daemon_scoped).unwrap()), "OK");
    wait_engines(&mut admin, 2);
    // C replays A's registration: answered from the record, and owning nothing.
    {
        let mut c = Client::connect(&f.daemon.socket).unwrap();
        let v = c.call_final(scoped).unwrap();
        assert_eq!(v["replayed"], true, "{v}");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        engines(&mut admin),
        json!(2),
        "C's close unregistered B's engine"
    );
}
