//! KV-cache layouts: where every (layer, K/V, block) piece of an engine's KV cache lives, built
//! from what the engine registers, with constructors for the vLLM layouts (DESIGN §6). No
//! layout is hard-coded in the data path: gather and scatter only follow the piece table.
//!
//! A block's payload in the store is the concatenation of its pieces in table order (layer 0 K,
//! layer 0 V, layer 1 K, …, or one packed piece per layer). Inside a piece, heads and tokens are
//! in the layout's `inner` order; two layouts that differ only in that order are *permutable*:
//! scatter transposes while it copies.

pub mod spec;

use crate::error::ErrorCode;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// f32.
    F32,
    /// 8-bit float (e4m3 / e5m2).
    Fp8,
}

impl Dtype {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> u64 {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8 => 1,
        }
    }

    /// Parses torch-style names (`bfloat16`, `torch.float16`, `bf16`, …).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim_start_matches("torch.") {
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "f16" | "float16" | "half" => Some(Dtype::F16),
            "f32" | "float32" | "float" => Some(Dtype::F32),
            "fp8" | "float8_e4m3fn" | "float8_e5m2" | "uint8" => Some(Dtype::Fp8),
            _ => None,
        }
    }
}

/// What one piece holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PieceKind {
    /// Keys of one layer.
    K,
    /// Values of one layer.
    V,
    /// Keys and values of one layer in one region (packed in the last dimension).
    Kv,
    /// MLA latent (compressed KV + rope part) of one layer.
    Latent,
}

/// Order of the dimensions inside one piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Inner {
    /// `[tokens][heads][channels]` (vLLM's NHD).
    Nhd,
    /// `[heads][tokens][channels]` (HND).
    Hnd,
    /// The engine's own in-page order (e.g. vLLM's CPU backend stores K transposed and V
    /// row-major in one page): pieces move whole and are never permuted.
    Opaque,
}

/// Where the pieces of one (layer, kind) live: piece of block `b` is at
/// `tensor`'s byte `offset + b * block_stride`, `len` bytes long, contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Layer index.
    pub layer: u32,
    /// What the piece holds.
    pub kind: PieceKind,
    /// Index of the registered tensor / memory region.
    pub tensor: u32,
    /// Byte offset of block 0's piece in that region.
    pub offset: u64,
    /// Bytes between the pieces of consecutive blocks.
    pub block_stride: u64,
    /// Bytes of one piece.
    pub len: u64,
}

/// A KV-cache layout: geometry plus the piece table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Layers.
    pub num_layers: u32,
    /// Blocks in the engine's cache.
    pub num_blocks: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// KV heads (1 for MLA).
    pub num_kv_heads: u32,
    /// Head size of K (or the MLA latent width).
    pub head_size: u32,
    /// Head size of V (equal to `head_size` for most models; 0 for MLA).
    pub head_size_v: u32,
    /// Element type.
    pub dtype: Dtype,
    /// Order inside a piece.
    pub inner: Inner,
    /// Name of the constructor / engine layout (informational).
    pub name: String,
    /// The piece table, in payload order.
    pub pieces: Vec<Piece>,
}

/// Layout errors (reach the wire as VALIDATION or LAYOUT_MISMATCH).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The description is inconsistent.
    #[error("invalid layout: {0}")]
    Invalid(String),
    /// The window was frozen with another geometry.
    #[error("layout mismatch: the window was frozen as {window}, the engine has {engine}")]
    Mismatch {
        /// Geometry of the window.
        window: String,
        /// Geometry of the engine.
        engine: String,
    },
}

impl LayoutError {
    /// Stable wire code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            LayoutError::Invalid(_) => ErrorCode::Validation,
            LayoutError::Mismatch { .. } => ErrorCode::LayoutMismatch,
        }
    }
}

/// How a window's blocks map onto an engine's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// Same geometry and order: copy pieces as they are.
    Same,
    /// Same geometry, heads/tokens order swapped: transpose while copying.
    Permute,
}

/// Cross-layer orders of one `[L, B, H, N, C]` buffer (vLLM ≥ 0.29).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossOrder {
    /// layer, block, head, token, channel.
    Lbhnc,
    /// layer, block, token, head, channel.
    Lbnhc,
    /// block, layer, head, token, channel.
    Blhnc,
    /// block, layer, token, head, channel.
    Blnhc,
}

impl Layout {
    #[expect(
        clippy::too_many_arguments,
        reason = "private constructor helper mirroring the geometry fields"
    )]
    fn base(
        name: &str,
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
        inner: Inner,
    ) -> Self {
        Self {
            num_layers,
            num_blocks,
            block_size,
            num_kv_heads: heads,
            head_size: head,
            head_size_v: head,
            dtype,
            inner,
            name: name.into(),
            pieces: Vec::new(),
        }
    }

    /// Bytes of K (or V) of one layer and one block.
    fn half(&self) -> u64 {
        u64::from(self.block_size)
            * u64::from(self.num_kv_heads)
            * u64::from(self.head_size)
            * self.dtype.size()
    }

    /// Per layer one tensor `(2, num_blocks, block_size, H, D)` (FlashAttention up to 0.22).
    #[must_use]
    pub fn flash_2nbhd(
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
    ) -> Self {
        let l = Self::base(
            "flash(2,B,N,H,D)",
            num_layers,
            num_blocks,
            block_size,
            heads,
            head,
            dtype,
            Inner::Nhd,
        );
        let h = l.half();
        l.per_layer(
            h,
            &[(PieceKind::K, 0, h), (PieceKind::V, num_blocks * h, h)],
        )
    }

    /// Per layer one tensor `(num_blocks, 2, block_size, H, D)` (0.23–0.25, FlashInfer).
    #[must_use]
    pub fn flash_n2bhd(
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
    ) -> Self {
        let l = Self::base(
            "flash(B,2,N,H,D)",
            num_layers,
            num_blocks,
            block_size,
            heads,
            head,
            dtype,
            Inner::Nhd,
        );
        let h = l.half();
        l.per_layer(2 * h, &[(PieceKind::K, 0, h), (PieceKind::V, h, h)])
    }

    /// Per layer one tensor `(num_blocks, block_size, H, 2·D)`: K and V packed in the last
    /// dimension (0.26–0.28).
    #[must_use]
    pub fn packed_kv(
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
    ) -> Self {
        let l = Self::base(
            "packed(B,N,H,2D)",
            num_layers,
            num_blocks,
            block_size,
            heads,
            head,
            dtype,
            Inner::Nhd,
        );
        let p = 2 * l.half();
        l.per_layer(p, &[(PieceKind::Kv, 0, p)])
    }

    /// One buffer `[L, B, H, N, C]` in one of the cross-layer orders (≥ 0.29; the CPU backend
    /// registers LBHNC with C = 2·head_size). Tensor 0 is the buffer. Pieces hold K and V
    /// packed in C.
    #[must_use]
    pub fn cross_layer(
        order: CrossOrder,
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
    ) -> Self {
        let (name, inner) = match order {
            CrossOrder::Lbhnc => ("LBHNC", Inner::Hnd),
            CrossOrder::Lbnhc => ("LBNHC", Inner::Nhd),
            CrossOrder::Blhnc => ("BLHNC", Inner::Hnd),
            CrossOrder::Blnhc => ("BLNHC", Inner::Nhd),
        };
        let mut l = Self::base(
            name, num_layers, num_blocks, block_size, heads, head, dtype, inner,
        );
        let page = 2 * l.half();
        let (layer_stride, block_stride) = match order {
            CrossOrder::Lbhnc | CrossOrder::Lbnhc => (num_blocks * page, page),
            CrossOrder::Blhnc | CrossOrder::Blnhc => (page, u64::from(num_layers) * page),
        };
        for layer in 0..num_layers {
            l.pieces.push(Piece {
                layer,
                kind: PieceKind::Kv,
                tensor: 0,
                offset: u64::from(layer) * layer_stride,
                block_stride,
                len: page,
            });
        }
        l
    }

    /// A layout given by its piece table, as an engine computed it from its tensors' shapes
    /// and strides (the vLLM connector does this, so no engine layout is hard-coded). Pieces
    /// of a permutable order (`Nhd`, `Hnd`) must be whole K, V or packed KV pages of the
    /// geometry; `Opaque` pieces may be any length.
    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the geometry fields of the register request"
    )]
    pub fn from_pieces(
        name: &str,
        num_layers: u32,
        num_blocks: u64,
        block_size: u32,
        heads: u32,
        head: u32,
        dtype: Dtype,
        inner: Inner,
        pieces: Vec<Piece>,
    ) -> Result<Self, String> {
        let mut l = Self::base(
            name, num_layers, num_blocks, block_size, heads, head, dtype, inner,
        );
        let half = l.half();
        for (i, p) in pieces.iter().enumerate() {
            if p.layer >= num_layers {
                return Err(format!("piece {i} names layer {} of {num_layers}", p.layer));
            }
            if p.len == 0 {
                return Err(format!("piece {i} has zero length"));
            }
            let want = match p.kind {
                PieceKind::K | PieceKind::V => half,
                PieceKind::Kv => 2 * half,
                PieceKind::Latent => u64::from(block_size) * u64::from(head) * dtype.size(),
            };
            if inner != Inner::Opaque && p.len != want {
                return Err(format!(
                    "piece {i} ({:?}) is {} bytes, but a {inner:?} page of this geometry is {want}",
                    p.kind, p.len
                ));
            }
        }
        if let Some(missing) = (0..num_layers).find(|x| !pieces.iter().any(|p| p.layer == *x)) {
            return Err(format!("no piece for layer {missing}"));
        }
        l.pieces = pieces;
        Ok(l)
    }

    /// MLA: per layer `(num_blocks, block_size, head_size)` (e.g. head_size 576).
    #[must_use]
    pub fn mla(num_layers: u32, num_blocks: u64, block_size: u32, head: u32, dtype: Dtype) -> Self {
        let mut l = Self::base(
            "mla(B,N,D)",
            num_layers,
            num_blocks,
            block_size,
            1,
            head,
            dtype,
            Inner::Nhd,
        );
        l.head_size_v = 0;
        let p = u64::from(block_size) * u64::from(head) * dtype.size();
        l.per_layer(p, &[(PieceKind::Latent, 0, p)])
    }

    /// Adds, for every layer, pieces in tensor `layer` at `offset + b * block_stride`.
    fn per_layer(mut self, block_stride: u64, parts: &[(PieceKind, u64, u64)]) -> Self {
        for layer in 0..self.num_layers {
            for &(kind, offset, len) in parts {
                self.pieces.push(Piece {
                    layer,
                    kind,
                    tensor: layer,
                    offset,
                    block_stride,
                    len,
                });
            }
        }
        self
    }

    /// Checks internal consistency and that every piece of every block lies inside its
    /// tensor, given the registered tensor sizes.
    pub fn validate(&self, tensor_sizes: &[u64]) -> Result<(), LayoutError> {
        let bad = |m: String| Err(LayoutError::Invalid(m));
        if self.num_layers == 0 || self.num_blocks == 0 || self.block_size == 0 {
            return bad("layers, blocks and block size must be positive".into());
        }
        if self.pieces.is_empty() {
            return bad("no pieces".into());
        }
        for (i, p) in self.pieces.iter().enumerate() {
            if p.len == 0 {
                return bad(format!("piece {i} has zero length"));
            }
            let Some(size) = tensor_sizes.get(p.tensor as usize) else {
                return bad(format!(
                    "piece {i} names tensor {} but {} are registered",
                    p.tensor,
                    tensor_sizes.len()
                ));
            };
            let last = (self.num_blocks - 1)
                .checked_mul(p.block_stride)
                .and_then(|x| x.checked_add(p.offset))
                .and_then(|x| x.checked_add(p.len));
            match last {
                Some(end) if end <= *size => {}
                _ => {
                    return bad(format!(
                    "piece {i} (layer {} {:?}) of block {} ends past the {size} bytes of tensor {}",
                    p.layer,
                    p.kind,
                    self.num_blocks - 1,
                    p.tensor
                ))
                }
            }
        }
        Ok(())
    }

    /// Bytes of one block across all layers: the store's block payload length.
    #[must_use]
    pub fn block_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// Geometry without dimension order: what must match for a thaw (possibly permuted).
    #[must_use]
    pub fn geometry(&self) -> String {
        let kinds: Vec<String> = self
            .pieces
            .iter()
            .map(|p| format!("{:?}{}:{}", p.kind, p.layer, p.len))
            .collect();
        format!(
            "L{} bs{} H{} D{}/{} {:?} [{}]",
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_size,
            self.head_size_v,
            self.dtype,
            kinds.join(",")
        )
    }

    /// Fingerprint of geometry and inner order (not of num_blocks or addresses): goes into
    /// block keys and manifests.
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        xxh3_64(format!("{} {:?}", self.geometry(), self.inner).as_bytes())
    }

    /// How a window frozen with `window` maps onto this (engine) layout.
    pub fn compat(&self, window: &Layout) -> Result<Compat, LayoutError> {
        if self.geometry() != window.geometry() {
            return Err(LayoutError::Mismatch {
                window: format!("{} ({})", window.geometry(), window.name),
                engine: format!("{} ({})", self.geometry(), self.name),
            });
        }
        Ok(if self.inner == window.inner {
            Compat::Same
        } else if self.inner == Inner::Opaque || window.inner == Inner::Opaque {
            return Err(LayoutError::Mismatch {
                window: format!("{} {:?} ({})", window.geometry(), window.inner, window.name),
                engine: format!("{} {:?} ({})", self.geometry(), self.inner, self.name),
            });
        } else {
            Compat::Permute
        })
    }

    /// Size of one channel row (elements of one head for one token) in a piece of this kind:
    /// the unit a permutation moves.
    #[must_use]
    pub fn row_bytes(&self, kind: PieceKind) -> u64 {
        let d = match kind {
            PieceKind::Kv => u64::from(self.head_size) + u64::from(self.head_size_v),
            _ => u64::from(self.head_size),
        };
        d * self.dtype.size()
    }

    /// Serialised descriptor (stored in manifests).
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a descriptor stored in a manifest.
    pub fn from_json(b: &[u8]) -> Result<Self, LayoutError> {
        serde_json::from_slice(b).map_err(|e| LayoutError::Invalid(format!("stored layout: {e}")))
    }
}

/// Copies one piece from `src` (in `from` order) to `dst` (in the other order), moving rows of
/// `row` bytes: `[a][b][row]` → `[b][a][row]` with `a` = heads or tokens.
pub fn transpose_piece(
    src: &[u8],
    dst: &mut [u8],
    heads: usize,
    tokens: usize,
    row: usize,
    from: Inner,
) {
    let (outer, inner) = match from {
        Inner::Hnd => (heads, tokens),
        // Opaque pieces are never permuted (compat refuses); treated as NHD for totality.
        Inner::Nhd | Inner::Opaque => (tokens, heads),
    };
    for o in 0..outer {
        for i in 0..inner {
            let s = (o * inner + i) * row;
            let d = (i * outer + o) * row;
            dst[d..d + row].copy_from_slice(&src[s..s + row]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bytes_of_llama_8b() {
        let l = Layout::flash_2nbhd(32, 100, 16, 8, 128, Dtype::Bf16);
        assert_eq!(l.block_bytes(), 2 << 20);
        assert_eq!(l.pieces.len(), 64);
        let sizes = vec![2 * 100 * (1 << 15); 32];
        l.validate(&sizes).unwrap();
        assert!(l.validate(&vec![2 * 100 * (1 << 15) - 1; 32]).is_err());
    }

    #[test]
    fn permutable_layouts() {
        let a = Layout::cross_layer(CrossOrder::Lbhnc, 2, 10, 16, 2, 64, Dtype::Bf16);
        let b = Layout::cross_layer(CrossOrder::Blnhc, 2, 20, 16, 2, 64, Dtype::Bf16);
        assert_eq!(b.compat(&a).unwrap(), Compat::Permute);
        assert_ne!(a.fingerprint(), b.fingerprint());
        let c = Layout::cross_layer(CrossOrder::Lbhnc, 2, 20, 16, 4, 64, Dtype::Bf16);
        let e = c.compat(&a).unwrap_err();
        assert_eq!(e.code(), "LAYOUT_MISMATCH");
        assert!(e.to_string().contains("H2") && e.to_string().contains("H4"));
    }

    #[test]
    fn transpose_round_trip() {
        let (h, n, row) = (3, 5, 4);
        let src: Vec<u8> = (0..(h * n * row) as u32).map(|x| x as u8).collect();
        let mut mid = vec![0u8; src.len()];
        let mut back = vec![0u8; src.len()];
        transpose_piece(&src, &mut mid, h, n, row, Inner::Hnd);
        transpose_piece(&mid, &mut back, h, n, row, Inner::Nhd);
        assert_eq!(src, back);
        assert_ne!(src, mid);
    }
}
