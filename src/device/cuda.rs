//! The CUDA backend: a KV cache in another process's GPU memory, imported with CUDA IPC
//! (`cuIpcOpenMemHandle` on the allocation base, plus an offset per tensor), gathered and
//! scattered by the kernel in `kernels/copy.cu` straight between GPU memory and the staging
//! pool, which is page-locked and mapped into the device (`cuMemHostRegister`, zero-copy over
//! PCIe). libcuda and libnvrtc are loaded at run time: without libcuda the backend reports
//! itself unavailable with one message; without libnvrtc it falls back to copy-engine
//! `cuMemcpy` per piece (correct, slower).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;

use super::{DeviceError, KvMemory, Region};
use crate::layout::{Compat, Inner, Layout, PieceKind};

/// The kernel source, embedded for NVRTC.
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/copy.cu");

/// The kernel compiled by nvcc at build time (sm_80, sm_90, compute_90 PTX), when nvcc was
/// there; otherwise NVRTC compiles [`KERNEL_SOURCE`] at first use.
#[cfg(cwm_fatbin)]
pub const KERNEL_FATBIN: Option<&[u8]> =
    Some(include_bytes!(concat!(env!("OUT_DIR"), "/copy.fatbin")));
/// The kernel compiled by nvcc at build time; `None`: this build had no nvcc.
#[cfg(not(cwm_fatbin))]
pub const KERNEL_FATBIN: Option<&[u8]> = None;

/// Default grid cap (CTAs) of the copy kernel: the smallest that saturates PCIe both ways in
/// the H200 sweep of 2026-11-27 (8 × 512 threads: gather 51.9, scatter 51.1 GB/s; more CTAs
/// add nothing), so the copy leaves 124 of 132 SMs to the forward pass. docs/PERFORMANCE.md.
pub const DEFAULT_GRID: u32 = 8;
/// Threads per CTA.
pub const THREADS: u32 = 512;

/// How a scatter moves bytes from mapped host memory into the engine's blocks
/// (`CWM_SCATTER`, or [`CudaMemory::set_scatter`]). Every path is checked bit-exact by
/// `scripts/gpu_check.py`; `cwm gpu-check bench` measures each against the H2D ceiling.
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

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|p| *p as u8 == v)
            .unwrap_or(ScatterPath::Kernel)
    }
}

/// The scatter path `CWM_SCATTER` asks for (the kernel when unset or unknown).
fn scatter_default() -> ScatterPath {
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

/// The module's entry points (`None`: not in this build or not for this GPU).
#[derive(Clone, Copy)]
struct Kernels {
    module: cu::CUmodule,
    copy: cu::CUfunction,
    l2: Option<cu::CUfunction>,
    bulk: Option<cu::CUfunction>,
}

/// Host regions page-locked by `Cuda::register_host`: (start, len, registrations).
static HOST_REGIONS: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

/// Threads per CTA of `cwm_scatter_bulk` (one thread drives the copies).
const BULK_THREADS: u32 = 32;

fn check(what: &str, r: cu::CUresult) -> Result<(), DeviceError> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Os(format!("{what}: {r:?}")))
    }
}

/// True when libcuda can be loaded on this machine.
#[must_use]
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cu::is_culib_present() }
}

/// Why the backend cannot run here, or `None` when it can.
#[must_use]
pub fn unavailable_reason() -> Option<String> {
    if available() {
        None
    } else {
        Some("CUDA backend unavailable: libcuda.so could not be loaded (no NVIDIA driver on this machine)".into())
    }
}

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

struct Ctx {
    dev: cu::CUdevice,
    ctx: cu::CUcontext,
    stream: cu::CUstream,
    kernels: Option<Kernels>,
    args: cu::CUdeviceptr,
    args_cap: usize,
}

// SAFETY: CUDA contexts, streams and functions may be used from any thread once the context
// is made current there (every entry point below does so under the mutex).
unsafe impl Send for Ctx {}

/// A CUDA device context with the copy kernel loaded.
pub struct Cuda {
    inner: Mutex<Ctx>,
    /// Device name.
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: i32,
    /// Why the kernel is not in use, if it is not (NVRTC missing or failed).
    pub kernel_error: Option<String>,
    /// Device ordinal.
    pub ordinal: i32,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
}

impl Cuda {
    /// The process's context for device `ordinal`, opened at first use and kept: every
    /// registration (and re-registration after an engine reconnects) shares one context,
    /// stream, module and argument buffer instead of leaking a set each time.
    pub fn shared(ordinal: i32) -> Result<Arc<Self>, DeviceError> {
        static DEVICES: Mutex<Vec<(i32, Arc<Cuda>)>> = Mutex::new(Vec::new());
        let mut d = DEVICES
            .lock()
            .map_err(|_| DeviceError::Os("CUDA device table lock poisoned".into()))?;
        if let Some((_, c)) = d.iter().find(|(o, _)| *o == ordinal) {
            return Ok(Arc::clone(c));
        }
        let c = Self::new(ordinal)?;
        d.push((ordinal, Arc::clone(&c)));
        Ok(c)
    }

    /// Opens device `ordinal`, compiles the kernel with NVRTC (a context of its own; see
    /// [`Cuda::shared`]).
    pub fn new(ordinal: i32) -> Result<Arc<Self>, DeviceError> {
        if let Some(r) = unavailable_reason() {
            return Err(DeviceError::Os(r));
        }
        let mut dev: cu::CUdevice = 0;
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        let mut stream: cu::CUstream = std::ptr::null_mut();
        let mut name = [0 as std::ffi::c_char; 128];
        let mut sms = 0i32;
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: plain driver API calls with valid out-pointers.
        unsafe {
            check("cuInit", cu::cuInit(0))?;
            check("cuDeviceGet", cu::cuDeviceGet(&mut dev, ordinal))?;
            check(
                "cuDevicePrimaryCtxRetain",
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
            )?;
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))?;
            check("cuStreamCreate", cu::cuStreamCreate(&mut stream, 1))?;
            let _ = cu::cuDeviceGetName(name.as_mut_ptr(), 127, dev);
            let _ = cu::cuDeviceGetAttribute(
                &mut sms,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                dev,
            );
            let _ = cu::cuDeviceGetAttribute(
                &mut major,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            );
            let _ = cu::cuDeviceGetAttribute(
                &mut minor,
                cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                dev,
            );
        }
        // SAFETY: cuDeviceGetName wrote a NUL-terminated string (the buffer starts zeroed).
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let (kernels, kernel_error) = match Self::load_kernel((major, minor)) {
            Ok(f) => (Some(f), None),
            Err(e) => {
                crate::log::warn(&format!(
                    "CUDA copy kernel unavailable ({e}); using cuMemcpy per piece"
                ));
                (None, Some(e))
            }
        };
        let args_cap = 4 << 20;
        let mut args: cu::CUdeviceptr = 0;
        // SAFETY: allocation with a valid out-pointer in the current context.
        unsafe { check("cuMemAlloc(args)", cu::cuMemAlloc_v2(&mut args, args_cap))? };
        Ok(Arc::new(Self {
            inner: Mutex::new(Ctx {
                dev,
                ctx,
                stream,
                kernels,
                args,
                args_cap,
            }),
            name,
            sms,
            kernel_error,
            ordinal,
            cc: (major, minor),
        }))
    }

    /// Loads the kernels: the nvcc fatbin when this build has one, else NVRTC's PTX for this
    /// GPU's architecture (so sm_90 code such as the bulk scatter is compiled in), else PTX
    /// for NVRTC's default architecture.
    fn load_kernel(cc: (i32, i32)) -> Result<Kernels, String> {
        if let Some(fatbin) = KERNEL_FATBIN {
            // The driver expects an 8-byte-aligned image; include_bytes! guarantees 1.
            let mut aligned = vec![0u64; fatbin.len().div_ceil(8)];
            for (i, b) in fatbin.iter().enumerate() {
                aligned[i / 8] |= u64::from(*b) << (8 * (i % 8));
            }
            // The fatbin holds sm_90 code, which an sm_90+ GPU runs.
            match Self::module_kernels(aligned.as_ptr().cast(), cc.0 >= 9) {
                Ok(k) => return Ok(k),
                Err(e) => crate::log::warn(&format!(
                    "embedded kernel fatbin did not load on this GPU ({e}); trying NVRTC"
                )),
            }
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("libnvrtc could not be loaded".into());
        }
        // The GPU's own architecture, or the newest one NVRTC knows below it (a GPU newer
        // than this NVRTC); NVRTC's default when it cannot say.
        let want = cc.0 * 10 + cc.1;
        let arch = nvrtc_archs()
            .into_iter()
            .filter(|&a| a <= want)
            .max()
            .or((want > 0).then_some(want));
        let ptx = match arch {
            Some(a) => cudarc::nvrtc::compile_ptx_with_opts(
                KERNEL_SOURCE,
                cudarc::nvrtc::CompileOptions {
                    options: vec![format!("--gpu-architecture=compute_{a}")],
                    ..Default::default()
                },
            ),
            None => cudarc::nvrtc::compile_ptx(KERNEL_SOURCE),
        }
        .map_err(|e| format!("NVRTC ({arch:?}): {e:?}"))?;
        let src = CString::new(ptx.to_src()).map_err(|e| e.to_string())?;
        // The bulk kernel has a body only when compiled for sm_90 or newer.
        Self::module_kernels(src.as_ptr().cast(), arch.is_some_and(|a| a >= 90))
    }

    /// Loads a module image (fatbin or NUL-terminated PTX) and looks its entry points up.
    fn module_kernels(image: *const c_void, bulk: bool) -> Result<Kernels, String> {
        let mut module: cu::CUmodule = std::ptr::null_mut();
        // SAFETY: `image` is a fatbin or NUL-terminated PTX image that outlives the call;
        // out-pointers are valid.
        let r = unsafe { cu::cuModuleLoadData(&mut module, image) };
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(format!("cuModuleLoadData: {r:?}"));
        }
        let get = |name: &std::ffi::CStr| -> Option<cu::CUfunction> {
            let mut f: cu::CUfunction = std::ptr::null_mut();
            // SAFETY: a loaded module, a NUL-terminated name, a valid out-pointer.
            let r = unsafe { cu::cuModuleGetFunction(&mut f, module, name.as_ptr()) };
            (r == cu::CUresult::CUDA_SUCCESS).then_some(f)
        };
        let Some(copy) = get(c"cwm_copy") else {
            // SAFETY: the module loaded above; nothing of it is in use.
            unsafe {
                let _ = cu::cuModuleUnload(module);
            }
            return Err("cuModuleGetFunction(cwm_copy) failed".into());
        };
        Ok(Kernels {
            module,
            copy,
            l2: get(c"cwm_copy_l2"),
            // Only where it was compiled for sm_90 or newer (elsewhere its body says so).
            bulk: bulk.then(|| get(c"cwm_scatter_bulk")).flatten(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ctx>, DeviceError> {
        let g = self
            .inner
            .lock()
            .map_err(|_| DeviceError::Os("CUDA context lock poisoned".into()))?;
        // SAFETY: making our retained primary context current on this thread.
        unsafe { check("cuCtxSetCurrent", cu::cuCtxSetCurrent(g.ctx))? };
        Ok(g)
    }

    /// True when the copy kernel is loaded.
    #[must_use]
    pub fn has_kernel(&self) -> bool {
        self.kernel_error.is_none()
    }

    /// Whether `path` can run here (its kernel entry point or driver call exists).
    #[must_use]
    pub fn supports(&self, path: ScatterPath) -> bool {
        let k = self.inner.lock().ok().and_then(|g| g.kernels);
        match path {
            ScatterPath::Kernel => k.is_some(),
            ScatterPath::CopyEngine => has_batch_copy(),
            ScatterPath::L2Hint => k.is_some_and(|k| k.l2.is_some()),
            ScatterPath::Bulk => k.is_some_and(|k| k.bulk.is_some()),
        }
    }

    /// Page-locks and maps a host region (portable: every context of the process sees it);
    /// returns its device address in this context. Registrations are counted per region, so
    /// several engines (devices, reconnects) can map the same region (the RAM tier's arena)
    /// and the last [`Cuda::unregister_host`] unpins it.
    pub fn register_host(&self, ptr: *mut u8, len: usize) -> Result<u64, DeviceError> {
        let _g = self.lock()?;
        let mut regs = HOST_REGIONS
            .lock()
            .map_err(|_| DeviceError::Os("host registration table lock poisoned".into()))?;
        let known = regs.iter().position(|r| r.0 == ptr as usize && r.1 == len);
        let mut d: cu::CUdeviceptr = 0;
        // SAFETY: the caller keeps the region alive while registered (staging pools live as
        // long as their engine, the tier's arena as long as the daemon); flags ask for a
        // mapped, portable registration; the device pointer query has a valid out-pointer.
        unsafe {
            if known.is_none() {
                check(
                    "cuMemHostRegister",
                    cu::cuMemHostRegister_v2(
                        ptr.cast(),
                        len,
                        cu::CU_MEMHOSTREGISTER_DEVICEMAP | cu::CU_MEMHOSTREGISTER_PORTABLE,
                    ),
                )?;
            }
            let r = cu::cuMemHostGetDevicePointer_v2(&mut d, ptr.cast(), 0);
            if r != cu::CUresult::CUDA_SUCCESS {
                if known.is_none() {
                    let _ = cu::cuMemHostUnregister(ptr.cast());
                }
                check("cuMemHostGetDevicePointer", r)?;
            }
        }
        match known {
            Some(i) => regs[i].2 += 1,
            None => regs.push((ptr as usize, len, 1)),
        }
        Ok(d)
    }

    /// Drops one registration of the region at `ptr`; the last one unpins it.
    pub fn unregister_host(&self, ptr: *mut u8) {
        let Ok(_g) = self.lock() else { return };
        let Ok(mut regs) = HOST_REGIONS.lock() else {
            return;
        };
        if let Some(i) = regs.iter().position(|r| r.0 == ptr as usize) {
            regs[i].2 -= 1;
            if regs[i].2 == 0 {
                regs.remove(i);
                // SAFETY: the region was registered by `register_host` and its last user is
                // gone.
                unsafe {
                    let _ = cu::cuMemHostUnregister(ptr.cast());
                }
            }
        }
    }

    /// Device-to-host and host-to-device copy ceilings: GB/s of one `bytes` copy each way
    /// between a device buffer and the page-locked host region at `host` (mapped earlier).
    pub fn memcpy_ceiling(&self, host: *mut u8, bytes: usize) -> Result<(f64, f64), DeviceError> {
        let g = self.lock()?;
        let mut d: cu::CUdeviceptr = 0;
        // SAFETY: a device allocation of `bytes`, copies within both buffers' bounds, freed
        // before returning.
        unsafe {
            check("cuMemAlloc", cu::cuMemAlloc_v2(&mut d, bytes))?;
            let run = |d2h: bool| -> Result<f64, DeviceError> {
                let t = std::time::Instant::now();
                if d2h {
                    check(
                        "cuMemcpyDtoHAsync",
                        cu::cuMemcpyDtoHAsync_v2(host.cast(), d, bytes, g.stream),
                    )?;
                } else {
                    check(
                        "cuMemcpyHtoDAsync",
                        cu::cuMemcpyHtoDAsync_v2(d, host.cast(), bytes, g.stream),
                    )?;
                }
                check("cuStreamSynchronize", cu::cuStreamSynchronize(g.stream))?;
                Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
            };
            let _ = run(true)?; // warm-up
            let d2h = run(true)?.max(run(true)?);
            let h2d = run(false)?.max(run(false)?);
            let _ = cu::cuMemFree_v2(d);
            Ok((d2h, h2d))
        }
    }

    /// Copies `sizes[i]` bytes from `srcs[i]` to `dsts[i]` for every i with the copy engines
    /// (cuMemcpyBatchAsync, CUDA ≥ 12.8 drivers: one call for many pieces, DMA instead of SM
    /// loads), after `wait` (an event of the engine) when given, and waits. Sources are read
    /// in stream order.
    pub fn batch_copy(
        &self,
        dsts: &mut [u64],
        srcs: &mut [u64],
        sizes: &mut [usize],
        wait: Option<cu::CUevent>,
    ) -> Result<(), DeviceError> {
        if dsts.len() != srcs.len() || dsts.len() != sizes.len() {
            return Err(DeviceError::Validation(
                "batch copy lists differ in length".into(),
            ));
        }
        if !has_batch_copy() {
            return Err(DeviceError::Os(
                "this driver has no cuMemcpyBatchAsync_v2 (CUDA 13 drivers)".into(),
            ));
        }
        let g = self.lock()?;
        if let Some(ev) = wait {
            // SAFETY: the caller's event (alive for the call), this context's stream.
            unsafe { check("cuStreamWaitEvent", cu::cuStreamWaitEvent(g.stream, ev, 0))? };
        }
        let mut attr = cu::CUmemcpyAttributes {
            srcAccessOrder: cu::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: cu::CUmemLocation {
                type_: cu::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
                id: 0,
            },
            dstLocHint: cu::CUmemLocation {
                type_: cu::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: self.ordinal,
            },
            flags: 0,
        };
        let mut idx = [0usize; 1];
        const CHUNK: usize = 4096;
        let mut at = 0;
        while at < dsts.len() {
            let n = CHUNK.min(dsts.len() - at);
            // SAFETY: the three lists hold `n` valid entries from `at`; every (dst, src, size)
            // lies inside a registered region (the caller checked block ids against the
            // validated layout, sources are mapped staging or tier slots); one attribute
            // applies to all copies; the stream is synchronized before the lists are dropped.
            let r = unsafe {
                cu::cuMemcpyBatchAsync_v2(
                    dsts[at..].as_mut_ptr(),
                    srcs[at..].as_mut_ptr(),
                    sizes[at..].as_mut_ptr(),
                    n,
                    &mut attr,
                    idx.as_mut_ptr(),
                    1,
                    g.stream,
                )
            };
            if r != cu::CUresult::CUDA_SUCCESS {
                // Copies queued by earlier chunks still read the sources: wait for them before
                // the caller may reuse those buffers.
                // SAFETY: the stream belongs to this context, made current by lock().
                unsafe {
                    let _ = cu::cuStreamSynchronize(g.stream);
                }
                return check("cuMemcpyBatchAsync", r);
            }
            at += n;
        }
        // SAFETY: the stream belongs to this context, made current by lock().
        unsafe { check("cuStreamSynchronize", cu::cuStreamSynchronize(g.stream)) }
    }

    /// Launches the copy kernel and waits for it.
    fn launch(
        &self,
        plan: &LaunchPlan,
        ids: &[u64],
        slots: &[u64],
        num_blocks: u64,
        geometry: (u32, u32),
        wait: Option<cu::CUevent>,
    ) -> Result<(), DeviceError> {
        let g = self.lock()?;
        let Some(k) = g.kernels else {
            return Err(DeviceError::Os("copy kernel not loaded".into()));
        };
        let func = match plan.path {
            ScatterPath::Kernel | ScatterPath::CopyEngine => k.copy,
            ScatterPath::L2Hint => k.l2.unwrap_or(k.copy),
            ScatterPath::Bulk => match k.bulk {
                Some(f) => f,
                None => return Err(DeviceError::Os("bulk scatter kernel not loaded".into())),
            },
        };
        let pieces = &plan.pieces[..];
        plan.check(ids, slots)?;
        // Argument block: err (16 bytes), pieces, ids, slots.
        let pb = std::mem::size_of_val(pieces);
        let need = 16 + pb + 16 * ids.len();
        if need > g.args_cap {
            return Err(DeviceError::Validation(format!(
                "batch too large for the launch arguments ({need} bytes)"
            )));
        }
        let mut host = vec![0u8; need];
        // SAFETY: KernelPiece is repr(C) plain data; the byte view covers exactly `pb` bytes.
        let pbytes = unsafe { std::slice::from_raw_parts(pieces.as_ptr().cast::<u8>(), pb) };
        host[16..16 + pb].copy_from_slice(pbytes);
        for (i, v) in ids.iter().chain(slots).enumerate() {
            let at = 16 + pb + 8 * i;
            host[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let err_d = g.args;
        let mut pieces_d = g.args + 16;
        let mut ids_d = g.args + 16 + pb as u64;
        let mut slots_d = ids_d + 8 * ids.len() as u64;
        let mut err_p = err_d;
        let mut np = pieces.len() as i32;
        let mut nb = ids.len() as i32;
        let mut num = num_blocks;
        let mut sc = i32::from(plan.scatter);
        let (mut outer, mut inner) = plan.dims;
        let (grid, threads) = plan.geometry(ids.len(), geometry);
        let mut params: [*mut c_void; 10] = [
            (&mut pieces_d as *mut u64).cast(),
            (&mut np as *mut i32).cast(),
            (&mut ids_d as *mut u64).cast(),
            (&mut slots_d as *mut u64).cast(),
            (&mut nb as *mut i32).cast(),
            (&mut num as *mut u64).cast(),
            (&mut sc as *mut i32).cast(),
            (&mut outer as *mut u64).cast(),
            (&mut inner as *mut u64).cast(),
            (&mut err_p as *mut u64).cast(),
        ];
        let mut err = [0u8; 4];
        // SAFETY: the argument block fits the device buffer; `params` points at live locals of
        // the kernel's parameter types; the stream is synchronized before `host` and the
        // locals go out of scope, and before the staging slots are handed back.
        unsafe {
            check(
                "cuMemcpyHtoDAsync(args)",
                cu::cuMemcpyHtoDAsync_v2(g.args, host.as_ptr().cast(), need, g.stream),
            )?;
            if let Some(ev) = wait {
                check("cuStreamWaitEvent", cu::cuStreamWaitEvent(g.stream, ev, 0))?;
            }
            check(
                "cuLaunchKernel",
                cu::cuLaunchKernel(
                    func,
                    grid,
                    1,
                    1,
                    threads,
                    1,
                    1,
                    0,
                    g.stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
            )?;
            check("cuStreamSynchronize", cu::cuStreamSynchronize(g.stream))?;
            check(
                "cuMemcpyDtoH(err)",
                cu::cuMemcpyDtoH_v2(err.as_mut_ptr().cast(), err_d, 4),
            )?;
        }
        match u32::from_le_bytes(err) {
            0 => {}
            2 => {
                return Err(DeviceError::Os(
                    "the bulk scatter kernel was not compiled for this GPU (sm_90 or newer)".into(),
                ))
            }
            _ => {
                return Err(DeviceError::Validation(
                    "the kernel saw an out-of-range block id".into(),
                ))
            }
        }
        Ok(())
    }
}

/// The virtual architectures this NVRTC compiles for, as 10 × major + minor (empty when it
/// cannot say).
fn nvrtc_archs() -> Vec<i32> {
    use cudarc::nvrtc::sys as rt;
    let mut n: i32 = 0;
    // SAFETY: plain NVRTC queries with valid out-pointers; the list is sized by the count.
    unsafe {
        if !rt::is_culib_present()
            || rt::nvrtcGetNumSupportedArchs(&mut n) != rt::nvrtcResult::NVRTC_SUCCESS
            || n <= 0
        {
            return Vec::new();
        }
        let mut v = vec![0i32; n as usize];
        if rt::nvrtcGetSupportedArchs(v.as_mut_ptr()) != rt::nvrtcResult::NVRTC_SUCCESS {
            return Vec::new();
        }
        v
    }
}

/// Compiles CUDA C `src` with NVRTC into a CUBIN for `arch` (e.g. `sm_90`), which also runs
/// ptxas over the result (inline PTX included). Needs libnvrtc only — no GPU, no driver — so
/// the CPU test suite checks that every kernel compiles for every architecture cwm targets.
pub fn compile_cubin(src: &str, arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys as rt;
    // SAFETY: only tries to dlopen the library.
    if !unsafe { rt::is_culib_present() } {
        return Err("libnvrtc could not be loaded".into());
    }
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "-default-device".into(),
    ]
    .into_iter()
    .map(|o| CString::new(o).map_err(|e| e.to_string()))
    .collect::<Result<_, _>>()?;
    let optp: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: rt::nvrtcProgram = std::ptr::null_mut();
    let ok = rt::nvrtcResult::NVRTC_SUCCESS;
    // SAFETY: NUL-terminated source and options that outlive the calls; `prog` is created
    // here, read through NVRTC's own size queries into buffers of those sizes, and destroyed
    // on every path.
    unsafe {
        let r = rt::nvrtcCreateProgram(
            &mut prog,
            csrc.as_ptr(),
            c"cwm.cu".as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != ok {
            return Err(format!("nvrtcCreateProgram: {r:?}"));
        }
        let out = (|| {
            let r = rt::nvrtcCompileProgram(prog, optp.len() as i32, optp.as_ptr());
            if r != ok {
                let mut n = 0usize;
                let mut log = Vec::new();
                if rt::nvrtcGetProgramLogSize(prog, &mut n) == ok {
                    log = vec![0u8; n];
                    let _ = rt::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast());
                }
                let log = String::from_utf8_lossy(&log);
                return Err(format!(
                    "NVRTC ({arch}): {r:?}: {}",
                    log.trim_end_matches('\0')
                ));
            }
            let mut n = 0usize;
            let r = rt::nvrtcGetCUBINSize(prog, &mut n);
            if r != ok {
                return Err(format!("nvrtcGetCUBINSize: {r:?}"));
            }
            let mut bin = vec![0u8; n];
            let r = rt::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast());
            if r != ok {
                return Err(format!("nvrtcGetCUBIN: {r:?}"));
            }
            Ok(bin)
        })();
        let _ = rt::nvrtcDestroyProgram(&mut prog);
        out
    }
}

/// Whether the driver exports `cuMemcpyBatchAsync_v2` (CUDA ≥ 13.0 drivers). cudarc panics on
/// a missing symbol, so every batch copy asks first.
#[must_use]
pub fn has_batch_copy() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        // SAFETY: only called once libcuda is known to be present (a context exists);
        // looking a symbol up runs no code of the library.
        available()
            && unsafe {
                cu::culib()
                    .get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync_v2")
                    .is_ok()
            }
    })
}

/// Whether every piece and slot suits `cwm_scatter_bulk`: bulk-async copies need 16-byte
/// aligned addresses and lengths, and no permutation.
fn bulk_aligned(table: &[KernelPiece], slots: &[u64]) -> bool {
    table
        .iter()
        .all(|k| k.perm == 0 && (k.base | k.stride | k.len | k.off) % 16 == 0)
        && slots.iter().all(|s| s % 16 == 0)
}

impl Drop for Cuda {
    fn drop(&mut self) {
        let Ok(g) = self.lock() else { return };
        // SAFETY: the resources were created in `new` in this context, and nothing of this
        // `Cuda` can use them any more (it is being dropped; every launch synchronized).
        unsafe {
            if let Some(k) = g.kernels {
                let _ = cu::cuModuleUnload(k.module);
            }
            let _ = cu::cuMemFree_v2(g.args);
            let _ = cu::cuStreamDestroy_v2(g.stream);
            let _ = cu::cuDevicePrimaryCtxRelease_v2(g.dev);
        }
    }
}

/// One tensor registered through CUDA IPC.
#[derive(Debug, Clone)]
pub struct IpcTensor {
    /// The 64-byte `cudaIpcMemHandle_t` of the allocation base.
    pub handle: [u8; 64],
    /// Offset of the tensor in that allocation.
    pub offset: u64,
    /// Bytes of the tensor.
    pub size: u64,
}

/// Another process's GPU memory, imported with CUDA IPC.
pub struct CudaMemory {
    cuda: Arc<Cuda>,
    ptrs: Vec<u64>,
    sizes: Vec<u64>,
    opened: Vec<u64>,
    staging: Mutex<Vec<(usize, usize, u64)>>,
    wait: Mutex<Option<usize>>,
    /// Grid cap of the copy kernel (CTAs).
    pub grid: std::sync::atomic::AtomicU32,
    /// Threads per CTA of the copy kernel.
    pub threads: std::sync::atomic::AtomicU32,
    /// The [`ScatterPath`] asked for (`CWM_SCATTER`; the kernel by default until the others
    /// are measured: `cwm gpu-check bench` measures every path).
    scatter: std::sync::atomic::AtomicU8,
    /// The path the last scatter took (a path that cannot run falls back to the kernel).
    last_scatter: std::sync::atomic::AtomicU8,
}

// SAFETY: device addresses are plain integers; the context is behind Cuda's mutex.
unsafe impl Send for CudaMemory {}
// SAFETY: as above; interior state is behind mutexes.
unsafe impl Sync for CudaMemory {}

impl CudaMemory {
    /// Opens the IPC handles (each distinct allocation once) and checks that every tensor
    /// (offset + size) lies inside its allocation. On any failure the mappings opened so far
    /// are closed again (an open mapping keeps the exporter's memory alive).
    pub fn open(cuda: Arc<Cuda>, tensors: &[IpcTensor]) -> Result<Self, DeviceError> {
        let g = cuda.lock()?;
        let mut bases: HashMap<[u8; 64], (u64, u64)> = HashMap::new();
        let mut opened = Vec::new();
        let mut ptrs = Vec::new();
        let close = |opened: &[u64]| {
            for d in opened {
                // SAFETY: mappings opened above, not handed out to anyone.
                unsafe {
                    let _ = cu::cuIpcCloseMemHandle(*d);
                }
            }
        };
        for (i, t) in tensors.iter().enumerate() {
            let (base, alloc) = match bases.get(&t.handle) {
                Some(b) => *b,
                None => {
                    let mut h = cu::CUipcMemHandle { reserved: [0; 64] };
                    for (d, s) in h.reserved.iter_mut().zip(t.handle.iter()) {
                        *d = *s as std::ffi::c_char;
                    }
                    let mut d: cu::CUdeviceptr = 0;
                    // SAFETY: a handle from the exporting process; the flag enables peer access
                    // lazily. The mapping is closed in Drop (or below on failure).
                    let r = unsafe { cu::cuIpcOpenMemHandle_v2(&mut d, h, 1) };
                    if let Err(e) = check("cuIpcOpenMemHandle", r) {
                        close(&opened);
                        return Err(e);
                    }
                    opened.push(d);
                    let (mut start, mut size): (cu::CUdeviceptr, usize) = (0, 0);
                    // SAFETY: valid out-pointers; `d` is a mapping in this context.
                    let r = unsafe { cu::cuMemGetAddressRange_v2(&mut start, &mut size, d) };
                    // The range of the mapped allocation from `d` on (the driver may not say).
                    let alloc = if r == cu::CUresult::CUDA_SUCCESS && start <= d {
                        (start + size as u64).saturating_sub(d)
                    } else {
                        u64::MAX
                    };
                    bases.insert(t.handle, (d, alloc));
                    (d, alloc)
                }
            };
            if t.offset.checked_add(t.size).is_none_or(|end| end > alloc) {
                close(&opened);
                return Err(DeviceError::Validation(format!(
                    "tensor {i}: offset {} + size {} lies outside its CUDA allocation ({alloc} bytes)",
                    t.offset, t.size
                )));
            }
            ptrs.push(base + t.offset);
        }
        drop(g);
        Ok(Self {
            cuda,
            ptrs,
            sizes: tensors.iter().map(|t| t.size).collect(),
            opened,
            staging: Mutex::new(Vec::new()),
            wait: Mutex::new(None),
            grid: std::sync::atomic::AtomicU32::new(DEFAULT_GRID),
            threads: std::sync::atomic::AtomicU32::new(THREADS),
            scatter: std::sync::atomic::AtomicU8::new(scatter_default() as u8),
            last_scatter: std::sync::atomic::AtomicU8::new(ScatterPath::Kernel as u8),
        })
    }

    /// Chooses how scatters move bytes (see [`ScatterPath`]).
    pub fn set_scatter(&self, path: ScatterPath) {
        self.scatter
            .store(path as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The path asked for.
    #[must_use]
    pub fn scatter_path(&self) -> ScatterPath {
        ScatterPath::from_u8(self.scatter.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The path the last scatter actually took.
    #[must_use]
    pub fn last_scatter_path(&self) -> ScatterPath {
        ScatterPath::from_u8(self.last_scatter.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn geometry(&self) -> (u32, u32) {
        (
            self.grid.load(std::sync::atomic::Ordering::Relaxed),
            self.threads.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Memory of this process (tests, and engines that share a process with cwm): tensors
    /// given by device address and size; nothing is closed on drop.
    #[must_use]
    pub fn from_device_ptrs(cuda: Arc<Cuda>, tensors: &[(u64, u64)]) -> Self {
        Self {
            cuda,
            ptrs: tensors.iter().map(|t| t.0).collect(),
            sizes: tensors.iter().map(|t| t.1).collect(),
            opened: Vec::new(),
            staging: Mutex::new(Vec::new()),
            wait: Mutex::new(None),
            grid: std::sync::atomic::AtomicU32::new(DEFAULT_GRID),
            threads: std::sync::atomic::AtomicU32::new(THREADS),
            scatter: std::sync::atomic::AtomicU8::new(scatter_default() as u8),
            last_scatter: std::sync::atomic::AtomicU8::new(ScatterPath::Kernel as u8),
        }
    }

    /// Device addresses of the tensors.
    #[must_use]
    pub fn tensor_ptrs(&self) -> &[u64] {
        &self.ptrs
    }

    /// The context.
    #[must_use]
    pub fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    /// Makes the next gathers wait on an interprocess event the engine recorded after the
    /// forward pass that wrote the KV.
    pub fn wait_for_event(&self, handle: &[u8; 64]) -> Result<(), DeviceError> {
        let _g = self.cuda.lock()?;
        let mut h = cu::CUipcEventHandle { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(handle.iter()) {
            *d = *s as std::ffi::c_char;
        }
        let mut ev: cu::CUevent = std::ptr::null_mut();
        // SAFETY: a handle from the exporting process; valid out-pointer.
        unsafe { check("cuIpcOpenEventHandle", cu::cuIpcOpenEventHandle(&mut ev, h))? };
        if let Ok(mut w) = self.wait.lock() {
            if let Some(old) = w.replace(ev as usize) {
                // SAFETY: an event opened here earlier; every launch that waited on it has
                // synchronized (launches run under the context lock, held here).
                unsafe {
                    let _ = cu::cuEventDestroy_v2(old as cu::CUevent);
                }
            }
        }
        Ok(())
    }

    /// Scatter through the copy engines: one (dst, src, len) per piece of every block.
    fn scatter_copy_engine(
        &self,
        table: &[KernelPiece],
        ids: &[u64],
        slots: &[u64],
        num_blocks: u64,
        wait: Option<cu::CUevent>,
    ) -> Result<(), DeviceError> {
        let n = ids.len() * table.len();
        let (mut dsts, mut srcs, mut sizes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (&id, &slot) in ids.iter().zip(slots) {
            if id >= num_blocks {
                return Err(DeviceError::Validation(format!(
                    "block id {id} out of range (the engine has {num_blocks} blocks)"
                )));
            }
            for k in table {
                dsts.push(k.base + id * k.stride);
                srcs.push(slot + k.off);
                sizes.push(k.len as usize);
            }
        }
        self.cuda.batch_copy(&mut dsts, &mut srcs, &mut sizes, wait)
    }

    fn device_ptr(&self, host: *const u8, len: usize) -> Option<u64> {
        let p = host as usize;
        let regs = self.staging.lock().ok()?;
        regs.iter()
            .find(|(start, l, _)| p >= *start && p + len <= start + l)
            .map(|(start, _, d)| d + (p - start) as u64)
    }

    fn wait_event(&self) -> Option<cu::CUevent> {
        self.wait
            .lock()
            .ok()
            .and_then(|w| w.map(|e| e as cu::CUevent))
    }

    fn bounds(
        &self,
        regions: &[Region],
        lens: impl Iterator<Item = usize>,
    ) -> Result<(), DeviceError> {
        for (r, l) in regions.iter().zip(lens) {
            let size = self.sizes.get(r.tensor as usize).copied().unwrap_or(0);
            if r.offset.checked_add(r.len).is_none_or(|e| e > size) || r.len as usize != l {
                return Err(DeviceError::Validation(format!(
                    "region {}+{} outside tensor {} ({size} bytes)",
                    r.offset, r.len, r.tensor
                )));
            }
        }
        Ok(())
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        if let Ok(regs) = self.staging.lock() {
            for (start, _, _) in regs.iter() {
                self.cuda.unregister_host(*start as *mut u8);
            }
        }
        if let Ok(_g) = self.cuda.lock() {
            for d in &self.opened {
                // SAFETY: closing mappings opened in `open`.
                unsafe {
                    let _ = cu::cuIpcCloseMemHandle(*d);
                }
            }
            if let Some(ev) = self.wait_event() {
                // SAFETY: the event opened in `wait_for_event`; no launch is running (this
                // memory is being dropped, launches synchronize under the lock held here).
                unsafe {
                    let _ = cu::cuEventDestroy_v2(ev);
                }
            }
        }
    }
}

impl KvMemory for CudaMemory {
    fn tensor_sizes(&self) -> Vec<u64> {
        self.sizes.clone()
    }

    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        self.bounds(regions, dst.iter().map(|d| d.len()))?;
        let _g = self.cuda.lock()?;
        // The copies below are not ordered after the engine's streams: wait for the forward
        // pass that wrote the KV (its event) first, like the kernel's stream does.
        if let Some(ev) = self.wait_event() {
            // SAFETY: an event opened in `wait_for_event`, alive until this memory drops.
            unsafe { check("cuEventSynchronize", cu::cuEventSynchronize(ev))? };
        }
        for (r, d) in regions.iter().zip(dst.iter_mut()) {
            // SAFETY: bounds checked; synchronous copy into our buffer.
            unsafe {
                check(
                    "cuMemcpyDtoH",
                    cu::cuMemcpyDtoH_v2(
                        d.as_mut_ptr().cast(),
                        self.ptrs[r.tensor as usize] + r.offset,
                        d.len(),
                    ),
                )?
            };
        }
        Ok(())
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        self.bounds(regions, src.iter().map(|d| d.len()))?;
        let _g = self.cuda.lock()?;
        // As for reads: blocks freed by a request whose last step may still be running are
        // written only after the engine's work up to its event.
        if let Some(ev) = self.wait_event() {
            // SAFETY: an event opened in `wait_for_event`, alive until this memory drops.
            unsafe { check("cuEventSynchronize", cu::cuEventSynchronize(ev))? };
        }
        for (r, s) in regions.iter().zip(src) {
            // SAFETY: bounds checked; synchronous copy from our buffer.
            unsafe {
                check(
                    "cuMemcpyHtoD",
                    cu::cuMemcpyHtoD_v2(
                        self.ptrs[r.tensor as usize] + r.offset,
                        s.as_ptr().cast(),
                        s.len(),
                    ),
                )?
            };
        }
        Ok(())
    }

    fn register_staging(&self, ptr: *mut u8, len: usize) -> bool {
        let Ok(mut regs) = self.staging.lock() else {
            return false;
        };
        if regs.iter().any(|r| r.0 == ptr as usize && r.1 == len) {
            return true;
        }
        match self.cuda.register_host(ptr, len) {
            Ok(d) => {
                regs.push((ptr as usize, len, d));
                true
            }
            Err(e) => {
                crate::log::warn(&format!(
                    "staging pool not mapped into the GPU ({e}); using cuMemcpy"
                ));
                false
            }
        }
    }

    fn gather_blocks(
        &self,
        layout: &Layout,
        ids: &[u64],
        payloads: &mut [&mut [u8]],
    ) -> Option<Result<(), DeviceError>> {
        if !self.cuda.has_kernel() {
            return None;
        }
        let slots: Option<Vec<u64>> = payloads
            .iter()
            .map(|p| self.device_ptr(p.as_ptr(), p.len()))
            .collect();
        let slots = slots?;
        let plan = gather_plan(layout, &self.ptrs);
        let wait = self.wait_event();
        Some(
            self.cuda
                .launch(&plan, ids, &slots, layout.num_blocks, self.geometry(), wait),
        )
    }

    fn scatter_blocks(
        &self,
        engine: &Layout,
        window: &Layout,
        compat: Compat,
        ids: &[u64],
        payloads: &[&[u8]],
    ) -> Option<Result<(), DeviceError>> {
        if !self.cuda.has_kernel() {
            return None;
        }
        let slots: Option<Vec<u64>> = payloads
            .iter()
            .map(|p| self.device_ptr(p.as_ptr(), p.len()))
            .collect();
        let slots = slots?;
        let plan = scatter_plan(
            engine,
            window,
            compat,
            &self.ptrs,
            &slots,
            self.scatter_path(),
            |p| self.cuda.supports(p),
        );
        self.last_scatter
            .store(plan.path as u8, std::sync::atomic::Ordering::Relaxed);
        // Ordered after the engine's work up to its event (the connector records it before
        // it asks for thaws): with asynchronous scheduling a step still running may be writing
        // blocks a finished request gave up, which this thaw now fills.
        let wait = self.wait_event();
        if plan.path == ScatterPath::CopyEngine {
            return Some(self.scatter_copy_engine(
                &plan.pieces,
                ids,
                &slots,
                engine.num_blocks,
                wait,
            ));
        }
        Some(
            self.cuda
                .launch(&plan, ids, &slots, engine.num_blocks, self.geometry(), wait),
        )
    }
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
    fn kernel_source_is_embedded() {
        assert!(KERNEL_SOURCE.contains("cwm_copy"));
    }

    /// Runs with `--ignored` on a machine with a GPU; shown as ignored everywhere else (the
    /// cross-process checks live in scripts/gpu-check.sh).
    #[test]
    #[ignore = "needs a GPU: run with --ignored there; scripts/gpu-check.sh covers IPC and layouts"]
    fn kernels_bit_exact_on_a_gpu() {
        use crate::device::{gather, read_block, scatter};
        let cuda = Cuda::new(0).expect("a GPU");
        assert!(cuda.has_kernel(), "{:?}", cuda.kernel_error);
        let l = Layout::flash_2nbhd(2, 32, 16, 2, 64, Dtype::Bf16);
        let size = 2 * 32 * 4096u64;
        let mut ptrs = Vec::new();
        for t in 0..2u64 {
            let mut d: cu::CUdeviceptr = 0;
            let mut host = vec![0u8; size as usize];
            crate::prng::fill_random(&mut host, 7 + t);
            // SAFETY: allocation and a copy of `size` bytes into it.
            unsafe {
                let _g = cuda.lock().expect("ctx");
                check("alloc", cu::cuMemAlloc_v2(&mut d, size as usize)).expect("alloc");
                check(
                    "copy",
                    cu::cuMemcpyHtoD_v2(d, host.as_ptr().cast(), size as usize),
                )
                .expect("copy");
            }
            ptrs.push((d, size));
        }
        let mem = CudaMemory::from_device_ptrs(cuda, &ptrs);
        let pool = crate::staging::StagingPool::new(8 << 20, 4096 + l.block_bytes() as usize, None)
            .expect("pool");
        assert!(mem.register_staging(pool.region_ptr(), pool.bytes() as usize));
        let want: Vec<Vec<u8>> = [3u64, 9, 20]
            .iter()
            .map(|&b| read_block(&l, &mem, b).expect("read"))
            .collect();
        let mut set = pool.take(3);
        let mut slots = set.slices();
        let mut pls: Vec<&mut [u8]> = slots
            .iter_mut()
            .map(|s| &mut s[4096..4096 + l.block_bytes() as usize])
            .collect();
        gather(&l, &mem, &[3, 9, 20], &mut pls, 1, None).expect("gather");
        for (p, w) in pls.iter().zip(&want) {
            assert_eq!(&p[..], &w[..]);
        }
        let srcs: Vec<&[u8]> = pls.iter().map(|p| &p[..]).collect();
        scatter(&l, &l, Compat::Same, &mem, &[30, 0, 12], &srcs, 1).expect("scatter");
        for (b, w) in [30u64, 0, 12].iter().zip(&want) {
            assert_eq!(&read_block(&l, &mem, *b).expect("read")[..], &w[..]);
        }
        assert!(gather(&l, &mem, &[32], &mut pls[..1], 1, None).is_err());
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

    #[test]
    fn nvrtc_compiles_the_kernels_for_every_target() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!(
                "skipped: no libnvrtc (scripts/test.sh puts the vLLM venv's on LD_LIBRARY_PATH)"
            );
            return;
        }
        let archs = nvrtc_archs();
        assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
        for arch in ["sm_80", "sm_90"] {
            let bin = compile_cubin(KERNEL_SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&bin[..4], b"\x7fELF", "{arch}: a CUBIN is an ELF image");
        }
        // The PTX the runtime loads for an sm_90 GPU has the bulk and hinted copies; an sm_80
        // build compiles the bulk kernel's body out.
        let ptx = |arch: &str| {
            cudarc::nvrtc::compile_ptx_with_opts(
                KERNEL_SOURCE,
                cudarc::nvrtc::CompileOptions {
                    options: vec![format!("--gpu-architecture={arch}")],
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{arch}: {e:?}"))
            .to_src()
        };
        let p90 = ptx("compute_90");
        assert!(
            p90.contains("cp.async.bulk.shared::cluster.global"),
            "bulk loads"
        );
        assert!(
            p90.contains("cp.async.bulk.global.shared::cta"),
            "bulk stores"
        );
        assert!(p90.contains("L2::256B"), "hinted loads");
        for entry in ["cwm_copy", "cwm_copy_l2", "cwm_scatter_bulk"] {
            assert!(p90.contains(&format!(".entry {entry}(")), "{entry}");
        }
        assert!(!ptx("compute_80").contains("cp.async.bulk"));
        // An architecture without the hint or the bulk copies still builds every entry point
        // (cwm_copy must load whatever NVRTC falls back to).
        let p75 = ptx("compute_75");
        assert!(!p75.contains("L2::256B") && p75.contains(".entry cwm_copy("));
        let e = compile_cubin("__global__ void k() { nope; }", "sm_90").expect_err("bad source");
        assert!(
            e.contains("nope"),
            "the compiler log reaches the error: {e}"
        );
    }

    #[test]
    fn no_gpu_reports_unavailable_not_panic() {
        if available() {
            eprintln!("libcuda present: the GPU checks run in scripts/gpu-check.sh");
            return;
        }
        eprintln!("skipped: no GPU (libcuda absent) — checking the unavailable path instead");
        let err = Cuda::new(0).err().expect("no CUDA here");
        assert!(err.to_string().contains("libcuda"), "{err}");
        // The copy-engine probe answers instead of panicking on the missing library.
        assert!(!has_batch_copy());
    }
}
