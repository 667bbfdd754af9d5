//! Concurrent freezes append interleaved (issue: the appender lock used to be held for a whole
//! freeze). Two writers are interleaved block by block on one thread — which deadlocked while a
//! writer held the lock from begin to commit — and eight threads freeze windows sharing a
//! prompt block into small segments (many rotations). Each window's commit stays atomic and
//! independent: a writer that gives up disturbs no other, a name taken by one commit is
//! refused to the other at its commit, a block another freeze published meanwhile is referred
//! to (never indexed twice), every acknowledged window reads back bit-exact, and a reopen finds
//! the same windows with nothing damaged.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{BlockImage, Store, StoreConfig, StoreError};

const LEN: u64 = 24 << 10;

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 256 << 10; // ten records a segment: rotations mid-freeze
    c
}

#[test]
fn interleaved_writers_commit_independently() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_keys, b_keys, c_keys) = (keys(100, 6), keys(200, 6), keys(300, 3));
        let (d1_keys, d2_keys) = (keys(400, 2), keys(500, 2));
        {
            let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
            let mut a = store.begin_window(spec("a", &a_keys, LEN)).unwrap();
            let mut b = store.begin_window(spec("b", &b_keys, LEN)).unwrap();
            let mut c = store.begin_window(spec("c", &c_keys, LEN)).unwrap();
            // Two freezes of one new name: both may begin; the first commit takes the name.
            let mut d1 = store.begin_window(spec("d", &d1_keys, LEN)).unwrap();
            let mut d2 = store.begin_window(spec("d", &d2_keys, LEN)).unwrap();
            for i in 0..6 {
                write_block(&mut a, i, a_keys[i] as u64, LEN);
                write_block(&mut b, i, b_keys[i] as u64, LEN);
                if i < 3 {
                    write_block(&mut c, i, c_keys[i] as u64, LEN);
                }
                if i < 2 {
                    write_block(&mut d1, i, d1_keys[i] as u64, LEN);
                    write_block(&mut d2, i, d2_keys[i] as u64, LEN);
                }
            }
            // b commits first although a began first; c gives up: neither disturbs the others.
            let bi = store.list().unwrap();
            assert!(
                bi.is_empty(),
                "{engine_name}: nothing visible before a commit"
            );
            b.commit().unwrap();
            drop(c);
            a.commit().unwrap();
            d2.commit().unwrap();
            match d1.commit() {
                Err(StoreError::AlreadyExists(n)) => assert_eq!(n, "d"),
                other => panic!("{engine_name}: second commit of d: {other:?}"),
            }
            check(&store, "a", &a_keys, LEN);
            check(&store, "b", &b_keys, LEN);
            check(&store, "d", &d2_keys, LEN);
            assert!(store.get("c").is_err());
            assert!(store.check_invariants().unwrap().is_empty());
        }
        let (store, rep) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{engine_name}: {rep:?}"
        );
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["a", "b", "d"], "{engine_name}");
        check(&store, "a", &a_keys, LEN);
        check(&store, "b", &b_keys, LEN);
        check(&store, "d", &d2_keys, LEN);
        assert!(store.check_invariants().unwrap().is_empty());
    }
}

#[test]
fn eight_threads_freeze_at_once() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Window t of thread p: a shared first block (a common system prompt), then its own.
    let wkeys = |p: u128, t: u128| {
        let mut k = keys(10_000 + p * 1_000 + t * 10, 5);
        k[0] = 42;
        k
    };
    {
        let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
        std::thread::scope(|s| {
            for p in 0..8u128 {
                let store = &store;
                s.spawn(move || {
                    for t in 0..6u128 {
                        put(store, &format!("p{p}-t{t}"), &wkeys(p, t), LEN);
                        if t % 3 == 2 {
                            // Deletes beside the freezes: the shared block stays while held.
                            store
                                .delete_window(&format!("p{p}-t{}", t - 1), None)
                                .unwrap();
                        }
                    }
                });
            }
        });
        assert!(store.check_invariants().unwrap().is_empty());
        assert_eq!(store.block_refs(42).unwrap(), 8 * 4);
    }
    let (store, rep) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
    assert!(
        rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
        "{rep:?}"
    );
    assert_eq!(store.list().unwrap().len(), 8 * 4);
    for p in 0..8u128 {
        for t in 0..6u128 {
            let name = format!("p{p}-t{t}");
            if t % 3 == 1 {
                assert!(store.get(&name).is_err(), "{name} was deleted");
            } else {
                check(&store, &name, &wkeys(p, t), LEN);
            }
        }
    }
    assert!(store.check_invariants().unwrap().is_empty());
}

/// Two freezes write the same block key with different bytes (GPU kernels need not be
/// bit-reproducible). The first to commit publishes its record; the second refers to it, as a
/// deduplication would, and its own copy is garbage: both windows verify, now and after a
/// reopen.
#[test]
fn a_block_published_meanwhile_is_referred_to() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = 77u128;
        {
            let (store, _) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
            let mut w = store.begin_window(spec("w", &[shared, 1], LEN)).unwrap();
            let mut v = store.begin_window(spec("v", &[shared, 2], LEN)).unwrap();
            // The same key, different bytes.
            for (x, seed) in [(&mut w, 1000), (&mut v, 2000)] {
                let mut img = block_image(seed, LEN);
                x.write_blocks(&mut [BlockImage {
                    index: 0,
                    image: &mut img[..],
                    checksum: None,
                }])
                .unwrap();
            }
            write_block(&mut w, 1, 1, LEN);
            write_block(&mut v, 1, 2, LEN);
            v.commit().unwrap();
            w.commit().unwrap();
            assert_eq!(store.block_refs(shared).unwrap(), 2, "{engine_name}");
            // Both read back verified; w's first block holds v's bytes (the published record).
            for name in ["w", "v"] {
                let (_, blocks) = store.read_window(name).unwrap();
                assert_eq!(
                    blocks[0],
                    payload(2000, LEN as usize),
                    "{engine_name} {name}"
                );
            }
            assert!(store.check_invariants().unwrap().is_empty());
        }
        let (store, rep) = Store::open_with_engine(cfg(tmp.path()), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.incomplete_windows.is_empty(),
            "{engine_name}: {rep:?}"
        );
        for (name, second) in [("w", 1u64), ("v", 2)] {
            let (_, blocks) = store.read_window(name).unwrap();
            assert_eq!(
                blocks[0],
                payload(2000, LEN as usize),
                "{engine_name} {name}"
            );
            assert_eq!(
                blocks[1],
                payload(second, LEN as usize),
                "{engine_name} {name}"
            );
        }
        assert!(store.check_invariants().unwrap().is_empty());
    }
}
