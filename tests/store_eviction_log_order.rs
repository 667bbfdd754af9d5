//! Eviction in log order (`fifo`) and the segments it is about to empty: `fifo` takes the
//! oldest-written unnamed windows whatever their thaws (LRU keeps a thawed one); the segments
//! `about_to_empty` names for the next victims are exactly those an eviction of them leaves
//! without a live record, so compacting them then copies nothing — which is why compaction
//! after an eviction leaves them for the next pass instead of copying their live blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, CompactOptions, EvictionPolicy, Retention, StoreConfig, WindowSpec};

/// One 40 KiB block per window: block record, manifest and segment header fill a 64 KiB
/// segment, so each window has a segment of its own.
const LEN: u64 = 40 << 10;

#[test]
fn fifo_evicts_in_write_order_and_names_the_segments_it_empties() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(tmp.path().join("d"));
    cfg.segment_size = 64 << 10;
    let (store, _) = cwm::store::Store::open_with_engine(cfg, engine).unwrap();
    for i in 0..6u128 {
        let k = keys(10 + i, 1);
        let p = payload(k[0] as u64, LEN as usize);
        let s = WindowSpec {
            retention: Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            ..spec(&format!("u{i}"), &k, LEN)
        };
        store.put_window(s, &[&p]).unwrap();
    }
    store.seal_active().unwrap();
    // The oldest window was just used: LRU keeps it, log order does not.
    store.record_hit("u0");
    let per = store.block_bytes().unwrap() / 6;
    let budget = 1 << 30;
    let fifo = store
        .about_to_empty(EvictionPolicy::Fifo, budget, 2 * per)
        .unwrap();
    let lru = store
        .about_to_empty(EvictionPolicy::Lru, budget, 2 * per)
        .unwrap();
    assert_eq!(fifo.len(), 2, "one segment per victim: {fifo:?}");
    assert_eq!(lru.len(), 2, "{lru:?}");
    assert_ne!(
        fifo, lru,
        "LRU's next victims are u1 and u2, fifo's u0 and u1"
    );
    assert!(store
        .about_to_empty(EvictionPolicy::Fifo, budget, 0)
        .unwrap()
        .is_empty());

    let live = store.block_bytes().unwrap();
    let rep = store
        .evict(EvictionPolicy::Fifo, live - 2 * per, budget)
        .unwrap();
    assert_eq!(rep.evicted, ["u0", "u1"]);
    assert!(rep.reached);
    // What about_to_empty named holds nothing live now: compacting it copies nothing.
    let mut ids: Vec<u64> = fifo.into_iter().collect();
    ids.sort_unstable();
    let c = store
        .compact_segments(&ids, &CompactOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(c.bytes_copied, 0, "{c:?}");
    let mut removed = c.segments_removed.clone();
    removed.sort_unstable();
    assert_eq!(removed, ids);
    // The rest is intact, and an LRU pass now takes the oldest-used first.
    for i in 2..6u128 {
        check(&store, &format!("u{i}"), &keys(10 + i, 1), LEN);
    }
    store.record_hit("u2");
    let live = store.block_bytes().unwrap();
    let rep = store
        .evict(EvictionPolicy::Lru, live - per, budget)
        .unwrap();
    assert_eq!(rep.evicted, ["u3"]);
    assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
}
