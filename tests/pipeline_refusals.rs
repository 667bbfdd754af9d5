//! Refusals of the data path, each before anything is copied or written: layout mismatch,
//! token mismatch (EC-004), out-of-range block ids, empty session (EC-010), insufficient
//! memory for a thaw (EC-022).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};

fn setup() -> (tempfile::TempDir, cwm::store::Store, Synthetic) {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let syn = synthetic(Layout::flash_2nbhd(2, 32, 16, 2, 64, Dtype::Bf16), 3);
    (tmp, store, syn)
}

fn frozen(store: &cwm::store::Store, syn: &Synthetic) -> Vec<u32> {
    let tokens: Vec<u32> = (100..164).collect();
    freeze(
        store,
        &syn.engine,
        FreezeRequest {
            window: "w".into(),
            session: "s".into(),
            tokens: tokens.clone(),
            block_ids: vec![0, 1, 2, 3],
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    tokens
}

#[test]
fn layout_mismatch_names_both_geometries() {
    let (_t, store, syn) = setup();
    frozen(&store, &syn);
    let other = synthetic(Layout::flash_2nbhd(2, 32, 16, 4, 64, Dtype::Bf16), 4);
    let err = thaw(
        &store,
        &other.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "w".into(),
            block_ids: vec![4, 5, 6, 7],
            expect_tokens: None,
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "LAYOUT_MISMATCH");
    let m = err.to_string();
    assert!(m.contains("H2") && m.contains("H4"), "{m}");
}

#[test]
fn ec_004_a_token_mismatch_refused() {
    let (_t, store, syn) = setup();
    let mut tokens = frozen(&store, &syn);
    tokens[40] += 1;
    let err = thaw(
        &store,
        &syn.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "w".into(),
            block_ids: vec![4, 5, 6, 7],
            expect_tokens: Some(tokens),
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "TOKEN_MISMATCH");
    assert!(err.to_string().contains("position 40"), "{err}");
}

#[test]
fn out_of_range_block_ids_refused_before_copying() {
    let (_t, store, syn) = setup();
    let tokens: Vec<u32> = (0..32).collect();
    let err = freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "x".into(),
            session: "s".into(),
            tokens,
            block_ids: vec![1, 32],
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "VALIDATION");
    assert!(err.to_string().contains("block id 32"), "{err}");
    assert_eq!(
        store.stats().unwrap().used_bytes,
        0,
        "something was written"
    );
    frozen(&store, &syn);
    let before = block_bytes_of(&syn.engine.layout, syn.local.as_ref(), 5);
    let err = thaw(
        &store,
        &syn.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "w".into(),
            block_ids: vec![5, 6, 7, 99],
            expect_tokens: None,
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "VALIDATION");
    assert_eq!(
        block_bytes_of(&syn.engine.layout, syn.local.as_ref(), 5),
        before,
        "a block was written before the check"
    );
}

#[test]
fn ec_010_a_empty_session_refused() {
    let (_t, store, syn) = setup();
    let err = freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "e".into(),
            session: "s".into(),
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "VALIDATION");
    assert!(err.to_string().contains("empty session"), "{err}");
}

#[test]
fn ec_022_insufficient_memory_refused_before_thaw() {
    let (_t, store, syn) = setup();
    frozen(&store, &syn);
    let cfg = PipelineConfig {
        memory_available: Some(4096),
        ..Default::default()
    };
    let req = ThawRequest {
        prefix: false,
        first_block: 0,
        window: "w".into(),
        block_ids: vec![4, 5, 6, 7],
        expect_tokens: None,
        salt: None,
    };
    // A fresh registration of the same cache has no staging pool yet: the thaw would have to
    // allocate one, and 4096 bytes are not enough.
    let fresh = cwm::pipeline::Engine::new(
        syn.engine.layout.clone(),
        syn.engine.mem.clone(),
        "test-model",
        None,
    )
    .unwrap();
    let err = thaw(&store, &fresh, &req, &cfg, &ThawOptions::default()).unwrap_err();
    assert_eq!(err.code(), "INSUFFICIENT_MEMORY");
    assert!(err.to_string().contains("4096 available"), "{err}");
    assert!(
        fresh.staging().is_none(),
        "staging allocated despite the refusal"
    );
    // The engine that froze already holds its staging: its thaw needs no new memory.
    thaw(&store, &syn.engine, &req, &cfg, &ThawOptions::default()).unwrap();
}
