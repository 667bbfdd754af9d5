//! Freeze → thaw round trip for every layout constructor, random KV, poisoned destinations,
//! different destination block ids; and a thaw across a dimension-order change (permuted).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{CrossOrder, Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};

fn layouts(blocks: u64) -> Vec<Layout> {
    every_layout(blocks)
}

#[test]
fn round_trip_every_layout() {
    for (ename, io) in engines() {
        for layout in layouts(64) {
            let tmp = tempfile::tempdir().unwrap();
            let (store, _) = open(tmp.path(), &io);
            let syn = synthetic(layout.clone(), 11);
            let bs = layout.block_size as usize;
            let tokens: Vec<u32> = (0..(bs * 10 + 3) as u32).collect(); // 11 blocks, last partial
            let src: Vec<u64> = (0..11).map(|i| i * 3 + 1).collect();
            let before: Vec<Vec<u8>> = src
                .iter()
                .map(|&b| block_bytes_of(&layout, syn.local.as_ref(), b))
                .collect();
            let cfg = PipelineConfig {
                batch_blocks: 4,
                ..Default::default()
            };
            let rep = freeze(
                &store,
                &syn.engine,
                FreezeRequest {
                    window: "w".into(),
                    session: "s".into(),
                    tokens: tokens.clone(),
                    block_ids: src.clone(),
                    ..Default::default()
                },
                &cfg,
                &FreezeOptions::default(),
            )
            .unwrap();
            assert_eq!(rep.info.num_blocks, 11);
            assert_eq!(rep.blocks_written, 11);
            // Poison the whole cache, then thaw into other blocks.
            for t in 0..tensor_sizes(&layout).len() {
                syn.local.fill_random(t, 999 + t as u64).unwrap();
            }
            let dst: Vec<u64> = (0..11).map(|i| 63 - i * 2).collect();
            let t = thaw(
                &store,
                &syn.engine,
                &ThawRequest {
                    prefix: false,
                    first_block: 0,
                    window: "w".into(),
                    block_ids: dst.clone(),
                    expect_tokens: Some(tokens.clone()),
                    salt: None,
                },
                &cfg,
                &ThawOptions::default(),
            )
            .unwrap();
            assert_eq!(t.blocks_restored, 11, "{ename} {}", layout.name);
            assert_eq!(t.tokens_restored, tokens.len() as u64);
            assert_eq!(t.tokens_to_recompute, 0);
            assert!(!t.permuted);
            for (i, &b) in dst.iter().enumerate() {
                assert_eq!(
                    block_bytes_of(&layout, syn.local.as_ref(), b),
                    before[i],
                    "{ename} {} block {i}",
                    layout.name
                );
            }
        }
    }
}

#[test]
fn thaw_across_a_dimension_order_change_permutes() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let old = Layout::cross_layer(CrossOrder::Lbhnc, 2, 16, 32, 4, 64, Dtype::Bf16);
    let new = Layout::cross_layer(CrossOrder::Blnhc, 2, 20, 32, 4, 64, Dtype::Bf16);
    let a = synthetic(old.clone(), 5);
    let b = synthetic(new.clone(), 6);
    let tokens: Vec<u32> = (0..96).collect();
    freeze(
        &store,
        &a.engine,
        FreezeRequest {
            window: "upgrade".into(),
            session: "s".into(),
            tokens,
            block_ids: vec![2, 7, 9],
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    let t = thaw(
        &store,
        &b.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "upgrade".into(),
            block_ids: vec![19, 0, 5],
            expect_tokens: None,
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap();
    assert!(t.permuted);
    assert_eq!(t.blocks_restored, 3);
    // Element (layer, head h, token n) must be equal across the two orders.
    let row = 2 * 64 * 2; // C = 2*D bf16
    for (src, dst) in [(2u64, 19u64), (7, 0), (9, 5)] {
        let s = block_bytes_of(&old, a.local.as_ref(), src);
        let d = block_bytes_of(&new, b.local.as_ref(), dst);
        let page = 4 * 32 * row;
        for l in 0..2 {
            for h in 0..4 {
                for n in 0..32 {
                    let so = l * page + (h * 32 + n) * row; // HNC
                    let do_ = l * page + (n * 4 + h) * row; // NHC
                    assert_eq!(s[so..so + row], d[do_..do_ + row], "l{l} h{h} n{n}");
                }
            }
        }
    }
}
