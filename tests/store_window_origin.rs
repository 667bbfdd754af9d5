//! A window's origin (the idempotency-keyed request that froze it) is committed in its
//! manifest: the index has it after the commit, after a reopen (from a segment checkpoint, or
//! from a scan of the log when checkpoints are off), after compaction moved the manifest, and
//! a replace under another request carries the new request's origin (or none).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Replace, Store};

const LEN: u64 = 16 << 10;

fn put_with(store: &Store, name: &str, keys: &[u128], origin: Option<u128>, replace: Replace) {
    let mut s = spec(name, keys, LEN);
    s.origin = origin;
    s.replace = replace;
    let info = put_spec(store, s).unwrap();
    assert_eq!(info.origin, origin, "{name}: as committed");
}

fn origins(store: &Store) -> Vec<(String, Option<u128>)> {
    store
        .list()
        .unwrap()
        .into_iter()
        .map(|w| (w.name, w.origin))
        .collect()
}

#[test]
fn a_windows_origin_survives_reopens_and_compaction() {
    for (ename, engine) in engines() {
        for checkpoints in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            let mut cfg = config(&dir);
            cfg.segment_size = 1 << 20;
            cfg.use_checkpoints = checkpoints;
            let a = 0x00a1_1ce5_u128 << 64 | 1;
            let b = 0x0b0b_u128 << 64 | 2;
            let want = vec![
                ("a".to_string(), Some(a)),
                ("b".to_string(), Some(b)),
                ("c".to_string(), None),
            ];
            {
                let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
                put_with(&store, "a", &[1, 2], Some(a), Replace::No);
                put_with(&store, "b", &[3], Some(7), Replace::No);
                // Replaced by another request: the new version carries its origin.
                put_with(&store, "b", &[3, 4], Some(b), Replace::Any);
                put_with(&store, "c", &[5], Some(9), Replace::No);
                // ... or none.
                put_with(&store, "c", &[5, 6], None, Replace::Any);
                // Enough windows after them to seal segments (checkpoints are written then).
                for i in 0..40u128 {
                    put_with(&store, &format!("x{i:02}"), &[100 + i], None, Replace::No);
                    store.delete_window(&format!("x{i:02}"), None).unwrap();
                }
                store.wait_checkpoints();
                assert_eq!(origins(&store)[..3], want[..], "{ename}");
            }
            let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
            assert_eq!(
                origins(&store),
                want,
                "{ename}, checkpoints {checkpoints}: reopened"
            );
            assert_eq!(store.get("a").unwrap().origin, Some(a));
            compact_everything(&store);
            assert_eq!(origins(&store), want, "{ename}: compacted");
            drop(store);
            let (store, _) = Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
            assert_eq!(origins(&store), want, "{ename}: compacted and reopened");
            check(&store, "a", &[1, 2], LEN);
        }
    }
}
