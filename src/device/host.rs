//! The host backend: a KV cache in another process's memory. Two ways in, both a
//! separate-process model of what CUDA IPC does on a GPU:
//! - [`ShmMemory`]: shared-memory files (memfd, /dev/shm) the engine created, mapped here;
//! - [`ProcessMemory`]: the engine's own anonymous memory, copied with process_vm_readv /
//!   process_vm_writev given its pid and the tensors' addresses (how vLLM's CPU backend is
//!   reached; see VLLM-CPU.md).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{DeviceError, KvMemory, Region};

fn check(
    sizes: &[u64],
    regions: &[Region],
    bufs: impl Iterator<Item = usize>,
) -> Result<(), DeviceError> {
    for (r, blen) in regions.iter().zip(bufs) {
        let Some(size) = sizes.get(r.tensor as usize) else {
            return Err(DeviceError::Validation(format!(
                "tensor {} is not registered",
                r.tensor
            )));
        };
        if r.offset.checked_add(r.len).is_none_or(|e| e > *size) || r.len as usize != blen {
            return Err(DeviceError::Validation(format!(
                "region {}+{} of tensor {} is outside its {size} bytes (or the buffer is {blen} bytes)",
                r.offset, r.len, r.tensor
            )));
        }
    }
    Ok(())
}

struct Mapping {
    ptr: usize,
    len: u64,
    _file: File,
}

/// Shared-memory files mapped into this process, one per tensor.
pub struct ShmMemory {
    maps: Vec<Mapping>,
}

impl ShmMemory {
    /// Maps whole files (the engine created and sized them).
    pub fn open(paths: &[&Path]) -> Result<Self, DeviceError> {
        let mut maps = Vec::new();
        for p in paths {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| DeviceError::Os(format!("open {}: {e}", p.display())))?;
            maps.push(Self::map(f)?);
        }
        Ok(Self { maps })
    }

    /// Creates `sizes.len()` anonymous shared-memory files (memfd) and maps them; returns the
    /// files too so another mapping (another process) can be made of them.
    pub fn create_memfd(sizes: &[u64]) -> Result<(Self, Vec<File>), DeviceError> {
        let mut maps = Vec::new();
        let mut files = Vec::new();
        for (i, &s) in sizes.iter().enumerate() {
            let name = std::ffi::CString::new(format!("cwm-kv-{i}"))
                .map_err(|e| DeviceError::Os(e.to_string()))?;
            // SAFETY: name is a valid NUL-terminated string.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(DeviceError::Os(format!(
                    "memfd_create: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: fd is a fresh descriptor we own.
            let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(s)
                .map_err(|e| DeviceError::Os(format!("size memfd: {e}")))?;
            let dup = f.try_clone().map_err(|e| DeviceError::Os(e.to_string()))?;
            maps.push(Self::map(f)?);
            files.push(dup);
        }
        Ok((Self { maps }, files))
    }

    /// Maps already-open files.
    pub fn from_files(files: Vec<File>) -> Result<Self, DeviceError> {
        Ok(Self {
            maps: files.into_iter().map(Self::map).collect::<Result<_, _>>()?,
        })
    }

    fn map(f: File) -> Result<Mapping, DeviceError> {
        let len = f
            .metadata()
            .map_err(|e| DeviceError::Os(e.to_string()))?
            .len();
        if len == 0 {
            return Err(DeviceError::Validation(
                "shared-memory file is empty".into(),
            ));
        }
        // SAFETY: mapping a regular file we hold open, shared, for its whole length.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DeviceError::Os(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Mapping {
            ptr: p as usize,
            len,
            _file: f,
        })
    }

    /// Fills tensor `t` with deterministic pseudo-random bytes (the synthetic engine's
    /// "forward pass"; also used to poison destinations in tests).
    pub fn fill_random(&self, t: usize, seed: u64) -> Result<(), DeviceError> {
        let m = self
            .maps
            .get(t)
            .ok_or_else(|| DeviceError::Validation(format!("tensor {t} is not registered")))?;
        // SAFETY: the mapping is valid for len bytes while self lives; the engine side owns
        // the bytes while it fills them (no transfer runs concurrently in its callers).
        let s = unsafe { std::slice::from_raw_parts_mut(m.ptr as *mut u8, m.len as usize) };
        crate::bench::fill_random(s, seed);
        Ok(())
    }
}

impl Drop for ShmMemory {
    fn drop(&mut self) {
        for m in &self.maps {
            // SAFETY: unmapping exactly what map() mapped.
            unsafe { libc::munmap(m.ptr as *mut libc::c_void, m.len as usize) };
        }
    }
}

impl KvMemory for ShmMemory {
    fn tensor_sizes(&self) -> Vec<u64> {
        self.maps.iter().map(|m| m.len).collect()
    }

    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, dst.iter().map(|d| d.len()))?;
        for (r, d) in regions.iter().zip(dst.iter_mut()) {
            let m = &self.maps[r.tensor as usize];
            // SAFETY: bounds checked above; source is mapped memory, destination our buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (m.ptr as *const u8).add(r.offset as usize),
                    d.as_mut_ptr(),
                    d.len(),
                );
            }
        }
        Ok(())
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, src.iter().map(|d| d.len()))?;
        for (r, s) in regions.iter().zip(src) {
            let m = &self.maps[r.tensor as usize];
            // SAFETY: bounds checked above; regions of distinct blocks do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    s.as_ptr(),
                    (m.ptr as *mut u8).add(r.offset as usize),
                    s.len(),
                );
            }
        }
        Ok(())
    }
}

// SAFETY: the mappings are plain shared memory; concurrent access to disjoint regions is sound
// and the mapping lives as long as the value.
unsafe impl Send for ShmMemory {}
// SAFETY: as above.
unsafe impl Sync for ShmMemory {}

/// Another process's memory, reached with process_vm_readv / process_vm_writev.
pub struct ProcessMemory {
    pid: i32,
    tensors: Vec<(u64, u64)>,
}

impl ProcessMemory {
    /// `tensors`: (address in the engine process, bytes) per tensor.
    #[must_use]
    pub fn new(pid: i32, tensors: Vec<(u64, u64)>) -> Self {
        Self { pid, tensors }
    }

    fn transfer(
        &self,
        regions: &[Region],
        local: Vec<libc::iovec>,
        write: bool,
    ) -> Result<(), DeviceError> {
        const IOV_MAX: usize = 1024;
        let remote: Vec<libc::iovec> = regions
            .iter()
            .map(|r| libc::iovec {
                iov_base: (self.tensors[r.tensor as usize].0 + r.offset) as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect();
        for (l, r) in local.chunks(IOV_MAX).zip(remote.chunks(IOV_MAX)) {
            let want: usize = l.iter().map(|v| v.iov_len).sum();
            // SAFETY: local iovecs point into caller buffers valid for their lengths; remote
            // iovecs are addresses in the other process, which the kernel checks.
            let n = unsafe {
                if write {
                    libc::process_vm_writev(
                        self.pid,
                        l.as_ptr(),
                        l.len() as _,
                        r.as_ptr(),
                        r.len() as _,
                        0,
                    )
                } else {
                    libc::process_vm_readv(
                        self.pid,
                        l.as_ptr(),
                        l.len() as _,
                        r.as_ptr(),
                        r.len() as _,
                        0,
                    )
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::ESRCH) {
                    DeviceError::Gone(format!("process {} exited", self.pid))
                } else {
                    DeviceError::Os(format!(
                        "process_vm_{}v pid {}: {e}",
                        if write { "write" } else { "read" },
                        self.pid
                    ))
                });
            }
            if n as usize != want {
                return Err(DeviceError::Gone(format!(
                    "partial transfer with process {}: {n} of {want} bytes (memory unmapped?)",
                    self.pid
                )));
            }
        }
        Ok(())
    }
}

impl KvMemory for ProcessMemory {
    fn tensor_sizes(&self) -> Vec<u64> {
        self.tensors.iter().map(|t| t.1).collect()
    }

    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, dst.iter().map(|d| d.len()))?;
        let local = dst
            .iter_mut()
            .map(|d| libc::iovec {
                iov_base: d.as_mut_ptr().cast(),
                iov_len: d.len(),
            })
            .collect();
        self.transfer(regions, local, false)
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, src.iter().map(|d| d.len()))?;
        let local = src
            .iter()
            .map(|d| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        self.transfer(regions, local, true)
    }
}
