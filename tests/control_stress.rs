//! 32 concurrent clients doing a bounded mix of freeze / thaw / list / stat / delete against one
//! daemon for a few seconds; every thaw is checked against the frozen bytes, and at the end every
//! acknowledged, undeleted window is listed and thaws bit-exactly — also after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::*;
use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;
use std::time::{Duration, Instant};

const CLIENTS: u64 = 32;
const PER: u64 = 32; // blocks owned by each client: 16 sources, 16 thaw targets

#[test]
fn thirty_two_clients_bounded_mix() {
    let mut f = fixture_n(&["--max-sessions", "1000"], CLIENTS * PER);
    let layout = Layout::flash_2nbhd(2, CLIENTS * PER, 16, 2, 64, Dtype::Bf16);
    let block = |id: u64| cwm::device::read_block(&layout, &f.mem, id).unwrap();
    let secs = std::env::var("CWM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let sock = f.daemon.socket.clone();
    // Each client: (window name, source block ids) of its acknowledged, undeleted windows.
    let kept: Vec<Vec<(String, Vec<u64>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CLIENTS)
            .map(|ci| {
                let sock = sock.clone();
                let block = &block;
                s.spawn(move || {
                    let mut c = Client::connect(&sock).unwrap();
                    let base = ci * PER;
                    let mut live: Vec<(String, Vec<u64>)> = Vec::new();
                    let mut x = ci * 7919 + 1;
                    let mut rnd = || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for op in 0..400u64 {
                        if Instant::now() > deadline {
                            break;
                        }
                        match rnd() % 6 {
                            0..=1 => {
                                let n = 1 + rnd() % 4;
                                let start = rnd() % (16 - n + 1);
                                let src: Vec<u64> = (0..n).map(|k| base + start + k).collect();
                                let name = format!("c{ci}-w{op}");
                                let tokens: Vec<u64> = (0..n * 16).map(|t| ci * 1_000_000 + op * 1000 + t).collect();
                                let r = c
                                    .call_final(json!({"op": "freeze", "engine": "e1", "session": format!("c{ci}-s{op}"),
                                        "window": name, "tokens": tokens, "block_ids": src}))
                                    .unwrap();
                                assert_eq!(code(&r), "OK", "{r}");
                                live.push((name, src));
                            }
                            2..=3 if !live.is_empty() => {
                                let (name, src) = live[(rnd() as usize) % live.len()].clone();
                                let dst: Vec<u64> = (0..src.len() as u64).map(|k| base + 16 + k).collect();
                                let r = c
                                    .call_final(json!({"op": "thaw", "engine": "e1", "window": name, "block_ids": dst}))
                                    .unwrap();
                                assert_eq!(r["status"], "loaded", "{r}");
                                for (s, d) in src.iter().zip(&dst) {
                                    assert_eq!(block(*s), block(*d), "client {ci}: {name} thawed wrong bytes");
                                }
                            }
                            4 if !live.is_empty() => {
                                let (name, _) = live.swap_remove((rnd() as usize) % live.len());
                                let r = c.call_final(json!({"op": "delete", "window": name})).unwrap();
                                assert_eq!(code(&r), "OK", "{r}");
                            }
                            _ => {
                                let r = c.call_final(json!({"op": "list", "limit": 50})).unwrap();
                                assert_eq!(code(&r), "OK");
                                if let Some((name, _)) = live.first() {
                                    assert_eq!(code(&c.call_final(json!({"op": "stat", "window": name})).unwrap()), "OK");
                                }
                            }
                        }
                    }
                    live
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let kept: Vec<(String, Vec<u64>)> = kept.into_iter().flatten().collect();
    assert!(!kept.is_empty());
    let check_all = |sock: &std::path::Path| {
        let mut c = Client::connect(sock).unwrap();
        let list = c.call_final(json!({"op": "list", "limit": 10000})).unwrap();
        assert_eq!(
            list["total"].as_u64().unwrap() as usize,
            kept.len(),
            "lost or extra windows"
        );
        for (i, (name, src)) in kept.iter().enumerate() {
            // Thaw into the owner's target range (clients are done now).
            let owner: u64 = name[1..name.find('-').unwrap()].parse().unwrap();
            let dst: Vec<u64> = (0..src.len() as u64)
                .map(|k| owner * PER + 16 + k)
                .collect();
            let r = c
                .call_final(json!({"op": "thaw", "engine": "e1", "window": name, "block_ids": dst}))
                .unwrap();
            assert_eq!(r["status"], "loaded", "{i}: {r}");
            for (s, d) in src.iter().zip(&dst) {
                assert_eq!(block(*s), block(*d), "{name}");
            }
        }
    };
    check_all(&f.daemon.socket);
    eprintln!("{} windows verified after the mix", kept.len());
    // kill -9 the daemon, restart it and verify again.
    f.daemon.child.kill().unwrap();
    f.daemon.child.wait().unwrap();
    let d = start(
        &f.tmp.path().join("data"),
        &f.tmp.path().join("cwm.sock"),
        &f.tmp.path().join("shm"),
        &[],
    );
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(
        code(
            &c.call_final(register_req_n(&f.paths, CLIENTS * PER))
                .unwrap()
        ),
        "OK"
    );
    check_all(&d.socket);
}
