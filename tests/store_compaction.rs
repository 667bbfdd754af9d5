//! Compaction: freeze/delete churn that would exceed the capacity without compaction stays
//! under it with compaction; a reader opened before compaction reads bit-exactly after it;
//! after reopening, every live window reads back, deleted windows stay deleted, replaced
//! windows keep their newest version, shared (deduplicated) blocks keep their counts, and a
//! copy left beside its original (a crash before the source segment is unlinked) is harmless.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

use cwm::store::{CompactOptions, Replace, Store, StoreConfig};

const LEN: u64 = 64 << 10;

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 1 << 20;
    c
}

fn compact(store: &Store, ratio: f64) -> cwm::store::CompactReport {
    let opts = CompactOptions {
        live_ratio: ratio,
        batch_bytes: 256 << 10,
        ..CompactOptions::default()
    };
    store.compact(&opts, &mut |_| {}).expect("compact")
}

/// Window `i` of the churn: 4 blocks, the first shared by every window (dedup).
fn wkeys(i: u128) -> Vec<u128> {
    let mut k = keys(1000 + i, 4);
    k[0] = 7;
    k
}

fn churn(store: &Store, rounds: u128, with_compaction: bool) -> Result<(), String> {
    let mut live: Vec<u128> = Vec::new();
    for i in 0..rounds {
        let k = wkeys(i);
        let payloads: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        store
            .put_window(spec(&format!("w{i}"), &k, LEN), &refs)
            .map_err(|e| format!("round {i}: {e}"))?;
        live.push(i);
        if live.len() > 3 {
            let old = live.remove(0);
            store.delete_window(&format!("w{old}"), None).unwrap();
        }
        if with_compaction && i % 4 == 3 {
            compact(store, 0.5);
        }
    }
    for &i in &live {
        check(store, &format!("w{i}"), &wkeys(i), LEN);
    }
    Ok(())
}

#[test]
fn churn_stays_under_capacity_only_with_compaction() {
    for (name, engine) in engines() {
        let capacity = 6 << 20;
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) =
            Store::open_with_engine(cfg(&tmp.path().join("a")), engine.clone()).unwrap();
        store.set_capacity(capacity);
        let err = churn(&store, 60, false).unwrap_err();
        assert!(err.contains("quota exceeded"), "{name}: {err}");

        let (store, _) =
            Store::open_with_engine(cfg(&tmp.path().join("b")), engine.clone()).unwrap();
        store.set_capacity(capacity);
        churn(&store, 60, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        let st = store.stats().unwrap();
        assert!(st.used_bytes <= capacity, "{name}");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{name}"
        );
        assert_eq!(
            store.block_refs(7).unwrap(),
            3,
            "{name}: shared block count"
        );
        drop(store);
        let (store, rep) =
            Store::open_with_engine(cfg(&tmp.path().join("b")), engine.clone()).unwrap();
        assert!(
            rep.torn_tails.is_empty() && rep.damaged_regions.is_empty(),
            "{name}: {rep:?}"
        );
        assert_eq!(store.list().unwrap().len(), 3, "{name}");
        for i in 57..60 {
            check(&store, &format!("w{i}"), &wkeys(i), LEN);
        }
        assert_eq!(store.block_refs(7).unwrap(), 3, "{name}");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{name}"
        );
    }
}

#[test]
fn reader_before_compaction_reads_after_and_reopen_keeps_everything() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        // Fill several segments, then delete most windows so their segments are sparse.
        for i in 0..24u128 {
            put(&store, &format!("w{i}"), &wkeys(i), LEN);
        }
        // A name deleted and frozen again (version 1 twice), and a replaced name (v2 shadows v1).
        store.delete_window("w3", None).unwrap();
        let mut sp = spec("w3", &keys(77, 2), LEN);
        sp.replace = Replace::No;
        let p: Vec<Vec<u8>> = keys(77, 2)
            .iter()
            .map(|&x| payload(x as u64, LEN as usize))
            .collect();
        store.put_window(sp, &[&p[0], &p[1]]).unwrap();
        let mut sp = spec("w5", &keys(55, 2), LEN);
        sp.replace = Replace::Any;
        let p: Vec<Vec<u8>> = keys(55, 2)
            .iter()
            .map(|&x| payload(x as u64, LEN as usize))
            .collect();
        assert_eq!(store.put_window(sp, &[&p[0], &p[1]]).unwrap().version, 2);
        for i in (0..24u128).filter(|i| i % 4 != 1 && *i != 3 && *i != 5) {
            store.delete_window(&format!("w{i}"), None).unwrap();
        }
        store.put_meta(42, b"first").unwrap();
        store.put_meta(42, b"second").unwrap();
        let reader = store.open_window("w1").unwrap();
        let before = store.stats().unwrap();
        let rep = compact(&store, 0.5);
        assert!(!rep.segments_removed.is_empty(), "{name}: {rep:?}");
        let after = store.stats().unwrap();
        assert!(
            after.used_bytes < before.used_bytes,
            "{name}: {before:?} {after:?}"
        );
        // The old reader still reads the moved blocks from the unlinked segment.
        for b in 0..reader.num_blocks() {
            let mut img = cwm::io::AlignedBuf::zeroed(reader.record_len(b) as usize);
            store.read_blocks(&reader, b, &mut [&mut img[..]]).unwrap();
            assert_eq!(
                reader.payload(b, &img),
                &payload(wkeys(1)[b] as u64, LEN as usize)[..]
            );
        }
        drop(reader);
        // Compact everything that holds garbage, twice (the second finds nothing to do).
        compact(&store, 1.0);
        compact(&store, 1.0);
        assert_eq!(store.garbage_bytes().unwrap(), 0, "{name}");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{name}"
        );
        let expect = |store: &Store| {
            let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
            let mut want: Vec<String> = (0..24u128)
                .filter(|i| i % 4 == 1 || *i == 3 || *i == 5)
                .map(|i| format!("w{i}"))
                .collect();
            want.sort();
            assert_eq!(names, want, "{name}");
            for i in (0..24u128).filter(|i| i % 4 == 1 && *i != 5) {
                check(store, &format!("w{i}"), &wkeys(i), LEN);
            }
            check(store, "w3", &keys(77, 2), LEN);
            check(store, "w5", &keys(55, 2), LEN);
            assert_eq!(store.get("w5").unwrap().version, 2);
            assert_eq!(store.block_refs(7).unwrap(), 5);
            let meta = store.meta().unwrap();
            assert_eq!(meta, vec![(42, b"second".to_vec())]);
        };
        expect(&store);
        drop(store);
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(
            rep.incomplete_windows.is_empty() && rep.damaged_regions.is_empty(),
            "{name}: {rep:?}"
        );
        expect(&store);
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{name}"
        );

        // A copy beside its original: one compaction pass, then the source segment put back
        // (a crash before its unlink reached the disk).
        store.delete_window("w1", None).unwrap();
        let segs = segments(&dir);
        let victim = segs[0].clone();
        let saved = std::fs::read(&victim).unwrap();
        compact(&store, 1.0);
        drop(store);
        if !victim.exists() {
            std::fs::write(&victim, &saved).unwrap();
        }
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(rep.incomplete_windows.is_empty(), "{name}: {rep:?}");
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert!(
            !names.contains(&"w1".to_string()),
            "{name}: deleted window came back"
        );
        check(&store, "w5", &keys(55, 2), LEN);
        assert_eq!(store.get("w5").unwrap().version, 2);
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{name}"
        );
        let before = store.stats().unwrap();
        let r = compact(&store, 1.0);
        assert_eq!(
            store.garbage_bytes().unwrap(),
            0,
            "{name}: {before:?} {r:?} {:?}",
            store.stats().unwrap()
        );
    }
}
