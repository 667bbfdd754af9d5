//! Freeze and thaw as overlapped stages between an engine's KV memory and the store.
//!
//! Freeze: gather (+ checksum, + RAM tier) on one thread, write on another: batch i is written
//! while batch i+1 is gathered. `captured` is reported when the last needed block has left the
//! engine's memory; `durable` when the manifest is on disk. Thaw: read + verify on one thread,
//! scatter on another; a corrupt block stops the thaw after the intact prefix has been
//! scattered, and the report says how many tokens the engine must recompute. Staging memory is
//! bounded by `staging_bytes` whatever the window size.

mod engine;
mod freeze;
mod stream;
pub mod synthetic;
mod thaw;

pub use engine::Engine;
pub use freeze::freeze;
pub use stream::{StreamThaw, Streamed};
pub use thaw::{thaw, WindowView};

use crate::error::ErrorCode;
use std::sync::Arc;

use crate::tier::RamTier;
use std::time::Instant;

use serde::Serialize;

use crate::device::DeviceError;

use crate::layout::{Compat, Layout, LayoutError};
use crate::staging::SlotSet;
use crate::store::{Replace, StoreError, WindowInfo};

/// Errors of the pipeline layer; codes reach the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
            PipelineError::Store(e) => e.code(),
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
}

/// Per-request options of a [`freeze`] (none is needed: `FreezeOptions::default()`).
#[derive(Clone, Default)]
pub struct FreezeOptions<'a> {
    /// The RAM tier the gathered blocks also go into.
    pub tier: Option<&'a RamTier>,
    /// Runs (on the gather thread) once the engine's blocks are no longer needed.
    pub on_captured: Option<&'a (dyn Fn() + Sync)>,
    /// True once whoever asked for this freeze has gone (its connection closed): a freeze not
    /// yet captured writes nothing (INTERRUPTED). Its engine may be reusing the blocks by then.
    pub cancel: Option<Cancel>,
    /// Called after each batch with ("freeze", blocks written, blocks in all).
    pub progress: Option<Progress>,
}

/// Per-request options of a [`thaw`] (none is needed: `ThawOptions::default()`).
#[derive(Clone, Default)]
pub struct ThawOptions<'a> {
    /// The RAM tier to serve blocks from (and to fill with what is read from disk).
    pub tier: Option<&'a RamTier>,
    /// True once whoever asked for this thaw has gone: it stops after its current batch.
    pub cancel: Option<Cancel>,
    /// Called after each batch with ("thaw", blocks scattered, blocks in all).
    pub progress: Option<Progress>,
    /// A thaw still running at this instant stops after its current batch with TIMEOUT.
    pub deadline: Option<Instant>,
}

/// A cancellation test (see [`FreezeOptions::cancel`], [`ThawOptions::cancel`]).
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

/// A progress callback (see [`FreezeOptions::progress`], [`ThawOptions::progress`]).
#[derive(Clone)]
pub struct Progress(pub Arc<ProgressFn>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

/// The request-side controls a running freeze or thaw consults between batches.
#[derive(Clone, Copy, Default)]
struct Control<'a> {
    cancel: Option<&'a Cancel>,
    progress: Option<&'a Progress>,
    deadline: Option<Instant>,
}

impl Control<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| (c.0)())
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn report(&self, stage: &str, done: u64, total: u64) {
        if let Some(p) = self.progress {
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
    /// Class and expiry of the window (default: pinned, no expiry).
    pub retention: crate::store::Retention,
    /// The request, when it carries an idempotency key ([`crate::store::Manifest::origin`]).
    pub origin: Option<u128>,
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
    /// Blocks scattered as they arrived from the shared tier (verified, beside their write
    /// to the local log), without being read back.
    pub blocks_streamed: u64,
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

/// The time a thaw of `bytes` may take (EC-041): twice the estimate at `gbps`, at least 30 s,
/// at most 5 minutes.
#[must_use]
pub fn thaw_timeout(bytes: u64, gbps: f64) -> std::time::Duration {
    let est = bytes as f64 / (gbps.max(0.01) * 1e9);
    std::time::Duration::from_secs_f64((2.0 * est).clamp(30.0, 300.0))
}

pub use crate::meminfo::available as memory_available;

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
