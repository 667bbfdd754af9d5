//! Decoders under arbitrary input: the record and segment header decoders, the manifest and
//! tombstone payload decoders and the control protocol's line parser are fed random bytes and
//! mutations of valid encodings. Each must return a value or a typed error: never panic, and
//! never allocate more than a small multiple of its input (a global allocator records the
//! largest single allocation made while a decoder runs on this thread).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cwm::control::protocol::parse;
use cwm::store::format::{RecordHeader, RecordKind, SegmentHeader, PAGE};
use cwm::store::{BlockRef, Class, Manifest, Retention, RetentionChange, Tombstone};
use proptest::prelude::*;

struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TRACK.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            }
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = TRACK.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
            }
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made.
fn tracked<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

/// The most a decoder may allocate at once for `n` input bytes.
fn bound(n: usize) -> usize {
    8 * n + 4096
}

fn sample_manifest(tokens: Vec<u32>, nblocks: usize, name: String) -> Manifest {
    // Every encoding: an origin (version 3) for names of even length.
    let origin = (name.len() % 2 == 0).then_some(0xfeed_u128 << 64 | nblocks as u128);
    Manifest {
        origin,
        name,
        version: 7,
        created_unix_ms: 1_700_000_000_000,
        session: "sess".into(),
        namespace: "model/ns".into(),
        layout: br#"{"kind":"flash"}"#.to_vec(),
        tokens,
        blocks: (0..nblocks)
            .map(|i| BlockRef {
                key: i as u128 * 0x1_0000_0001,
                len: 4096 + i as u64,
                checksum: i as u64 ^ 0xdead,
            })
            .collect(),
        // Version 1 (default retention) and 2 (a trailer), or 3 with either.
        retention: match nblocks % 3 {
            0 => Retention::default(),
            1 => Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            _ => Retention {
                class: Class::Pinned,
                expires_unix_ms: Some(1_800_000_000_000 + nblocks as i64),
            },
        },
    }
}

/// A valid encoding with some bytes overwritten, some inserted, or a cut.
fn mutate(mut b: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, val, how) in edits {
        if b.is_empty() {
            b.push(val);
            continue;
        }
        let at = at % b.len();
        match how % 4 {
            0 => b[at] = val,
            1 => b[at] ^= 1 << (val % 8),
            2 => b.insert(at, val),
            _ => b.truncate(at),
        }
    }
    b
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn record_header_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..200), generation in any::<u64>()) {
        let (r, big) = tracked(|| RecordHeader::decode(&b, generation));
        prop_assert!(big <= bound(b.len()));
        if let Ok(h) = r {
            // Whatever decodes must re-encode to the same 64 bytes.
            let mut page = vec![0u8; PAGE as usize];
            h.encode(generation, &mut page);
            prop_assert_eq!(&page[..64], &b[..64]);
        }
        let _ = SegmentHeader::decode(&b);
    }

    #[test]
    fn record_header_mutations(seq in any::<u64>(), key in any::<u128>(), len in 1u64..(1 << 40),
                               copy in any::<bool>(), generation in any::<u64>(),
                               edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4)) {
        let h = RecordHeader { kind: RecordKind::Block, seq, key, payload_len: len, payload_xxh3: seq ^ 5, segment_id: 3, copied: copy, ditto: false };
        let mut page = vec![0u8; PAGE as usize];
        h.encode(generation, &mut page);
        prop_assert_eq!(RecordHeader::decode(&page, generation), Ok(h));
        let m = mutate(page[..64].to_vec(), &edits);
        let (r, big) = tracked(|| RecordHeader::decode(&m, generation));
        prop_assert!(big <= bound(m.len()));
        if m.len() >= 64 && m[..64] != page[..64] {
            prop_assert!(r.is_err(), "a changed header decoded");
        }
    }

    #[test]
    fn manifest_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (r, big) = tracked(|| Manifest::decode(&b));
        prop_assert!(big <= bound(b.len()));
        if let Ok(m) = r {
            prop_assert_eq!(m.encode(), b.clone());
        }
        let (_, big) = tracked(|| Tombstone::decode(&b));
        prop_assert!(big <= bound(b.len()));
        let (r, big) = tracked(|| RetentionChange::decode(&b));
        prop_assert!(big <= bound(b.len()));
        if let Ok(c) = r {
            prop_assert_eq!(c.encode(), b.clone());
        }
    }

    #[test]
    fn retention_change_mutations(version in any::<u64>(), name in "[a-z0-9]{1,30}", class in 0u8..2,
                                  expires in proptest::option::of(any::<i64>()),
                                  edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)) {
        let retention = Retention {
            class: if class == 0 { Class::Pinned } else { Class::Unnamed },
            expires_unix_ms: expires,
        };
        let c = RetentionChange { name, version, retention };
        let e = c.encode();
        prop_assert_eq!(RetentionChange::decode(&e), Ok(c));
        let bad = mutate(e, &edits);
        let (r, big) = tracked(|| RetentionChange::decode(&bad));
        prop_assert!(big <= bound(bad.len()));
        if let Ok(c2) = r {
            prop_assert_eq!(c2.encode(), bad);
        }
    }

    #[test]
    fn manifest_mutations(tokens in proptest::collection::vec(any::<u32>(), 0..40), nblocks in 0usize..8,
                          name in "[a-z0-9_-]{1,20}",
                          edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6)) {
        let m = sample_manifest(tokens, nblocks, name);
        let e = m.encode();
        prop_assert_eq!(Manifest::decode(&e), Ok(m));
        let bad = mutate(e, &edits);
        let (r, big) = tracked(|| Manifest::decode(&bad));
        prop_assert!(big <= bound(bad.len()), "allocated {big} for {} bytes", bad.len());
        if let Ok(m2) = r {
            prop_assert_eq!(m2.encode(), bad);
        }
    }

    #[test]
    fn tombstone_mutations(version in any::<u64>(), seq in any::<u64>(), name in "[a-z0-9]{1,30}",
                           edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4)) {
        let t = Tombstone { name, version, manifest_seq: seq };
        let e = t.encode();
        prop_assert_eq!(Tombstone::decode(&e), Ok(t));
        let bad = mutate(e, &edits);
        let (r, big) = tracked(|| Tombstone::decode(&bad));
        prop_assert!(big <= bound(bad.len()));
        if let Ok(t2) = r {
            prop_assert_eq!(t2.encode(), bad);
        }
    }

    #[test]
    fn protocol_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (r, big) = tracked(|| parse(&b));
        prop_assert!(big <= bound(b.len()));
        if let Err((_, e)) = r {
            prop_assert_eq!(e.code, "VALIDATION");
        }
    }

    #[test]
    fn protocol_mutated_requests(op in "[a-z.]{0,12}", id in any::<i64>(), key in proptest::option::of("[ -~]{0,300}"),
                                 window in "[ -~]{0,40}",
                                 edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..5)) {
        let mut v = serde_json::json!({"op": op, "id": id, "window": window, "block_ids": [1, 2, 3]});
        if let Some(k) = key {
            v["idempotency_key"] = serde_json::Value::String(k);
        }
        let line = mutate(serde_json::to_vec(&v).unwrap(), &edits);
        let (r, big) = tracked(|| parse(&line));
        prop_assert!(big <= bound(line.len()));
        match r {
            Ok(req) => {
                if let Some(k) = req.idempotency_key {
                    prop_assert!(!k.is_empty() && k.len() <= 256);
                }
            }
            Err((_, e)) => prop_assert_eq!(e.code, "VALIDATION"),
        }
    }
}

/// Count fields of u32::MAX never allocate what they claim (the decoder checks them against
/// the bytes that remain first).
#[test]
fn huge_counts_are_refused_without_allocating() {
    let m = sample_manifest(vec![1, 2, 3], 2, "w".into());
    let e = m.encode();
    for at in 0..e.len().saturating_sub(4) {
        let mut bad = e.clone();
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let (_, big) = tracked(|| Manifest::decode(&bad));
        assert!(big <= bound(bad.len()), "offset {at}: allocated {big}");
    }
}

/// A list whose count promises more items than the payload holds is refused at the count,
/// before any item is read (or any room reserved for them): the error names the offset just
/// after the count.
#[test]
fn a_count_longer_than_the_rest_is_refused_at_the_count() {
    let e = sample_manifest((0..40).collect(), 3, "w".into()).encode();
    let after_count = e.len() - 3 * 32;
    for cut in [1, 31, 33, 95] {
        assert_eq!(
            Manifest::decode(&e[..e.len() - cut]),
            Err(cwm::store::manifest::DecodeError::Truncated(after_count)),
            "cut {cut}"
        );
    }
}
