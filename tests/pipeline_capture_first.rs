//! A window that fits in the staging pool's capture share is captured whole before the freeze
//! touches the log: while another writer holds the log, the engine still gets `captured` (its
//! blocks back) and the freeze becomes durable once the log is free, deduplicated and
//! bit-exact. A freeze the log would refuse (the name exists) is refused before any capture.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, PipelineError, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[test]
fn capture_does_not_wait_for_the_log() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16); // 16 KiB per block
    let syn = synthetic(layout.clone(), 5);
    let cfg = PipelineConfig {
        staging_bytes: 4 << 20, // ~200 slots: a 20-block window fits in the capture share
        batch_blocks: 4,
        ..Default::default()
    };
    let req = |name: &str, first: u32, ids: std::ops::Range<u64>| FreezeRequest {
        window: name.into(),
        session: "s".into(),
        tokens: (first..first + 16 * (ids.end - ids.start) as u32).collect(),
        block_ids: ids.collect(),
        ..Default::default()
    };
    // Window "base" holds the first 8 blocks' tokens: the next freeze shares them.
    freeze(
        &store,
        &syn.engine,
        req("base", 0, 0..8),
        &cfg,
        &FreezeOptions::default(),
    )
    .unwrap();
    let want = blocks_of(&layout, syn.local.as_ref(), &(0..20).collect::<Vec<u64>>());
    // Another writer holds the log (as a long streaming freeze would).
    let held = store
        .begin_window(spec("holder", &keys(900, 1), 4096))
        .unwrap();
    let captured = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            freeze(
                &store,
                &syn.engine,
                req("w", 0, 0..20),
                &cfg,
                &FreezeOptions {
                    on_captured: Some(&|| {
                        captured.store(true, Ordering::SeqCst);
                        let _ = tx.send(());
                    }),
                    ..Default::default()
                },
            )
        });
        // Liveness, not timing: before this change the capture waited for the log, forever here.
        rx.recv_timeout(Duration::from_secs(60))
            .expect("captured while another writer holds the log");
        assert!(!h.is_finished(), "durable while the log is held");
        // The engine reuses its blocks at once: the window must not change.
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 1234).unwrap();
        }
        drop(held);
        let rep = h.join().unwrap().unwrap();
        assert!(captured.load(Ordering::SeqCst));
        assert!(rep.captured_secs <= rep.durable_secs);
        assert_eq!(rep.blocks_deduplicated, 8, "{rep:?}");
        assert_eq!(rep.blocks_written, 12);
    });
    let dst: Vec<u64> = (0..20).map(|i| 63 - i).collect();
    let t = thaw(
        &store,
        &syn.engine,
        &ThawRequest {
            window: "w".into(),
            block_ids: dst.clone(),
            ..Default::default()
        },
        &cfg,
        &ThawOptions::default(),
    )
    .unwrap();
    assert_eq!(t.blocks_restored, 20);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
            w,
            "block {i}"
        );
    }
    // The name exists: refused before the engine's blocks are read or released.
    let captured = AtomicBool::new(false);
    let e = freeze(
        &store,
        &syn.engine,
        req("w", 0, 0..20),
        &cfg,
        &FreezeOptions {
            on_captured: Some(&|| captured.store(true, Ordering::SeqCst)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, PipelineError::Store(s) if s.code() == "ALREADY_EXISTS"),
        "{e:?}"
    );
    assert!(!captured.load(Ordering::SeqCst));
}

/// EC-020: a window the log cannot hold is refused before its capture: the engine is never
/// told `captured` for a freeze that then fails for room.
#[test]
fn ec_020_d_no_capture_for_a_window_the_log_cannot_hold() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16); // 16 KiB per block
    let syn = synthetic(layout.clone(), 6);
    let cfg = PipelineConfig {
        staging_bytes: 4 << 20,
        ..Default::default()
    };
    store.set_capacity(store.stats().unwrap().used_bytes + 10 * (16 << 10));
    let captured = AtomicBool::new(false);
    let e = freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "big".into(),
            session: "s".into(),
            tokens: (0..16 * 20).collect(),
            block_ids: (0..20).collect(),
            ..Default::default()
        },
        &cfg,
        &FreezeOptions {
            on_captured: Some(&|| captured.store(true, Ordering::SeqCst)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, PipelineError::Store(s) if s.code() == "QUOTA_EXCEEDED"),
        "{e:?}"
    );
    assert!(!captured.load(Ordering::SeqCst), "captured, then refused");
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
}
