//! Shared tier out of memory, under both eviction policies the docs name. `noeviction` (Redis's
//! default): writes fail with OOM — the push reports NO_SPACE as an outage of the tier, the
//! local window is untouched. `volatile-lfu`: blocks (which carry TTLs) are evicted to make room
//! while heads and manifests (which carry none) stay; a pull of a window whose blocks were
//! evicted reports NOT_FOUND and stores nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use cwm::error::ErrorCode;
use cwm::remote::{pull_window, push_window, Expect, Remote, RemoteConfig};
use cwm::store::Replace;

fn remote(c: &common::redis::Cluster) -> Remote {
    Remote::connect(RemoteConfig {
        nodes: c.urls(),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn a_full_tier_refuses_or_evicts_blocks_and_never_serves_a_partial_window() {
    let (_, engine) = common::engines().remove(0);
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(a_dir.path(), &engine);
    // 24 blocks of 512 KiB: 12 MiB, three times the tier's memory.
    let keys: Vec<u128> = (1..=24u128).map(|i| i << 40).collect();
    common::put(&a, "big", &keys, 512 << 10);
    common::put(&a, "small", &[7], 4096);

    let full =
        common::redis::Cluster::single(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let r = remote(&full);
    let e = push_window(&a, &r, "big", Some(Expect::New)).expect_err("out of memory");
    assert_eq!(e.code(), ErrorCode::NoSpace, "{e}");
    assert!(e.is_outage());
    assert!(r.head("big").unwrap().is_none(), "nothing published");
    common::check(&a, "big", &keys, 512 << 10);

    let lfu = common::redis::Cluster::single(&[
        "--maxmemory",
        "4mb",
        "--maxmemory-policy",
        "volatile-lfu",
    ]);
    let r = remote(&lfu);
    push_window(&a, &r, "small", Some(Expect::New)).unwrap();
    let p = push_window(&a, &r, "big", Some(Expect::New)).expect("blocks are evicted to make room");
    assert_eq!(p.written, 24);
    // Heads and manifests carry no TTL: both windows are still published.
    assert!(r.manifest("big").is_ok());
    assert!(r.manifest("small").is_ok());
    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);
    let e = pull_window(&b, &r, "big", Replace::No).expect_err("most blocks were evicted");
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    assert!(
        b.read_window("big").is_err(),
        "a failed pull stores nothing"
    );
}
