//! Prefix thaw: a longer prompt whose first blocks are a stored window gets exactly those
//! blocks restored, from any starting block (the engine may hold the first ones already),
//! and never a block past the range; a differing token is TOKEN_MISMATCH; the store finds the
//! window holding the longest stored prefix of a key chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, PipelineError, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};

/// A prefix thaw of window "sys-prompt" from `first_block` into `block_ids`.
fn thaw_range(
    store: &cwm::store::Store,
    engine: &cwm::pipeline::Engine,
    block_ids: Vec<u64>,
    tokens: Option<Vec<u32>>,
    prefix: bool,
    first_block: usize,
) -> Result<cwm::pipeline::ThawReport, PipelineError> {
    thaw(
        store,
        engine,
        &ThawRequest {
            window: "sys-prompt".into(),
            block_ids,
            expect_tokens: tokens,
            prefix,
            first_block,
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
}

#[test]
fn prefix_ranges_restore_exactly_their_blocks() {
    let (_, io) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::flash_n2bhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let syn = synthetic(layout.clone(), 11);
    let tokens: Vec<u32> = (0..16 * 6).collect(); // 6 full blocks
    let src: Vec<u64> = (0..6).collect();
    let (store, _) = open(&tmp.path().join("d"), &io);
    freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "sys-prompt".into(),
            session: "s".into(),
            tokens: tokens.clone(),
            block_ids: src.clone(),
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    let orig: Vec<Vec<u8>> = src
        .iter()
        .map(|&b| block_bytes_of(&layout, syn.local.as_ref(), b))
        .collect();

    // A longer prompt: the 6 stored blocks, then 3 more of its own.
    let mut prompt = tokens.clone();
    prompt.extend(1000..1000 + 16 * 3);
    let keys = syn.engine.keys(&prompt);
    let (w, n) = store.longest_prefix(&keys, None).unwrap().unwrap();
    assert_eq!((w.name.as_str(), n), ("sys-prompt", 6));
    assert_eq!(store.longest_prefix(&keys, Some("nope")).unwrap(), None);
    let other: Vec<u32> = (5000..5100).collect();
    assert_eq!(
        store
            .longest_prefix(&syn.engine.keys(&other), None)
            .unwrap(),
        None
    );

    // Restore window blocks 2..5 into 40..43 (the engine holds blocks 0 and 1 already).
    let dst: Vec<u64> = (40..43).collect();
    let before_next = block_bytes_of(&layout, syn.local.as_ref(), 43);
    let rep = thaw_range(
        &store,
        &syn.engine,
        dst.clone(),
        Some(prompt.clone()),
        true,
        2,
    )
    .unwrap();
    assert_eq!(rep.blocks_restored, 3);
    assert_eq!(rep.tokens_restored, 48);
    assert_eq!(rep.tokens_to_recompute, 0);
    for i in 0..3 {
        assert_eq!(
            block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
            orig[2 + i],
            "window block {} not in engine block {}",
            2 + i,
            dst[i]
        );
    }
    assert_eq!(block_bytes_of(&layout, syn.local.as_ref(), 43), before_next);

    // More destinations than the window has blocks: only the window's blocks are written.
    let dst: Vec<u64> = (50..60).collect();
    let untouched = block_bytes_of(&layout, syn.local.as_ref(), 56);
    let rep = thaw_range(
        &store,
        &syn.engine,
        dst.clone(),
        Some(prompt.clone()),
        true,
        0,
    )
    .unwrap();
    assert_eq!(rep.blocks_restored, 6);
    assert_eq!(block_bytes_of(&layout, syn.local.as_ref(), 55), orig[5]);
    assert_eq!(block_bytes_of(&layout, syn.local.as_ref(), 56), untouched);

    // A prompt that differs inside the restored range is refused before any byte moves.
    let mut wrong = prompt.clone();
    wrong[20] ^= 1;
    let err = thaw_range(&store, &syn.engine, vec![60, 61], Some(wrong), true, 0).unwrap_err();
    assert!(
        matches!(err, PipelineError::TokenMismatch { at: 20, .. }),
        "{err}"
    );
    // first_block without prefix, or past the window, is a validation error.
    for (prefix, first) in [(false, 1), (true, 6)] {
        let err = thaw_range(&store, &syn.engine, vec![60], None, prefix, first).unwrap_err();
        assert_eq!(err.code(), "VALIDATION", "{err}");
    }
}
