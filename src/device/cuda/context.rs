//! The CUDA context: the device and its retained primary context, one stream, the loaded copy
//! kernels and their argument buffer; kernel launches and copy-engine batch copies on that
//! stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;

use super::kernels::{self, Kernels};
use super::plan::{LaunchPlan, ScatterPath};
use crate::device::DeviceError;

/// `Ok` on `CUDA_SUCCESS`; otherwise the driver's result, named after the call `what`.
pub(super) fn check(what: &str, r: cu::CUresult) -> Result<(), DeviceError> {
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

/// The handles behind [`Cuda`]'s mutex; every driver call runs under [`Cuda::lock`].
pub(super) struct Ctx {
    dev: cu::CUdevice,
    ctx: cu::CUcontext,
    stream: cu::CUstream,
    kernels: Option<Kernels>,
    args: cu::CUdeviceptr,
    args_cap: usize,
}

// SAFETY: CUDA contexts, streams and functions may be used from any thread once the context
// is made current there (every entry point, here and in memory.rs, does so under the mutex
// through `Cuda::lock`).
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
        let (kernels, kernel_error) = match kernels::load_kernel((major, minor)) {
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

    /// Locks the context and makes it current on this thread (for memory.rs and the tests
    /// too: every driver call runs under this guard).
    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ctx>, DeviceError> {
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
    pub(super) fn launch(
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

#[cfg(test)]
mod tests {
    use super::*;

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
