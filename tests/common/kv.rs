//! A synthetic engine for pipeline tests: a KV cache in shared memory (memfd), viewed through
//! two separate mappings: the engine's and the sidecar's.
#![allow(dead_code)]

use std::sync::Arc;

use cwm::device::host::ShmMemory;
use cwm::device::{KvMemory, Region};
use cwm::layout::Layout;
use cwm::pipeline::Engine;

/// Bytes each tensor of `layout` needs.
pub fn tensor_sizes(layout: &Layout) -> Vec<u64> {
    let n = layout.pieces.iter().map(|p| p.tensor).max().unwrap_or(0) as usize + 1;
    let mut v = vec![0u64; n];
    for p in &layout.pieces {
        let end = p.offset + (layout.num_blocks - 1) * p.block_stride + p.len;
        v[p.tensor as usize] = v[p.tensor as usize].max(end);
    }
    v
}

pub struct Synthetic {
    /// The engine's own view (fills and checks).
    pub local: Arc<ShmMemory>,
    /// The sidecar's engine registration (a separate mapping of the same memory).
    pub engine: Engine,
}

pub fn synthetic(layout: Layout, seed: u64) -> Synthetic {
    let sizes = tensor_sizes(&layout);
    let (local, files) = ShmMemory::create_memfd(&sizes).unwrap();
    for t in 0..sizes.len() {
        local.fill_random(t, seed + t as u64).unwrap();
    }
    let remote = ShmMemory::from_files(files).unwrap();
    let engine = Engine::new(layout, Arc::new(remote), "test-model", None).unwrap();
    Synthetic {
        local: Arc::new(local),
        engine,
    }
}

/// The bytes of block `id` as the store lays them out (pieces in table order).
pub fn block_bytes_of(layout: &Layout, mem: &dyn KvMemory, id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for p in &layout.pieces {
        let mut b = vec![0u8; p.len as usize];
        mem.read(
            &[Region {
                tensor: p.tensor,
                offset: p.offset + id * p.block_stride,
                len: p.len,
            }],
            &mut [&mut b[..]],
        )
        .unwrap();
        out.extend(b);
    }
    out
}
