//! Round trip and reopen after a clean shutdown, on both engines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

#[test]
fn round_trip_and_reopen() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let a = keys(1, 5);
        let b = keys(2, 3);
        {
            let (store, report) = open(dir, &engine);
            assert_eq!(report.windows, 0);
            let info = put(&store, "alpha", &a, 64 * 1024);
            assert_eq!(info.version, 1);
            assert_eq!(info.num_blocks, 5);
            assert_eq!(info.num_tokens, 80);
            put(&store, "beta_2", &b, 1000); // inline payloads (< 4 KiB)
            check(&store, "alpha", &a, 64 * 1024);
            check(&store, "beta_2", &b, 1000);
            let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
            assert_eq!(names, vec!["alpha", "beta_2"], "{name}");
            // The store refuses a second owner of the directory.
            let again = cwm::store::Store::open_with_engine(config(dir), engine.clone());
            assert_eq!(again.err().map(|e| e.code().as_str()), Some("BUSY"));
        }
        let (store, report) = open(dir, &engine);
        assert_eq!(report.windows, 2, "{name}");
        assert!(
            report.torn_tails.is_empty(),
            "{name}: {:?}",
            report.torn_tails
        );
        check(&store, "alpha", &a, 64 * 1024);
        check(&store, "beta_2", &b, 1000);
        let m = store.open_window("alpha").unwrap().manifest;
        assert_eq!(m.session, "session-alpha");
        assert_eq!(m.namespace, "test-model");
        assert_eq!(m.tokens.len(), 80);
        assert!(m.created_unix_ms > 1_600_000_000_000);
        // Writes continue after the reopen, and survive another reopen.
        put(&store, "gamma", &keys(3, 2), 8192);
        drop(store);
        let (store, _) = open(dir, &engine);
        check(&store, "gamma", &keys(3, 2), 8192);
        check(&store, "alpha", &a, 64 * 1024);
    }
}

#[test]
fn windows_span_segments() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // 4 MiB segments, 40 blocks of 256 KiB: the window spans at least 3 segments.
        let k = keys(9, 40);
        {
            let (store, _) = open(dir, &engine);
            put(&store, "big", &k, 256 * 1024);
            assert!(segments(dir).len() >= 3, "{name}");
        }
        let (store, _) = open(dir, &engine);
        check(&store, "big", &k, 256 * 1024);
    }
}

#[test]
fn replace_and_versions() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        put(&store, "w", &keys(1, 2), 4096);
        let err = store
            .put_window(spec("w", &keys(2, 1), 4096), &[&payload(0, 4096)])
            .unwrap_err();
        assert_eq!(err.code(), "ALREADY_EXISTS");
        // EC-005: replacing with a stale version is refused.
        let mut s = spec("w", &keys(2, 1), 4096);
        s.replace = cwm::store::Replace::IfVersion(7);
        let err = store.put_window(s, &[&payload(0, 4096)]).unwrap_err();
        assert_eq!(err.code(), "CONCURRENT_MODIFICATION");
        let k2 = keys(2, 1);
        let mut s = spec("w", &k2, 4096);
        s.replace = cwm::store::Replace::IfVersion(1);
        let p = payload(k2[0] as u64, 4096);
        let info = store.put_window(s, &[&p]).unwrap();
        assert_eq!(info.version, 2);
        drop(store);
        let (store, _) = open(tmp.path(), &engine);
        assert_eq!(store.get("w").unwrap().version, 2);
        check(&store, "w", &k2, 4096);
        // Old blocks are unreferenced now.
        assert_eq!(store.block_refs(keys(1, 2)[0]).unwrap(), 0);
    }
}

#[test]
fn catalog_records_newest_wins_across_reopen() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(tmp.path(), &engine);
            store.put_meta(1, b"first").unwrap();
            store.put_meta(2, b"other").unwrap();
            store.put_meta(1, b"second").unwrap();
            put(&store, "w", &keys(1, 1), 4096);
            assert!(store.put_meta(3, b"").is_err());
        }
        let (store, _) = open(tmp.path(), &engine);
        let mut m = store.meta().unwrap();
        m.sort();
        assert_eq!(m, vec![(1, b"second".to_vec()), (2, b"other".to_vec())]);
        check(&store, "w", &keys(1, 1), 4096);
    }
}
