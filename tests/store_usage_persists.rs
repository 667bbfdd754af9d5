//! Window usage (last use, hits) survives a restart, so eviction after a restart still takes
//! the least recently used window, not the oldest: saved at a clean stop, applied at the open
//! to the windows still at the commit it names; a window replaced since starts afresh; a
//! damaged usage file is ignored and reported, never trusted; an open without checkpoints
//! (`cwm fsck`) writes none.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, EvictionPolicy, Replace, Retention, Store, WindowSpec};
use std::path::Path;

const LEN: u64 = 8192;

fn put_unnamed(store: &Store, name: &str, keys: &[u128], replace: bool) {
    let mut s = WindowSpec {
        retention: Retention {
            class: Class::Unnamed,
            expires_unix_ms: None,
        },
        ..spec(name, keys, LEN)
    };
    if replace {
        s.replace = Replace::Any;
    }
    let p: Vec<Vec<u8>> = keys
        .iter()
        .map(|&k| payload(k as u64, LEN as usize))
        .collect();
    let refs: Vec<&[u8]> = p.iter().map(Vec::as_slice).collect();
    store.put_window(s, &refs).unwrap();
}

fn reopen(dir: &Path) -> (Store, cwm::store::RecoveryReport) {
    let (_, engine) = engines().remove(0);
    open(dir, &engine)
}

/// u0 (oldest), u1, u2 (newest); u0 thawed twice since. Returns u0's last use.
fn build(dir: &Path) -> i64 {
    let (store, _) = reopen(dir);
    for i in 0..3u128 {
        put_unnamed(&store, &format!("u{i}"), &keys(i + 1, 2), false);
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    store.record_hit("u0");
    store.record_hit("u0");
    store.get("u0").unwrap().last_use_unix_ms
}

fn evict_one(store: &Store) -> Vec<String> {
    let live = store.block_bytes().unwrap();
    store
        .evict(EvictionPolicy::Lru, live - 1, live)
        .unwrap()
        .evicted
}

#[test]
fn usage_survives_a_clean_restart_and_orders_eviction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let used = build(&dir);
    let (store, rep) = reopen(&dir);
    assert_eq!(rep.usage_restored, 1, "{rep:?}");
    assert!(rep.ignored_usage.is_none(), "{rep:?}");
    let u0 = store.get("u0").unwrap();
    assert_eq!((u0.hits, u0.last_use_unix_ms), (2, used));
    // The least recently used is u1 now, not u0 (the oldest).
    assert_eq!(evict_one(&store), ["u1"]);
}

#[test]
fn a_replaced_window_starts_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build(&dir);
    {
        let (store, _) = reopen(&dir);
        // Saved usage names u0's first commit; replaced without a clean stop after.
        put_unnamed(&store, "u0", &keys(9, 2), true);
        std::mem::forget(store); // no clean stop: usage.bin still names the old commit
    }
    std::fs::remove_file(dir.join("LOCK")).ok();
    let (store, rep) = reopen(&dir);
    assert_eq!(rep.usage_restored, 0, "{rep:?}");
    assert_eq!(store.get("u0").unwrap().hits, 0);
}

#[test]
fn a_damaged_usage_file_is_ignored_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build(&dir);
    let f = dir.join("usage.bin");
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&f, &b).unwrap();
    let (store, rep) = reopen(&dir);
    assert!(
        rep.ignored_usage
            .as_deref()
            .is_some_and(|w| w.contains("checksum")),
        "{rep:?}"
    );
    assert_eq!(rep.usage_restored, 0);
    assert_eq!(
        store.get("u0").unwrap().hits,
        0,
        "nothing taken from a damaged file"
    );
    // The next clean stop writes a good one.
    drop(store);
    let (_, rep) = reopen(&dir);
    assert!(rep.ignored_usage.is_none(), "{rep:?}");
}

#[test]
fn an_open_without_checkpoints_writes_no_usage_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build(&dir);
    std::fs::remove_file(dir.join("usage.bin")).unwrap();
    let mut c = config(&dir);
    c.use_checkpoints = false;
    let (_, engine) = engines().remove(0);
    let (store, _) = Store::open_with_engine(c, engine).unwrap();
    store.record_hit("u1");
    drop(store);
    assert!(!dir.join("usage.bin").exists());
}
