//! Where KV caches live and how bytes get in and out of them. The `host` backend reaches a KV
//! cache in another process's memory (a shared-memory file, or the process itself through
//! process_vm_readv/writev) with CPU gather/scatter; the CUDA backend (a later change) plugs
//! into the same [`KvMemory`] trait with kernels.

#[cfg(target_os = "linux")]
pub mod cuda;
pub mod host;

use crate::error::ErrorCode;
use crate::layout::{transpose_piece, Compat, Layout, PieceKind};

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Bad request (a block id out of range, a size mismatch).
    #[error("invalid input: {0}")]
    Validation(String),
    /// The engine process is gone (or its memory unmapped) mid-transfer.
    #[error("the engine's memory is no longer reachable: {0}")]
    Gone(String),
    /// Any other OS failure reaching the memory.
    #[error("KV memory access failed: {0}")]
    Os(String),
}

impl DeviceError {
    /// Stable wire code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            DeviceError::Validation(_) => ErrorCode::Validation,
            DeviceError::Gone(_) => ErrorCode::Interrupted,
            DeviceError::Os(_) => ErrorCode::Internal,
        }
    }
}

/// A byte range inside one registered tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Tensor index.
    pub tensor: u32,
    /// Byte offset inside it.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// An engine's KV memory as the sidecar sees it.
pub trait KvMemory: Send + Sync {
    /// Bytes of each registered tensor (bounds for every access).
    fn tensor_sizes(&self) -> Vec<u64>;
    /// Copies `regions[i]` into `dst[i]` (equal lengths) for every i.
    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError>;
    /// Copies `src[i]` into `regions[i]` for every i.
    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError>;

    /// Makes a host region (a staging pool, the RAM tier's arena) reachable by the device for
    /// zero-copy gather and scatter (CUDA: page-locked and mapped; a region may be shared by
    /// several memories, and registering it again with the same memory is a no-op that
    /// answers true). False when there is nothing to do.
    fn register_staging(&self, ptr: *mut u8, len: usize) -> bool {
        let _ = (ptr, len);
        false
    }

    /// Whether scattering from host memory the device cannot reach (not registered with
    /// [`KvMemory::register_staging`]) is slow enough that copying it into registered
    /// staging first pays (CUDA: pageable copies region by region instead of one kernel
    /// launch). Host memory: false.
    fn scatter_prefers_staging(&self) -> bool {
        false
    }

    /// Gathers whole blocks in one go (a kernel launch on a GPU). `None`: not supported for
    /// these buffers; the caller falls back to [`KvMemory::read`].
    fn gather_blocks(
        &self,
        layout: &Layout,
        ids: &[u64],
        payloads: &mut [&mut [u8]],
    ) -> Option<Result<(), DeviceError>> {
        let _ = (layout, ids, payloads);
        None
    }

    /// Scatters whole blocks in one go, transposing when `compat` says so. `None`: not
    /// supported for these buffers; the caller falls back to [`KvMemory::write`].
    fn scatter_blocks(
        &self,
        engine: &Layout,
        window: &Layout,
        compat: Compat,
        ids: &[u64],
        payloads: &[&[u8]],
    ) -> Option<Result<(), DeviceError>> {
        let _ = (engine, window, compat, ids, payloads);
        None
    }
}

/// Checks every block id against the layout before anything is copied.
pub fn check_block_ids(layout: &Layout, ids: &[u64]) -> Result<(), DeviceError> {
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &b)| b >= layout.num_blocks)
    {
        return Err(DeviceError::Validation(format!(
            "block id {id} (position {i}) is out of range: the KV cache has {} blocks",
            layout.num_blocks
        )));
    }
    Ok(())
}

fn regions_of(layout: &Layout, id: u64) -> impl Iterator<Item = Region> + '_ {
    layout.pieces.iter().map(move |p| Region {
        tensor: p.tensor,
        offset: p.offset + id * p.block_stride,
        len: p.len,
    })
}

fn split_piece_refs<'a>(layout: &Layout, payload: &'a [u8]) -> Vec<&'a [u8]> {
    let mut at = 0usize;
    layout
        .pieces
        .iter()
        .map(|p| {
            let s = &payload[at..at + p.len as usize];
            at += p.len as usize;
            s
        })
        .collect()
}

/// Copies block `id` out of `mem` as the store lays it out (pieces in table order).
pub fn read_block(layout: &Layout, mem: &dyn KvMemory, id: u64) -> Result<Vec<u8>, DeviceError> {
    check_block_ids(layout, &[id])?;
    let mut out = vec![0u8; layout.block_bytes() as usize];
    let regions: Vec<Region> = regions_of(layout, id).collect();
    mem.read(&regions, &mut split_pieces(layout, &mut out))?;
    Ok(out)
}

fn split_pieces<'a>(layout: &Layout, mut payload: &'a mut [u8]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(layout.pieces.len());
    for p in &layout.pieces {
        let (a, b) = payload.split_at_mut(p.len as usize);
        out.push(a);
        payload = b;
    }
    out
}

/// Gathers blocks `ids` into `payloads` (one `block_bytes` slice per block), on up to
/// `threads` threads. Every id is checked first. With `sums`, the xxh3 of each payload is
/// computed right after its copy, while the bytes are still in cache.
pub fn gather(
    layout: &Layout,
    mem: &dyn KvMemory,
    ids: &[u64],
    payloads: &mut [&mut [u8]],
    threads: usize,
    sums: Option<&mut [u64]>,
) -> Result<(), DeviceError> {
    check_block_ids(layout, ids)?;
    let bb = layout.block_bytes() as usize;
    if payloads.len() != ids.len() || payloads.iter().any(|p| p.len() != bb) {
        return Err(DeviceError::Validation(
            "gather: one block_bytes slice per block".into(),
        ));
    }
    if let Some(r) = mem.gather_blocks(layout, ids, payloads) {
        r?;
        if let Some(sums) = sums {
            if sums.len() != ids.len() {
                return Err(DeviceError::Validation(
                    "gather: one checksum per block".into(),
                ));
            }
            let per = ids.len().div_ceil(threads.max(1)).max(1);
            std::thread::scope(|s| {
                for (p, o) in payloads.chunks(per).zip(sums.chunks_mut(per)) {
                    s.spawn(move || {
                        for (p, o) in p.iter().zip(o.iter_mut()) {
                            *o = crate::checksum::payload_checksum(p);
                        }
                    });
                }
            });
        }
        return Ok(());
    }
    let mut scratch = vec![0u64; ids.len()];
    let want_sums = sums.is_some();
    let out: &mut [u64] = match sums {
        Some(s) if s.len() == ids.len() => s,
        Some(_) => {
            return Err(DeviceError::Validation(
                "gather: one checksum per block".into(),
            ))
        }
        None => &mut scratch,
    };
    let per = ids.len().div_ceil(threads.max(1)).max(1);
    let work = |ids: &[u64], pls: &mut [&mut [u8]], sums: &mut [u64]| -> Result<(), DeviceError> {
        for ((&id, p), sum) in ids.iter().zip(pls.iter_mut()).zip(sums.iter_mut()) {
            let regions: Vec<Region> = regions_of(layout, id).collect();
            mem.read(&regions, &mut split_pieces(layout, p))?;
            if want_sums {
                *sum = crate::checksum::payload_checksum(p);
            }
        }
        Ok(())
    };
    if threads <= 1 || ids.len() < 2 {
        return work(ids, payloads, out);
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .chunks(per)
            .zip(payloads.chunks_mut(per))
            .zip(out.chunks_mut(per))
            .map(|((i, p), o)| s.spawn(move || work(i, p, o)))
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(DeviceError::Os("gather thread panicked".into())))
        })
    })
}

/// Scatters `payloads` (laid out per `window`'s piece table) into blocks `ids` of `engine`'s
/// layout, transposing pieces when the two differ only in dimension order.
pub fn scatter(
    engine: &Layout,
    window: &Layout,
    compat: Compat,
    mem: &dyn KvMemory,
    ids: &[u64],
    payloads: &[&[u8]],
    threads: usize,
) -> Result<(), DeviceError> {
    check_block_ids(engine, ids)?;
    let bb = engine.block_bytes() as usize;
    if payloads.len() != ids.len() || payloads.iter().any(|p| p.len() != bb) {
        return Err(DeviceError::Validation(
            "scatter: one block_bytes slice per block".into(),
        ));
    }
    if let Some(r) = mem.scatter_blocks(engine, window, compat, ids, payloads) {
        return r;
    }
    let per = ids.len().div_ceil(threads.max(1)).max(1);
    let work = |ids: &[u64], pls: &[&[u8]]| -> Result<(), DeviceError> {
        let mut regions = Vec::with_capacity(ids.len() * engine.pieces.len());
        for &id in ids {
            regions.extend(regions_of(engine, id));
        }
        if compat == Compat::Same {
            let srcs: Vec<&[u8]> = pls
                .iter()
                .flat_map(|p| split_piece_refs(window, p))
                .collect();
            return mem.write(&regions, &srcs);
        }
        // Layout upgrade: transpose every piece (MLA latents have no head dimension and are
        // copied as they are) into owned buffers first.
        let mut owned: Vec<Vec<u8>> = Vec::with_capacity(regions.len());
        for p in pls {
            for (wp, piece) in window.pieces.iter().zip(split_piece_refs(window, p)) {
                if wp.kind == PieceKind::Latent {
                    owned.push(piece.to_vec());
                    continue;
                }
                let mut t = vec![0u8; piece.len()];
                transpose_piece(
                    piece,
                    &mut t,
                    engine.num_kv_heads as usize,
                    engine.block_size as usize,
                    engine.row_bytes(wp.kind) as usize,
                    window.inner,
                );
                owned.push(t);
            }
        }
        let srcs: Vec<&[u8]> = owned.iter().map(|v| &v[..]).collect();
        mem.write(&regions, &srcs)
    };
    if threads <= 1 || ids.len() < 4 {
        return work(ids, payloads);
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .chunks(per)
            .zip(payloads.chunks(per))
            .map(|(i, p)| s.spawn(move || work(i, p)))
            .collect();
        hs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(DeviceError::Os("scatter thread panicked".into())))
        })
    })
}
