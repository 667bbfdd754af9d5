//! Dedup: two windows sharing blocks store them once; deleting one keeps the other intact,
//! before and after a reopen; reference counts and live bytes follow.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

#[test]
fn shared_prefix_stored_once_and_delete_keeps_the_other() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let len = 32 * 1024u64;
        let prefix = keys(7, 3);
        let a: Vec<u128> = prefix.iter().copied().chain([1 << 100]).collect();
        let b: Vec<u128> = prefix.iter().copied().chain([2 << 100]).collect();
        {
            let (store, _) = open(dir, &engine);
            put(&store, "a", &a, len);
            let after_a = store.stats().unwrap().used_bytes;
            put(&store, "b", &b, len);
            let after_b = store.stats().unwrap().used_bytes;
            // b added one block record and one manifest page (twice) only.
            assert_eq!(after_b - after_a, (4096 + len) + 2 * 4096, "{name}");
            assert_eq!(store.block_refs(prefix[0]).unwrap(), 2);
            assert_eq!(store.stats().unwrap().blocks, 5);
            let live_before = store.stats().unwrap().live_bytes;
            store.delete_window("a", None).unwrap();
            assert!(store.get("a").is_err());
            assert_eq!(store.block_refs(prefix[0]).unwrap(), 1);
            assert!(!store.contains_block(a[3]).unwrap());
            // a's own block and manifest are no longer live; the tombstone page is.
            let live_after = store.stats().unwrap().live_bytes;
            assert_eq!(
                live_before - live_after,
                (4096 + len) + 4096 - 4096,
                "{name}"
            );
            check(&store, "b", &b, len);
            assert_eq!(
                store.delete_window("a", None).unwrap_err().code(),
                "NOT_FOUND"
            );
            // A stale version is refused (EC-005).
            assert_eq!(
                store.delete_window("b", Some(9)).unwrap_err().code(),
                "CONCURRENT_MODIFICATION"
            );
        }
        let (store, report) = open(dir, &engine);
        assert_eq!(report.windows, 1);
        assert!(store.get("a").is_err());
        check(&store, "b", &b, len);
        assert_eq!(store.block_refs(prefix[0]).unwrap(), 1);
        assert_eq!(store.stats().unwrap().blocks, 4);
        // Re-freezing "a" writes only its unique block again.
        let before = store.stats().unwrap().used_bytes;
        put(&store, "a", &a, len);
        assert_eq!(
            store.stats().unwrap().used_bytes - before,
            (4096 + len) + 2 * 4096
        );
        store.delete_window("b", None).unwrap();
        check(&store, "a", &a, len);
    }
}
