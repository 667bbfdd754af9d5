//! One client cannot exhaust the daemon: connections beyond `--max-connections` are answered
//! BUSY and closed (each connection is a thread), and engines beyond `--max-engines` are
//! refused BUSY (each keeps a staging pool); replacing a registered engine does not count,
//! and a slot freed is usable again.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, register_req};

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::{json, Value};

/// The first line the daemon sends on a fresh connection that sent nothing (a refusal).
fn refusal(socket: &std::path::Path) -> Option<Value> {
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap()),
        _ => None,
    }
}

#[test]
fn connections_past_the_limit_are_refused_busy_and_a_freed_one_is_usable() {
    let f = fixture(&["--max-connections", "3"]);
    // Three connections held open (each retried while the fixture's own, closed, may still
    // be counted).
    let t = Instant::now();
    let mut open: Vec<Client> = Vec::new();
    while open.len() < 3 {
        let mut c = Client::connect(&f.daemon.socket).unwrap();
        let v = c.call_final(json!({"op": "hello"})).unwrap();
        match code(&v) {
            "OK" => open.push(c),
            other => assert_eq!(other, "BUSY", "{v}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never admitted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = refusal(&f.daemon.socket).expect("a refusal line");
    assert_eq!(code(&v), "BUSY", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_connections"));
    // The open ones still work; one closed frees its slot.
    assert_eq!(
        code(&open[0].call_final(json!({"op": "health"})).unwrap()),
        "OK"
    );
    let text = open[1].call_final(json!({"op": "metrics"})).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("\ncwm_connections 3\n"), "{text}");
    assert!(
        !text.contains("\ncwm_connections_refused_total 0\n"),
        "{text}"
    );
    open.pop();
    let t = Instant::now();
    loop {
        match refusal(&f.daemon.socket) {
            // Not refused: served (it sent nothing, so nothing came back).
            None => break,
            Some(v) => assert_eq!(code(&v), "BUSY", "{v}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn engines_past_the_limit_are_refused_busy_replacements_are_not() {
    let f = fixture(&["--max-engines", "2"]); // e1 registered
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let named = |n: &str| {
        let mut r = register_req(&f.paths);
        r["engine"] = json!(n);
        r
    };
    assert_eq!(code(&c.call_final(named("e2")).unwrap()), "OK");
    let v = c.call_final(named("e3")).unwrap();
    assert_eq!(code(&v), "BUSY", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_engines"),
        "{v}"
    );
    // Replacing a registered engine (a vLLM restart) is not one more.
    assert_eq!(code(&c.call_final(named("e1")).unwrap()), "OK");
    assert_eq!(c.call_final(json!({"op": "health"})).unwrap()["engines"], 2);
    assert_eq!(
        code(
            &c.call_final(json!({"op": "unregister", "engine": "e2"}))
                .unwrap()
        ),
        "OK"
    );
    assert_eq!(code(&c.call_final(named("e3")).unwrap()), "OK");
}

/// Engines registered and unregistered with ever new block sizes leave their staging pools
/// behind for a later engine of that size; past `--max-engines` the idle ones go, so the
/// pools kept (and the memory they hold) stay bounded.
#[test]
fn staging_pools_left_behind_are_bounded_by_the_engine_limit() {
    let f = fixture(&["--max-engines", "2"]); // e1 registered: one pool
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    // The same files under other geometries: (blocks, block_size) with one byte size.
    for (blocks, block_size) in [(32, 32), (16, 64), (8, 128), (32, 32), (16, 64), (8, 128)] {
        let mut r = register_req(&f.paths);
        r["engine"] = json!("x");
        r["layout"]["blocks"] = json!(blocks);
        r["layout"]["block_size"] = json!(block_size);
        let v = c.call_final(r).unwrap();
        assert_eq!(code(&v), "OK", "{v}");
        assert_eq!(
            code(
                &c.call_final(json!({"op": "unregister", "engine": "x"}))
                    .unwrap()
            ),
            "OK"
        );
        let h = c.call_final(json!({"op": "health"})).unwrap();
        assert!(h["staging_pools"].as_u64().unwrap() <= 2, "{h}");
    }
    // e1 still has its own and works.
    let v = c
        .call_final(json!({"op": "freeze", "engine": "e1", "window": "w",
            "tokens": (0..64).collect::<Vec<u32>>(), "block_ids": [0, 1, 2, 3]}))
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
}
