//! The same tokens' KV differs across models, LoRA adapters, tenants' cache salts and
//! multimodal inputs: a request's own salt keeps its blocks apart (no dedup, no prefix match
//! across salts), and a thaw of a window frozen in another namespace — another model, another
//! salt — is refused with NAMESPACE_MISMATCH before any byte moves.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::synthetic::Synthetic;
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, PipelineError, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};

#[test]
fn request_salts_and_models_keep_kv_apart() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let layout = Layout::flash_2nbhd(2, 32, 16, 2, 64, Dtype::Bf16);
    let syn = synthetic(layout.clone(), 8);
    let cfg = PipelineConfig::default();
    let tokens: Vec<u32> = (0..64).collect();
    let fr = |window: &str, salt: Option<&str>, ids: Vec<u64>| FreezeRequest {
        window: window.into(),
        session: "s".into(),
        tokens: tokens.clone(),
        block_ids: ids,
        salt: salt.map(Into::into),
        ..Default::default()
    };
    let a = freeze(
        &store,
        &syn.engine,
        fr("lora-a", Some("lora:a"), vec![0, 1, 2, 3]),
        &cfg,
        &FreezeOptions::default(),
    )
    .unwrap();
    assert_eq!(a.blocks_written, 4);
    // Same tokens, another adapter: nothing shared.
    let b = freeze(
        &store,
        &syn.engine,
        fr("lora-b", Some("lora:b"), vec![4, 5, 6, 7]),
        &cfg,
        &FreezeOptions::default(),
    )
    .unwrap();
    assert_eq!((b.blocks_written, b.blocks_deduplicated), (4, 0));
    // Prefix matching is per salt.
    let found = |salt: Option<&str>| {
        store
            .longest_prefix(&syn.engine.keys_with(&tokens, salt), None)
            .unwrap()
            .map(|(w, n)| (w.name, n))
    };
    assert_eq!(found(Some("lora:a")), Some(("lora-a".to_string(), 4)));
    assert_eq!(found(Some("lora:b")), Some(("lora-b".to_string(), 4)));
    assert_eq!(
        found(None),
        None,
        "the base model must not find an adapter's KV"
    );
    // Thaws by name check the namespace.
    let tr = |window: &str, salt: Option<&str>| ThawRequest {
        window: window.into(),
        block_ids: vec![20, 21, 22, 23],
        salt: salt.map(Into::into),
        ..Default::default()
    };
    let want = blocks_of(&layout, syn.local.as_ref(), &[0, 1, 2, 3]);
    for salt in [None, Some("lora:b")] {
        match thaw(
            &store,
            &syn.engine,
            &tr("lora-a", salt),
            &cfg,
            &ThawOptions::default(),
        ) {
            Err(e @ PipelineError::NamespaceMismatch { .. }) => {
                assert_eq!(e.code(), "NAMESPACE_MISMATCH");
                assert!(e.to_string().contains("lora:a"), "{e}");
            }
            other => panic!("salt {salt:?}: expected NAMESPACE_MISMATCH, got {other:?}"),
        }
    }
    let t = thaw(
        &store,
        &syn.engine,
        &tr("lora-a", Some("lora:a")),
        &cfg,
        &ThawOptions::default(),
    )
    .unwrap();
    assert_eq!(t.blocks_restored, 4);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &block_bytes_of(&layout, syn.local.as_ref(), 20 + i as u64),
            w
        );
    }
    // Another model with the same layout: its engine may not load this model's window.
    let other = Synthetic::new(layout.clone(), "another-model", 9).unwrap();
    freeze(
        &store,
        &syn.engine,
        fr("base", None, vec![8, 9, 10, 11]),
        &cfg,
        &FreezeOptions::default(),
    )
    .unwrap();
    let before = block_bytes_of(&layout, other.local.as_ref(), 20);
    match thaw(
        &store,
        &other.engine,
        &tr("base", None),
        &cfg,
        &ThawOptions::default(),
    ) {
        Err(PipelineError::NamespaceMismatch { window_ns, .. }) => {
            assert!(window_ns.starts_with("test-model#"), "{window_ns}")
        }
        other => panic!("expected NAMESPACE_MISMATCH, got {other:?}"),
    }
    assert_eq!(
        block_bytes_of(&layout, other.local.as_ref(), 20),
        before,
        "refused before any byte moved"
    );
}
