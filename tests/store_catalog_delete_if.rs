//! Catalog records deleted in a batch, each only if its current payload is still the one the
//! caller means (`delete_metas_if`): a key written again since keeps its newer record, a key
//! never written or deleted already writes nothing; after a reopen the same holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

#[test]
fn a_batch_deletes_only_the_records_still_meant() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        {
            let (store, _) = open(&dir, &engine);
            for k in 1..=5u128 {
                store.put_meta(k, format!("old {k}").as_bytes()).unwrap();
            }
            // Written again: no longer what the batch means.
            store.put_meta(2, b"new 2").unwrap();
            store.delete_meta(4).unwrap();
            let n = store
                .delete_metas_if(&[1, 2, 3, 4, 9], |_, p| p.starts_with(b"old"))
                .unwrap();
            assert_eq!(n, 2, "{name}: 1 and 3");
            assert_eq!(
                store
                    .meta()
                    .unwrap()
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
                [(2, b"new 2".to_vec()), (5, b"old 5".to_vec())].into(),
                "{name}"
            );
            assert!(store.check_invariants().unwrap().is_empty(), "{name}");
        }
        let (store, _) = open(&dir, &engine);
        let mut left: Vec<u128> = store.meta().unwrap().into_iter().map(|(k, _)| k).collect();
        left.sort_unstable();
        assert_eq!(left, vec![2, 5], "{name}: after a reopen");
    }
}
