//! Partial thaw: a corrupt block k on disk → blocks 0..k are restored, k and later are never
//! written into the engine, and the report says how many tokens to recompute.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};

#[test]
fn corrupt_block_restores_the_intact_prefix() {
    for (name, io) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let layout = Layout::flash_2nbhd(2, 32, 16, 2, 64, Dtype::Bf16); // 16 KiB blocks
        let syn = synthetic(layout.clone(), 8);
        let tokens: Vec<u32> = (0..16 * 8 - 5).collect(); // 8 blocks
        let src: Vec<u64> = (0..8).collect();
        {
            let (store, _) = open(&dir, &io);
            freeze(
                &store,
                &syn.engine,
                FreezeRequest {
                    window: "w".into(),
                    session: "s".into(),
                    tokens: tokens.clone(),
                    block_ids: src.clone(),
                    ..Default::default()
                },
                &PipelineConfig::default(),
                &FreezeOptions::default(),
            )
            .unwrap();
        }
        let orig: Vec<Vec<u8>> = src
            .iter()
            .map(|&b| block_bytes_of(&layout, syn.local.as_ref(), b))
            .collect();
        // Corrupt block 5's payload on disk.
        let bb = layout.block_bytes();
        flip_bit(&segments(&dir)[0], 8192 + 5 * (4096 + bb) + 4096 + 777, 2);
        let (store, _) = open(&dir, &io);
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 4242 + t as u64).unwrap();
        }
        let dst: Vec<u64> = (16..24).collect();
        let poisoned: Vec<Vec<u8>> = dst
            .iter()
            .map(|&b| block_bytes_of(&layout, syn.local.as_ref(), b))
            .collect();
        let cfg = PipelineConfig {
            batch_blocks: 2,
            ..Default::default()
        };
        let rep = thaw(
            &store,
            &syn.engine,
            &ThawRequest {
                prefix: false,
                first_block: 0,
                window: "w".into(),
                block_ids: dst.clone(),
                expect_tokens: None,
                salt: None,
            },
            &cfg,
            &ThawOptions::default(),
        )
        .unwrap();
        assert_eq!(rep.blocks_restored, 5, "{name}");
        assert_eq!(rep.tokens_restored, 80);
        assert_eq!(rep.tokens_to_recompute, tokens.len() as u64 - 80);
        assert!(
            rep.corruption.as_deref().unwrap().contains("block 5"),
            "{:?}",
            rep.corruption
        );
        for i in 0..8 {
            let got = block_bytes_of(&layout, syn.local.as_ref(), dst[i]);
            if i < 5 {
                assert_eq!(got, orig[i], "{name}: block {i} not restored");
            } else {
                assert_eq!(
                    got, poisoned[i],
                    "{name}: block {i} was written despite corruption"
                );
            }
        }
    }
}
