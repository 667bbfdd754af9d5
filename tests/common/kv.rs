//! The synthetic engine for pipeline tests (the library's, with the test model name), and a
//! reader of a block's bytes from any KV memory.
#![allow(dead_code)]

use cwm::device::{KvMemory, Region};
use cwm::layout::Layout;

#[allow(unused_imports)]
pub use cwm::device::synthetic::{tensor_sizes, Synthetic};

pub fn synthetic(layout: Layout, seed: u64) -> Synthetic {
    Synthetic::new(layout, "test-model", seed).unwrap()
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
