//! `Store::longest_prefix` (what `lookup` and prefix thaws ask the index): the window holding
//! the longest run of leading chained keys wins, the newest on a tie; a window must match the
//! first key to count at all; `only` restricts it to one window; a block lost to damage ends a
//! window's usable prefix; expired windows are not candidates. And `contains_block`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, Retention, Store, StoreConfig};

const LEN: u64 = 4096;

fn best(store: &Store, keys: &[u128], only: Option<&str>) -> Option<(String, usize)> {
    store
        .longest_prefix(keys, only)
        .unwrap()
        .map(|(w, n)| (w.name, n))
}

fn some(name: &str, n: usize) -> Option<(String, usize)> {
    Some((name.to_string(), n))
}

#[test]
fn longest_then_newest_wins() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = Store::open_with_engine(StoreConfig::new(tmp.path()), engine).unwrap();
    put(&store, "a", &[1, 2, 3], LEN);
    put(&store, "b", &[1, 2, 3, 4], LEN);
    // Longest wins, whatever the order.
    assert_eq!(best(&store, &[1, 2, 3, 4, 5], None), some("b", 4));
    // A tie at 2 (both diverge from 9): the newest.
    assert_eq!(best(&store, &[1, 2, 9], None), some("b", 2));
    put(&store, "c", &[1, 2], LEN);
    assert_eq!(best(&store, &[1, 2, 9], None), some("c", 2));
    // Still longest before newest.
    assert_eq!(best(&store, &[1, 2, 3], None), some("b", 3));
    // Newest by commit, not by name: "m" is newer than "z" and sorts before it.
    put(&store, "z", &[50, 51, 52], LEN);
    put(&store, "m", &[50, 51, 53], LEN);
    assert_eq!(best(&store, &[50, 51, 99], None), some("m", 2));
    put(&store, "a2", &[50, 51], LEN);
    assert_eq!(best(&store, &[50, 51, 99], None), some("a2", 2));
    // Nothing starts with 7; no keys at all.
    assert_eq!(best(&store, &[7, 2, 3], None), None);
    assert_eq!(best(&store, &[], None), None);
    // Only one window considered.
    assert_eq!(best(&store, &[1, 2, 3, 4], Some("a")), some("a", 3));
    assert_eq!(best(&store, &[1, 2, 3, 4], Some("c")), some("c", 2));
    assert_eq!(best(&store, &[5, 2], Some("a")), None);
    assert_eq!(best(&store, &[1, 2], Some("nobody")), None);
    assert!(store.contains_block(4).unwrap());
    assert!(!store.contains_block(5).unwrap());
    // An expired window is no candidate.
    let mut s = spec("e", &[40, 41], LEN);
    s.retention = Retention {
        class: Class::Unnamed,
        expires_unix_ms: Some(cwm::store::now_unix_ms() + 3_000),
    };
    store
        .put_window(s, &[&payload(40, 4096), &payload(41, 4096)])
        .unwrap();
    assert_eq!(best(&store, &[40, 41], None).map(|x| x.1), Some(2));
    std::thread::sleep(std::time::Duration::from_millis(3_100));
    assert_eq!(best(&store, &[40, 41], None), None);
}

#[test]
fn a_lost_block_ends_the_usable_prefix() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (store, _) =
                Store::open_with_engine(StoreConfig::new(tmp.path()), engine.clone()).unwrap();
            put(&store, "d", &[20, 21, 22], LEN);
        }
        // Zero the header page of d's second block record (pages: 3 blocks, 2 manifest copies).
        let seg = segments(tmp.path())[0].clone();
        let pages = record_pages(&seg);
        assert_eq!(pages.len(), 5, "{engine_name}");
        zero(&seg, pages[1], 4096);
        let (store, rep) =
            verified(Store::open_with_engine(StoreConfig::new(tmp.path()), engine).unwrap());
        assert_eq!(rep.incomplete_windows, ["d"], "{engine_name}: {rep:?}");
        assert_eq!(
            best(&store, &[20, 21, 22], None),
            some("d", 1),
            "{engine_name}"
        );
        assert!(store.contains_block(20).unwrap());
        assert!(
            !store.contains_block(21).unwrap(),
            "lost: not deduplicated against"
        );
    }
}
