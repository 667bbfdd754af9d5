//! Dedup of a shared 4,096-token prefix across two windows (bytes on disk measured), a freeze
//! larger than the staging pool, `captured` before `durable`, and the RAM tier serving a thaw
//! without the disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::kv::*;
use common::*;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::tier::RamTier;
use std::sync::atomic::{AtomicBool, Ordering};

fn dir_bytes(d: &std::path::Path) -> u64 {
    segments(d)
        .iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks() * 512
        })
        .sum()
}

#[test]
fn shared_prefix_stored_once() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let layout = Layout::flash_2nbhd(2, 600, 16, 2, 64, Dtype::Bf16); // 16 KiB per block
    let syn = synthetic(layout.clone(), 1);
    let prefix: Vec<u32> = (0..4096).map(|i| i * 7 % 1000).collect();
    let mut t1 = prefix.clone();
    t1.extend(5000..5100);
    let mut t2 = prefix.clone();
    t2.extend(6000..6100);
    let nb = t1.len().div_ceil(16);
    let ids1: Vec<u64> = (0..nb as u64).collect();
    // The engine computed the shared prefix into different blocks for the second request.
    let ids2: Vec<u64> = (0..nb as u64).map(|i| i + 300).collect();
    let r1 = freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "one".into(),
            session: "s1".into(),
            tokens: t1.clone(),
            block_ids: ids1,
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    let used1 = store.stats().unwrap().used_bytes;
    let r2 = freeze(
        &store,
        &syn.engine,
        FreezeRequest {
            window: "two".into(),
            session: "s2".into(),
            tokens: t2.clone(),
            block_ids: ids2.clone(),
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    let used2 = store.stats().unwrap().used_bytes;
    assert_eq!(r1.blocks_written as usize, nb);
    assert_eq!(
        r2.blocks_deduplicated, 256,
        "4096 tokens = 256 shared blocks"
    );
    assert_eq!(r2.blocks_written as usize, nb - 256);
    let block_rec = 4096 + layout.block_bytes();
    assert!(
        used2 - used1 < (nb as u64 - 256 + 4) * block_rec,
        "second window rewrote shared blocks"
    );
    let on_disk = dir_bytes(tmp.path());
    println!(
        "two windows of {nb} blocks each: {used2} bytes of log, {on_disk} bytes allocated on disk"
    );
    // Window two thaws with the prefix blocks written by window one: same bytes, since the
    // synthetic engine's content is per block id, compare against what was frozen.
    let want: Vec<Vec<u8>> = (0..nb)
        .map(|i| {
            let id = if i < 256 { i as u64 } else { ids2[i] };
            block_bytes_of(&layout, syn.local.as_ref(), id)
        })
        .collect();
    let dst: Vec<u64> = (0..nb as u64).map(|i| 599 - i).collect();
    thaw(
        &store,
        &syn.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "two".into(),
            block_ids: dst.clone(),
            expect_tokens: Some(t2),
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap();
    for i in [0usize, 100, 255, 256, nb - 1] {
        assert_eq!(
            block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
            want[i],
            "block {i}"
        );
    }
}

#[test]
fn freeze_larger_than_staging_and_ram_tier() {
    for (name, io) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), &io);
        let layout = Layout::flash_n2bhd(4, 128, 16, 4, 128, Dtype::Bf16); // 128 KiB per block
        let syn = synthetic(layout.clone(), 2);
        let tokens: Vec<u32> = (0..16 * 100).collect(); // 100 blocks = 12.5 MiB
        let ids: Vec<u64> = (0..100).collect();
        let before: Vec<Vec<u8>> = ids
            .iter()
            .map(|&b| block_bytes_of(&layout, syn.local.as_ref(), b))
            .collect();
        // 1 MiB of staging: 7 slots, far less than the window.
        let cfg = PipelineConfig {
            staging_bytes: 1 << 20,
            ..Default::default()
        };
        let tier = RamTier::new(64 << 20);
        let captured = AtomicBool::new(false);
        let rep = freeze(
            &store,
            &syn.engine,
            FreezeRequest {
                window: "big".into(),
                session: "s".into(),
                tokens,
                block_ids: ids,
                ..Default::default()
            },
            &cfg,
            &FreezeOptions {
                tier: Some(&tier),
                on_captured: Some(&|| captured.store(true, Ordering::SeqCst)),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(captured.load(Ordering::SeqCst));
        assert!(rep.captured_secs <= rep.durable_secs);
        assert_eq!(tier.bytes(), 100 * layout.block_bytes());
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 77).unwrap();
        }
        // Thaw with a tiny staging pool from disk (no tier) …
        let dst: Vec<u64> = (0..100).map(|i| 127 - i).collect();
        let t = thaw(
            &store,
            &syn.engine,
            &ThawRequest {
                prefix: false,
                first_block: 0,
                window: "big".into(),
                block_ids: dst.clone(),
                expect_tokens: None,
                salt: None,
            },
            &cfg,
            &ThawOptions::default(),
        )
        .unwrap();
        assert_eq!(t.blocks_restored, 100, "{name}");
        assert_eq!(t.blocks_from_tier, 0);
        for i in [0usize, 50, 99] {
            assert_eq!(
                block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
                before[i]
            );
        }
        // … and from the RAM tier, with the log made unreadable to prove no disk read.
        for t in 0..tensor_sizes(&layout).len() {
            syn.local.fill_random(t, 78).unwrap();
        }
        let seg = segments(tmp.path())[0].clone();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0u8; 1 << 20], 4096 + 4096 * 4)
            .unwrap();
        drop(f);
        let t = thaw(
            &store,
            &syn.engine,
            &ThawRequest {
                prefix: false,
                first_block: 0,
                window: "big".into(),
                block_ids: dst.clone(),
                expect_tokens: None,
                salt: None,
            },
            &cfg,
            &ThawOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(t.blocks_from_tier, 100, "{name}");
        for i in [0usize, 1, 99] {
            assert_eq!(
                block_bytes_of(&layout, syn.local.as_ref(), dst[i]),
                before[i]
            );
        }
    }
}
