//! Shared tier through the daemon: two `cwm serve` instances on their own data directories and
//! one real Redis Cluster. A window frozen and pushed on A is pulled and thawed bit-exact on B
//! after A is killed and its data directory deleted; B's `health` shows the tier; an older
//! generation shown later (a lost publish) is refused as stale.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};

#[test]
fn frozen_and_pushed_on_one_instance_thaws_bit_exact_on_another() {
    let cluster = common::redis::Cluster::start(3, 0);
    let urls = cluster.urls().join(",");
    let mut a = fixture(&["--remote", &urls, "--remote-write", "off"]);
    let b = fixture(&["--remote", &urls]);
    let o = cli_freeze(&a.daemon.socket, "w1", "0,1,2");
    assert!(o.status.success(), "{o:?}");
    let o = cli(&a.daemon.socket, &["push", "w1"]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("pushed w1 as generation 1: 3 blocks, 3 written"),
        "{out}"
    );
    // Pushing the same name again as new: refused, exit 4 (ALREADY_EXISTS).
    let o = cli(&a.daemon.socket, &["push", "w1"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    // --replace publishes generation 2 (no block written again).
    let o = cli(&a.daemon.socket, &["push", "w1", "--replace"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("generation 2: 3 blocks, 0 written"),
        "{o:?}"
    );

    // A's metrics count the pushes by outcome and the bytes sent (3 blocks of 16 KiB, once).
    assert_series(
        &metrics_text(&a.daemon.socket),
        &[
            r#"cwm_remote_operations_total{op="push",outcome="ok"} 2"#,
            r#"cwm_remote_operations_total{op="push",outcome="ALREADY_EXISTS"} 1"#,
            r#"cwm_remote_bytes_total{direction="sent"} 49152"#,
        ],
    );

    // A dies and its data directory goes.
    let _ = a.daemon.child.kill();
    let _ = a.daemon.child.wait();
    std::fs::remove_dir_all(a.tmp.path().join("data")).unwrap();

    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    assert_ne!(
        read_block(&layout, &b.mem, 10).unwrap(),
        read_block(&layout, &a.mem, 0).unwrap()
    );
    let o = cli(&b.daemon.socket, &["pull", "w1"]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("pulled w1 generation 2 as version 1: 3 blocks, 3 fetched"),
        "{out}"
    );
    let o = cli(
        &b.daemon.socket,
        &["thaw", "w1", "--engine", "e1", "--block-ids", "10,11,12"],
    );
    assert!(o.status.success(), "{o:?}");
    for (x, y) in [(0, 10), (1, 11), (2, 12)] {
        assert_eq!(
            read_block(&layout, &a.mem, x).unwrap(),
            read_block(&layout, &b.mem, y).unwrap(),
            "A's block {x} -> B's block {y}"
        );
    }
    let mut c = cwm::control::client::Client::connect(&b.daemon.socket).unwrap();
    let h = c.call_final(serde_json::json!({"op": "health"})).unwrap();
    assert_eq!(h["remote"]["configured"], true, "{h}");
    assert_eq!(h["remote"]["status"], "ok", "{h}");
    assert_series(
        &metrics_text(&b.daemon.socket),
        &[
            r#"cwm_remote_operations_total{op="pull",outcome="ok"} 1"#,
            r#"cwm_remote_bytes_total{direction="received"} 49152"#,
        ],
    );
    // The tier loses w1's generation 2 (as a failover to a replica it had not reached
    // would): B, which pulled generation 2, refuses the older head as stale.
    let head = format!("cwm:v1:w:{{{:032x}}}:head", cwm::store::name_key("w1"));
    let set = cluster.cmd(&["HSET", &head, "gen", "1"]);
    assert_eq!(set.trim(), "0", "{set}");
    let o = cli(&b.daemon.socket, &["pull", "w1", "--replace"]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("UNAVAILABLE") && err.contains("older than generation 2"),
        "{err}"
    );
    // A name the tier does not hold: NOT_FOUND, exit 3.
    let o = cli(&b.daemon.socket, &["pull", "nope"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
}
