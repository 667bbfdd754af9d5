//! EC-050 in the RAM tier: a thaw from the tier scatters while it verifies; a payload that no
//! longer matches its checksum (a memory error) is dropped from the tier and the window is
//! read from disk instead, bit-exact. A thaw past its deadline claims no unverified block.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, PipelineError};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::tier::RamTier;

#[test]
fn ec_050_d_tier_bit_flip_falls_back_to_disk() {
    for (name, io) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &io);
        let layout = Layout::flash_n2bhd(2, 160, 16, 2, 64, Dtype::Bf16); // 16 KiB per block
        let syn = synthetic(layout.clone(), 3);
        let n = 70usize;
        let tokens: Vec<u32> = (0..16 * n as u32).collect();
        let ids: Vec<u64> = (0..n as u64).collect();
        let before = blocks_of(&layout, syn.local.as_ref(), &ids);
        // Small batches: the scatter runs in several chunks (8 batches each).
        let cfg = PipelineConfig {
            batch_blocks: 2,
            verify_threads: 3,
            ..Default::default()
        };
        let tier = RamTier::new(64 << 20);
        let rep = freeze(
            &store,
            &syn.engine,
            FreezeRequest {
                window: "w".into(),
                session: "s".into(),
                tokens,
                block_ids: ids,
                ..Default::default()
            },
            &cfg,
            &FreezeOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rep.blocks_written as usize, n);
        let man = store.open_window("w").unwrap().manifest;
        let keys: Vec<u128> = man.blocks.iter().map(|b| b.key).collect();
        let dst: Vec<u64> = (0..n as u64).map(|i| 159 - i).collect();
        let req = whole_thaw("w", &dst);
        let check = |what: &str| {
            for (i, want) in before.iter().enumerate() {
                assert_eq!(
                    &block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
                    want,
                    "{name} {what}: block {i}"
                );
            }
        };
        let poison = || {
            for t in 0..tensor_sizes(&layout).len() {
                syn.local.fill_random(t, 99).unwrap();
            }
        };
        // Intact tier: served from RAM, verified.
        poison();
        let t = thaw(
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
        assert_eq!(t.blocks_from_tier as usize, n, "{name}");
        assert_eq!(t.blocks_restored as usize, n);
        assert!(t.verify_secs > 0.0 && t.scatter_secs > 0.0, "{t:?}");
        check("from the tier");
        // A memory error in block 41's payload in the tier.
        assert!(tier.flip_bit(keys[41], 1000));
        poison();
        let t = thaw(
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
            t.blocks_from_tier, 0,
            "{name}: a corrupt tier block was used"
        );
        assert_eq!(t.blocks_restored as usize, n);
        assert!(t.corruption.is_none(), "the disk copy is intact: {t:?}");
        assert_eq!(t.tier_corruption.as_deref(), Some("block 41"));
        check("from disk after a tier bit flip");
        // The disk thaw put the good payload back: the next thaw is served from RAM again.
        assert_eq!(tier.contains_all(&keys), Some(true));
        poison();
        let t = thaw(
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
        assert_eq!(t.blocks_from_tier as usize, n, "{name}");
        check("from the repaired tier");
        // The first block corrupt: found whichever verifier reaches it.
        assert!(tier.flip_bit(keys[0], 0));
        let t = thaw(
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
        assert_eq!(t.blocks_from_tier, 0, "{name}");
        assert_eq!(t.blocks_restored as usize, n);
        // A deadline already past: TIMEOUT, and no block claimed that was not verified.
        match thaw(
            &store,
            &syn.engine,
            &req,
            &cfg,
            &ThawOptions {
                tier: Some(&tier),
                deadline: Some(std::time::Instant::now()),
                ..Default::default()
            },
        ) {
            Err(PipelineError::Timeout {
                blocks_restored, ..
            }) => assert_eq!(blocks_restored, 0, "{name}"),
            other => panic!("{name}: expected TIMEOUT, got {other:?}"),
        }
    }
}
