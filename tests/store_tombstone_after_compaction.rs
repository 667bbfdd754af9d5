//! A deleted window stays deleted after compaction dropped the manifest its tombstone names:
//! W v1 (segment 1, beside live data), W v2 (segment 2), delete (tombstone names v2);
//! compaction empties segment 2 (v2 was dead) but keeps segment 1 and so the tombstone; at
//! the next open the tombstone must remove v1 too (it is older than the tombstone), not only
//! the version it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{CompactOptions, Replace, StoreConfig};

const LEN: u64 = 64 << 10;

#[test]
fn a_deleted_window_stays_deleted_when_compaction_dropped_the_named_version() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut cfg = StoreConfig::new(dir);
        cfg.segment_size = 1 << 20;
        cfg.engine = cwm::io::EngineKind::Psync;
        let open = || {
            cwm::store::Store::open_with_engine(cfg.clone(), engine.clone())
                .unwrap()
                .0
        };
        let store = open();
        // Segment 1: W v1 and a live window X that keeps segment 1 above the live ratio.
        put(&store, "w", &keys(1, 2), LEN);
        put(&store, "x", &keys(2, 12), LEN);
        // Segment 2: W v2 (fills it past the first segment).
        let k2 = keys(3, 12);
        let p: Vec<Vec<u8>> = k2
            .iter()
            .map(|&k| payload(k as u64, LEN as usize))
            .collect();
        let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
        let mut sp = spec("w", &k2, LEN);
        sp.replace = Replace::Any;
        assert_eq!(store.put_window(sp, &refs).unwrap().version, 2);
        store.delete_window("w", None).unwrap();
        // More data so that segment 2 is sealed.
        put(&store, "y", &keys(4, 14), LEN);
        assert!(segments(dir).len() >= 3, "{name}: {:?}", segments(dir));
        let rep = store
            .compact(
                &CompactOptions {
                    live_ratio: 0.5,
                    ..CompactOptions::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert!(!rep.segments_removed.is_empty(), "{name}: {rep:?}");
        assert_eq!(store.get("w").unwrap_err().code(), "NOT_FOUND");
        drop(store);
        let store = open();
        assert_eq!(
            store.get("w").unwrap_err().code(),
            "NOT_FOUND",
            "{name}: the deleted window came back"
        );
        check(&store, "x", &keys(2, 12), LEN);
        check(&store, "y", &keys(4, 14), LEN);
    }
}
