//! A synthetic engine: a KV cache in shared memory (memfd) filled with pseudo-random bytes,
//! seen through two mappings — the engine's own and the sidecar's registration — as it would be
//! across two processes. Used by `cwm demo`, `cwm bench pipeline` and tests.

use std::sync::Arc;

use super::{Engine, PipelineError};
use crate::device::host::ShmMemory;
use crate::device::DeviceError;
use crate::layout::Layout;

/// The engine side and the sidecar's registration of one synthetic KV cache.
pub struct Synthetic {
    /// The engine's own mapping.
    pub local: Arc<ShmMemory>,
    /// The sidecar's registration (a separate mapping of the same memory).
    pub engine: Engine,
}

/// Bytes each tensor of `layout` needs.
#[must_use]
pub fn tensor_sizes(layout: &Layout) -> Vec<u64> {
    let n = layout.pieces.iter().map(|p| p.tensor).max().unwrap_or(0) as usize + 1;
    let mut v = vec![0u64; n];
    for p in &layout.pieces {
        let end = p.offset + (layout.num_blocks - 1) * p.block_stride + p.len;
        v[p.tensor as usize] = v[p.tensor as usize].max(end);
    }
    v
}

impl Synthetic {
    /// Creates the cache and fills it ("prefill") from `seed`.
    pub fn new(layout: Layout, model: &str, seed: u64) -> Result<Self, PipelineError> {
        let sizes = tensor_sizes(&layout);
        let (local, files) = ShmMemory::create_memfd(&sizes)?;
        for t in 0..sizes.len() {
            local.fill_random(t, seed.wrapping_add(t as u64))?;
        }
        let remote = ShmMemory::from_files(files)?;
        let engine = Engine::new(layout, Arc::new(remote), model, None)?;
        Ok(Self {
            local: Arc::new(local),
            engine,
        })
    }

    /// Refills every tensor (poisons destinations).
    pub fn refill(&self, seed: u64) -> Result<(), DeviceError> {
        for t in 0..tensor_sizes(&self.engine.layout).len() {
            self.local.fill_random(t, seed.wrapping_add(t as u64))?;
        }
        Ok(())
    }

    /// Block `id` as the engine sees it, pieces in table order.
    pub fn block(&self, id: u64) -> Result<Vec<u8>, DeviceError> {
        crate::device::read_block(&self.engine.layout, self.local.as_ref(), id)
    }
}
