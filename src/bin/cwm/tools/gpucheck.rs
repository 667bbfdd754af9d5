//! `cwm gpu-check`: the Rust half of scripts/gpu-check.sh. A Python process allocates KV caches
//! with torch, exports CUDA IPC handles and writes a spec; this imports them and either
//! freezes + thaws (`run`, checked bit-exactly by the Python side afterwards) or measures
//! (`bench`: copy ceilings, gather/scatter alone, a grid sweep, freeze/thaw end to end against
//! the raw disk, thaw from the RAM tier). Until the daemon exists this subcommand is the
//! protocol between the two processes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use cwm::device;
use cwm::device::cuda::{Cuda, CudaMemory, IpcTensor, ScatterPath};
use cwm::io::{self, EngineKind};
use cwm::layout::spec::{hex64, layout_of, LayoutSpec, TensorSpec};
use cwm::layout::Compat;
use cwm::pipeline::{freeze, thaw, Engine, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use cwm::store::{Store, StoreConfig};
use cwm::tier::RamTier;

/// The spec file.
#[derive(Debug, Deserialize)]
pub struct Spec {
    /// Layout.
    pub layout: LayoutSpec,
    /// Tensors, in layout order.
    pub tensors: Vec<TensorSpec>,
    /// Blocks to freeze.
    pub src: Vec<u64>,
    /// Blocks to thaw into.
    pub dst: Vec<u64>,
    /// Session length in tokens.
    pub tokens: u32,
    /// Interprocess event recorded after the KV was written (hex), if any.
    #[serde(default)]
    pub event: Option<String>,
}

struct Setup {
    mem: Arc<CudaMemory>,
    engine: Engine,
    cuda: Arc<Cuda>,
}

fn setup(spec: &Spec, cfg: &PipelineConfig) -> Result<Setup, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let layout = layout_of(&spec.layout)?;
    let cuda = Cuda::new(0).map_err(|x| e(&x))?;
    let tensors: Vec<IpcTensor> = spec
        .tensors
        .iter()
        .map(|t| {
            Ok(IpcTensor {
                handle: hex64(&t.handle)?,
                offset: t.offset,
                size: t.size,
            })
        })
        .collect::<Result<_, String>>()?;
    let mem = Arc::new(CudaMemory::open(cuda.clone(), &tensors).map_err(|x| e(&x))?);
    if let Some(ev) = &spec.event {
        mem.wait_for_event(&hex64(ev)?).map_err(|x| e(&x))?;
    }
    let engine = Engine::new(layout, mem.clone(), "gpu-check", None).map_err(|x| e(&x))?;
    let _ = cfg;
    Ok(Setup { mem, engine, cuda })
}

fn tokens(n: u32) -> Vec<u32> {
    (0..n)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect()
}

/// The pipeline settings, the imported engine and a scratch directory under `dir`.
fn prepare(
    spec: &Spec,
    dir: &std::path::Path,
    staging_bytes: u64,
    threads: usize,
) -> Result<(PipelineConfig, Setup, tempfile::TempDir), String> {
    let cfg = PipelineConfig {
        staging_bytes,
        threads,
        ..Default::default()
    };
    let s = setup(spec, &cfg)?;
    let tmp = tempfile::Builder::new()
        .prefix("cwm-gpu-")
        .tempdir_in(dir)
        .map_err(|x| x.to_string())?;
    Ok((cfg, s, tmp))
}

/// A thaw as it arrives from the shared tier (`pipeline::StreamThaw`, as the daemon runs it
/// for a pull), without Redis: window "bench"'s payloads, read from the log into ordinary
/// memory as a fetch delivers them, handed over in batches of 32 blocks and scattered into
/// `spec.dst` (through the registered staging when the memory asks for it). Seconds from the
/// first block handed over to the last scattered, and whether it went through the staging;
/// every 17th block is compared with its source.
fn stream_thaw(
    store: &Store,
    s: &Setup,
    spec: &Spec,
    cfg: &PipelineConfig,
) -> Result<(f64, bool), String> {
    use cwm::remote::BlockSink;
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let (m, payloads) = store.read_window("bench").map_err(|x| e(&x))?;
    let w = m.spec(
        m.name.clone(),
        cwm::store::Replace::No,
        cwm::store::Retention::default(),
    );
    let req = ThawRequest {
        window: "bench".into(),
        block_ids: spec.dst.clone(),
        ..Default::default()
    };
    let pairs: Vec<(usize, &[u8])> = payloads.iter().map(|p| &p[..]).enumerate().collect();
    let t = Instant::now();
    let mut st = cwm::pipeline::StreamThaw::new(&s.engine, &req, cfg, None, None, 1.0);
    st.begin(&w, &(0..pairs.len()).collect::<Vec<_>>());
    for batch in pairs.chunks(32) {
        st.blocks(batch);
    }
    let done = st.finish().ok_or("the stream did not restore the window")?;
    let secs = t.elapsed().as_secs_f64();
    if done.local != 0 || done.report.blocks_streamed != pairs.len() as u64 {
        return Err(format!("streamed {:?}", done.report));
    }
    let layout = &s.engine.layout;
    for (&a, &b) in spec.src.iter().zip(&spec.dst).step_by(17) {
        let x = device::read_block(layout, s.mem.as_ref(), a).map_err(|x| e(&x))?;
        let y = device::read_block(layout, s.mem.as_ref(), b).map_err(|x| e(&x))?;
        if x != y {
            return Err(format!("block {a} -> {b} differs after the streamed thaw"));
        }
    }
    Ok((
        secs,
        device::KvMemory::scatter_prefers_staging(s.mem.as_ref()),
    ))
}

/// `cwm gpu-check run`: freeze `src`, thaw into `dst` (the Python side compares).
pub fn run(spec: &Spec, dir: &std::path::Path) -> Result<Value, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let (cfg, s, tmp) = prepare(spec, dir, 512 << 20, 8)?;
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).map_err(|x| e(&x))?;
    let f = freeze(
        &store,
        &s.engine,
        FreezeRequest {
            window: "gpu-check".into(),
            session: "gpu".into(),
            tokens: tokens(spec.tokens),
            block_ids: spec.src.clone(),
            ..Default::default()
        },
        &cfg,
        &FreezeOptions::default(),
    )
    .map_err(|x| e(&x))?;
    drop(store);
    // Reopen: the thaw reads what recovery finds.
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("store"))).map_err(|x| e(&x))?;
    let t = thaw(
        &store,
        &s.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "gpu-check".into(),
            block_ids: spec.dst.clone(),
            expect_tokens: Some(tokens(spec.tokens)),
            salt: None,
        },
        &cfg,
        &ThawOptions::default(),
    )
    .map_err(|x| e(&x))?;
    // Out-of-range ids are refused before any launch.
    let bad = device::check_block_ids(&s.engine.layout, &[s.engine.layout.num_blocks]).is_err();
    Ok(json!({
        "device": s.cuda.name,
        "kernel": s.cuda.has_kernel(),
        "kernel_error": s.cuda.kernel_error,
        "staging_mapped": s.engine.staging().is_some(),
        "scatter_path": s.mem.scatter_path().name(),
        "scatter_path_taken": s.mem.last_scatter_path().name(),
        "freeze": f,
        "thaw": t,
        "out_of_range_refused": bad,
    }))
}

/// The non-default scatter paths to measure: all, or those `CWM_BENCH_PATHS` lists.
fn bench_paths() -> Vec<ScatterPath> {
    let all = ScatterPath::ALL.into_iter().skip(1);
    match std::env::var("CWM_BENCH_PATHS") {
        Ok(v) => all
            .filter(|p| v.split(',').any(|x| x.trim() == p.name()))
            .collect(),
        Err(_) => all.collect(),
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// Gathers (or scatters) all `ids` through the engine's staging pool, in sets; seconds.
fn copy_all(s: &Setup, ids: &[u64], scatter: bool, cfg: &PipelineConfig) -> Result<f64, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let pool = s.engine.staging().cloned().ok_or("no staging pool")?;
    let l = &s.engine.layout;
    let po = cwm::store::format::payload_offset(l.block_bytes());
    let bb = l.block_bytes() as usize;
    let t = Instant::now();
    for c in ids.chunks(pool.max_set()) {
        let mut set = pool.take(c.len());
        let mut slots = set.slices();
        if scatter {
            let pls: Vec<&[u8]> = slots.iter().map(|x| &x[po..po + bb]).collect();
            device::scatter(l, l, Compat::Same, s.mem.as_ref(), c, &pls, cfg.threads)
                .map_err(|x| e(&x))?;
        } else {
            let mut pls: Vec<&mut [u8]> = slots.iter_mut().map(|x| &mut x[po..po + bb]).collect();
            device::gather(l, s.mem.as_ref(), c, &mut pls, cfg.threads, None).map_err(|x| e(&x))?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `cwm gpu-check bench`: ceilings and throughput (overwrites `dst` blocks).
#[expect(
    clippy::too_many_lines,
    reason = "one measurement run: ceilings, gather/scatter, grid sweep, end to end, RAM tier, in the order the report lists them"
)]
pub fn bench(spec: &Spec, dir: &std::path::Path) -> Result<Value, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let (cfg, s, tmp) = prepare(spec, dir, 1 << 30, 12)?;
    let io_engine = io::build_engine(EngineKind::Uring, 32);
    let (store, _) = Store::open_with_engine(
        StoreConfig::new(tmp.path().join("store")),
        io_engine.clone(),
    )
    .map_err(|x| e(&x))?;
    let bb = s.engine.layout.block_bytes();
    let bytes = bb * spec.src.len() as u64;
    // The staging pool is allocated and mapped at registration, as a daemon does.
    s.engine
        .prepare_staging(&cfg, io_engine.as_ref())
        .map_err(|x| e(&x))?;
    let (rw0, rr0) = super::bench::raw_disk(io_engine.as_ref(), tmp.path(), bytes, bb as usize, 32)
        .map_err(|x| e(&x))?;
    let f = freeze(
        &store,
        &s.engine,
        FreezeRequest {
            window: "bench".into(),
            session: "gpu".into(),
            tokens: tokens(spec.tokens),
            block_ids: spec.src.clone(),
            ..Default::default()
        },
        &cfg,
        &FreezeOptions::default(),
    )
    .map_err(|x| e(&x))?;
    let t = thaw(
        &store,
        &s.engine,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "bench".into(),
            block_ids: spec.dst.clone(),
            expect_tokens: None,
            salt: None,
        },
        &cfg,
        &ThawOptions::default(),
    )
    .map_err(|x| e(&x))?;
    let (rw1, rr1) = super::bench::raw_disk(io_engine.as_ref(), tmp.path(), bytes, bb as usize, 32)
        .map_err(|x| e(&x))?;
    let pool = s.engine.staging().cloned().ok_or("no staging pool")?;
    let (d2h, h2d) = s
        .cuda
        .memcpy_ceiling(pool.region_ptr(), pool.bytes() as usize)
        .map_err(|x| e(&x))?;
    // Gather / scatter alone, default grid, best of 3.
    let mut g = f64::MAX;
    let mut sc = f64::MAX;
    for _ in 0..3 {
        g = g.min(copy_all(&s, &spec.src, false, &cfg)?);
        sc = sc.min(copy_all(&s, &spec.dst, true, &cfg)?);
    }
    // Launch sweep: CTAs at 512 threads, then threads per CTA at a few grids.
    let mut sweep = Vec::new();
    let geoms: Vec<(u32, u32)> = [2u32, 4, 8, 16, 32, 64, 132]
        .iter()
        .map(|&g| (g, cwm::device::cuda::THREADS))
        .chain([(8, 1024), (16, 256), (16, 1024), (32, 256), (32, 1024)])
        .collect();
    for (grid, threads) in geoms {
        s.mem.grid.store(grid, Ordering::Relaxed);
        s.mem.threads.store(threads, Ordering::Relaxed);
        let gt = copy_all(&s, &spec.src, false, &cfg)?.min(copy_all(&s, &spec.src, false, &cfg)?);
        let st = copy_all(&s, &spec.dst, true, &cfg)?.min(copy_all(&s, &spec.dst, true, &cfg)?);
        sweep.push(json!({
            "grid": grid,
            "threads": threads,
            "gather_gbps": gbps(bytes, gt),
            "scatter_gbps": gbps(bytes, st),
        }));
    }
    // The other scatter paths (copy engines, L2-hinted kernel, bulk-async copies), best of 3
    // each at a few grid caps; a path that cannot run here is reported, not fatal. Only the
    // paths CWM_BENCH_PATHS names when it is set (scripts/gpu_check.py names those that
    // passed its bit-exact checks).
    let measured = bench_paths();
    let mut paths = Vec::new();
    for path in measured.iter().copied() {
        let grids: &[u32] = if path == ScatterPath::CopyEngine {
            &[cwm::device::cuda::DEFAULT_GRID]
        } else {
            &[8, 16, 32, 64]
        };
        for &grid in grids {
            s.mem.grid.store(grid, Ordering::Relaxed);
            s.mem.set_scatter(path);
            let mut best: Result<f64, String> = if s.cuda.supports(path) {
                Ok(f64::MAX)
            } else {
                Err(format!("{} cannot run on this GPU or driver", path.name()))
            };
            for _ in 0..3 {
                if let Ok(b) = best {
                    best = copy_all(&s, &spec.dst, true, &cfg).map(|t| b.min(t));
                }
            }
            let took = s.mem.last_scatter_path();
            s.mem.set_scatter(ScatterPath::Kernel);
            paths.push(json!({
                "path": path.name(),
                "grid": grid,
                "took": took.name(),
                "scatter_gbps": best.as_ref().map(|t| gbps(bytes, *t)).ok(),
                "scatter_ratio": best.as_ref().map(|t| gbps(bytes, *t) / h2d).ok(),
                "error": best.as_ref().err(),
            }));
        }
    }
    s.mem
        .grid
        .store(cwm::device::cuda::DEFAULT_GRID, Ordering::Relaxed);
    s.mem
        .threads
        .store(cwm::device::cuda::THREADS, Ordering::Relaxed);
    // RAM tier: freeze into the tier, thaw from it.
    // The tier's arena is allocated and mapped at registration, as a daemon does.
    let tier = RamTier::new(bytes + (64 << 20));
    tier.prepare(bb as usize);
    let tier_mapped = tier.attach(s.mem.as_ref());
    freeze(
        &store,
        &s.engine,
        FreezeRequest {
            window: "tiered".into(),
            session: "gpu".into(),
            tokens: tokens(spec.tokens).iter().map(|t| t + 1).collect(),
            block_ids: spec.src.clone(),
            ..Default::default()
        },
        &cfg,
        &FreezeOptions {
            tier: Some(&tier),
            ..Default::default()
        },
    )
    .map_err(|x| e(&x))?;
    let tier_thaw = || {
        thaw(
            &store,
            &s.engine,
            &ThawRequest {
                prefix: false,
                first_block: 0,
                window: "tiered".into(),
                block_ids: spec.dst.clone(),
                expect_tokens: None,
                salt: None,
            },
            &cfg,
            &ThawOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .map_err(|x| e(&x))
    };
    let tt = tier_thaw()?;
    // The same tier thaw through each other scatter path (default grid).
    let mut tier_paths = Vec::new();
    for path in measured.iter().copied() {
        s.mem.set_scatter(path);
        let r = if s.cuda.supports(path) {
            tier_thaw()
        } else {
            Err(format!("{} cannot run on this GPU or driver", path.name()))
        };
        let took = s.mem.last_scatter_path();
        s.mem.set_scatter(ScatterPath::Kernel);
        tier_paths.push(json!({
            "path": path.name(),
            "took": took.name(),
            "tier_gbps": r.as_ref().map(|r| gbps(bytes, r.loaded_secs)).ok(),
            "tier_ratio": r.as_ref().map(|r| gbps(bytes, r.loaded_secs) / h2d).ok(),
            "blocks_from_tier": r.as_ref().map(|r| r.blocks_from_tier).ok(),
            "error": r.as_ref().err(),
        }));
    }
    let raw_w = (rw0 + rw1) / 2.0;
    let raw_r = (rr0 + rr1) / 2.0;
    let gather = gbps(bytes, g);
    let scatter = gbps(bytes, sc);
    let freeze_gbps = gbps(bytes, f.durable_secs);
    let thaw_gbps = gbps(bytes, t.loaded_secs);
    let tier_gbps = gbps(bytes, tt.loaded_secs);
    let stream = stream_thaw(&store, &s, spec, &cfg)
        .map_or_else(|x| json!({"error": x}), |(secs, staged)| {
            json!({"gbps": gbps(bytes, secs), "ratio": gbps(bytes, secs) / h2d, "staged": staged})
        });
    Ok(json!({
        "stream": stream,
        "device": s.cuda.name,
        "sms": s.cuda.sms,
        "kernel": s.cuda.has_kernel(),
        "kernel_error": s.cuda.kernel_error,
        "bytes": bytes,
        "blocks": spec.src.len(),
        "block_bytes": bb,
        "grid": cwm::device::cuda::DEFAULT_GRID,
        "threads_per_cta": cwm::device::cuda::THREADS,
        "d2h_pinned_gbps": d2h,
        "h2d_pinned_gbps": h2d,
        "gather_gbps": gather,
        "scatter_gbps": scatter,
        "gather_ratio": gather / d2h,
        "scatter_ratio": scatter / h2d,
        "raw_write_gbps": raw_w,
        "raw_read_gbps": raw_r,
        "freeze_gbps": freeze_gbps,
        "thaw_gbps": thaw_gbps,
        "freeze_ratio": freeze_gbps / raw_w.min(d2h),
        "thaw_ratio": thaw_gbps / raw_r.min(h2d),
        "compute_capability": format!("{}.{}", s.cuda.cc.0, s.cuda.cc.1),
        "scatter_paths": paths,
        "tier_paths": tier_paths,
        "tier_thaw_gbps": tier_gbps,
        "tier_ratio": tier_gbps / h2d,
        "tier_blocks": tt.blocks_from_tier,
        "tier_mapped": tier_mapped,
        "verify_threads": cfg.verify_threads,
        "freeze": f,
        "thaw": t,
        "grid_sweep": sweep,
    }))
}
