//! Publish announcements are sharded (`SPUBLISH` / `SSUBSCRIBE`): a listener subscribes at the
//! master serving the channel's slot. When that master dies and its replica takes over, the
//! listener subscribes again at the new master and hears the next announcement; when the node
//! it listens at stops answering (paused: its socket stays open), the listener notices within
//! its keepalive and request timeout instead of waiting forever.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cwm::remote::{Remote, RemoteConfig};

/// Index of the node that masters `slot`, from node `from`'s `CLUSTER NODES` (none while the
/// master is suspected of failing).
fn owner(cluster: &common::redis::Cluster, from: usize, slot: u16) -> Option<usize> {
    let out = cluster.cmd_on(from, &["CLUSTER", "NODES"]);
    for l in out
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail"))
    {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port: u16 = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
        for r in &f[8..] {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                if (a..=b).contains(&slot) {
                    return cluster.nodes.iter().position(|n| n.port == port);
                }
            }
        }
    }
    None
}

#[test]
fn a_listener_follows_the_announcement_channel_to_the_new_master() {
    let mut cluster = common::redis::Cluster::start(3, 1);
    let cfg = RemoteConfig {
        nodes: cluster.urls(),
        timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let publisher = Remote::connect(cfg.clone()).unwrap();
    let listener = Arc::new(Remote::connect(cfg).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Vec<u128>>();
    let (l, s) = (listener.clone(), stop.clone());
    // As the daemon listens: again at the next seed whenever a subscription ends.
    let th = std::thread::spawn(move || {
        let mut node = 0;
        while !s.load(Ordering::SeqCst) {
            let _ = l.listen(node, Duration::from_millis(200), |got| {
                if let Some(keys) = got {
                    let _ = tx.send(keys);
                }
                !s.load(Ordering::SeqCst)
            });
            node += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // Announce `key` until the listener hears it (it may be between subscriptions).
    let hear = |key: u128, within: Duration| {
        let t = Instant::now();
        while t.elapsed() < within {
            let _ = publisher.announce(&[key]);
            if let Ok(k) = rx.recv_timeout(Duration::from_millis(300)) {
                if k == [key] {
                    return true;
                }
            }
        }
        false
    };
    assert!(hear(1, Duration::from_secs(15)), "first announcement");

    let slot: u16 = cluster
        .cmd(&["CLUSTER", "KEYSLOT", &publisher.announce_channel()])
        .trim()
        .parse()
        .unwrap();
    let m = owner(&cluster, 0, slot).expect("a master serves the channel's slot");
    // Sharded: the listener is a shard-channel subscriber of the slot's master (looked at
    // until it is: under load a keepalive can time out and the listener be between two
    // subscriptions for a moment).
    let ch = publisher.announce_channel();
    let t = Instant::now();
    loop {
        let subs = cluster.cmd_on(m, &["PUBSUB", "SHARDNUMSUB", &ch]);
        if subs.lines().nth(1).map(str::trim) == Some("1") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{subs}");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.kill(m);
    let other = (m + 1) % cluster.nodes.len();
    let t = Instant::now();
    while owner(&cluster, other, slot).is_none_or(|o| o == m) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no failover:\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.wait_ok_except(m);
    assert!(
        hear(2, Duration::from_secs(30)),
        "the listener never resubscribed at the new master:\n{}",
        cluster.logs()
    );
    stop.store(true, Ordering::SeqCst);
    th.join().unwrap();
}

#[test]
fn a_listener_at_a_node_that_stops_answering_gives_up_within_its_keepalive() {
    let cluster = common::redis::Cluster::single(&[]);
    let r = Remote::connect(RemoteConfig {
        nodes: cluster.urls(),
        timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap();
    let t = Instant::now();
    let mut paused = false;
    let e = r
        .listen(0, Duration::from_millis(200), |_| {
            if !paused && t.elapsed() > Duration::from_secs(1) {
                cluster.pause(0);
                paused = true;
            }
            t.elapsed() < Duration::from_secs(30)
        })
        .expect_err("a paused node must end the subscription");
    let took = t.elapsed();
    cluster.resume(0);
    assert!(paused);
    assert!(took < Duration::from_secs(15), "{took:?}: {e}");
    assert!(e.to_string().contains("stopped answering"), "{e}");
}
