//! Shared tier under node failures (3 masters + 3 replicas): a publish waits for every
//! master's replica when asked (`replicated`); a master paused past the node
//! timeout is failed over to its replica and pulls succeed again, bit-exact; with the
//! replicas gone too, a master killed takes its slots down: requests fail as an outage
//! (UNAVAILABLE or TIMEOUT, never a wrong answer), and succeed again once it is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::time::{Duration, Instant};

use cwm::remote::{pull_window, push_window, Expect, Remote, RemoteConfig};
use cwm::store::Replace;

#[test]
fn a_failed_over_master_serves_again_and_a_lost_one_is_an_outage() {
    let mut cluster = common::redis::Cluster::start(3, 1);
    let (_, engine) = common::engines().remove(0);
    let cfg = RemoteConfig {
        nodes: cluster.urls(),
        timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let r = Remote::connect(cfg.clone()).unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(a_dir.path(), &engine);
    // 64 blocks: every master holds some of them.
    let keys: Vec<u128> = (1..=64u128).map(|i| i * 0x9E37_79B9_7F4A_7C15).collect();
    common::put(&a, "w", &keys, 3000);
    // Published and received by every master's replica (`wait_replicas`), reported so.
    let rw = Remote::connect(RemoteConfig {
        wait_replicas: 1,
        timeout: Duration::from_secs(10),
        ..cfg.clone()
    })
    .unwrap();
    // (A node starved of CPU past the 1 s node timeout on a loaded machine can fail over
    // under the first push: an outage is retried, anything else fails the test.)
    let t = Instant::now();
    let p = loop {
        match push_window(&a, &rw, "w", Some(Expect::New)) {
            Ok(p) => break p,
            Err(e) if e.is_outage() && t.elapsed() < Duration::from_secs(30) => {
                cluster.wait_ok();
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("first push: {e}"),
        }
    };
    assert_eq!(p.replicated, Some(true), "{p:?}");
    // Two replicas a master asked for, one each exists: not replicated within the timeout.
    let r2 = Remote::connect(RemoteConfig {
        wait_replicas: 2,
        ..cfg.clone()
    })
    .unwrap();
    common::put(&a, "w2", &[7, 8], 3000);
    let p = push_window(&a, &r2, "w2", Some(Expect::New)).unwrap();
    assert_eq!(p.replicated, Some(false), "{p:?}");
    assert_eq!(p.generation, 1, "published all the same");

    let masters = cluster.masters(0);
    assert_eq!(masters.len(), 3, "{masters:?}");
    let victim = masters[1];
    cluster.pause(victim);
    // Its replica takes over once the node timeout (1 s) passes and the election ends.
    let t = Instant::now();
    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);
    let pulled = loop {
        match pull_window(&b, &r, "w", Replace::No) {
            Ok(p) => break p,
            Err(e) => {
                assert!(e.is_outage(), "during a failover only outages, got {e}");
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no failover: {e}\n{}\n{}",
                    cluster.cmd(&["CLUSTER", "NODES"]),
                    cluster.logs()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert_eq!(pulled.fetched, 64);
    common::check(&b, "w", &keys, 3000);
    cluster.resume(victim);

    // Kill every replica, then a master: its slots have no one left.
    cluster.wait_ok_except(usize::MAX);
    let masters = cluster.masters(masters[0]);
    let replicas: Vec<usize> = (0..6).filter(|i| !masters.contains(i)).collect();
    for i in replicas {
        cluster.kill(i);
    }
    let dead = masters[2];
    cluster.kill(dead);
    let c_dir = tempfile::tempdir().unwrap();
    let (c, _) = common::open(c_dir.path(), &engine);
    let t = Instant::now();
    let e = pull_window(&c, &r, "w", Replace::No).expect_err("a third of the slots are gone");
    assert!(e.is_outage(), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert!(c.read_window("w").is_err());
    // Local service is untouched.
    common::check(&a, "w", &keys, 3000);
    // The master comes back (no persistence: its blocks are gone): a pull now reports the
    // missing blocks, or the missing head, as NOT_FOUND — never stale or wrong bytes.
    cluster.restart(dead);
    let t = Instant::now();
    loop {
        match pull_window(&c, &r, "w", Replace::No) {
            Ok(p) => {
                // Every block and the head happened to live on the other two masters.
                common::check(&c, "w", &keys, 3000);
                assert_eq!(p.fetched, 64);
                break;
            }
            Err(e) if e.code() == cwm::error::ErrorCode::NotFound => {
                // What the restarted master held is gone: nothing is stored from it.
                assert!(c.read_window("w").is_err(), "a failed pull stores nothing");
                break;
            }
            Err(e) => {
                assert!(e.is_outage(), "{e}");
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the master did not come back: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
