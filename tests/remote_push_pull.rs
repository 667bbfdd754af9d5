//! Shared tier: a window frozen (stored) on instance A thaws bit-exact on instance B through a
//! real 3-master Redis Cluster, after A's data directory is gone; blocks already in the tier
//! or in B's store are not moved again; blocks larger than one value are split and joined.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use cwm::remote::{pull_window, push_window, Expect, Remote, RemoteConfig};
use cwm::store::Replace;

fn remote(urls: Vec<String>, max_value: usize) -> Remote {
    Remote::connect(RemoteConfig {
        nodes: urls,
        max_value,
        ..Default::default()
    })
    .expect("connect")
}

#[test]
fn a_window_pushed_by_one_instance_is_pulled_bit_exact_by_another() {
    let cluster = common::redis::Cluster::start(3, 0);
    let (_, engine) = common::engines().remove(0);
    // Blocks of 20,000 bytes in values of at most 8 KiB: three parts each.
    let len = 20_000u64;
    let keys: Vec<u128> = (1..=12u128).map(|i| i * 0x1_0000_0001).collect();
    let a_dir = tempfile::tempdir().unwrap();
    let ra = remote(cluster.urls(), 8 << 10);
    {
        let (a, _) = common::open(a_dir.path(), &engine);
        common::put(&a, "chat-1", &keys, len);
        let p = push_window(&a, &ra, "chat-1", Some(Expect::New)).expect("push");
        assert_eq!((p.generation, p.blocks, p.written), (1, 12, 12));
        assert_eq!(p.bytes, 12 * len);
        // A second window sharing the first 8 blocks writes only its 3 new ones.
        let mut k2 = keys[..8].to_vec();
        k2.extend([77u128, 78, 79]);
        common::put(&a, "chat-2", &k2, len);
        let p = push_window(&a, &ra, "chat-2", Some(Expect::New)).expect("push 2");
        assert_eq!((p.blocks, p.written), (11, 3));
        // Insert-only: pushing chat-1 again as new is refused.
        let e = push_window(&a, &ra, "chat-1", Some(Expect::New)).expect_err("exists");
        assert_eq!(e.code(), cwm::error::ErrorCode::AlreadyExists);
    }
    // A's data directory is gone: the tier is all B has.
    drop(a_dir);
    let b_dir = tempfile::tempdir().unwrap();
    let rb = remote(cluster.urls(), 8 << 10);
    let (b, _) = common::open(b_dir.path(), &engine);
    // B holds a prefix of chat-1 already: those blocks are not fetched.
    common::put(&b, "local-prefix", &keys[..4], len);
    let r = pull_window(&b, &rb, "chat-1", Replace::No).expect("pull");
    assert_eq!(
        (r.generation, r.version, r.blocks, r.fetched),
        (1, 1, 12, 8)
    );
    assert_eq!(r.bytes, 8 * len);
    common::check(&b, "chat-1", &keys, len);
    let r = pull_window(&b, &rb, "chat-2", Replace::No).expect("pull 2");
    assert_eq!(
        r.fetched, 3,
        "chat-2 shares 8 blocks with chat-1, now local"
    );
    // The manifest came across whole: tokens, session, namespace.
    let (m, _) = b.read_window("chat-2").unwrap();
    assert_eq!(m.tokens.len(), 11 * 16);
    assert_eq!(m.namespace, "test-model");
    // Pulling a name the tier does not hold: NOT_FOUND, nothing stored.
    let e = pull_window(&b, &rb, "no-such-window", Replace::No).expect_err("missing");
    assert_eq!(e.code(), cwm::error::ErrorCode::NotFound);
    assert!(b.read_window("no-such-window").is_err());
}
