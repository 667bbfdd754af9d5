//! Sessions through the daemon: EC-001 (concurrent freezes of one session), EC-003 (freeze
//! during generation), EC-011 (context warnings), EC-021 (too many active sessions, naming the
//! oldest), EC-030 (an invalid transition over the wire), EC-031 (delete needs cascade).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::*;
use cwm::control::client::Client;
use serde_json::json;

fn freeze_req(session: &str, window: &str, base: u32) -> serde_json::Value {
    json!({"op": "freeze", "engine": "e1", "session": session, "window": window,
        "tokens": (base..base + 64).collect::<Vec<u32>>(), "block_ids": [1, 2, 3, 4]})
}

#[test]
fn ec_001_concurrent_freezes_of_one_session() {
    let f = fixture(&[]);
    let sock = f.daemon.socket.clone();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let sock = sock.clone();
                s.spawn(move || {
                    let mut c = Client::connect(&sock).unwrap();
                    c.call_final(freeze_req("chat", &format!("w{i}"), 100 * i))
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| code(r) == "OK").count();
    assert_eq!(ok, 1, "{results:?}");
    for r in &results {
        assert!(
            ["OK", "BUSY", "SESSION_ALREADY_FROZEN"].contains(&code(r)),
            "{r}"
        );
    }
    let mut c = Client::connect(&sock).unwrap();
    let list = c
        .call_final(json!({"op": "list", "session": "chat"}))
        .unwrap();
    assert_eq!(list["total"], 1, "duplicate windows: {list}");
}

#[test]
fn ec_003_ec_011_ec_030_session_states_over_the_wire() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    c.call_final(json!({"op": "session.open", "session": "s1", "max_context": 1000}))
        .unwrap();
    let r = c
        .call_final(
            json!({"op": "session.state", "session": "s1", "generating": true, "tokens": 960}),
        )
        .unwrap();
    assert_eq!(r["context_warning"], "NEAR_LIMIT");
    let r = c.call_final(freeze_req("s1", "w1", 0)).unwrap();
    assert_eq!(code(&r), "INVALID_STATE_TRANSITION");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("generation is in progress"));
    let r = c
        .call_final(
            json!({"op": "session.state", "session": "s1", "generating": false, "tokens": 1000}),
        )
        .unwrap();
    assert_eq!(r["context_warning"], "AT_LIMIT");
    assert_eq!(
        code(&c.call_final(freeze_req("s1", "w1", 0)).unwrap()),
        "OK"
    );
    assert_eq!(
        c.call_final(json!({"op": "session.state", "session": "s1"}))
            .unwrap()["session"]["state"],
        "FROZEN"
    );
    // FROZEN -> EXPIRED is not in the table.
    let r = c
        .call_final(json!({"op": "session.state", "session": "s1", "state": "EXPIRED"}))
        .unwrap();
    assert_eq!(code(&r), "INVALID_STATE_TRANSITION");
    // A thaw into the session makes it THAWED; it can go ACTIVE again.
    let r = c.call_final(json!({"op": "thaw", "engine": "e1", "session": "s1", "window": "w1", "block_ids": [10, 11, 12, 13]})).unwrap();
    assert_eq!(r["status"], "loaded", "{r}");
    assert_eq!(
        c.call_final(json!({"op": "session.state", "session": "s1"}))
            .unwrap()["session"]["state"],
        "THAWED"
    );
    assert_eq!(
        code(
            &c.call_final(json!({"op": "session.state", "session": "s1", "state": "ACTIVE"}))
                .unwrap()
        ),
        "OK"
    );
}

#[test]
fn ec_021_too_many_active_sessions() {
    let f = fixture(&["--max-sessions", "2"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    c.call_final(json!({"op": "session.open", "session": "old"}))
        .unwrap();
    c.call_final(json!({"op": "session.open", "session": "new"}))
        .unwrap();
    let r = c
        .call_final(json!({"op": "session.open", "session": "third"}))
        .unwrap();
    assert_eq!(code(&r), "TOO_MANY_SESSIONS");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("\"old\""),
        "{r}"
    );
    c.call_final(json!({"op": "session.close", "session": "old"}))
        .unwrap();
    assert_eq!(
        code(
            &c.call_final(json!({"op": "session.open", "session": "third"}))
                .unwrap()
        ),
        "OK"
    );
}

#[test]
fn ec_031_deleting_a_session_with_windows_needs_cascade() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    assert_eq!(
        code(&c.call_final(freeze_req("s9", "keep-me", 0)).unwrap()),
        "OK"
    );
    let r = c
        .call_final(json!({"op": "session.delete", "session": "s9"}))
        .unwrap();
    assert_eq!(code(&r), "SESSION_HAS_WINDOWS");
    assert!(r["error"]["message"].as_str().unwrap().contains("keep-me"));
    assert_eq!(
        code(
            &c.call_final(json!({"op": "stat", "window": "keep-me"}))
                .unwrap()
        ),
        "OK"
    );
    let r = c
        .call_final(json!({"op": "session.delete", "session": "s9", "cascade": true}))
        .unwrap();
    assert_eq!(r["windows_deleted"], json!(["keep-me"]));
    assert_eq!(
        code(
            &c.call_final(json!({"op": "stat", "window": "keep-me"}))
                .unwrap()
        ),
        "NOT_FOUND"
    );
    assert_eq!(
        c.call_final(json!({"op": "session.list"})).unwrap()["sessions"][0]["state"],
        "DELETED"
    );
}

#[test]
fn sessions_and_idempotency_keys_survive_a_kill_9() {
    let mut f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    c.call_final(json!({"op": "session.open", "session": "s1", "max_context": 4096}))
        .unwrap();
    let mut req = freeze_req("s1", "w1", 0);
    req["idempotency_key"] = json!("k-1");
    assert_eq!(code(&c.call_final(req.clone()).unwrap()), "OK");
    c.call_final(json!({"op": "session.open", "session": "s2"}))
        .unwrap();
    f.daemon.child.kill().unwrap();
    f.daemon.child.wait().unwrap();
    let d = start(
        &f.tmp.path().join("data"),
        &f.tmp.path().join("cwm.sock"),
        &f.tmp.path().join("shm"),
        &[],
    );
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(code(&c.call_final(register_req(&f.paths)).unwrap()), "OK");
    let s = c
        .call_final(json!({"op": "session.state", "session": "s1"}))
        .unwrap();
    assert_eq!(s["session"]["state"], "FROZEN", "{s}");
    assert_eq!(s["session"]["max_context"], 4096);
    assert_eq!(
        c.call_final(json!({"op": "session.state", "session": "s2"}))
            .unwrap()["session"]["state"],
        "ACTIVE"
    );
    // The retry is answered from the log: same outcome, no second window version.
    let again = c.call_final(req).unwrap();
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["window"]["version"], 1);
    assert_eq!(
        code(&c.call_final(freeze_req("s1", "w2", 500)).unwrap()),
        "SESSION_ALREADY_FROZEN"
    );
    assert_eq!(c.call_final(json!({"op": "list"})).unwrap()["total"], 1);
}

#[test]
fn ram_tier_serves_a_recent_window() {
    let f = fixture(&["--tier", "4MiB"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    assert_eq!(
        code(&c.call_final(freeze_req("t", "tiered", 7)).unwrap()),
        "OK"
    );
    let r = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "tiered", "block_ids": [20, 21, 22, 23]}))
        .unwrap();
    assert_eq!(r["report"]["blocks_from_tier"], 4, "{r}");
}

#[test]
fn max_ops_refuses_with_busy_and_durations_are_histograms() {
    let f = fixture(&["--max-ops", "1"]);
    let sock = f.daemon.socket.clone();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let sock = sock.clone();
                s.spawn(move || {
                    let mut c = Client::connect(&sock).unwrap();
                    c.call_final(freeze_req(&format!("m{i}"), &format!("mw{i}"), 1000 * i))
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|r| code(r) == "OK").count();
    for r in &results {
        let c = code(r);
        assert!(
            c == "OK"
                || (c == "BUSY" && r["error"]["message"].as_str().unwrap().contains("max_ops")),
            "{r}"
        );
    }
    let mut c = Client::connect(&sock).unwrap();
    assert_eq!(
        c.call_final(json!({"op": "list"})).unwrap()["total"]
            .as_u64()
            .unwrap() as usize,
        ok
    );
    let text = c.call_final(json!({"op": "metrics"})).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains(&format!("cwm_freeze_duration_seconds_count {ok}")),
        "{text}"
    );
    assert!(
        text.contains("cwm_freeze_duration_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
}

#[test]
fn cli_freeze_and_thaw_by_session() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let tokens: Vec<u32> = (9000..9000 + 50).collect();
    c.call_final(json!({"op": "session.open", "session": "chat"}))
        .unwrap();
    c.call_final(
        json!({"op": "session.state", "session": "chat", "engine": "e1",
        "token_ids": tokens, "block_ids": [5, 6, 7, 8]}),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
            .args(args)
            .arg("--socket")
            .arg(&f.daemon.socket)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (rc, out) = cli(&["freeze", "--session", "chat", "--window", "by-cli"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("by-cli v1: 50 tokens, 4 blocks"), "{out}");
    // The engine allocated new blocks for the session; thaw there.
    c.call_final(json!({"op": "session.state", "session": "chat", "state": "THAWED"}))
        .unwrap();
    c.call_final(
        json!({"op": "session.state", "session": "chat", "engine": "e1",
        "token_ids": tokens, "block_ids": [40, 41, 42, 43]}),
    )
    .unwrap();
    let (rc, out) = cli(&["thaw", "by-cli", "--session", "chat"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("4 of 4 blocks, 50 tokens restored, 0 to recompute"),
        "{out}"
    );
    let layout = cwm::layout::Layout::flash_2nbhd(2, 64, 16, 2, 64, cwm::layout::Dtype::Bf16);
    for (s, d) in [(5u64, 40u64), (6, 41), (7, 42), (8, 43)] {
        assert_eq!(
            cwm::device::read_block(&layout, &f.mem, s).unwrap(),
            cwm::device::read_block(&layout, &f.mem, d).unwrap()
        );
    }
    // Explicit block ids, and a missing window's exit code.
    assert_eq!(
        cli(&[
            "thaw",
            "by-cli",
            "--engine",
            "e1",
            "--block-ids",
            "50,51,52,53"
        ])
        .0,
        0
    );
    assert_eq!(cli(&["thaw", "nope", "--session", "chat"]).0, 3);
    // rm --cascade takes a session with its windows.
    let (rc, out) = cli(&["rm", "chat", "--cascade"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("by-cli"), "{out}");
    assert_eq!(cli(&["stat", "by-cli"]).0, 3);
}

#[test]
fn ec_002_concurrent_identical_thaws_do_the_work_once() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let r = c
        .call_final(json!({"op": "freeze", "engine": "e1", "window": "shared",
            "tokens": (0..40 * 16).collect::<Vec<u32>>(), "block_ids": (0..40).collect::<Vec<u64>>()}))
        .unwrap();
    assert_eq!(code(&r), "OK");
    let sock = f.daemon.socket.clone();
    let results: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let sock = sock.clone();
                s.spawn(move || {
                    let mut c = Client::connect(&sock).unwrap();
                    c.call_final(json!({"op": "thaw", "engine": "e1", "window": "shared",
                        "block_ids": (24..64).collect::<Vec<u64>>()}))
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r["status"], "loaded", "{r}");
        assert_eq!(r["report"]["blocks_restored"], 40);
    }
    let coalesced = results.iter().filter(|r| r["coalesced"] == true).count();
    let text = c.call_final(json!({"op": "metrics"})).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    let thaws: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("cwm_thaws_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        thaws + coalesced,
        8,
        "each thaw either ran or shared a running one:\n{text}"
    );
}
