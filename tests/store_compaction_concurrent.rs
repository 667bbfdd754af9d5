//! Compaction reads its batches without the appender lock and copies, under it, only what is
//! still live: here a writer freezes, replaces and deletes windows (sharing a block) while a
//! compactor runs pass after pass over every segment with garbage. After both stop: the
//! index is consistent, every window reads back bit-exactly in its newest version, deleted
//! windows stay deleted, and all of it holds again after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{CompactOptions, Replace, StoreConfig};
use std::sync::atomic::{AtomicBool, Ordering};

const LEN: u64 = 32 << 10;

/// Version `v` of window `w`: 4 blocks, the first shared by every window.
fn wkeys(w: u128, v: u128) -> Vec<u128> {
    let mut k = keys(10_000 + w * 100 + v, 4);
    k[0] = 7;
    k
}

#[test]
fn compaction_beside_deletes_and_replaces_keeps_everything() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = StoreConfig::new(tmp.path());
        c.segment_size = 512 << 10;
        c
    };
    let (store, _) = cwm::store::Store::open_with_engine(cfg(), io.clone()).unwrap();
    let done = AtomicBool::new(false);
    // Final state per window: Some(version) or None (deleted).
    let mut last: Vec<Option<u128>> = vec![None; 8];
    std::thread::scope(|s| {
        let compactor = s.spawn(|| {
            let opts = CompactOptions {
                live_ratio: 1.0,
                batch_bytes: 64 << 10,
                ..CompactOptions::default()
            };
            let mut passes = 0;
            while !done.load(Ordering::SeqCst) {
                let rep = store.compact(&opts, &mut |_| {}).expect("compact");
                assert!(rep.segments_skipped.is_empty(), "{rep:?}");
                passes += 1;
            }
            passes
        });
        for round in 0..240u128 {
            let w = round % 8;
            let v = round / 8;
            if round % 5 == 4 {
                if last[w as usize].is_some() {
                    store.delete_window(&format!("w{w}"), None).unwrap();
                    last[w as usize] = None;
                }
                continue;
            }
            let k = wkeys(w, v);
            let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
            let refs: Vec<&[u8]> = p.iter().map(|x| &x[..]).collect();
            let mut sp = spec(&format!("w{w}"), &k, LEN);
            sp.replace = Replace::Any;
            store.put_window(sp, &refs).unwrap();
            last[w as usize] = Some(v);
        }
        done.store(true, Ordering::SeqCst);
        assert!(compactor.join().unwrap() > 0);
    });
    let expect = |store: &cwm::store::Store| {
        assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
        for (w, v) in last.iter().enumerate() {
            let name = format!("w{w}");
            match v {
                Some(v) => check(store, &name, &wkeys(w as u128, *v), LEN),
                None => assert!(store.get(&name).is_err(), "{name} came back"),
            }
        }
    };
    expect(&store);
    drop(store);
    let (store, _) = cwm::store::Store::open_with_engine(cfg(), io).unwrap();
    expect(&store);
}
