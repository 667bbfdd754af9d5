//! The per-name publish lease (EC-001 across instances): while another instance holds a name's
//! lease, a push of that name is BUSY and publishes nothing; the push takes and releases the
//! lease itself; a daemon's background publish that meets BUSY retries until the lease is
//! released, then publishes with no command.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

use cwm::error::ErrorCode;
use cwm::remote::{push_window, Expect, Remote, RemoteConfig};

#[test]
fn a_name_leased_by_another_instance_is_published_only_after_its_release() {
    let cluster = common::redis::Cluster::start(3, 0);
    let r = Remote::connect(RemoteConfig {
        nodes: cluster.urls(),
        ..Default::default()
    })
    .unwrap();
    let (_, engine) = common::engines().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(dir.path(), &engine);
    common::put(&a, "w", &[11, 12, 13], 4096);

    // "Another instance" holds w's lease: the push is BUSY and the name stays unpublished.
    let other = r.lock("w", Duration::from_secs(30)).unwrap();
    let e = push_window(&a, &r, "w", Some(Expect::New)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Busy, "{e}");
    assert!(r.head("w").unwrap().is_none());
    assert!(r.unlock("w", other).unwrap());
    let p = push_window(&a, &r, "w", Some(Expect::New)).unwrap();
    assert_eq!(p.generation, 1);
    // The push released its lease: the name can be leased again at once.
    let t = r.lock("w", Duration::from_secs(30)).unwrap();
    assert!(r.unlock("w", t).unwrap());

    // A daemon's background publish of a leased name waits for the release.
    let urls = cluster.urls().join(",");
    let f = fixture(&["--remote", &urls]);
    let held = r.lock("w1", Duration::from_secs(60)).unwrap();
    let o = cli_freeze(&f.daemon.socket, "w1", "0,1,2");
    assert!(o.status.success(), "{o:?}");
    let mut c = cwm::control::client::Client::connect(&f.daemon.socket).unwrap();
    let listed = |c: &mut cwm::control::client::Client| {
        let v = c
            .call_final(serde_json::json!({"op": "remote.list"}))
            .unwrap();
        v["windows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "w1")
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !listed(&mut c),
        "published while another instance held the lease"
    );
    assert!(r.unlock("w1", held).unwrap());
    let t = Instant::now();
    while !listed(&mut c) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never published after the release"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
