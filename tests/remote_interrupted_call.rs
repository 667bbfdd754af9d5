//! A request to the shared tier that is waiting for its answer when the daemon is stopped
//! and resumed (SIGSTOP and SIGCONT: an operator, a debugger, a cgroup freezer) sees its
//! socket call fail with EINTR — Linux does not restart a blocking socket call with a
//! timeout after a stop, signal handler or not. The daemon sends the (idempotent) request
//! again on a fresh connection instead of reporting the tier degraded: lookups and a pull
//! through a storm of stops all land, bit-exact. (Before, they failed with "remote tier
//! unavailable: Interrupted system call", as `cwm bench remote` once did on the dev VM.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::Duration;

use cwm::control::client::Client;
use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

fn call(c: &mut Client, req: Value) -> Value {
    let r = c.call_final(req).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    r
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn requests_of_a_daemon_stopped_and_resumed_again_and_again_still_land() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let a = fixture(&["--remote", &urls, "--remote-write", "sync"]);
    let b = fixture(&[
        "--remote",
        &urls,
        "--remote-timeout-ms",
        "10000",
        "--remote-lookup-timeout-ms",
        "10000",
    ]);
    let (mut ca, mut cb) = (
        Client::connect(&a.daemon.socket).unwrap(),
        Client::connect(&b.daemon.socket).unwrap(),
    );
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    // Eight unnamed prompts of 4 blocks (found by B's lookups through the tier) and one
    // named window (pulled by B).
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|p| (p * 1000..p * 1000 + 64).collect())
        .collect();
    for (p, t) in prompts.iter().enumerate() {
        let r = call(
            &mut ca,
            json!({"op": "freeze", "engine": "e1", "session": format!("p{p}"),
                "window": format!("p{p}"), "tokens": t, "block_ids": [0, 1, 2, 3],
                "class": "unnamed"}),
        );
        assert_eq!(r["remote"]["generation"], 0, "{r}");
    }
    let t4: Vec<u32> = (100_000..100_064).collect();
    let r = call(
        &mut ca,
        json!({"op": "freeze", "engine": "e1", "session": "chat", "window": "chat",
            "tokens": t4, "block_ids": [4, 5, 6, 7]}),
    );
    assert_eq!(r["remote"]["generation"], 1, "{r}");
    // B's connection to the tier exists before the storm.
    call(&mut cb, json!({"op": "remote.list"}));

    // B is stopped for 20 ms every 50 ms while it works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = b.daemon.child.id();
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                signal(pid, "-STOP");
                std::thread::sleep(Duration::from_millis(20));
                signal(pid, "-CONT");
                std::thread::sleep(Duration::from_millis(30));
                n += 1;
            }
            n
        })
    };
    let mut lookups = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        for t in &prompts {
            let r = call(
                &mut cb,
                json!({"op": "lookup", "engine": "e1", "tokens": t}),
            );
            assert_eq!(r["remote"]["outcome"], "hit", "lookup {lookups}: {r}");
            assert_eq!(r["blocks_matched"], 4, "{r}");
            lookups += 1;
        }
    }
    let r = call(&mut cb, json!({"op": "pull", "window": "chat"}));
    assert_eq!(r["pull"]["fetched"], 4, "{r}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let stops = storm.join().unwrap();
    assert!(stops >= 40, "only {stops} stops");
    let h = call(&mut cb, json!({"op": "health"}));
    assert_eq!(h["remote"]["status"], "ok", "{h}");
    let r = call(
        &mut cb,
        json!({"op": "thaw", "engine": "e1", "window": "chat", "tokens": t4,
            "block_ids": [10, 11, 12, 13]}),
    );
    assert_eq!(r["report"]["blocks_restored"], 4, "{r}");
    for (x, y) in [(4, 10), (5, 11), (6, 12), (7, 13)] {
        assert!(
            read_block(&layout, &a.mem, x).unwrap() == read_block(&layout, &b.mem, y).unwrap(),
            "{x}->{y}"
        );
    }
}
