//! One zeroed sector in the middle of a segment (the damage campaign's first finding): three
//! windows in one segment with default options; the daemon stopped; 512 bytes zeroed. Before,
//! recovery took the zeros for the clean end of the log and dropped every window after them
//! (b and c, never touched, were gone, and nothing was reported). Now the zeros are a damaged
//! region: skipped, reported, and every window whose records are intact is still there.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::{Store, StoreConfig};

fn freeze_three(dir: &std::path::Path, engine: &std::sync::Arc<dyn cwm::io::IoEngine>) {
    let (store, _) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
    put(&store, "a", &keys(1, 3), 16 * 1024);
    put(&store, "b", &keys(2, 3), 16 * 1024);
    put(&store, "c", &keys(3, 3), 16 * 1024);
}

#[test]
fn a_zeroed_sector_at_4096_loses_no_window() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        freeze_three(dir, &engine);
        let seg = segments(dir)[0].clone();
        zero(&seg, 4096, 512);
        let (store, report) =
            verified(Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap());
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["a", "b", "c"], "{name}: {report:?}");
        for (w, k) in [("a", 1), ("b", 2), ("c", 3)] {
            check(&store, w, &keys(k, 3), 16 * 1024);
        }
        assert!(
            !report.damaged_regions.is_empty(),
            "{name}: the damage was not reported: {report:?}"
        );
    }
}

#[test]
fn a_zeroed_block_header_costs_only_its_window_prefix() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        freeze_three(dir, &engine);
        let seg = segments(dir)[0].clone();
        // The first record of the log: window a's first block.
        let first = record_pages(&seg)[0];
        zero(&seg, first, 512);
        let (store, report) =
            verified(Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap());
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["a", "b", "c"], "{name}: {report:?}");
        check(&store, "b", &keys(2, 3), 16 * 1024);
        check(&store, "c", &keys(3, 3), 16 * 1024);
        // a's first block is gone: its thaw restores nothing, and says so.
        let err = store.read_window("a").unwrap_err();
        assert_eq!(err.code(), "CORRUPTION", "{name}: {err}");
        assert!(matches!(
            err,
            cwm::store::StoreError::Corruption {
                intact_blocks: 0,
                ..
            }
        ));
        assert_eq!(report.damaged_regions.len(), 1, "{name}: {report:?}");
        assert_eq!(report.incomplete_windows, ["a"], "{name}: {report:?}");
        // A new freeze holding that block writes it again, and heals a.
        put(&store, "a2", &keys(1, 3), 16 * 1024);
        check(&store, "a", &keys(1, 3), 16 * 1024);
        assert!(store.check_invariants().unwrap().is_empty());
        drop(store);
        let (store, _) = Store::open_with_engine(StoreConfig::new(dir), engine.clone()).unwrap();
        check(&store, "a", &keys(1, 3), 16 * 1024);
        check(&store, "a2", &keys(1, 3), 16 * 1024);
        assert!(store.check_invariants().unwrap().is_empty());
    }
}
