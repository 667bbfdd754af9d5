//! The RAM tier mirrors the log: when a freeze gathers other bytes for blocks the log already
//! holds (the same tokens frozen again; GPU kernels need not be bit-reproducible), a thaw of
//! the window restores the log's bytes, with no false "corruption in the RAM tier" report,
//! and the tier then holds the log's bytes. Through the capture-first freeze and the streaming
//! freeze.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::tier::RamTier;

#[test]
fn a_refrozen_window_with_other_bytes_thaws_the_logs_bytes_without_false_corruption() {
    let layout = Layout::flash_n2bhd(2, 160, 16, 2, 64, Dtype::Bf16); // 16 KiB per block
    let n = 40usize;
    for (mode, cfg) in captured_and_streaming(&layout) {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &engines()[0].1);
        let syn = synthetic(layout.clone(), 3);
        let tokens: Vec<u32> = (0..16 * n as u32).collect();
        let ids: Vec<u64> = (0..n as u64).collect();
        let logged = blocks_of(&layout, syn.local.as_ref(), &ids);
        let frz = |window: &str, tier: Option<&RamTier>| {
            freeze(
                &store,
                &syn.engine,
                FreezeRequest {
                    window: window.into(),
                    session: "s".into(),
                    tokens: tokens.clone(),
                    block_ids: ids.clone(),
                    ..Default::default()
                },
                &cfg,
                &FreezeOptions {
                    tier,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        // "a" is frozen without the tier (another daemon run, or evicted since).
        assert_eq!(frz("a", None).blocks_written as usize, n);
        // The same tokens' KV, recomputed with other bytes, frozen as "b": deduplicated.
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 7 + t as u64).unwrap();
        }
        let tier = RamTier::new(64 << 20);
        assert_eq!(
            frz("b", Some(&tier)).blocks_written,
            0,
            "{mode}: all deduplicated"
        );
        let dst: Vec<u64> = (0..n as u64).map(|i| 159 - i).collect();
        let req = whole_thaw("b", &dst);
        for round in 0..2 {
            for t in 0..tensor_sizes(&layout).len() {
                syn.local.fill_random(t, 99).unwrap();
            }
            let r = thaw(
                &store,
                &syn.engine,
                &req,
                &cfg,
                &ThawOptions {
                    tier: Some(&tier),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(
                r.tier_corruption, None,
                "{mode} round {round}: no false corruption"
            );
            assert_eq!(r.blocks_restored as usize, n);
            // First from disk (the tier did not hold the log's bytes), then from the tier.
            let from_tier = if round == 0 { 0 } else { n };
            assert_eq!(
                r.blocks_from_tier as usize, from_tier,
                "{mode} round {round}"
            );
            for (i, want) in logged.iter().enumerate() {
                assert_eq!(
                    &block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
                    want,
                    "{mode} round {round}: block {i} holds the log's bytes"
                );
            }
        }
    }
}
