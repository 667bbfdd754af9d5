//! An open with checkpoints off (what `cwm fsck` does) neither reads nor writes them: a store
//! whose checkpoint files are gone has none after such an open and its stop either, and the
//! next ordinary open scans every segment (then writes them).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use std::path::{Path, PathBuf};

use common::*;
use cwm::store::Store;

fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
        .collect()
}

#[test]
fn an_open_with_checkpoints_off_leaves_none_behind() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = Store::open_with_engine(config(dir), engine.clone()).unwrap();
            for i in 0..12u128 {
                put(&store, &format!("w{i}"), &keys(i + 1, 2), 256 << 10);
            }
        }
        assert!(
            !checkpoints(dir).is_empty(),
            "{name}: a clean stop writes them"
        );
        for c in checkpoints(dir) {
            std::fs::remove_file(c).unwrap();
        }
        let mut cfg = config(dir);
        cfg.use_checkpoints = false;
        let (store, report) = Store::open_with_engine(cfg, engine.clone()).unwrap();
        assert_eq!(report.checkpointed_segments, 0, "{name}");
        assert!(
            checkpoints(dir).is_empty(),
            "{name}: the open wrote a checkpoint"
        );
        put(&store, "after", &keys(99, 1), 4096);
        drop(store);
        assert!(
            checkpoints(dir).is_empty(),
            "{name}: the stop wrote a checkpoint"
        );
        let (_, report) = open(dir, &engine);
        assert_eq!(
            report.checkpointed_segments, 0,
            "{name}: nothing to read yet"
        );
        assert_eq!(report.windows, 13, "{name}");
    }
}
