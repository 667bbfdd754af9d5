//! The synthetic engine for pipeline tests (the library's, with the test model name), and a
//! reader of a block's bytes from any KV memory.
#![allow(dead_code)]

use cwm::device::KvMemory;
use cwm::layout::Layout;

#[allow(unused_imports)]
pub use cwm::pipeline::synthetic::{tensor_sizes, Synthetic};

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

/// One of every layout constructor (the cross-layer ones in all four orders), with `blocks`
/// blocks.
pub fn every_layout(blocks: u64) -> Vec<Layout> {
    use cwm::layout::{CrossOrder, Dtype};
    let d = Dtype::Bf16;
    vec![
        Layout::flash_2nbhd(3, blocks, 16, 2, 64, d),
        Layout::flash_n2bhd(3, blocks, 16, 2, 64, d),
        Layout::packed_kv(3, blocks, 16, 2, 64, d),
        Layout::cross_layer(CrossOrder::Lbhnc, 2, blocks, 32, 2, 64, d),
        Layout::cross_layer(CrossOrder::Lbnhc, 2, blocks, 32, 2, 64, d),
        Layout::cross_layer(CrossOrder::Blhnc, 2, blocks, 32, 2, 64, d),
        Layout::cross_layer(CrossOrder::Blnhc, 2, blocks, 32, 2, 64, d),
        Layout::mla(2, blocks, 16, 576, d),
    ]
}

/// The two freeze paths for a window of `n` blocks of `layout`: ("captured", a pool that
/// captures it whole) and ("streaming", a pool of 16 blocks it streams through), both with
/// batches of 4 blocks.
pub fn captured_and_streaming(
    layout: &Layout,
) -> [(&'static str, cwm::pipeline::PipelineConfig); 2] {
    use cwm::pipeline::PipelineConfig;
    [
        (
            "captured",
            PipelineConfig {
                batch_blocks: 4,
                ..Default::default()
            },
        ),
        (
            "streaming",
            PipelineConfig {
                batch_blocks: 4,
                staging_bytes: 16 * (4096 + layout.block_bytes()),
                ..Default::default()
            },
        ),
    ]
}

/// A thaw of the whole window `window` into blocks `block_ids`, no token check, no salt.
pub fn whole_thaw(window: &str, block_ids: &[u64]) -> cwm::pipeline::ThawRequest {
    cwm::pipeline::ThawRequest {
        prefix: false,
        first_block: 0,
        window: window.into(),
        block_ids: block_ids.to_vec(),
        expect_tokens: None,
        salt: None,
    }
}
