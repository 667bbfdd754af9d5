//! Retention in the store: a window's class and TTL survive a reopen (manifest version 2 at
//! creation, retention records after); an expired window is gone for every reader at once,
//! also across a reopen before its tombstone is written, and its name is free again; eviction
//! takes unnamed windows only, in the policy's order, down to the target, and keeps every
//! block a pinned window holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, EvictionPolicy, Retention, StoreError, WindowSpec};

const LEN: u64 = 8192;

fn put_with(store: &cwm::store::Store, name: &str, keys: &[u128], r: Retention) {
    let s = WindowSpec {
        retention: r,
        ..spec(name, keys, LEN)
    };
    let payloads: Vec<Vec<u8>> = keys
        .iter()
        .map(|&k| payload(k as u64, LEN as usize))
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    store.put_window(s, &refs).unwrap();
}

const UNNAMED: Retention = Retention {
    class: Class::Unnamed,
    expires_unix_ms: None,
};

#[test]
fn class_and_ttl_survive_a_reopen() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let later = cwm::clock::now_unix_ms() + 3_600_000;
    {
        let (store, _) = open(&dir, &engine);
        put_with(&store, "auto-1", &keys(1, 2), UNNAMED);
        put_with(
            &store,
            "chat-1",
            &keys(2, 2),
            Retention {
                class: Class::Pinned,
                expires_unix_ms: Some(later),
            },
        );
        put(&store, "chat-2", &keys(3, 2), LEN);
        // Changed after creation: a retention record each.
        store.set_retention("chat-2", None, UNNAMED).unwrap();
        store
            .set_retention("auto-1", Some(1), Retention::default())
            .unwrap();
        // A stale expected version is refused.
        assert!(matches!(
            store.set_retention("auto-1", Some(7), UNNAMED),
            Err(StoreError::ConcurrentModification { .. })
        ));
    }
    let (store, _) = open(&dir, &engine);
    let a = store.get("auto-1").unwrap();
    assert_eq!((a.class, a.expires_unix_ms), (Class::Pinned, None));
    let c1 = store.get("chat-1").unwrap();
    assert_eq!((c1.class, c1.expires_unix_ms), (Class::Pinned, Some(later)));
    let c2 = store.get("chat-2").unwrap();
    assert_eq!(c2.class, Class::Unnamed);
    // A replace starts from the new manifest's retention; the old record no longer applies.
    let s = WindowSpec {
        replace: cwm::store::Replace::Any,
        ..spec("chat-2", &keys(3, 2), LEN)
    };
    let p: Vec<Vec<u8>> = keys(3, 2)
        .iter()
        .map(|&k| payload(k as u64, LEN as usize))
        .collect();
    let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
    store.put_window(s, &refs).unwrap();
    drop(store);
    let (store, _) = open(&dir, &engine);
    assert_eq!(store.get("chat-2").unwrap().class, Class::Pinned);
    check(&store, "chat-2", &keys(3, 2), LEN);
}

#[test]
fn an_expired_window_is_gone_for_every_reader_even_before_its_tombstone() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let ks = keys(5, 3);
    {
        let (store, _) = open(&dir, &engine);
        put(&store, "short", &ks, LEN);
        put(&store, "other", &keys(6, 1), LEN);
        assert!(store.longest_prefix(&ks, None).unwrap().is_some());
        let past = Retention {
            class: Class::Pinned,
            expires_unix_ms: Some(cwm::clock::now_unix_ms() - 1),
        };
        store.set_retention("short", None, past).unwrap();
        assert!(matches!(store.get("short"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            store.open_window("short"),
            Err(StoreError::NotFound(_))
        ));
        assert!(store.longest_prefix(&ks, None).unwrap().is_none());
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.list_page(0, 10, None).unwrap().1, 1);
    }
    // Reopened before any tombstone: still gone.
    {
        let (store, _) = open(&dir, &engine);
        assert!(matches!(store.get("short"), Err(StoreError::NotFound(_))));
        assert_eq!(store.list().unwrap().len(), 1);
        // The reaper writes the tombstone; the blocks go (nothing else holds them).
        let expired = store.expire_due().unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].name, "short");
        assert_eq!(store.block_refs(ks[0]).unwrap(), 0);
        assert!(store.expire_due().unwrap().is_empty());
        assert!(store.check_invariants().unwrap().is_empty());
    }
    let (store, _) = open(&dir, &engine);
    assert!(matches!(store.get("short"), Err(StoreError::NotFound(_))));
    // The name is free again.
    put(&store, "short", &ks, LEN);
    check(&store, "short", &ks, LEN);
    check(&store, "other", &keys(6, 1), LEN);
}

#[test]
fn an_expired_name_can_be_frozen_again_before_its_tombstone() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    {
        let (store, _) = open(&dir, &engine);
        put(&store, "n", &keys(7, 2), LEN);
        let past = Retention {
            class: Class::Pinned,
            expires_unix_ms: Some(cwm::clock::now_unix_ms() - 1),
        };
        store.set_retention("n", None, past).unwrap();
        put(&store, "n", &keys(8, 2), LEN);
        check(&store, "n", &keys(8, 2), LEN);
        assert_eq!(store.block_refs(keys(7, 2)[0]).unwrap(), 0);
        assert!(store.check_invariants().unwrap().is_empty());
    }
    let (store, _) = open(&dir, &engine);
    check(&store, "n", &keys(8, 2), LEN);
    assert_eq!(store.get("n").unwrap().expires_unix_ms, None);
}

#[test]
fn eviction_takes_unnamed_windows_in_lru_order_and_keeps_pinned_blocks() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(&tmp.path().join("d"), &engine);
    // A pinned window whose first block is shared with unnamed window u3.
    let pinned = keys(100, 2);
    put(&store, "pinned", &pinned, LEN);
    for i in 0..6u128 {
        let mut ks = keys(10 + i, 2);
        if i == 3 {
            ks[0] = pinned[0];
        }
        put_with(&store, &format!("u{i}"), &ks, UNNAMED);
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // u0 and u1 used since: they go last.
    store.record_hit("u0");
    std::thread::sleep(std::time::Duration::from_millis(3));
    store.record_hit("u1");
    let live = store.block_bytes().unwrap();
    // Eviction counts block records. Evicting u2 gives up two, u3 one (the other is the pinned
    // window's), u4 two: a target four records below needs exactly those three, least recently
    // used first.
    let rec = cwm::store::format::record_len(LEN);
    let target = live - 4 * rec - 1;
    let rep = store
        .evict(EvictionPolicy::Lru, target, live)
        .expect("evict");
    assert!(rep.reached, "{rep:?}");
    assert_eq!(rep.evicted, ["u2", "u3", "u4"], "{rep:?}");
    assert!(store.block_bytes().unwrap() <= target);
    // The pinned window is whole, the block it shared with u3 kept.
    check(&store, "pinned", &pinned, LEN);
    assert_eq!(store.block_refs(pinned[0]).unwrap(), 1);
    assert!(store.get("u0").is_ok() && store.get("u1").is_ok());
    assert_eq!(store.get("u0").unwrap().hits, 1);
    // Asking for less than pinned data: every unnamed window goes, the target is not reached.
    let rep = store.evict(EvictionPolicy::S3fifo, 0, live).unwrap();
    assert!(!rep.reached);
    assert_eq!(
        store
            .list()
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect::<Vec<_>>(),
        ["pinned"]
    );
    assert!(store.check_invariants().unwrap().is_empty());
    let cb = store.class_bytes().unwrap();
    assert_eq!((cb.pinned, cb.unnamed), (2 * LEN, 0));
}
