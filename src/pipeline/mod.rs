//! Freeze and thaw as overlapped stages between an engine's KV memory and the store.
//!
//! Freeze: gather (+ checksum, + RAM tier) on one thread, write on another: batch i is written
//! while batch i+1 is gathered. `captured` is reported when the last needed block has left the
//! engine's memory; `durable` when the manifest is on disk. Thaw: read + verify on one thread,
//! scatter on another; a corrupt block stops the thaw after the intact prefix has been
//! scattered, and the report says how many tokens the engine must recompute. Staging memory is
//! bounded by `staging_bytes` whatever the window size.

mod engine;
pub mod synthetic;

pub use engine::Engine;

use crate::error::ErrorCode;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::device::{self, DeviceError};

use crate::checksum::payload_checksum;
use crate::layout::{Compat, Layout, LayoutError};
use crate::staging::SlotSet;
use crate::store::format::payload_offset;
use crate::store::{
    BlockDesc, BlockImage, Replace, Store, StoreError, WindowInfo, WindowReader, WindowSpec,
};
use crate::tier::RamTier;

/// Errors of the pipeline layer; codes reach the wire.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// From the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From the KV memory.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Layout problems.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Bad request.
    #[error("invalid input: {0}")]
    Validation(String),
    /// The engine holds other tokens than the window (EC-004).
    #[error("token mismatch: window {window:?} holds different token ids from position {at}; refusing to load KV computed for other tokens")]
    TokenMismatch {
        /// Window.
        window: String,
        /// First differing position.
        at: usize,
    },
    /// The thaw ran past its deadline (EC-041); blocks restored so far are valid.
    #[error("thaw of {window:?} stopped at its deadline after {limit_secs:.1} s, having restored {blocks_restored} of {num_blocks} blocks; the engine recomputes the rest (raise timeout_ms for very large windows)")]
    Timeout {
        /// Window.
        window: String,
        /// The time allowed.
        limit_secs: f64,
        /// Blocks restored before the deadline.
        blocks_restored: u64,
        /// Blocks in the window.
        num_blocks: u64,
    },
    /// The window was frozen in another namespace (another model, weights, adapter, salt or
    /// input): its KV is not this request's, whatever its tokens.
    #[error("namespace mismatch: window {window:?} was frozen as {window_ns:?}, this thaw is in {want:?} (another model, adapter, salt or multimodal input); refusing to load KV computed for other inputs")]
    NamespaceMismatch {
        /// Window.
        window: String,
        /// The window's namespace.
        window_ns: String,
        /// The thaw's namespace.
        want: String,
    },
    /// Not enough memory for the thaw's staging (EC-022).
    #[error("insufficient memory to thaw: needs {needed} bytes of staging, {available} available; lower staging_bytes or free memory")]
    InsufficientMemory {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
}

impl PipelineError {
    /// Stable wire code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            PipelineError::Store(e) => {
                ErrorCode::from_wire(e.code()).unwrap_or(ErrorCode::Internal)
            }
            PipelineError::Device(e) => e.code(),
            PipelineError::Layout(e) => e.code(),
            PipelineError::Validation(_) => ErrorCode::Validation,
            PipelineError::TokenMismatch { .. } => ErrorCode::TokenMismatch,
            PipelineError::NamespaceMismatch { .. } => ErrorCode::NamespaceMismatch,
            PipelineError::InsufficientMemory { .. } => ErrorCode::InsufficientMemory,
            PipelineError::Timeout { .. } => ErrorCode::Timeout,
        }
    }
}

/// Pipeline tuning.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Bound on staging memory (default 256 MiB).
    pub staging_bytes: u64,
    /// Blocks per batch (default 32 = the I/O queue depth).
    pub batch_blocks: usize,
    /// Gather/scatter threads (default 2).
    pub threads: usize,
    /// Threads verifying a thaw from the RAM tier while its scatter runs (default: the
    /// machine's cores, at most 8; verification must outpace the PCIe copy).
    pub verify_threads: usize,
    /// Memory the thaw may assume is available (default: MemAvailable of /proc/meminfo).
    pub memory_available: Option<u64>,
    /// Register the staging pool with the I/O engine as io_uring fixed buffers (default true).
    /// Takes effect when the engine's pool is first allocated.
    pub fixed_buffers: bool,
    /// A thaw still running at this instant stops after its current batch with TIMEOUT.
    pub deadline: Option<std::time::Instant>,
    /// Called after each batch with (stage, blocks done, blocks in all): `freeze` counts
    /// blocks written, `thaw` blocks scattered.
    pub progress: Option<Progress>,
    /// True once whoever asked for this freeze or thaw has gone (its connection closed): a
    /// thaw stops after its current batch, a freeze not yet captured writes nothing
    /// (INTERRUPTED). Its engine may be reusing the blocks by then.
    pub cancel: Option<Cancel>,
}

/// A cancellation test (see [`PipelineConfig::cancel`]).
#[derive(Clone)]
pub struct Cancel(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cancel(..)")
    }
}

fn requester_gone() -> PipelineError {
    PipelineError::Device(DeviceError::Gone(
        "the requester closed its connection; stopped (its engine may be reusing the blocks)"
            .into(),
    ))
}

/// A progress function: (stage, done, total).
pub type ProgressFn = dyn Fn(&str, u64, u64) + Send + Sync;

/// A progress callback (see [`PipelineConfig::progress`]).
#[derive(Clone)]
pub struct Progress(pub Arc<ProgressFn>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

impl PipelineConfig {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| (c.0)())
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    }

    fn report(&self, stage: &str, done: u64, total: u64) {
        if let Some(p) = &self.progress {
            (p.0)(stage, done, total);
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            staging_bytes: 256 << 20,
            batch_blocks: 32,
            threads: 2,
            verify_threads: default_verify_threads(),
            memory_available: None,
            fixed_buffers: true,
            deadline: None,
            progress: None,
            cancel: None,
        }
    }
}

/// Verification threads for a RAM-tier thaw when none are configured: one per core, at most
/// 8 (xxh3 runs at 10–20 GB/s a core from DRAM; 4–8 cores outpace a 55 GB/s H2D copy).
#[must_use]
pub fn default_verify_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// A freeze request.
#[derive(Debug, Clone, Default)]
pub struct FreezeRequest {
    /// Window name.
    pub window: String,
    /// Session id.
    pub session: String,
    /// Token ids of the session.
    pub tokens: Vec<u32>,
    /// Engine block ids holding those tokens, in order.
    pub block_ids: Vec<u64>,
    /// Existing window handling.
    pub replace: Replace,
    /// The request's own namespace salt ([`Engine::namespace_with`]).
    pub salt: Option<String>,
}

/// What a freeze did.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeReport {
    /// The committed window.
    pub info: WindowInfo,
    /// Blocks written to the log.
    pub blocks_written: u64,
    /// Blocks already stored (deduplicated).
    pub blocks_deduplicated: u64,
    /// KV bytes of the window.
    pub bytes: u64,
    /// Seconds until `captured` (engine blocks free).
    pub captured_secs: f64,
    /// Seconds until `durable`.
    pub durable_secs: f64,
    /// Where the time went: gather + checksum busy seconds (gather thread).
    pub gather_secs: f64,
    /// Block writes busy seconds (writer thread).
    pub write_secs: f64,
    /// fdatasync + manifest + fdatasync seconds.
    pub commit_secs: f64,
}

/// A thaw request.
#[derive(Debug, Clone, Default)]
pub struct ThawRequest {
    /// Window name.
    pub window: String,
    /// Destination block ids, one per window block.
    pub block_ids: Vec<u64>,
    /// Tokens the engine holds for this prefix (checked against the window, EC-004).
    pub expect_tokens: Option<Vec<u32>>,
    /// Restore only `block_ids.len()` blocks of the window (a stored prefix of a longer
    /// prompt); without it `block_ids` must name one destination per window block.
    pub prefix: bool,
    /// With `prefix`: start at this window block (the engine already holds the ones before);
    /// `block_ids[0]` receives window block `first_block`. Tokens are still checked from 0.
    pub first_block: usize,
    /// The request's own namespace salt: the window must have been frozen with the same
    /// (and by the same model), or the thaw is refused with NAMESPACE_MISMATCH.
    pub salt: Option<String>,
}

/// What a thaw did.
#[derive(Debug, Clone, Serialize)]
pub struct ThawReport {
    /// Window.
    pub window: String,
    /// Blocks in the window.
    pub num_blocks: u64,
    /// Blocks written into the engine.
    pub blocks_restored: u64,
    /// Tokens whose KV was restored.
    pub tokens_restored: u64,
    /// Tokens the engine must recompute (after a corrupt block).
    pub tokens_to_recompute: u64,
    /// KV bytes restored.
    pub bytes: u64,
    /// Blocks served from the RAM tier.
    pub blocks_from_tier: u64,
    /// The scatter transposed pieces (layout upgrade).
    pub permuted: bool,
    /// The corruption that stopped the thaw early, if any.
    pub corruption: Option<String>,
    /// A block found corrupt in the RAM tier (a memory error): dropped there, and the window
    /// read from disk instead.
    pub tier_corruption: Option<String>,
    /// Seconds until `loaded`.
    pub loaded_secs: f64,
    /// Where the time went: reads busy seconds (reader thread).
    pub read_secs: f64,
    /// Verification busy seconds.
    pub verify_secs: f64,
    /// Scatter busy seconds.
    pub scatter_secs: f64,
}

/// A gathered batch: block indices, their record images, their payload checksums.
type Batch = (Vec<usize>, SlotSet, Vec<u64>);

/// Freezes a session's blocks into a window. `on_captured` runs (on the gather thread) once
/// the engine's blocks are no longer needed.
pub fn freeze(
    store: &Store,
    eng: &Engine,
    req: FreezeRequest,
    cfg: &PipelineConfig,
    tier: Option<&RamTier>,
    on_captured: &(dyn Fn() + Sync),
) -> Result<FreezeReport, PipelineError> {
    let t0 = Instant::now();
    let layout = &eng.layout;
    if req.tokens.is_empty() {
        return Err(PipelineError::Validation(
            "cannot freeze an empty session: it holds no tokens (EC-010)".into(),
        ));
    }
    let n = req.tokens.len().div_ceil(layout.block_size as usize);
    if req.block_ids.len() != n {
        return Err(PipelineError::Validation(format!(
            "{} tokens need {n} blocks of {} tokens, but {} block ids were given",
            req.tokens.len(),
            layout.block_size,
            req.block_ids.len()
        )));
    }
    device::check_block_ids(layout, &req.block_ids)?;
    let keys = eng.keys_with(&req.tokens, req.salt.as_deref());
    let bb = layout.block_bytes();
    let spec = WindowSpec {
        name: req.window.clone(),
        session: req.session.clone(),
        namespace: eng.namespace_with(req.salt.as_deref(), &eng.layout).label(),
        layout: layout.to_json(),
        tokens: req.tokens,
        blocks: keys.iter().map(|&key| BlockDesc { key, len: bb }).collect(),
        replace: req.replace,
    };
    let pool = eng.staging_pool(cfg, store.engine().as_ref())?;
    let batch = cfg.batch_blocks.clamp(1, pool.max_set());
    // A window that fits in the pool's capture share (and surely in the log) is captured
    // whole before the log is touched: the engine gets its blocks back at gather speed, even
    // while another freeze holds the log.
    if pool.captures(n) {
        if let Some(room) = store.reserve(&spec)? {
            if let Some(sets) = pool.take_capture(n, batch) {
                let c = Capture {
                    sets,
                    batch,
                    block_ids: &req.block_ids,
                    keys: &keys,
                    room,
                };
                return freeze_captured(eng, spec, c, cfg, tier, on_captured, t0);
            }
        }
    }
    let mut w = store.begin_window(spec)?;
    let todo: Vec<usize> = (0..n).filter(|&i| w.needs_write(i)).collect();
    let po = payload_offset(bb);
    let bbu = bb as usize;
    let (full_tx, full_rx) = bounded::<Batch>(1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let captured_at = std::sync::Mutex::new(0.0f64);
    let ids = &req.block_ids;
    let keys_ref = &keys;
    let todo_ref = &todo;
    let (gres, wres) = std::thread::scope(|s| {
        let captured_at = &captured_at;
        let stop = &stop;
        // Stage 1: gather + checksum (+ RAM tier) into staging slots.
        let g = s.spawn(move || -> Result<f64, PipelineError> {
            let mut busy = 0.0;
            for chunk in todo_ref.chunks(batch) {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(busy);
                }
                let mut set = pool.take(chunk.len());
                let tb = Instant::now();
                let cids: Vec<u64> = chunk.iter().map(|&i| ids[i]).collect();
                let mut sums = vec![0u64; chunk.len()];
                {
                    let mut slots = set.slices();
                    let mut pls: Vec<&mut [u8]> =
                        slots.iter_mut().map(|b| &mut b[po..po + bbu]).collect();
                    device::gather(
                        layout,
                        eng.mem.as_ref(),
                        &cids,
                        &mut pls,
                        cfg.threads,
                        Some(&mut sums),
                    )?;
                    if let Some(t) = tier.filter(|t| t.enabled()) {
                        for ((p, &i), &sum) in pls.iter().zip(chunk).zip(&sums) {
                            t.put(keys_ref[i], p, sum, false);
                        }
                    }
                }
                busy += tb.elapsed().as_secs_f64();
                // Gathered before the requester went: valid. After: it may have reused them.
                if cfg.cancelled() {
                    return Err(requester_gone());
                }
                if full_tx.send((chunk.to_vec(), set, sums)).is_err() {
                    return Ok(busy);
                }
            }
            if let Ok(mut c) = captured_at.lock() {
                *c = t0.elapsed().as_secs_f64();
            }
            on_captured();
            Ok(busy)
        });
        // Stage 2: write batch i while batch i+1 is gathered.
        let mut wres: Result<f64, StoreError> = Ok(0.0);
        let mut written = 0u64;
        for (idxs, mut set, sums) in full_rx.iter() {
            if wres.is_err() {
                continue; // drain: give the slots back so the gatherer can stop
            }
            let mut slots = set.slices();
            let mut imgs: Vec<BlockImage<'_>> = slots
                .iter_mut()
                .zip(idxs.iter().zip(&sums))
                .map(|(b, (&index, &sum))| BlockImage {
                    index,
                    image: &mut b[..],
                    checksum: Some(sum),
                })
                .collect();
            let tw = Instant::now();
            match w.write_blocks(&mut imgs) {
                Ok(()) => {
                    if let Ok(busy) = &mut wres {
                        *busy += tw.elapsed().as_secs_f64();
                    }
                    written += idxs.len() as u64;
                    cfg.report("freeze", written, todo_ref.len() as u64);
                }
                Err(e) => {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    wres = Err(e);
                }
            }
        }
        let gres = g
            .join()
            .unwrap_or_else(|_| Err(PipelineError::Validation("gather thread panicked".into())));
        (gres, wres)
    });
    let gather_secs = gres?;
    let write_secs = wres?;
    let tc = Instant::now();
    let info = w.commit()?;
    let commit_secs = tc.elapsed().as_secs_f64();
    let captured_secs = captured_at.lock().map(|c| *c).unwrap_or(0.0);
    Ok(FreezeReport {
        blocks_written: todo.len() as u64,
        blocks_deduplicated: (n - todo.len()) as u64,
        bytes: bb * n as u64,
        captured_secs,
        durable_secs: t0.elapsed().as_secs_f64(),
        gather_secs,
        write_secs,
        commit_secs,
        info,
    })
}

/// A whole window's staging, taken before the freeze writes anything.
struct Capture<'a> {
    /// Slot sets of `batch` blocks each, in window order.
    sets: Vec<SlotSet>,
    batch: usize,
    block_ids: &'a [u64],
    keys: &'a [u128],
    /// Log room reserved for the window: once `captured`, the log cannot refuse it for room.
    room: crate::store::Reservation<'a>,
}

/// A freeze whose window fits in staging: gather every block (the engine's blocks are free
/// once this returns to `captured`), checksum them while waiting for the log, then write what
/// the log does not hold yet, giving each batch's slots back as soon as they are written.
/// Blocks the log already holds are gathered too: whether the log still holds them is only
/// known under its lock, and once `captured` the engine may reuse its blocks.
fn freeze_captured(
    eng: &Engine,
    spec: WindowSpec,
    c: Capture<'_>,
    cfg: &PipelineConfig,
    tier: Option<&RamTier>,
    on_captured: &(dyn Fn() + Sync),
    t0: Instant,
) -> Result<FreezeReport, PipelineError> {
    let layout = &eng.layout;
    let n = c.block_ids.len();
    let bb = layout.block_bytes();
    let (po, bbu) = (payload_offset(bb), bb as usize);
    let mut sets = c.sets;
    let tg = Instant::now();
    for (k, set) in sets.iter_mut().enumerate() {
        let from = k * c.batch;
        let to = from + set.len();
        let mut slots = set.slices();
        let mut pls: Vec<&mut [u8]> = slots.iter_mut().map(|b| &mut b[po..po + bbu]).collect();
        device::gather(
            layout,
            eng.mem.as_ref(),
            &c.block_ids[from..to],
            &mut pls,
            cfg.threads,
            None,
        )?;
    }
    let captured_secs = t0.elapsed().as_secs_f64();
    let mut gather_secs = tg.elapsed().as_secs_f64();
    if cfg.cancelled() {
        // Part of the gather may have read blocks the engine already reused.
        return Err(requester_gone());
    }
    on_captured();
    // Checksums on the verify threads while this thread waits for the log.
    let (sums, w) = {
        let mut views: Vec<Vec<&mut [u8]>> = sets.iter_mut().map(SlotSet::slices).collect();
        let pls: Vec<&[u8]> = views
            .iter_mut()
            .flat_map(|v| v.iter().map(|b| &b[po..po + bbu]))
            .collect();
        let pls = &pls;
        std::thread::scope(|s| {
            let per = n.div_ceil(cfg.verify_threads.max(1)).max(1);
            let hs: Vec<_> = pls
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        let t = Instant::now();
                        let v: Vec<u64> = c.iter().map(|p| payload_checksum(p)).collect();
                        (v, t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            let w = c.room.begin(spec);
            let mut sums = Vec::with_capacity(n);
            let mut busy = 0.0f64;
            for h in hs {
                if let Ok((v, t)) = h.join() {
                    sums.extend(v);
                    busy = busy.max(t);
                }
            }
            gather_secs += busy;
            (sums, w)
        })
    };
    let mut w = w?;
    if sums.len() != n {
        return Err(PipelineError::Validation("checksum thread panicked".into()));
    }
    // Into the RAM tier once their checksums are known, and only the blocks this freeze
    // writes: a block the log holds already may hold other bytes there (GPU kernels need not
    // be bit-reproducible), and the tier must mirror the log.
    if let Some(t) = tier.filter(|t| t.enabled()) {
        for (k, set) in sets.iter_mut().enumerate() {
            let from = k * c.batch;
            for (j, b) in set.slices().iter().enumerate() {
                if w.needs_write(from + j) {
                    t.put(c.keys[from + j], &b[po..po + bbu], sums[from + j], false);
                }
            }
        }
    }
    let todo = (0..n).filter(|&i| w.needs_write(i)).count();
    let tw = Instant::now();
    let mut written = 0u64;
    for (k, mut set) in sets.into_iter().enumerate() {
        let from = k * c.batch;
        let mut slots = set.slices();
        let mut imgs: Vec<BlockImage<'_>> = slots
            .iter_mut()
            .enumerate()
            .filter(|(j, _)| w.needs_write(from + j))
            .map(|(j, b)| BlockImage {
                index: from + j,
                image: &mut b[..],
                checksum: Some(sums[from + j]),
            })
            .collect();
        if !imgs.is_empty() {
            w.write_blocks(&mut imgs)?;
            written += imgs.len() as u64;
            cfg.report("freeze", written, todo as u64);
        }
    }
    let write_secs = tw.elapsed().as_secs_f64();
    let tc = Instant::now();
    let info = w.commit()?;
    Ok(FreezeReport {
        blocks_written: todo as u64,
        blocks_deduplicated: (n - todo) as u64,
        bytes: bb * n as u64,
        captured_secs,
        durable_secs: t0.elapsed().as_secs_f64(),
        gather_secs,
        write_secs,
        commit_secs: tc.elapsed().as_secs_f64(),
        info,
    })
}

/// The time a thaw of `bytes` may take (EC-041): twice the estimate at `gbps`, at least 30 s,
/// at most 5 minutes.
#[must_use]
pub fn thaw_timeout(bytes: u64, gbps: f64) -> std::time::Duration {
    let est = bytes as f64 / (gbps.max(0.01) * 1e9);
    std::time::Duration::from_secs_f64((2.0 * est).clamp(30.0, 300.0))
}

/// Bytes of memory the kernel says are available (MemAvailable).
#[must_use]
pub fn memory_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}

/// Thaws a window into the engine's blocks `req.block_ids`.
pub fn thaw(
    store: &Store,
    eng: &Engine,
    req: &ThawRequest,
    cfg: &PipelineConfig,
    tier: Option<&RamTier>,
) -> Result<ThawReport, PipelineError> {
    let t0 = Instant::now();
    let mut r = store.open_window(&req.window)?;
    let wl = Layout::from_json(&r.manifest.layout)?;
    let compat = eng.layout.compat(&wl)?;
    // The window's KV must be this engine's model's (and this request's adapter, salt and
    // inputs): with the window's own layout, the namespaces must agree exactly.
    let want = eng.namespace_with(req.salt.as_deref(), &wl).label();
    if r.manifest.namespace != want {
        return Err(PipelineError::NamespaceMismatch {
            window: r.info.name.clone(),
            window_ns: r.manifest.namespace.clone(),
            want,
        });
    }
    let bs = u64::from(eng.layout.block_size);
    let avail = r.num_blocks();
    let first = req.first_block;
    if first > 0 && (!req.prefix || first >= avail) {
        return Err(PipelineError::Validation(format!(
            "first_block {first} needs prefix and must be below the {avail} blocks of window {:?}",
            r.info.name
        )));
    }
    let n = if req.prefix {
        req.block_ids.len().min(avail - first)
    } else {
        avail
    };
    // Tokens up to the end of the restored range.
    let end_tokens = ((first + n) as u64 * bs).min(r.manifest.tokens.len() as u64);
    if let Some(expect) = &req.expect_tokens {
        let have = &r.manifest.tokens[..end_tokens as usize];
        let at = have.iter().zip(expect.iter()).position(|(a, b)| a != b);
        let at = at.or_else(|| (expect.len() < have.len() && !req.prefix).then_some(expect.len()));
        if let Some(at) = at {
            return Err(PipelineError::TokenMismatch {
                window: r.info.name.clone(),
                at,
            });
        }
    }
    if first > 0 {
        r.skip_blocks(first, bs as usize);
    }
    let total_tokens = end_tokens.saturating_sub(first as u64 * bs);
    if !req.prefix && req.block_ids.len() != n {
        return Err(PipelineError::Validation(format!(
            "window {:?} has {n} blocks but {} destination block ids were given",
            r.info.name,
            req.block_ids.len()
        )));
    }
    device::check_block_ids(&eng.layout, &req.block_ids)?;
    let bb = eng.layout.block_bytes();
    let tier = tier.filter(|t| t.enabled());
    // EC-022: what this thaw must newly allocate — the staging pool on first use, transpose
    // scratch for a layout upgrade, RAM-tier growth — against what the machine has.
    let window_bytes = bb * n as u64;
    let needed = if eng.staging().is_none() {
        cfg.staging_bytes
    } else {
        0
    } + if compat == Compat::Permute {
        bb * cfg.batch_blocks as u64
    } else {
        0
    } + tier.map_or(0, |t| {
        window_bytes.min(t.capacity().saturating_sub(t.bytes()))
    });
    let available = cfg.memory_available.unwrap_or_else(memory_available);
    if needed > available {
        return Err(PipelineError::InsufficientMemory { needed, available });
    }
    let mut report = ThawReport {
        window: r.info.name.clone(),
        num_blocks: n as u64,
        blocks_restored: 0,
        tokens_restored: 0,
        tokens_to_recompute: total_tokens,
        bytes: 0,
        blocks_from_tier: 0,
        permuted: compat == Compat::Permute,
        corruption: None,
        tier_corruption: None,
        loaded_secs: 0.0,
        read_secs: 0.0,
        verify_secs: 0.0,
        scatter_secs: 0.0,
    };
    // RAM tier: when every block is there (and verifies), no disk read at all. On a GPU the
    // tier's arena is mapped into the device, so this is one copy, host to device.
    if let Some(t) = tier {
        t.attach(eng.mem.as_ref());
        let keys: Vec<u128> = r.manifest.blocks[..n].iter().map(|b| b.key).collect();
        let sums: Vec<u64> = r.manifest.blocks[..n].iter().map(|b| b.checksum).collect();
        let outcome = t.all(&keys, &sums).and_then(|hits| {
            let pls = hits.payloads();
            (pls.len() == n)
                .then(|| scatter_verifying(eng, &wl, compat, &req.block_ids[..n], &pls, &sums, cfg))
        });
        match outcome {
            Some(TierThaw::Done {
                verify_secs,
                scatter_secs,
            }) => {
                report.blocks_restored = n as u64;
                report.blocks_from_tier = n as u64;
                report.tokens_restored = total_tokens;
                report.tokens_to_recompute = 0;
                report.bytes = window_bytes;
                report.verify_secs = verify_secs;
                report.scatter_secs = scatter_secs;
                report.loaded_secs = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
            Some(TierThaw::Corrupt(bad)) => {
                // The disk copy is read instead; every destination block is written again.
                crate::log::warn(&format!(
                    "thaw of {:?}: block {bad} is corrupt in the RAM tier; dropped it, reading the window from disk",
                    r.info.name
                ));
                t.remove(keys[bad]);
                report.tier_corruption = Some(format!("block {bad}"));
            }
            Some(TierThaw::Failed(e)) => return Err(e),
            Some(TierThaw::TimedOut { verified, bad }) => {
                if let Some(b) = bad {
                    t.remove(keys[b]);
                }
                return Err(PipelineError::Timeout {
                    window: r.info.name.clone(),
                    limit_secs: t0.elapsed().as_secs_f64(),
                    blocks_restored: verified as u64,
                    num_blocks: n as u64,
                });
            }
            None => {}
        }
    }
    let pool = eng.staging_pool(cfg, store.engine().as_ref())?;
    let batch = cfg.batch_blocks.clamp(1, pool.max_set());
    let (full_tx, full_rx) = bounded::<(usize, Result<ReadBatch, StoreError>)>(2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rr = &r;
    let next = std::sync::Mutex::new(0usize);
    let res: Result<(), PipelineError> = std::thread::scope(|s| {
        let stop = &stop;
        // Stage 1: two readers keep the I/O queue full (one batch is submitted while the
        // other completes) while earlier batches are verified and scattered. Sets are taken
        // in batch order, so the earliest batch always gets staging first.
        let next = &next;
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let full_tx = full_tx.clone();
                s.spawn(move || {
                    let mut busy = 0.0;
                    loop {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return busy;
                        }
                        let (start, mut set) = {
                            let Ok(mut g) = next.lock() else { return busy };
                            let start = *g;
                            if start >= n {
                                return busy;
                            }
                            let k = batch.min(n - start);
                            *g += k;
                            (start, pool.take(k))
                        };
                        let tr = Instant::now();
                        let res = {
                            let mut slots = set.slices();
                            let mut imgs: Vec<&mut [u8]> =
                                slots.iter_mut().map(|b| &mut b[..]).collect();
                            store.read_images(rr, start, &mut imgs)
                        };
                        busy += tr.elapsed().as_secs_f64();
                        let msg = res.map(|unreadable| ReadBatch {
                            start,
                            set,
                            unreadable,
                        });
                        let stop_now = msg.as_ref().map_or(true, |m| m.unreadable.is_some());
                        if stop_now {
                            stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        if full_tx.send((start, msg)).is_err() || stop_now {
                            return busy;
                        }
                    }
                })
            })
            .collect();
        drop(full_tx);
        // Stage 2, in batch order: verify (in parallel), then scatter the verified prefix.
        let mut out = Ok(());
        let mut pending = std::collections::BTreeMap::new();
        let mut expected = 0usize;
        for (start, msg) in full_rx.iter() {
            if out.is_err() || report.corruption.is_some() {
                pending.clear();
                continue; // drain: give the slots back so the readers can stop
            }
            pending.insert(start, msg);
            while let Some(msg) = pending.remove(&expected) {
                expected += msg.as_ref().map_or(0, |b| b.set.len());
                let step = (|| -> Result<(), PipelineError> {
                    let mut b = msg?;
                    let slots = b.set.slices();
                    let k = slots.len();
                    let tv = Instant::now();
                    let first_bad =
                        first_bad_block(rr, b.start, &slots, b.unreadable.as_ref(), cfg.threads);
                    report.verify_secs += tv.elapsed().as_secs_f64();
                    let ts = Instant::now();
                    let good = first_bad.as_ref().map_or(k, |(i, _)| *i);
                    if good > 0 {
                        let pls: Vec<&[u8]> = (0..good)
                            .map(|j| rr.payload(b.start + j, slots[j]))
                            .collect();
                        device::scatter(
                            &eng.layout,
                            &wl,
                            compat,
                            eng.mem.as_ref(),
                            &req.block_ids[b.start..b.start + good],
                            &pls,
                            cfg.threads,
                        )?;
                        if let Some(t) = tier {
                            // Verified log bytes: they replace other bytes held for a key.
                            for (j, p) in pls.iter().enumerate() {
                                let m = &rr.manifest.blocks[b.start + j];
                                t.put(m.key, p, m.checksum, true);
                            }
                        }
                    }
                    report.scatter_secs += ts.elapsed().as_secs_f64();
                    report.blocks_restored = (b.start + good) as u64;
                    cfg.report("thaw", report.blocks_restored, n as u64);
                    if report.blocks_restored < n as u64 && cfg.cancelled() {
                        return Err(requester_gone());
                    }
                    if first_bad.is_none()
                        && report.blocks_restored < n as u64
                        && cfg.past_deadline()
                    {
                        return Err(PipelineError::Timeout {
                            window: rr.info.name.clone(),
                            limit_secs: t0.elapsed().as_secs_f64(),
                            blocks_restored: report.blocks_restored,
                            num_blocks: n as u64,
                        });
                    }
                    if let Some((i, d)) = first_bad {
                        let bad = b.start + i;
                        crate::log::warn(&format!(
                        "thaw of {:?}: block {bad} is corrupt ({d}); restored the first {bad} blocks, the engine recomputes the rest",
                        rr.info.name
                    ));
                        if let Some(t) = tier {
                            t.remove(rr.manifest.blocks[bad].key);
                        }
                        report.corruption = Some(format!("block {bad}: {d}"));
                    }
                    Ok(())
                })();
                if let Err(e) = step {
                    out = Err(e);
                }
                if out.is_err() || report.corruption.is_some() {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    pending.clear();
                    break;
                }
            }
        }
        report.read_secs = readers.into_iter().map(|h| h.join().unwrap_or(0.0)).sum();
        out
    });
    res?;
    report.tokens_restored = (report.blocks_restored * bs).min(total_tokens);
    report.tokens_to_recompute = total_tokens - report.tokens_restored;
    report.bytes = report.blocks_restored * bb;
    report.loaded_secs = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// How a thaw from the RAM tier ended.
enum TierThaw {
    /// Every block scattered and verified.
    Done { verify_secs: f64, scatter_secs: f64 },
    /// This block's payload does not match its checksum (the scatter stopped early).
    Corrupt(usize),
    /// The scatter failed.
    Failed(PipelineError),
    /// The deadline passed; the first `verified` blocks are scattered and verified (`bad`: a
    /// corrupt block found meanwhile).
    TimedOut { verified: usize, bad: Option<usize> },
}

/// Scatters tier payloads into `dst` while `cfg.verify_threads` threads check them against
/// `sums`, so a thaw from RAM costs max(copy, verification) instead of their sum. A block
/// counts as restored only once verified: on a mismatch the scatter stops and the caller
/// rewrites every block from disk; blocks already written hold bytes no report claims (the
/// engine overwrites or recomputes them).
fn scatter_verifying(
    eng: &Engine,
    wl: &Layout,
    compat: Compat,
    dst: &[u64],
    pls: &[&[u8]],
    sums: &[u64],
    cfg: &PipelineConfig,
) -> TierThaw {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    /// Blocks a verifier takes at a time, in window order: every unit below the highest one
    /// taken is finished (or holds the first bad block) once the verifiers are joined.
    const UNIT: usize = 4;
    let n = dst.len();
    let bad = AtomicUsize::new(usize::MAX);
    let next = AtomicUsize::new(0);
    // Verifiers take no unit at or past this (lowered when the scatter stops early).
    let limit = AtomicUsize::new(n);
    let tv = Instant::now();
    let (done, scatter_secs, failed, verify_secs) = std::thread::scope(|sc| {
        let verifiers: Vec<_> = (0..cfg.verify_threads.max(1))
            .map(|_| {
                sc.spawn(|| {
                    loop {
                        if bad.load(SeqCst) != usize::MAX {
                            break;
                        }
                        let from = next.fetch_add(UNIT, SeqCst);
                        if from >= limit.load(SeqCst) {
                            break;
                        }
                        let to = (from + UNIT).min(n);
                        if let Some(j) = (from..to).find(|&j| payload_checksum(pls[j]) != sums[j]) {
                            bad.fetch_min(j, SeqCst);
                            break;
                        }
                    }
                    tv.elapsed().as_secs_f64()
                })
            })
            .collect();
        // Scatter in chunks of 8 batches: the deadline, a corrupt block found meanwhile and
        // progress are looked at between chunks.
        let step = cfg.batch_blocks.max(1) * 8;
        let ts = Instant::now();
        let mut done = 0;
        let mut failed = None;
        while done < n && bad.load(SeqCst) == usize::MAX {
            if cfg.cancelled() {
                failed = Some(Some(requester_gone()));
                break;
            }
            if cfg.past_deadline() {
                failed = Some(None);
                break;
            }
            let to = (done + step).min(n);
            if let Err(e) = device::scatter(
                &eng.layout,
                wl,
                compat,
                eng.mem.as_ref(),
                &dst[done..to],
                &pls[done..to],
                cfg.threads,
            ) {
                failed = Some(Some(PipelineError::from(e)));
                break;
            }
            done = to;
            cfg.report("thaw", done as u64, n as u64);
        }
        let scatter_secs = ts.elapsed().as_secs_f64();
        // After a timeout (or a failure) only the units already handed out are waited for
        // (one taken in the meantime is finished too, but never claimed), so the verification
        // backlog does not overrun the deadline; otherwise every scattered block is verified.
        let claimable = if failed.is_some() {
            done.min(next.load(SeqCst))
        } else {
            done
        };
        limit.store(claimable, SeqCst);
        let mut verify_secs = 0.0f64;
        for h in verifiers {
            match h.join() {
                Ok(t) => verify_secs = verify_secs.max(t),
                Err(_) => {
                    // Not a corrupt block: the thaw fails instead of blaming the tier.
                    failed = failed.or(Some(Some(PipelineError::Validation(
                        "a tier verifier thread panicked".into(),
                    ))));
                }
            }
        }
        (claimable, scatter_secs, failed, verify_secs)
    });
    let bad = bad.load(SeqCst);
    match failed {
        Some(Some(e)) => TierThaw::Failed(e),
        Some(None) => TierThaw::TimedOut {
            verified: done.min(bad),
            bad: (bad != usize::MAX).then_some(bad),
        },
        None if bad != usize::MAX => TierThaw::Corrupt(bad),
        None => TierThaw::Done {
            verify_secs,
            scatter_secs,
        },
    }
}

/// A batch of record images read but not yet verified.
struct ReadBatch {
    start: usize,
    set: SlotSet,
    unreadable: Option<(usize, crate::io::IoError)>,
}

/// Verifies the images of blocks `start..` on up to `threads` threads; returns the first bad
/// one (position in the batch, why).
fn first_bad_block(
    r: &WindowReader,
    start: usize,
    slots: &[&mut [u8]],
    unreadable: Option<&(usize, crate::io::IoError)>,
    threads: usize,
) -> Option<(usize, String)> {
    let limit = unreadable.map_or(slots.len(), |(i, _)| *i);
    let per = limit.div_ceil(threads.max(1)).max(1);
    let found: Vec<Option<(usize, String)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..limit)
            .step_by(per)
            .map(|from| {
                let to = (from + per).min(limit);
                s.spawn(move || {
                    (from..to).find_map(|j| match r.verify(start + j, &slots[j][..]) {
                        Ok(()) => None,
                        Err(StoreError::Corruption { detail, .. }) => Some((j, detail)),
                        Err(e) => Some((j, e.to_string())),
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Some((0, "verifier panicked".into()))))
            .collect()
    });
    found
        .into_iter()
        .flatten()
        .next()
        .or_else(|| unreadable.map(|(i, e)| (*i, format!("unreadable: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::thaw_timeout;

    #[test]
    fn ec_041_a_timeout_scales_with_window_size_within_bounds() {
        // 2 MiB window: the 30 s floor.
        assert_eq!(thaw_timeout(2 << 20, 1.0).as_secs(), 30);
        // 128K tokens of a Llama-8B cache (16 GiB) at 1 GB/s: 2 x 17.2 s.
        let t = thaw_timeout(16 << 30, 1.0).as_secs_f64();
        assert!((34.0..35.0).contains(&t), "{t}");
        // 70B-sized windows at a slow disk: capped at 5 minutes.
        assert_eq!(thaw_timeout(100 << 30, 0.2).as_secs(), 300);
    }
}
