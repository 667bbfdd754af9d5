//! The engine's GPU memory: [`CudaMemory`] (tensors imported with CUDA IPC, or given by
//! device address), page-locked host regions mapped into the device for zero-copy transfers
//! (`Cuda::register_host`), and the [`KvMemory`] implementation that gathers and scatters
//! through the context's launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;

use super::context::{check, Cuda};
use super::plan::{
    gather_plan, scatter_default, scatter_plan, KernelPiece, ScatterPath, DEFAULT_GRID, THREADS,
};
use crate::device::{DeviceError, KvMemory, Region};
use crate::layout::{Compat, Layout};

/// Host regions page-locked by `Cuda::register_host`: (start, len, registrations).
static HOST_REGIONS: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

impl Cuda {
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

    fn scatter_prefers_staging(&self) -> bool {
        self.cuda.has_kernel()
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
