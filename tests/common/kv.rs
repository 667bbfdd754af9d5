//! The synthetic engine for pipeline tests (the library's, with the test model name), and a
//! reader of a block's bytes from any KV memory.
#![allow(dead_code)]

use cwm::device::KvMemory;
use cwm::layout::Layout;

#[allow(unused_imports)]
pub use cwm::device::synthetic::{tensor_sizes, Synthetic};

pub fn synthetic(layout: Layout, seed: u64) -> Synthetic {
    Synthetic::new(layout, "test-model", seed).unwrap()
}

/// The bytes of each of blocks `ids`, in order (what a freeze of them must bring back).
pub fn blocks_of(layout: &Layout, mem: &dyn KvMemory, ids: &[u64]) -> Vec<Vec<u8>> {
    ids.iter()
        .map(|&b| block_bytes_of(layout, mem, b))
        .collect()
}

/// The bytes of block `id` as the store lays them out (pieces in table order).
pub fn block_bytes_of(layout: &Layout, mem: &dyn KvMemory, id: u64) -> Vec<u8> {
    cwm::device::read_block(layout, mem, id).unwrap()
}
