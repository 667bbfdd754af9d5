//! An eviction pass writes its tombstones in runs (one write per run of adjacent records, not
//! one each) under the appender lock; a run never spans a rotation. Evicting more windows than
//! a segment holds tombstones for: every one is gone, stays gone after a reopen, and the log
//! verifies clean — the sealed segment's tombstones were written before its seal.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, EvictionPolicy, Store, StoreConfig};

#[test]
fn an_eviction_across_a_rotation_writes_every_tombstone() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = StoreConfig::new(tmp.path());
        cfg.segment_size = 1 << 20;
        let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
        put(&store, "pinned", &keys(1, 2), 4096);
        for i in 0..200u128 {
            let k = keys(i + 10, 1);
            let p = payload(i as u64, 4096);
            let mut s = spec(&format!("u{i}"), &k, 4096);
            s.retention.class = Class::Unnamed;
            store.put_window(s, &[&p[..]]).unwrap();
        }
        let rep = store.evict(EvictionPolicy::Lru, 0, 1 << 30).unwrap();
        assert_eq!(rep.evicted.len(), 200, "{engine_name}");
        assert!(store.verify_log().unwrap().is_empty(), "{engine_name}");
        let names =
            |s: &Store| -> Vec<String> { s.list().unwrap().into_iter().map(|w| w.name).collect() };
        assert_eq!(names(&store), vec!["pinned"], "{engine_name}");
        drop(store);
        let (store, rep) = Store::open_with_engine(cfg, engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{engine_name}: {rep:?}"
        );
        assert_eq!(names(&store), vec!["pinned"], "{engine_name}");
        check(&store, "pinned", &keys(1, 2), 4096);
        assert!(store.verify_log().unwrap().is_empty(), "{engine_name}");
    }
}
