//! A freeze under an idempotency key commits its window, then its outcome record does not
//! reach the log (here the catalog write fails; a crash between the commit and the record
//! does the same), and the daemon is killed. The client never had its answer, or had it and
//! retries anyway: the retry must be told the freeze succeeded — not ALREADY_EXISTS for its
//! own window, and no second version. The window's manifest carries the request's origin (a
//! digest of key, uid and fields), so the retry recognises it (`replayed` and `recovered`),
//! and from then on the rebuilt outcome is replayed like any other. Another request — other
//! fields, or the same fields under another key — is not taken for it. (Needs the failpoints
//! build: `CWM_FAILPOINTS` fails the daemon's catalog writes.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, restart};

use cwm::control::client::Client;
use serde_json::{json, Value};

fn freeze(window: &str, key: &str, blocks: &[u64]) -> Value {
    let n = blocks.len() as u32 * 16;
    json!({"op": "freeze", "engine": "e1", "window": window,
        "tokens": (0..n).collect::<Vec<u32>>(), "block_ids": blocks,
        "idempotency_key": key})
}

fn versions(c: &mut Client, window: &str) -> Vec<u64> {
    let v = c.call_final(json!({"op": "list", "limit": 1000})).unwrap();
    v["windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == window)
        .map(|w| w["version"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_retry_after_a_lost_outcome_is_told_its_freeze_succeeded() {
    // The child daemon fails every catalog write: the freezes commit (no catalog record in
    // their path), their outcome records do not.
    std::env::set_var("CWM_FAILPOINTS", "meta-write=error");
    let mut f = fixture(&[]);
    std::env::remove_var("CWM_FAILPOINTS");
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let first = c.call_final(freeze("w1", "k1", &[0, 1, 2])).unwrap();
    assert_eq!(code(&first), "OK", "{first}");
    assert_eq!(first["window"]["version"], 1);
    let other = c.call_final(freeze("w2", "k2", &[3, 4])).unwrap();
    assert_eq!(code(&other), "OK", "{other}");
    drop(c);

    let mut c = restart(&mut f, &[]);
    // The retry: answered as the success it was, and nothing frozen again.
    let mut retry = freeze("w1", "k1", &[0, 1, 2]);
    retry["id"] = json!("retry-1");
    let v = c.call_final(retry.clone()).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert_eq!(
        (&v["replayed"], &v["recovered"], &v["status"], &v["id"]),
        (
            &json!(true),
            &json!(true),
            &json!("durable"),
            &json!("retry-1")
        ),
        "{v}"
    );
    assert_eq!(v["window"]["name"], "w1");
    assert_eq!(v["window"]["version"], 1);
    assert_eq!(v["window"]["num_blocks"], 3);
    assert_eq!(versions(&mut c, "w1"), vec![1]);
    // The same fields under another key are another request: it runs (and the window
    // exists).
    let v = c.call_final(freeze("w1", "k-other", &[0, 1, 2])).unwrap();
    assert_eq!(code(&v), "ALREADY_EXISTS", "{v}");
    // Other fields under the retried key: not the request that froze w2 (other blocks).
    let v = c.call_final(freeze("w2", "k2", &[3, 4, 5])).unwrap();
    assert_eq!(code(&v), "ALREADY_EXISTS", "{v}");
    assert_eq!(versions(&mut c, "w2"), vec![1]);

    // The rebuilt outcome is recorded now (catalog writes work again): replayed after another
    // kill as any outcome is, and a different request under k1 is refused.
    let mut c = restart(&mut f, &[]);
    let v = c.call_final(retry).unwrap();
    assert_eq!((code(&v), &v["replayed"]), ("OK", &json!(true)), "{v}");
    let v = c.call_final(freeze("w9", "k1", &[6])).unwrap();
    assert_eq!(code(&v), "VALIDATION", "{v}");
    // The retry of w2 under its own key and fields, too.
    let v = c.call_final(freeze("w2", "k2", &[3, 4])).unwrap();
    assert_eq!(
        (code(&v), &v["recovered"], &v["window"]["version"]),
        ("OK", &json!(true), &json!(1)),
        "{v}"
    );
    // A freeze under a key that the daemon knows nothing of behaves as before.
    let v = c.call_final(freeze("w3", "k3", &[7, 8])).unwrap();
    assert_eq!((code(&v), &v["recovered"]), ("OK", &Value::Null), "{v}");
}
