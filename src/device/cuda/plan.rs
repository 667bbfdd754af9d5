//! Launch planning, pure CPU: what one gather or scatter launch does (the piece table, the
//! permutation dimensions, the scatter path, the launch geometry), decided from the layouts
//! and buffers alone. The context launches these plans on the GPU; tests/kernel_emulation.rs
//! runs the same plans through the kernel source compiled for the CPU.

use crate::device::DeviceError;
use crate::layout::{Compat, Inner, Layout, PieceKind};

/// Default grid cap (CTAs) of the copy kernel: the smallest that saturates PCIe both ways in
/// the H200 sweep of 2026-11-27 (8 × 512 threads: gather 51.9, scatter 51.1 GB/s; more CTAs
/// add nothing), so the copy leaves 124 of 132 SMs to the forward pass. docs/PERFORMANCE.md.
pub const DEFAULT_GRID: u32 = 8;
/// Threads per CTA.
pub const THREADS: u32 = 512;

/// How a scatter moves bytes from mapped host memory into the engine's blocks
/// (`CWM_SCATTER`, or [`CudaMemory::set_scatter`](super::CudaMemory::set_scatter)). Every
/// path is checked bit-exact by `scripts/gpu_check.py`; `cwm gpu-check bench` measures each
/// against the H2D ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScatterPath {
    /// `cwm_copy`: SM loads of mapped host memory (the default).
    Kernel = 0,
    /// `cuMemcpyBatchAsync`: the copy engines, one (dst, src, len) per piece.
    CopyEngine = 1,
    /// `cwm_copy_l2`: the kernel with 256-byte L2 prefetch hints on its loads.
    L2Hint = 2,
    /// `cwm_scatter_bulk` (sm_90+): bulk-async copies through shared memory (TMA).
    Bulk = 3,
}

impl ScatterPath {
    /// Every path, default first.
    pub const ALL: [ScatterPath; 4] = [
        ScatterPath::Kernel,
        ScatterPath::CopyEngine,
        ScatterPath::L2Hint,
        ScatterPath::Bulk,
    ];

    /// The `CWM_SCATTER` spelling.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ScatterPath::Kernel => "kernel",
            ScatterPath::CopyEngine => "copy-engine",
            ScatterPath::L2Hint => "l2",
            ScatterPath::Bulk => "bulk",
        }
    }

    /// Parses a `CWM_SCATTER` value.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    pub(super) fn from_u8(v: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|p| *p as u8 == v)
            .unwrap_or(ScatterPath::Kernel)
    }
}

/// The scatter path `CWM_SCATTER` asks for (the kernel when unset or unknown).
pub(super) fn scatter_default() -> ScatterPath {
    match std::env::var("CWM_SCATTER") {
        Err(_) => ScatterPath::Kernel,
        Ok(v) => ScatterPath::parse(&v).unwrap_or_else(|| {
            crate::log::warn(&format!(
                "CWM_SCATTER={v:?} is none of kernel, copy-engine, l2, bulk; using the kernel"
            ));
            ScatterPath::Kernel
        }),
    }
}

/// Threads per CTA of `cwm_scatter_bulk` (one thread drives the copies).
const BULK_THREADS: u32 = 32;

/// One launch-argument record per piece, laid out like `struct Piece` in kernels/copy.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPiece {
    /// Device address of block 0's piece.
    pub base: u64,
    /// Bytes between blocks.
    pub stride: u64,
    /// Bytes of the piece.
    pub len: u64,
    /// Offset inside a block payload.
    pub off: u64,
    /// Row bytes for permutation.
    pub row: u64,
    /// Transpose on scatter.
    pub perm: i32,
    /// Padding.
    pub pad: i32,
}

/// The piece table the kernel gets for `engine` (device addresses from `tensor_ptrs`), with
/// payload offsets from `window`'s table and permutation flags for `compat`.
#[must_use]
pub fn piece_table(
    engine: &Layout,
    window: &Layout,
    compat: Compat,
    tensor_ptrs: &[u64],
) -> Vec<KernelPiece> {
    let mut off = 0u64;
    engine
        .pieces
        .iter()
        .zip(&window.pieces)
        .map(|(ep, wp)| {
            let k = KernelPiece {
                base: tensor_ptrs.get(ep.tensor as usize).copied().unwrap_or(0) + ep.offset,
                stride: ep.block_stride,
                len: ep.len,
                off,
                row: engine.row_bytes(ep.kind),
                perm: i32::from(compat == Compat::Permute && ep.kind != PieceKind::Latent),
                pad: 0,
            };
            off += wp.len;
            k
        })
        .collect()
}

/// Launch geometry: (grid, threads) for `items` work items under a grid cap, `threads` per
/// CTA (rounded to whole warps, 32..=1024).
#[must_use]
pub fn launch_geometry(items: usize, grid_cap: u32, threads: u32) -> (u32, u32) {
    let grid = (items as u64).clamp(1, u64::from(grid_cap.max(1))) as u32;
    (grid, (threads.clamp(32, 1024) / 32) * 32)
}

/// (outer, inner) of the window's piece order, for the kernel's permutation.
#[must_use]
pub fn perm_dims(window: &Layout) -> (u64, u64) {
    let h = u64::from(window.num_kv_heads);
    let n = u64::from(window.block_size);
    match window.inner {
        Inner::Hnd => (h, n),
        // Opaque pieces are never permuted (compat refuses); treated as NHD for totality.
        Inner::Nhd | Inner::Opaque => (n, h),
    }
}

/// What one gather or scatter launch does, decided from the layouts and buffers alone: the
/// CUDA backend launches it, and tests/kernel_emulation.rs runs the same plan through the
/// kernel source compiled for the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// The path taken: `Kernel`, `L2Hint` or `Bulk` name the entry point launched;
    /// `CopyEngine` runs the same piece table through `cuMemcpyBatchAsync` instead.
    pub path: ScatterPath,
    /// One record per piece (`struct Piece`).
    pub pieces: Vec<KernelPiece>,
    /// Host → device (scatter) rather than device → host (gather).
    pub scatter: bool,
    /// (outer, inner) for the permutation.
    pub dims: (u64, u64),
}

impl LaunchPlan {
    /// What the kernel relies on and does not check itself: one staging slot per block id,
    /// and every permuted piece exactly `outer × inner` rows (else its transpose would write
    /// past the piece). Block ids are checked by the kernel (and by the callers before).
    pub fn check(&self, ids: &[u64], slots: &[u64]) -> Result<(), DeviceError> {
        if slots.len() != ids.len() {
            return Err(DeviceError::Validation(
                "launch: one staging slot per block id".into(),
            ));
        }
        let (outer, inner) = self.dims;
        if let Some(p) = self.pieces.iter().find(|p| {
            p.perm != 0
                && (p.row == 0
                    || outer
                        .checked_mul(inner)
                        .and_then(|x| x.checked_mul(p.row))
                        .is_none_or(|x| x != p.len))
        }) {
            return Err(DeviceError::Validation(format!(
                "permuted piece of {} bytes is not {outer} x {inner} rows of {} bytes",
                p.len, p.row
            )));
        }
        Ok(())
    }

    /// (grid, threads per CTA) for `blocks` blocks under the backend's grid cap and thread
    /// count (`cwm_scatter_bulk` drives its copies from one thread and gets one warp).
    #[must_use]
    pub fn geometry(&self, blocks: usize, (grid_cap, threads): (u32, u32)) -> (u32, u32) {
        let threads = if self.path == ScatterPath::Bulk {
            BULK_THREADS
        } else {
            threads
        };
        launch_geometry(blocks * self.pieces.len(), grid_cap, threads)
    }
}

/// The launch that gathers whole blocks of `layout` (tensors at `tensor_ptrs`).
#[must_use]
pub fn gather_plan(layout: &Layout, tensor_ptrs: &[u64]) -> LaunchPlan {
    LaunchPlan {
        path: ScatterPath::Kernel,
        pieces: piece_table(layout, layout, Compat::Same, tensor_ptrs),
        scatter: false,
        dims: (1, 1),
    }
}

/// The launch that scatters `window`-laid-out payloads at `slots` into `engine`'s blocks:
/// the path `want` when `supported` says this build and GPU have it and it can do this copy
/// (only the kernels permute; bulk copies need 16-byte alignment), the kernel otherwise.
#[must_use]
pub fn scatter_plan(
    engine: &Layout,
    window: &Layout,
    compat: Compat,
    tensor_ptrs: &[u64],
    slots: &[u64],
    want: ScatterPath,
    supported: impl Fn(ScatterPath) -> bool,
) -> LaunchPlan {
    let pieces = piece_table(engine, window, compat, tensor_ptrs);
    let path = if want == ScatterPath::Kernel
        || !supported(want)
        || (want != ScatterPath::L2Hint && compat != Compat::Same)
        || (want == ScatterPath::Bulk && !bulk_aligned(&pieces, slots))
    {
        ScatterPath::Kernel
    } else {
        want
    };
    LaunchPlan {
        path,
        pieces,
        scatter: true,
        dims: perm_dims(window),
    }
}

/// Whether every piece and slot suits `cwm_scatter_bulk`: bulk-async copies need 16-byte
/// aligned addresses and lengths, and no permutation.
fn bulk_aligned(table: &[KernelPiece], slots: &[u64]) -> bool {
    table
        .iter()
        .all(|k| k.perm == 0 && (k.base | k.stride | k.len | k.off) % 16 == 0)
        && slots.iter().all(|s| s % 16 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CrossOrder, Dtype};

    #[test]
    fn piece_table_matches_the_layout() {
        let l = Layout::flash_2nbhd(2, 10, 16, 2, 64, Dtype::Bf16);
        let t = piece_table(&l, &l, Compat::Same, &[1000, 5000]);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].base, 1000);
        assert_eq!(t[1].base, 1000 + 10 * 4096);
        assert_eq!(t[2].base, 5000);
        assert_eq!(
            t.iter().map(|p| p.off).collect::<Vec<_>>(),
            vec![0, 4096, 8192, 12288]
        );
        assert!(t
            .iter()
            .all(|p| p.perm == 0 && p.stride == 4096 && p.len == 4096));
        assert_eq!(std::mem::size_of::<KernelPiece>(), 48);
    }

    #[test]
    fn permutation_flags_and_dims() {
        let a = Layout::cross_layer(CrossOrder::Lbhnc, 2, 8, 16, 4, 64, Dtype::Bf16);
        let b = Layout::cross_layer(CrossOrder::Blnhc, 2, 8, 16, 4, 64, Dtype::Bf16);
        let t = piece_table(&b, &a, Compat::Permute, &[0]);
        assert!(t.iter().all(|p| p.perm == 1 && p.row == 256));
        assert_eq!(perm_dims(&a), (4, 16));
        let m = Layout::mla(2, 8, 16, 576, Dtype::Bf16);
        assert!(piece_table(&m, &m, Compat::Permute, &[0, 0])
            .iter()
            .all(|p| p.perm == 0));
    }

    #[test]
    fn launch_geometry_caps_the_grid() {
        assert_eq!(launch_geometry(64 * 1024, 16, THREADS), (16, THREADS));
        assert_eq!(launch_geometry(3, 16, 1000), (3, 992));
        assert_eq!(launch_geometry(0, 16, 4096), (1, 1024));
    }

    #[test]
    fn scatter_paths_parse_and_bulk_needs_alignment() {
        for p in ScatterPath::ALL {
            assert_eq!(ScatterPath::parse(p.name()), Some(p));
            assert_eq!(ScatterPath::from_u8(p as u8), p);
        }
        assert_eq!(ScatterPath::parse("dma"), None);
        assert_eq!(ScatterPath::from_u8(200), ScatterPath::Kernel);
        let l = Layout::flash_2nbhd(2, 8, 16, 2, 64, Dtype::Bf16);
        let t = piece_table(&l, &l, Compat::Same, &[1 << 20, 2 << 20]);
        assert!(bulk_aligned(&t, &[4096, 8192]));
        assert!(!bulk_aligned(&t, &[4096, 8200]), "a slot off 16 bytes");
        let mut odd = t.clone();
        odd[1].len = 72;
        assert!(!bulk_aligned(&odd, &[4096]), "a piece length off 16 bytes");
        let a = Layout::cross_layer(CrossOrder::Lbhnc, 2, 8, 16, 4, 64, Dtype::Bf16);
        let b = Layout::cross_layer(CrossOrder::Blnhc, 2, 8, 16, 4, 64, Dtype::Bf16);
        let p = piece_table(&b, &a, Compat::Permute, &[0]);
        assert!(!bulk_aligned(&p, &[4096]), "permutation");
        // The plan takes the path asked for only where it can run and can do the copy.
        let all = |_: ScatterPath| true;
        let path =
            |e: &Layout, w: &Layout, c, slots: &[u64], want, sup: &dyn Fn(ScatterPath) -> bool| {
                scatter_plan(e, w, c, &[0, 0], slots, want, sup).path
            };
        for want in ScatterPath::ALL {
            assert_eq!(path(&l, &l, Compat::Same, &[4096], want, &all), want);
            assert_eq!(
                path(&l, &l, Compat::Same, &[4096], want, &|_| false),
                ScatterPath::Kernel
            );
        }
        assert_eq!(
            path(&l, &l, Compat::Same, &[4100], ScatterPath::Bulk, &all),
            ScatterPath::Kernel
        );
        assert_eq!(
            path(&l, &l, Compat::Same, &[4100], ScatterPath::L2Hint, &all),
            ScatterPath::L2Hint
        );
        for want in [ScatterPath::CopyEngine, ScatterPath::Bulk] {
            assert_eq!(
                path(&b, &a, Compat::Permute, &[4096], want, &all),
                ScatterPath::Kernel
            );
        }
        assert_eq!(
            path(&b, &a, Compat::Permute, &[4096], ScatterPath::L2Hint, &all),
            ScatterPath::L2Hint
        );
        let plan = scatter_plan(&b, &a, Compat::Permute, &[0], &[0], ScatterPath::Bulk, all);
        assert!(plan.scatter && plan.dims == perm_dims(&a));
        assert_eq!(plan.geometry(1000, (16, 512)), (16, 512));
        let bulk = scatter_plan(&l, &l, Compat::Same, &[0, 0], &[0], ScatterPath::Bulk, all);
        assert_eq!(bulk.geometry(1000, (16, 512)), (16, BULK_THREADS));
        let g = gather_plan(&l, &[0, 0]);
        assert!(!g.scatter && g.path == ScatterPath::Kernel && g.pieces.len() == 4);
    }
}
