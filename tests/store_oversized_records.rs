//! Records larger than a segment get a segment of their own size and survive a reopen: a
//! catalog record over `segment_size`, and compaction copies of blocks written when segments
//! were larger (`segment_size` lowered between runs). Before, such a record was written past
//! its segment's end, acknowledged, and cut off at the next open as a torn tail.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{CompactOptions, StoreConfig};

#[test]
fn records_larger_than_a_segment_survive_a_reopen() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let open = |segment_size: u64| {
            let mut cfg = StoreConfig::new(dir);
            cfg.segment_size = segment_size;
            cwm::store::Store::open_with_engine(cfg, engine.clone())
                .unwrap()
                .0
        };
        let big_meta = payload(9, 100 << 10);
        {
            let store = open(1 << 20);
            // One segment: a window deleted (garbage), then one that stays.
            put(&store, "gone", &keys(3, 1), 256 << 10);
            put(&store, "big", &keys(2, 2), 256 << 10);
            store.delete_window("gone", None).unwrap();
        }
        {
            let store = open(64 << 10);
            store.seal_active().unwrap();
            store.put_meta(42, &big_meta).unwrap();
            put(&store, "small", &keys(1, 2), 8192);
            let rep = store
                .compact(
                    &CompactOptions {
                        live_ratio: 1.0,
                        ..CompactOptions::default()
                    },
                    &mut |_| {},
                )
                .unwrap();
            assert!(rep.bytes_copied >= 2 * (256 << 10), "{name}: {rep:?}");
        }
        let store = open(64 << 10);
        check(&store, "big", &keys(2, 2), 256 << 10);
        check(&store, "small", &keys(1, 2), 8192);
        let meta = store.meta().unwrap();
        assert!(
            meta.iter().any(|(k, v)| *k == 42 && *v == big_meta),
            "{name}"
        );
    }
}
