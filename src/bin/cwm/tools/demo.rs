//! `cwm demo`: the README's main command. A synthetic engine with a Llama-3.1-8B-shaped KV
//! cache (32 layers, 8 KV heads, head size 128, bf16, 16-token blocks) fills a session with
//! random KV, freezes it into a window in a temporary data dir, drops the cache, reopens the
//! store (recovery), thaws into different block ids, and verifies bit-exactness.

use std::time::Instant;

use cwm::layout::{Dtype, Layout};
use cwm::pipeline::synthetic::Synthetic;
use cwm::pipeline::{freeze, thaw, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::store::{Store, StoreConfig};

/// Arguments of `cwm demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Session length in tokens.
    #[arg(long, default_value_t = 16_384)]
    tokens: u32,
    /// Keep the data directory here instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

pub fn run(a: &DemoArgs) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let tmp = tempfile::Builder::new()
        .prefix("cwm-demo-")
        .tempdir()
        .map_err(|x| e(&x))?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().join("data"));
    let bs = 16u32;
    let nb = a.tokens.max(1).div_ceil(bs) as u64;
    let layout = Layout::flash_2nbhd(32, nb + 8, bs, 8, 128, Dtype::Bf16);
    let block_bytes = layout.block_bytes();
    println!(
        "cwm demo: Llama-3.1-8B-shaped KV cache (32 layers, 8 KV heads, head 128, bf16, {bs}-token blocks)"
    );
    println!(
        "  session: {} tokens = {nb} blocks x {:.1} MiB = {:.0} MiB of KV; data dir {}",
        a.tokens,
        mib(block_bytes),
        mib(block_bytes * nb),
        dir.display()
    );
    let t = Instant::now();
    let syn = Synthetic::new(layout.clone(), "demo/llama-3.1-8b-shaped", 1).map_err(|x| e(&x))?;
    // The session's blocks, and a digest of each to verify the thaw against.
    let src: Vec<u64> = (0..nb).collect();
    let digests: Vec<u128> = src
        .iter()
        .map(|&b| syn.block(b).map(|v| xxhash_rust::xxh3::xxh3_128(&v)))
        .collect::<Result<_, _>>()
        .map_err(|x| e(&x))?;
    let tokens: Vec<u32> = (0..a.tokens)
        .map(|i| i.wrapping_mul(2_654_435_761u32) % 128_000)
        .collect();
    println!("  prefill (synthetic): {:.2} s", t.elapsed().as_secs_f64());
    let cfg = PipelineConfig::default();
    let bar = std::sync::Arc::new(crate::progress::Progress::new(
        crate::progress::Mode::detect(false),
        "blocks",
    ));
    let b = bar.clone();
    let progress = Some(cwm::pipeline::Progress(std::sync::Arc::new(
        move |stage, done, total| b.update(stage, done, total, ""),
    )));
    let info;
    {
        let (store, _) = Store::open(StoreConfig::new(&dir)).map_err(|x| e(&x))?;
        // The engine registers: its staging pool is allocated once, as the daemon does.
        syn.engine
            .prepare_staging(&cfg, store.engine().as_ref())
            .map_err(|x| e(&x))?;
        let r = freeze(
            &store,
            &syn.engine,
            FreezeRequest {
                window: "demo-window".into(),
                session: "demo-session".into(),
                tokens: tokens.clone(),
                block_ids: src.clone(),
                ..Default::default()
            },
            &cfg,
            &FreezeOptions {
                progress: progress.clone(),
                ..Default::default()
            },
        )
        .map_err(|x| e(&x))?;
        bar.finish();
        let bytes = r.bytes as f64;
        println!(
            "  freeze: captured after {:.3} s, durable after {:.3} s -> {:.2} GB/s [{} engine]",
            r.captured_secs,
            r.durable_secs,
            bytes / r.durable_secs / 1e9,
            store.engine().name()
        );
        println!(
            "          busy: gather+checksum {:.3} s, block writes {:.3} s, fdatasync+manifest {:.3} s (stages overlap)",
            r.gather_secs, r.write_secs, r.commit_secs
        );
        info = r.info;
    }
    // The engine drops the session: its blocks are reused for other work.
    syn.refill(0xdead).map_err(|x| e(&x))?;
    let t = Instant::now();
    let (store, report) = Store::open(StoreConfig::new(&dir)).map_err(|x| e(&x))?;
    println!(
        "  restart: store reopened in {:.3} s ({} records, {} window)",
        t.elapsed().as_secs_f64(),
        report.records,
        report.windows
    );
    // Different block ids: reversed, shifted by 8.
    let dst: Vec<u64> = (0..nb).map(|i| nb + 7 - i).collect();
    let r = thaw(
        &store,
        &syn.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "demo-window".into(),
            block_ids: dst.clone(),
            expect_tokens: Some(tokens),
            salt: None,
        },
        &cfg,
        &ThawOptions {
            progress: progress.clone(),
            ..Default::default()
        },
    )
    .map_err(|x| e(&x))?;
    bar.finish();
    println!(
        "  thaw: {} blocks into other block ids, loaded after {:.3} s -> {:.2} GB/s",
        r.blocks_restored,
        r.loaded_secs,
        r.bytes as f64 / r.loaded_secs / 1e9
    );
    println!(
        "          busy: reads {:.3} s (two readers together), verify {:.3} s, scatter {:.3} s",
        r.read_secs, r.verify_secs, r.scatter_secs
    );
    // Verify: the xxh3-128 digest of every thawed block equals the original's.
    let mut bad = Vec::new();
    for (i, &d) in dst.iter().enumerate() {
        if xxhash_rust::xxh3::xxh3_128(&syn.block(d).map_err(|x| e(&x))?) != digests[i] {
            bad.push(i);
        }
        if i % 64 == 63 || i + 1 == dst.len() {
            bar.update("verify", (i + 1) as u64, dst.len() as u64, "");
        }
    }
    println!(
        "  window {:?} v{}: {} tokens, {:.0} MiB; verification: {}",
        info.name,
        info.version,
        info.num_tokens,
        mib(info.bytes),
        if bad.is_empty() {
            "bit-exact (xxh3-128 of every block)".to_string()
        } else {
            format!("{} blocks differ", bad.len())
        }
    );
    if bad.is_empty() && r.tokens_to_recompute == 0 {
        Ok(())
    } else {
        Err(format!("verification failed: blocks {bad:?} differ"))
    }
}
