//! A read in progress never loses its blocks: a window opened for reading (as a thaw does)
//! is evicted, and compaction then deletes the segments its blocks were in; the reader still
//! reads every block, verified, with the right bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::io::AlignedBuf;
use cwm::store::{Class, CompactOptions, EvictionPolicy, Retention, WindowSpec};

const LEN: u64 = 65536;

#[test]
fn an_open_reader_survives_eviction_and_compaction() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&tmp.path().join("d"));
    cfg.segment_size = 256 << 10;
    let (store, _) = cwm::store::Store::open_with_engine(cfg, engine).unwrap();
    // Several segments of unnamed windows.
    for w in 0..8u128 {
        let ks = keys(10 + w, 3);
        let payloads: Vec<Vec<u8>> = ks
            .iter()
            .map(|&k| payload(k as u64, LEN as usize))
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let s = WindowSpec {
            retention: Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            ..spec(&format!("u{w}"), &ks, LEN)
        };
        store.put_window(s, &refs).unwrap();
    }
    let r = store.open_window("u0").unwrap();
    let before: Vec<_> = store
        .stats()
        .unwrap()
        .segments
        .iter()
        .map(|s| s.id)
        .collect();
    // Evict everything, then compact every sealed segment: u0's segment goes.
    let rep = store.evict(EvictionPolicy::Lru, 0, 1).unwrap();
    assert_eq!(rep.evicted.len(), 8);
    let opts = CompactOptions {
        live_ratio: 1.0,
        ..Default::default()
    };
    let c = store.compact(&opts, &mut |_| {}).unwrap();
    assert!(!c.segments_removed.is_empty(), "{c:?}");
    let after: Vec<_> = store
        .stats()
        .unwrap()
        .segments
        .iter()
        .map(|s| s.id)
        .collect();
    assert!(
        before.iter().any(|id| !after.contains(id)),
        "no segment was deleted"
    );
    assert!(matches!(
        store.open_window("u0"),
        Err(cwm::store::StoreError::NotFound(_))
    ));
    // The reader opened before still reads every block, verified.
    for (i, &k) in keys(10, 3).iter().enumerate() {
        let mut img = AlignedBuf::zeroed(r.record_len(i) as usize);
        store.read_blocks(&r, i, &mut [&mut img[..]]).unwrap();
        assert_eq!(
            r.payload(i, &img),
            payload(k as u64, LEN as usize),
            "block {i}"
        );
    }
}
