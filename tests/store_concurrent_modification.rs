//! EC-005 (write-after-write race): two processes on one data directory, and concurrent
//! replacements of one window. A second process is refused the directory (its lock names the
//! holder's pid) and the first keeps serving; of concurrent replaces of the same version
//! exactly one wins, the others get CONCURRENT_MODIFICATION (on the wire too) and nothing is
//! half-written; a loser that re-reads the version and retries succeeds.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture};
use common::*;

use cwm::control::client::Client;
use cwm::store::{Replace, Store, StoreConfig};
use serde_json::json;

#[test]
fn ec_005_a_a_second_process_on_the_data_directory_is_refused() {
    let f = fixture(&[]);
    let data = f.tmp.path().join("data");
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let tokens: Vec<u32> = (0..64).collect();
    let v = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "window": "w", "tokens": tokens,
            "block_ids": [0, 1, 2, 3]}),
        )
        .unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    // This process, opening the daemon's directory, is refused and told who holds it.
    let err = Store::open(StoreConfig::new(&data)).err().expect("refused");
    assert_eq!(err.code(), "BUSY");
    let msg = err.to_string();
    assert!(msg.contains(&f.daemon.child.id().to_string()), "{msg}");
    // So is a second daemon, with a clear message and a non-zero exit.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--socket")
        .arg(f.tmp.path().join("second.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&f.daemon.child.id().to_string()), "{err}");
    // The first one serves on, its window intact; a stale replace is refused on the wire.
    let v = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "window": "w", "tokens": tokens,
            "block_ids": [4, 5, 6, 7], "replace": 7}),
        )
        .unwrap();
    assert_eq!(code(&v), "CONCURRENT_MODIFICATION", "{v}");
    let v = c.call_final(json!({"op": "stat", "window": "w"})).unwrap();
    assert_eq!(code(&v), "OK", "{v}");
    assert_eq!(v["window"]["version"], 1, "{v}");
}

#[test]
fn ec_005_b_c_concurrent_replaces_one_wins_a_retry_after_a_fresh_read_succeeds() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        put(&store, "w", &keys(1, 2), 8192);
        // Eight writers replace version 1 at once, each with its own blocks.
        let barrier = std::sync::Barrier::new(8);
        let results: Vec<(u128, Result<u64, String>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u128)
                .map(|t| {
                    let (store, barrier) = (&store, &barrier);
                    s.spawn(move || {
                        let k = keys(10 + t, 2);
                        let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, 8192)).collect();
                        let mut sp = spec("w", &k, 8192);
                        sp.replace = Replace::IfVersion(1);
                        barrier.wait();
                        let r = store.put_window(sp, &[&p[0], &p[1]]);
                        (
                            10 + t,
                            r.map(|i| i.version).map_err(|e| e.code().to_string()),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&(u128, Result<u64, String>)> =
            results.iter().filter(|r| r.1.is_ok()).collect();
        assert_eq!(winners.len(), 1, "{name}: {results:?}");
        assert_eq!(winners[0].1, Ok(2));
        assert!(
            results
                .iter()
                .filter(|r| r.1.is_err())
                .all(|r| r.1 == Err("CONCURRENT_MODIFICATION".into())),
            "{results:?}"
        );
        let won = winners[0].0;
        check(&store, "w", &keys(won, 2), 8192);
        // A loser re-reads the version and retries: it succeeds.
        let loser = results.iter().find(|r| r.1.is_err()).unwrap().0;
        let current = store.get("w").unwrap().version;
        let k = keys(loser, 2);
        let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, 8192)).collect();
        let mut sp = spec("w", &k, 8192);
        sp.replace = Replace::IfVersion(current);
        assert_eq!(store.put_window(sp, &[&p[0], &p[1]]).unwrap().version, 3);
        drop(store);
        // Across a reopen: the last write, whole.
        let (store, _) = open(tmp.path(), &engine);
        assert_eq!(store.get("w").unwrap().version, 3);
        check(&store, "w", &k, 8192);
    }
}
