//! EC-020 (quota: exactly full, one byte under, far over), EC-014 (zero-size block), EC-010
//! (empty window): refused before any byte is written, with the bytes needed and free.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

fn needed_for(engine: &std::sync::Arc<dyn cwm::io::IoEngine>, k: &[u128], len: u64) -> u64 {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), engine);
    store.set_capacity(0);
    let payloads: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, len as usize)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    match store.put_window(spec("probe", k, len), &refs).unwrap_err() {
        cwm::store::StoreError::QuotaExceeded { needed, free, .. } => {
            assert_eq!(free, 0);
            needed
        }
        e => panic!("expected QUOTA_EXCEEDED, got {e}"),
    }
}

#[test]
fn ec_020_a_exactly_full_is_accepted_then_full() {
    for (name, engine) in engines() {
        let k = keys(1, 4);
        let n = needed_for(&engine, &k, 8192);
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        store.set_capacity(n);
        put(&store, "fits", &k, 8192);
        let st = store.stats().unwrap();
        assert_eq!(st.used_bytes, n, "{name}");
        assert_eq!(st.free_bytes, 0);
        let err = store
            .put_window(spec("more", &keys(2, 1), 8192), &[&payload(0, 8192)])
            .unwrap_err();
        assert_eq!(err.code(), "QUOTA_EXCEEDED");
        check(&store, "fits", &k, 8192);
    }
}

#[test]
fn ec_020_b_one_byte_under_is_refused_before_writing() {
    for (name, engine) in engines() {
        let k = keys(1, 4);
        let n = needed_for(&engine, &k, 8192);
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        store.set_capacity(n - 1);
        let payloads: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, 8192)).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        let err = store.put_window(spec("w", &k, 8192), &refs).unwrap_err();
        assert_eq!(err.code(), "QUOTA_EXCEEDED", "{name}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("needs {n} bytes")), "{msg}");
        assert!(
            msg.contains(&format!("{} of {} are free", n - 1, n - 1)),
            "{msg}"
        );
        assert_eq!(store.stats().unwrap().used_bytes, 0, "bytes were written");
        assert!(segments(tmp.path()).is_empty(), "a segment was created");
    }
}

#[test]
fn ec_020_c_far_over_is_refused() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        put(&store, "small", &keys(1, 1), 4096);
        let used = store.stats().unwrap().used_bytes;
        store.set_capacity(used + 10_000);
        let k = keys(2, 64);
        let payloads: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, 65536)).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        let err = store
            .put_window(spec("huge", &k, 65536), &refs)
            .unwrap_err();
        assert_eq!(err.code(), "QUOTA_EXCEEDED");
        assert_eq!(store.stats().unwrap().used_bytes, used);
        check(&store, "small", &keys(1, 1), 4096);
    }
}

#[test]
fn ec_014_zero_size_block_refused() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        let mut s = spec("z", &keys(1, 2), 4096);
        s.blocks[1].len = 0;
        let err = store.put_window(s, &[&payload(0, 4096), &[]]).unwrap_err();
        assert_eq!(err.code(), "VALIDATION");
        assert!(err.to_string().contains("zero"), "{err}");
        assert_eq!(store.stats().unwrap().used_bytes, 0);
    }
}

/// A length no KV block comes near — what a forged manifest in the shared tier may claim —
/// is refused before a record size is computed from it (it would overflow).
#[test]
fn a_block_over_the_largest_size_is_refused_before_anything_is_planned() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, engine) = engines().remove(0);
    let (store, _) = open(tmp.path(), &engine);
    for len in [cwm::store::MAX_BLOCK_BYTES + 1, u64::MAX] {
        let mut s = spec("huge", &keys(1, 2), 4096);
        s.blocks[1].len = len;
        let err = store.begin_window(s).err().expect("refused");
        assert_eq!(err.code(), "VALIDATION");
        assert!(err.to_string().contains("at most"), "{err}");
    }
    assert_eq!(store.stats().unwrap().used_bytes, 0);
}

#[test]
fn ec_010_empty_window_refused() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        let err = store.put_window(spec("empty", &[], 4096), &[]).unwrap_err();
        assert_eq!(err.code(), "VALIDATION");
        assert!(err.to_string().contains("empty"), "{err}");
    }
}

#[test]
fn ec_012_ec_013_names_checked_by_the_store() {
    for (_, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engine);
        let long = "n".repeat(128);
        put(&store, &long, &keys(1, 1), 4096);
        check(&store, &long, &keys(1, 1), 4096);
        for bad in [
            "n".repeat(129),
            "chat-\u{1F600}".into(),
            "p\u{0430}ypal".into(),
            String::new(),
        ] {
            let err = store
                .put_window(spec(&bad, &keys(2, 1), 4096), &[&payload(0, 4096)])
                .unwrap_err();
            assert_eq!(err.code(), "VALIDATION", "{bad:?}");
        }
    }
}
