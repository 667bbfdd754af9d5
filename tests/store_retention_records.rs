//! Retention records do not outlive their use: once the window a `pin`/`unpin`/`ttl` record
//! names is deleted or replaced, the record can never apply again, and
//! `forget_inert_retention` deletes it (catalog deletions, one sync) — the log no longer keeps
//! one record per name ever pinned. A record still in use stays, and applies after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::retention::retention_key;
use cwm::store::{Class, Replace, Retention, WindowSpec};

const LEN: u64 = 8192;

const UNNAMED: Retention = Retention {
    class: Class::Unnamed,
    expires_unix_ms: None,
};

#[test]
fn records_of_deleted_and_replaced_windows_are_deleted_and_others_kept() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        {
            let (store, _) = open(&dir, &engine);
            for (i, w) in ["gone", "replaced", "kept"].into_iter().enumerate() {
                put(&store, w, &keys(i as u128 + 1, 2), LEN);
                store.set_retention(w, None, UNNAMED).unwrap();
            }
            store.delete_window("gone", None).unwrap();
            let payloads: Vec<Vec<u8>> = keys(9, 2)
                .iter()
                .map(|&k| payload(k as u64, LEN as usize))
                .collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let s = WindowSpec {
                replace: Replace::Any,
                ..spec("replaced", &keys(9, 2), LEN)
            };
            store.put_window(s, &refs).unwrap();
            assert_eq!(store.meta().unwrap().len(), 3, "{name}");
            assert_eq!(store.forget_inert_retention().unwrap(), 2, "{name}");
            assert_eq!(store.forget_inert_retention().unwrap(), 0, "{name}");
            let left: Vec<u128> = store.meta().unwrap().into_iter().map(|(k, _)| k).collect();
            assert_eq!(left, vec![retention_key("kept")], "{name}");
            assert!(store.check_invariants().unwrap().is_empty(), "{name}");
        }
        let (store, _) = open(&dir, &engine);
        let left: Vec<u128> = store.meta().unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(left, vec![retention_key("kept")], "{name}: after a reopen");
        assert_eq!(store.get("kept").unwrap().class, Class::Unnamed, "{name}");
        assert_eq!(
            store.get("replaced").unwrap().class,
            Class::Pinned,
            "{name}"
        );
        assert_eq!(store.get("gone").unwrap_err().code(), "NOT_FOUND", "{name}");
    }
}
