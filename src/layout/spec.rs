//! How an engine describes its KV cache on the wire: the layout parameters and the exported
//! tensors that the `register` op (docs/PROTOCOL.md) and `cwm gpu-check`'s spec file carry,
//! and their translation into a [`Layout`].

use serde::Deserialize;

use super::{CrossOrder, Dtype, Inner, Layout};

/// Layout parameters as the Python side writes them.
#[derive(Debug, Deserialize)]
pub struct LayoutSpec {
    /// flash_2nbhd, flash_n2bhd, packed_kv, cross_layer, mla.
    pub kind: String,
    /// Layers.
    pub layers: u32,
    /// Blocks.
    pub blocks: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// KV heads.
    pub heads: u32,
    /// Head size.
    pub head: u32,
    /// dtype name.
    pub dtype: String,
    /// Cross-layer order (LBHNC, …).
    #[serde(default)]
    pub order: Option<String>,
    /// Kind `pieces`: the piece table itself, as the engine read it from its tensors' shapes
    /// and strides (`layer`, `kind` k|v|kv|latent, `tensor`, `offset`, `block_stride`, `len`).
    #[serde(default)]
    pub pieces: Option<Vec<super::Piece>>,
    /// Kind `pieces`: order inside a piece, `NHD`, `HND` or `opaque` (the default: never
    /// permuted).
    #[serde(default)]
    pub inner: Option<String>,
    /// Kind `pieces`: a name for the engine's layout (informational).
    #[serde(default)]
    pub name: Option<String>,
}

/// One tensor as exported by torch.
#[derive(Debug, Deserialize)]
pub struct TensorSpec {
    /// 64-byte IPC handle, hex.
    pub handle: String,
    /// Offset in the allocation.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
}

/// Parses a 64-byte handle written as 128 hex digits.
pub fn hex64(s: &str) -> Result<[u8; 64], String> {
    let b: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad hex: {e}"))?;
    b.try_into()
        .map_err(|_| "IPC handles are 64 bytes".to_string())
}

/// Builds the layout a spec names.
pub fn layout_of(l: &LayoutSpec) -> Result<Layout, String> {
    let dt = Dtype::parse(&l.dtype).ok_or_else(|| format!("unknown dtype {}", l.dtype))?;
    Ok(match l.kind.as_str() {
        "flash_2nbhd" => Layout::flash_2nbhd(l.layers, l.blocks, l.block_size, l.heads, l.head, dt),
        "flash_n2bhd" => Layout::flash_n2bhd(l.layers, l.blocks, l.block_size, l.heads, l.head, dt),
        "packed_kv" => Layout::packed_kv(l.layers, l.blocks, l.block_size, l.heads, l.head, dt),
        "mla" => Layout::mla(l.layers, l.blocks, l.block_size, l.head, dt),
        "cross_layer" => {
            let order = match l.order.as_deref() {
                Some("LBHNC") => CrossOrder::Lbhnc,
                Some("LBNHC") => CrossOrder::Lbnhc,
                Some("BLHNC") => CrossOrder::Blhnc,
                Some("BLNHC") => CrossOrder::Blnhc,
                o => return Err(format!("unknown cross-layer order {o:?}")),
            };
            Layout::cross_layer(order, l.layers, l.blocks, l.block_size, l.heads, l.head, dt)
        }
        "pieces" => {
            let pieces = l
                .pieces
                .clone()
                .filter(|p| !p.is_empty())
                .ok_or("layout kind pieces needs a non-empty pieces list")?;
            let inner = match l.inner.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("opaque") => Inner::Opaque,
                Some("nhd") => Inner::Nhd,
                Some("hnd") => Inner::Hnd,
                Some(o) => return Err(format!("unknown inner order {o:?} (NHD, HND, opaque)")),
            };
            Layout::from_pieces(
                l.name.as_deref().unwrap_or("pieces"),
                l.layers,
                l.blocks,
                l.block_size,
                l.heads,
                l.head,
                dt,
                inner,
                pieces,
            )?
        }
        k => return Err(format!("unknown layout kind {k}")),
    })
}
