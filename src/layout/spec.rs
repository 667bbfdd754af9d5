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

/// Most layers a layout may have (far past any model; what keeps the piece table, built
/// before anything else is checked, small).
pub const MAX_LAYERS: u32 = 4096;
/// Most KV heads, and largest head size, tokens per block.
pub const MAX_DIM: u32 = 1 << 16;
/// Most bytes a whole cache may span (blocks × block bytes): every offset and stride computed
/// from a layout then fits in 64 bits.
pub const MAX_CACHE_BYTES: u64 = 1 << 50;

/// Refuses dimensions no engine has before anything is built from them: a register request
/// naming 2^32 layers would otherwise allocate a piece table of hundreds of GB, and products
/// of the dimensions could overflow.
fn check_dims(l: &LayoutSpec, dt: Dtype) -> Result<(), String> {
    if l.layers > MAX_LAYERS {
        return Err(format!("{} layers: at most {MAX_LAYERS}", l.layers));
    }
    for (what, v) in [
        ("heads", l.heads),
        ("head", l.head),
        ("block_size", l.block_size),
    ] {
        if v > MAX_DIM {
            return Err(format!("{what} {v}: at most {MAX_DIM}"));
        }
    }
    let max_block = crate::store::MAX_BLOCK_BYTES;
    // (Each factor is capped above: no product here overflows.)
    let block: u64 = match l.pieces.as_deref() {
        Some(ps) if l.kind == "pieces" => {
            let most = 16 * l.layers.max(1) as usize;
            if ps.len() > most {
                return Err(format!(
                    "{} pieces for {} layers: at most {most}",
                    ps.len(),
                    l.layers
                ));
            }
            ps.iter()
                .try_fold(0u64, |a, p| a.checked_add(p.len))
                .unwrap_or(u64::MAX)
        }
        _ => {
            2 * u64::from(l.layers)
                * u64::from(l.block_size)
                * u64::from(l.heads.max(1))
                * u64::from(l.head)
                * dt.size()
        }
    };
    if block > max_block {
        return Err(format!(
            "blocks of {block} bytes: at most {max_block} a block"
        ));
    }
    if l.blocks
        .checked_mul(block)
        .is_none_or(|b| b > MAX_CACHE_BYTES)
    {
        return Err(format!(
            "{} blocks of {block} bytes span more than {MAX_CACHE_BYTES} bytes",
            l.blocks
        ));
    }
    Ok(())
}

/// Builds the layout a spec names (its dimensions checked first: [`check_dims`]).
pub fn layout_of(l: &LayoutSpec) -> Result<Layout, String> {
    let dt = Dtype::parse(&l.dtype).ok_or_else(|| format!("unknown dtype {}", l.dtype))?;
    check_dims(l, dt)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str, layers: u32, blocks: u64, heads: u32, head: u32) -> LayoutSpec {
        LayoutSpec {
            kind: kind.into(),
            layers,
            blocks,
            block_size: 16,
            heads,
            head,
            dtype: "bf16".into(),
            order: Some("LBHNC".into()),
            pieces: None,
            inner: None,
            name: None,
        }
    }

    #[test]
    fn dimensions_no_engine_has_are_refused_before_anything_is_built() {
        // Real geometries pass: a 70B model's, DeepSeek's MLA.
        assert!(layout_of(&spec("flash_2nbhd", 80, 100_000, 8, 128)).is_ok());
        assert!(layout_of(&spec("mla", 61, 100_000, 1, 576)).is_ok());
        for (kind, layers, blocks, heads, head, says) in [
            ("flash_2nbhd", u32::MAX, 1, 1, 1, "layers"),
            ("mla", u32::MAX, 1, 1, 1, "layers"),
            ("cross_layer", MAX_LAYERS + 1, 1, 1, 1, "layers"),
            ("packed_kv", 2, 1, u32::MAX, 64, "heads"),
            ("flash_n2bhd", 2, 1, 8, u32::MAX, "head"),
            // Each dimension allowed, the block too large.
            ("flash_2nbhd", MAX_LAYERS, 1, MAX_DIM, MAX_DIM, "a block"),
            // Blocks that together overflow every offset.
            ("cross_layer", 80, u64::MAX, 8, 128, "span"),
        ] {
            let e = layout_of(&spec(kind, layers, blocks, heads, head)).expect_err(kind);
            assert!(e.contains(says), "{kind}: {e}");
        }
        let mut s = spec("pieces", 2, 4, 1, 1);
        s.pieces = Some(
            (0..33)
                .map(|i| super::super::Piece {
                    layer: i % 2,
                    kind: super::super::PieceKind::Kv,
                    tensor: 0,
                    offset: 0,
                    block_stride: 64,
                    len: 64,
                })
                .collect(),
        );
        assert!(layout_of(&s).expect_err("pieces").contains("pieces"));
    }
}
