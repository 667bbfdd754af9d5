//! An idempotency key names one request: a retry (same op and fields; `id` and `timeout_ms`
//! may differ) is answered from the first success, but another request sent under a used key
//! is refused (VALIDATION) and never runs — before, it got the other request's answer and
//! its own work silently never happened. The check survives a kill -9. Outcomes are bounded
//! (`--idempotency-max`): the oldest are forgotten, in memory and in the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, restart};

use cwm::control::client::Client;
use serde_json::{json, Value};

fn freeze(window: &str, key: &str) -> Value {
    json!({"op": "freeze", "engine": "e1", "window": window,
        "tokens": (0..64).collect::<Vec<u32>>(), "block_ids": [0, 1, 2, 3],
        "idempotency_key": key})
}

fn exists(c: &mut Client, window: &str) -> bool {
    code(
        &c.call_final(json!({"op": "stat", "window": window}))
            .unwrap(),
    ) == "OK"
}

#[test]
fn a_key_reused_by_another_request_is_refused_and_that_request_never_runs() {
    let mut f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    assert_eq!(code(&c.call_final(freeze("w1", "k")).unwrap()), "OK");
    // Another window under the key: refused, and not frozen.
    let v = c.call_final(freeze("w2", "k")).unwrap();
    assert_eq!(code(&v), "VALIDATION", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("idempotency key") && msg.contains("freeze"),
        "{msg}"
    );
    assert!(!exists(&mut c, "w2"), "the refused freeze ran");
    // Another op under the key: refused, and w1 is not deleted.
    let v = c
        .call_final(json!({"op": "delete", "window": "w1", "idempotency_key": "k"}))
        .unwrap();
    assert_eq!(code(&v), "VALIDATION", "{v}");
    assert!(exists(&mut c, "w1"), "the refused delete ran");
    // The retry itself — another id, a longer timeout — is replayed.
    let mut retry = freeze("w1", "k");
    retry["id"] = json!("retry-7");
    retry["timeout_ms"] = json!(60_000);
    let v = c.call_final(retry.clone()).unwrap();
    assert_eq!((code(&v), &v["replayed"]), ("OK", &json!(true)), "{v}");
    // Another field order is the same request.
    let reordered: Value = serde_json::from_str(
        r#"{"block_ids": [0, 1, 2, 3], "idempotency_key": "k", "window": "w1",
            "op": "freeze", "engine": "e1", "tokens": [0]}"#,
    )
    .unwrap();
    let mut reordered = reordered;
    reordered["tokens"] = json!((0..64).collect::<Vec<u32>>());
    assert_eq!(c.call_final(reordered).unwrap()["replayed"], true);
    // After a kill -9 the outcome and what it answers are the same.
    let mut c = restart(&mut f, &[]);
    assert_eq!(
        code(&c.call_final(freeze("w2", "k")).unwrap()),
        "VALIDATION"
    );
    assert!(!exists(&mut c, "w2"));
    assert_eq!(c.call_final(retry).unwrap()["replayed"], true);
}

#[test]
fn the_oldest_outcomes_are_forgotten_past_the_most_kept() {
    let mut f = fixture(&["--idempotency-max", "2", "--eviction-interval-ms", "100"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    for (w, k) in [("a", "ka"), ("b", "kb"), ("c", "kc")] {
        assert_eq!(code(&c.call_final(freeze(w, k)).unwrap()), "OK");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Two kept (kb, kc): a new request under kc is refused; ka was forgotten, so a new
    // request under it runs (and, kept now, pushes kb out).
    assert_eq!(
        code(&c.call_final(freeze("c2", "kc")).unwrap()),
        "VALIDATION"
    );
    let v = c.call_final(freeze("a2", "ka")).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert!(v.get("replayed").is_none(), "{v}");
    // The retention pass deletes the forgotten outcomes' records: after a restart that keeps
    // many more, kb is still forgotten and ka still names the new request.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut c = restart(&mut f, &["--idempotency-max", "100"]);
    let v = c.call_final(freeze("b2", "kb")).unwrap();
    assert_eq!(code(&v), "OK", "kb came back from the log: {v}");
    assert!(v.get("replayed").is_none(), "{v}");
    assert_eq!(c.call_final(freeze("a2", "ka")).unwrap()["replayed"], true);
    assert_eq!(
        code(&c.call_final(freeze("a", "ka")).unwrap()),
        "VALIDATION"
    );
    assert_eq!(c.call_final(freeze("c", "kc")).unwrap()["replayed"], true);
}
