//! A freeze or thaw whose requester has gone (FreezeOptions::cancel, ThawOptions::cancel; the daemon sets it from
//! the request's connection) stops: a thaw after its current batch, without writing the
//! blocks after it; a freeze not yet captured writes nothing (both answer INTERRUPTED), so
//! blocks the engine may already be reusing are neither overwritten nor stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::kv::*;
use common::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, Cancel, FreezeRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::tier::RamTier;

/// Cancelled from the `after`-th question on.
fn cancel_after(after: usize) -> Cancel {
    let n = Arc::new(AtomicUsize::new(0));
    Cancel(Arc::new(move || n.fetch_add(1, Ordering::SeqCst) >= after))
}

fn req(window: &str, n: usize) -> FreezeRequest {
    FreezeRequest {
        window: window.into(),
        session: "s".into(),
        tokens: (0..16 * n as u32).collect(),
        block_ids: (0..n as u64).collect(),
        ..Default::default()
    }
}

#[test]
fn a_cancelled_freeze_stores_nothing_and_a_cancelled_thaw_stops() {
    let layout = Layout::flash_n2bhd(2, 160, 16, 2, 64, Dtype::Bf16);
    let n = 40usize;
    for (mode, base) in captured_and_streaming(&layout) {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engines()[0].1);
        let syn = synthetic(layout.clone(), 3);
        // Freezes whose requester is gone: before the capture completes (a captured freeze
        // asks once, when its gather is done; a streaming one after every batch).
        let afters: &[usize] = if mode == "captured" { &[0] } else { &[0, 1, 5] };
        for &after in afters {
            let err = freeze(
                &store,
                &syn.engine,
                req("gone", n),
                &base,
                &FreezeOptions {
                    cancel: Some(cancel_after(after)),
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert_eq!(err.code(), "INTERRUPTED", "{mode}: {err}");
            assert_eq!(store.get("gone").unwrap_err().code(), "NOT_FOUND", "{mode}");
        }
        assert_eq!(
            store.stats().unwrap().reserved_bytes,
            0,
            "{mode}: nothing held"
        );
        // The same freeze with its requester there.
        freeze(
            &store,
            &syn.engine,
            req("w", n),
            &base,
            &FreezeOptions::default(),
        )
        .unwrap();
        let before = blocks_of(
            &layout,
            syn.local.as_ref(),
            &(0..n as u64).collect::<Vec<_>>(),
        );

        // A thaw from disk whose requester goes after the first batch: the later blocks stay
        // as they were.
        let dst: Vec<u64> = (0..n as u64).map(|i| 159 - i).collect();
        let treq = whole_thaw("w", &dst);
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 99).unwrap();
        }
        let poisoned = blocks_of(&layout, syn.local.as_ref(), &dst);
        let err = thaw(
            &store,
            &syn.engine,
            &treq,
            &base,
            &ThawOptions {
                cancel: Some(cancel_after(1)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.code(), "INTERRUPTED", "{mode}: {err}");
        let now = blocks_of(&layout, syn.local.as_ref(), &dst);
        let written = now.iter().zip(&before).take_while(|(a, b)| a == b).count();
        assert!(written < n, "{mode}: the thaw went on to the end");
        assert_eq!(
            &now[written + 4..],
            &poisoned[written + 4..],
            "{mode}: written past a batch"
        );

        // From the RAM tier too.
        let tier = RamTier::new(64 << 20);
        thaw(
            &store,
            &syn.engine,
            &treq,
            &base,
            &ThawOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .unwrap();
        let r = thaw(
            &store,
            &syn.engine,
            &treq,
            &base,
            &ThawOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.blocks_from_tier as usize, n, "{mode}");
        let err = thaw(
            &store,
            &syn.engine,
            &treq,
            &base,
            &ThawOptions {
                cancel: Some(cancel_after(0)),
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.code(), "INTERRUPTED", "{mode}: {err}");
    }
}
