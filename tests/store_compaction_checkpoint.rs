//! Compaction takes a sealed segment's record list from its checkpoint (one small read instead
//! of a walk of every record header) when the checkpoint is usable and covers the whole
//! segment, and walks the headers otherwise: with intact checkpoints, with damaged ones and
//! with none, the same garbage goes, every live window reads back, before and after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Store, StoreConfig};

const LEN: u64 = 64 << 10;

#[test]
fn compaction_uses_checkpoints_and_survives_damaged_ones() {
    for damage in ["none", "flipped", "removed"] {
        let (_, engine) = engines().pop().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let mut cfg = StoreConfig::new(&dir);
        cfg.segment_size = 1 << 20;
        {
            let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
            // Three segments, each a live window beside garbage.
            for s in 0..3u128 {
                put(&store, &format!("live{s}"), &keys(10 + s, 5), LEN);
                put(&store, &format!("gone{s}"), &keys(20 + s, 8), LEN);
                store.delete_window(&format!("gone{s}"), None).unwrap();
                store.seal_active().unwrap();
            }
            store.wait_checkpoints();
            let files = checkpoint_files(&dir);
            assert_eq!(files.len(), 3, "{damage}: a checkpoint per sealed segment");
            match damage {
                "flipped" => {
                    for f in &files {
                        let mut b = std::fs::read(f).unwrap();
                        let at = b.len() / 2;
                        b[at] ^= 0x40;
                        std::fs::write(f, b).unwrap();
                    }
                }
                "removed" => {
                    for f in &files {
                        std::fs::remove_file(f).unwrap();
                    }
                }
                _ => {}
            }
            let rep = compact_everything(&store);
            assert_eq!(rep.segments_removed.len(), 3, "{damage}: {rep:?}");
            assert!(rep.segments_skipped.is_empty(), "{damage}: {rep:?}");
            // The 15 live blocks and the 3 live manifests, nothing of the garbage.
            assert_eq!(rep.records_copied, 18, "{damage}: {rep:?}");
            for s in 0..3u128 {
                check(&store, &format!("live{s}"), &keys(10 + s, 5), LEN);
                assert!(store.get(&format!("gone{s}")).is_err());
            }
            assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
        }
        let (store, _) = Store::open_with_engine(cfg, engine).unwrap();
        for s in 0..3u128 {
            check(&store, &format!("live{s}"), &keys(10 + s, 5), LEN);
            assert_eq!(
                store.get(&format!("gone{s}")).unwrap_err().code(),
                "NOT_FOUND",
                "{damage}: a deleted window came back"
            );
        }
    }
}
