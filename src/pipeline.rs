//! Freeze and thaw as overlapped stages between an engine's KV memory and the store.
//!
//! Freeze: gather (+ checksum, + RAM tier) on one thread, write on another: batch i is written
//! while batch i+1 is gathered. `captured` is reported when the last needed block has left the
//! engine's memory; `durable` when the manifest is on disk. Thaw: read + verify on one thread,
//! scatter on another; a corrupt block stops the thaw after the intact prefix has been
//! scattered, and the report says how many tokens the engine must recompute. Staging memory is
//! bounded by `staging_bytes` whatever the window size.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::device::{self, DeviceError, KvMemory};
use crate::io::AlignedBuf;
use crate::keys::{block_keys, Namespace};
use crate::layout::{Compat, Layout, LayoutError};
use crate::store::format::{payload_checksum, payload_offset, record_len};
use crate::store::{BlockDesc, BlockImage, Replace, Store, StoreError, WindowInfo, WindowSpec};
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
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::Store(e) => e.code(),
            PipelineError::Device(e) => e.code(),
            PipelineError::Layout(e) => e.code(),
            PipelineError::Validation(_) => "VALIDATION",
            PipelineError::TokenMismatch { .. } => "TOKEN_MISMATCH",
            PipelineError::InsufficientMemory { .. } => "INSUFFICIENT_MEMORY",
        }
    }
}

/// An engine's registered KV cache.
pub struct Engine {
    /// Its layout.
    pub layout: Layout,
    /// Its memory.
    pub mem: Arc<dyn KvMemory>,
    /// Model id (part of the key namespace).
    pub model: String,
    /// Optional cache salt.
    pub salt: Option<String>,
}

impl Engine {
    /// Registers a KV cache: the layout is checked against the memory's tensor sizes.
    pub fn new(
        layout: Layout,
        mem: Arc<dyn KvMemory>,
        model: impl Into<String>,
        salt: Option<String>,
    ) -> Result<Self, PipelineError> {
        layout.validate(&mem.tensor_sizes())?;
        Ok(Self {
            layout,
            mem,
            model: model.into(),
            salt,
        })
    }

    /// The namespace of this engine's keys.
    #[must_use]
    pub fn namespace(&self) -> Namespace {
        Namespace {
            model: self.model.clone(),
            layout_fingerprint: self.layout.fingerprint(),
            salt: self.salt.clone(),
        }
    }

    /// Keys of a token sequence in this engine's namespace.
    #[must_use]
    pub fn keys(&self, tokens: &[u32]) -> Vec<u128> {
        block_keys(&self.namespace(), tokens, self.layout.block_size)
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
    /// Memory the thaw may assume is available (default: MemAvailable of /proc/meminfo).
    pub memory_available: Option<u64>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            staging_bytes: 256 << 20,
            batch_blocks: 32,
            threads: 2,
            memory_available: None,
        }
    }
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
    /// Seconds until `loaded`.
    pub loaded_secs: f64,
}

/// A gathered batch: block indices, their record images, their payload checksums.
type Batch = (Vec<usize>, Vec<AlignedBuf>, Vec<u64>);

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
    let keys = eng.keys(&req.tokens);
    let bb = layout.block_bytes();
    let spec = WindowSpec {
        name: req.window.clone(),
        session: req.session.clone(),
        namespace: eng.namespace().label(),
        layout: layout.to_json(),
        tokens: req.tokens,
        blocks: keys.iter().map(|&key| BlockDesc { key, len: bb }).collect(),
        replace: req.replace,
    };
    let mut w = store.begin_window(spec)?;
    let todo: Vec<usize> = (0..n).filter(|&i| w.needs_write(i)).collect();
    let slot = record_len(bb) as usize;
    let po = payload_offset(bb);
    let bbu = bb as usize;
    let slots_total = ((cfg.staging_bytes as usize) / slot).max(2);
    let batch = cfg.batch_blocks.clamp(1, (slots_total / 2).max(1));
    let nsets = (slots_total / batch)
        .max(2)
        .min(todo.len().div_ceil(batch).max(1));
    let (free_tx, free_rx) = bounded::<Vec<AlignedBuf>>(nsets);
    let (full_tx, full_rx) = bounded::<Batch>(nsets);
    for _ in 0..nsets {
        let set: Vec<AlignedBuf> = (0..batch).map(|_| AlignedBuf::zeroed(slot)).collect();
        let _ = free_tx.send(set);
    }
    let captured_at = std::sync::Mutex::new(0.0f64);
    let ids = &req.block_ids;
    let keys_ref = &keys;
    let todo_ref = &todo;
    let (gres, wres) = std::thread::scope(|s| {
        let captured_at = &captured_at;
        let g = s.spawn(move || -> Result<(), PipelineError> {
            for chunk in todo_ref.chunks(batch) {
                let Ok(mut set) = free_rx.recv() else {
                    return Ok(());
                };
                let cids: Vec<u64> = chunk.iter().map(|&i| ids[i]).collect();
                {
                    let mut pls: Vec<&mut [u8]> = set[..chunk.len()]
                        .iter_mut()
                        .map(|b| &mut b[po..po + bbu])
                        .collect();
                    device::gather(layout, eng.mem.as_ref(), &cids, &mut pls, cfg.threads)?;
                }
                let sums: Vec<u64> = set[..chunk.len()]
                    .iter()
                    .map(|b| payload_checksum(&b[po..po + bbu]))
                    .collect();
                if let Some(t) = tier.filter(|t| t.enabled()) {
                    for (j, &i) in chunk.iter().enumerate() {
                        t.put(keys_ref[i], &set[j][po..po + bbu]);
                    }
                }
                if full_tx.send((chunk.to_vec(), set, sums)).is_err() {
                    return Ok(());
                }
            }
            if let Ok(mut c) = captured_at.lock() {
                *c = t0.elapsed().as_secs_f64();
            }
            on_captured();
            Ok(())
        });
        let mut wres: Result<(), StoreError> = Ok(());
        for (idxs, mut set, sums) in full_rx.iter() {
            let mut imgs: Vec<BlockImage<'_>> = set
                .iter_mut()
                .zip(idxs.iter().zip(&sums))
                .map(|(b, (&index, &sum))| BlockImage {
                    index,
                    image: &mut b[..],
                    checksum: Some(sum),
                })
                .collect();
            if let Err(e) = w.write_blocks(&mut imgs) {
                wres = Err(e);
                break;
            }
            drop(imgs);
            let _ = free_tx.send(set);
        }
        drop(full_rx);
        drop(free_tx);
        let gres = g
            .join()
            .unwrap_or_else(|_| Err(PipelineError::Validation("gather thread panicked".into())));
        (gres, wres)
    });
    gres?;
    wres?;
    let info = w.commit()?;
    let captured_secs = captured_at.lock().map(|c| *c).unwrap_or(0.0);
    Ok(FreezeReport {
        blocks_written: todo.len() as u64,
        blocks_deduplicated: (n - todo.len()) as u64,
        bytes: bb * n as u64,
        captured_secs,
        durable_secs: t0.elapsed().as_secs_f64(),
        info,
    })
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

enum ReadMsg {
    Batch(usize, Vec<AlignedBuf>, usize),
    Corrupt(usize, Vec<AlignedBuf>, usize, String),
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
    let r = store.open_window(&req.window)?;
    let wl = Layout::from_json(&r.manifest.layout)?;
    let compat = eng.layout.compat(&wl)?;
    if let Some(expect) = &req.expect_tokens {
        let have = &r.manifest.tokens;
        let at = have.iter().zip(expect.iter()).position(|(a, b)| a != b);
        let at = at.or_else(|| (expect.len() < have.len()).then_some(expect.len()));
        if let Some(at) = at {
            return Err(PipelineError::TokenMismatch {
                window: r.info.name.clone(),
                at,
            });
        }
    }
    let n = r.num_blocks();
    if req.block_ids.len() != n {
        return Err(PipelineError::Validation(format!(
            "window {:?} has {n} blocks but {} destination block ids were given",
            r.info.name,
            req.block_ids.len()
        )));
    }
    device::check_block_ids(&eng.layout, &req.block_ids)?;
    let bb = eng.layout.block_bytes();
    let slot = record_len(bb) as usize;
    let slots_total = ((cfg.staging_bytes as usize) / slot).max(2);
    let batch = cfg.batch_blocks.clamp(1, (slots_total / 2).max(1));
    let nsets = (slots_total / batch).max(2).min(n.div_ceil(batch).max(1));
    let needed = (nsets * batch * slot) as u64
        + if compat == Compat::Permute {
            bb * batch as u64
        } else {
            0
        };
    let available = cfg.memory_available.unwrap_or_else(memory_available);
    if needed > available {
        return Err(PipelineError::InsufficientMemory { needed, available });
    }
    let bs = u64::from(eng.layout.block_size);
    let total_tokens = r.manifest.tokens.len() as u64;
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
        loaded_secs: 0.0,
    };
    // RAM tier: when every block is there, no disk read at all.
    if let Some(t) = tier.filter(|t| t.enabled()) {
        let hits: Vec<_> = r
            .manifest
            .blocks
            .iter()
            .map_while(|b| t.get(b.key))
            .collect();
        let intact = hits.len() == n
            && hits
                .iter()
                .zip(&r.manifest.blocks)
                .all(|(h, b)| payload_checksum(h) == b.checksum);
        if intact {
            for (c, ids) in hits.chunks(batch).zip(req.block_ids.chunks(batch)) {
                let pls: Vec<&[u8]> = c.iter().map(|h| &h[..]).collect();
                device::scatter(
                    &eng.layout,
                    &wl,
                    compat,
                    eng.mem.as_ref(),
                    ids,
                    &pls,
                    cfg.threads,
                )?;
            }
            report.blocks_restored = n as u64;
            report.blocks_from_tier = n as u64;
            report.tokens_restored = total_tokens;
            report.tokens_to_recompute = 0;
            report.bytes = bb * n as u64;
            report.loaded_secs = t0.elapsed().as_secs_f64();
            return Ok(report);
        }
    }
    let (free_tx, free_rx) = bounded::<Vec<AlignedBuf>>(nsets);
    let (full_tx, full_rx) = bounded::<Result<ReadMsg, StoreError>>(nsets);
    for _ in 0..nsets {
        let _ = free_tx.send((0..batch).map(|_| AlignedBuf::zeroed(slot)).collect());
    }
    let rr = &r;
    let res: Result<(), PipelineError> = std::thread::scope(|s| {
        s.spawn(move || {
            let mut start = 0;
            while start < n {
                let k = batch.min(n - start);
                let Ok(mut set) = free_rx.recv() else { return };
                let res = {
                    let mut imgs: Vec<&mut [u8]> =
                        set[..k].iter_mut().map(|b| &mut b[..]).collect();
                    store.read_blocks(rr, start, &mut imgs)
                };
                let msg = match res {
                    Ok(()) => Ok(ReadMsg::Batch(start, set, k)),
                    Err(StoreError::Corruption { block, detail, .. }) => {
                        let _ =
                            full_tx.send(Ok(ReadMsg::Corrupt(start, set, block - start, detail)));
                        return;
                    }
                    Err(e) => Err(e),
                };
                let stop = msg.is_err();
                if full_tx.send(msg).is_err() || stop {
                    return;
                }
                start += k;
            }
        });
        for msg in full_rx.iter() {
            let (start, set, k, corrupt) = match msg? {
                ReadMsg::Batch(s, set, k) => (s, set, k, None),
                ReadMsg::Corrupt(s, set, good, d) => (s, set, good, Some(d)),
            };
            if k > 0 {
                let pls: Vec<&[u8]> = (0..k).map(|j| rr.payload(start + j, &set[j])).collect();
                device::scatter(
                    &eng.layout,
                    &wl,
                    compat,
                    eng.mem.as_ref(),
                    &req.block_ids[start..start + k],
                    &pls,
                    cfg.threads,
                )?;
                if let Some(t) = tier.filter(|t| t.enabled()) {
                    for (j, p) in pls.iter().enumerate() {
                        t.put(rr.manifest.blocks[start + j].key, p);
                    }
                }
            }
            report.blocks_restored = (start + k) as u64;
            if let Some(d) = corrupt {
                let bad = start + k;
                crate::log::warn(&format!(
                    "thaw of {:?}: block {bad} is corrupt ({d}); restored the first {bad} blocks, the engine recomputes the rest",
                    rr.info.name
                ));
                if let Some(t) = tier {
                    t.remove(rr.manifest.blocks[bad].key);
                }
                report.corruption = Some(format!("block {bad}: {d}"));
                break;
            }
            let _ = free_tx.send(set);
        }
        Ok(())
    });
    res?;
    report.tokens_restored = (report.blocks_restored * bs).min(total_tokens);
    report.tokens_to_recompute = total_tokens - report.tokens_restored;
    report.bytes = report.blocks_restored * bb;
    report.loaded_secs = t0.elapsed().as_secs_f64();
    Ok(report)
}
