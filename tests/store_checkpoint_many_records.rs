//! A checkpointed segment of more records than one batch of metadata reads (256): each
//! manifest's payload is taken from the checkpoint entry of that manifest, not another's — 300
//! one-block windows (600 records, manifests at every other index) reopen from their checkpoint
//! with no damage reported and every window bit-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::*;
use cwm::store::Store;

#[test]
fn a_segment_of_many_small_windows_reopens_from_its_checkpoint_intact() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let mut cfg = config(dir);
            cfg.segment_size = 64 << 20;
            let (store, _) = Store::open_with_engine(cfg, engine.clone()).unwrap();
            for i in 0..300u128 {
                put(&store, &format!("w{i}"), &keys(i + 1, 1), 512);
            }
        }
        let mut cfg = config(dir);
        cfg.segment_size = 64 << 20;
        let (store, report) = Store::open_with_engine(cfg, engine.clone()).unwrap();
        assert_eq!(report.checkpointed_segments, 1, "{name}");
        assert!(
            report.damaged_records.is_empty(),
            "{name}: {:?}",
            report.damaged_records
        );
        assert!(
            report.damaged_regions.is_empty(),
            "{name}: {:?}",
            report.damaged_regions
        );
        assert_eq!(report.windows, 300, "{name}");
        for i in 0..300u128 {
            check(&store, &format!("w{i}"), &keys(i + 1, 1), 512);
        }
    }
}
