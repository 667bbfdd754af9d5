//! `cwm demo`: the README's main command. Writes a synthetic window of random blocks into a
//! temporary data dir, reopens the store (recovery), reads every block back verified and
//! compares it bit for bit.

use std::time::Instant;

use cwm::bench::fill_random;
use cwm::store::{BlockDesc, Store, StoreConfig, WindowSpec};

/// Arguments of `cwm demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Number of blocks.
    #[arg(long, default_value_t = 256)]
    blocks: usize,
    /// Bytes per block.
    #[arg(long, default_value_t = 256 * 1024)]
    block_bytes: usize,
    /// Keep the data directory here instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

pub fn run(a: &DemoArgs) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("cwm-demo-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().join("data"));
    let cfg = StoreConfig::new(&dir);
    let payloads: Vec<Vec<u8>> = (0..a.blocks)
        .map(|i| {
            let mut v = vec![0u8; a.block_bytes];
            fill_random(&mut v, i as u64 + 1);
            v
        })
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    let spec = WindowSpec {
        name: "demo-window".into(),
        session: "demo-session".into(),
        namespace: "demo".into(),
        layout: b"{\"demo\":true}".to_vec(),
        tokens: (0..(a.blocks as u32) * 16).collect(),
        blocks: (0..a.blocks)
            .map(|i| BlockDesc {
                key: 0xc0ffee_u128 << 64 | i as u128,
                len: a.block_bytes as u64,
            })
            .collect(),
        ..Default::default()
    };
    let total = (a.blocks * a.block_bytes) as f64;
    let t = Instant::now();
    {
        let (store, _) = Store::open(cfg.clone()).map_err(|e| e.to_string())?;
        let info = store.put_window(spec, &refs).map_err(|e| e.to_string())?;
        let dt = t.elapsed().as_secs_f64();
        println!(
            "froze window {:?}: {} blocks, {:.1} MiB, durable in {:.3} s ({:.2} GB/s) [{}]",
            info.name,
            info.num_blocks,
            total / 1048576.0,
            dt,
            total / dt / 1e9,
            store.engine().name()
        );
    }
    let t = Instant::now();
    let (store, report) = Store::open(cfg).map_err(|e| e.to_string())?;
    println!(
        "reopened: {} records, {} windows recovered in {:.3} s",
        report.records,
        report.windows,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let (_, blocks) = store
        .read_window("demo-window")
        .map_err(|e| e.to_string())?;
    let dt = t.elapsed().as_secs_f64();
    let same = blocks == payloads;
    println!(
        "thawed and verified {} blocks in {:.3} s ({:.2} GB/s): {}",
        blocks.len(),
        dt,
        total / dt / 1e9,
        if same { "bit-exact" } else { "MISMATCH" }
    );
    if same {
        Ok(())
    } else {
        Err("verification failed: thawed bytes differ from frozen bytes".into())
    }
}
