//! The host backend: a KV cache in another process's memory. Two ways in, both a
//! separate-process model of what CUDA IPC does on a GPU:
//! - [`ShmMemory`]: shared-memory files (memfd, /dev/shm) the engine created;
//! - [`ProcessMemory`]: the engine's own anonymous memory, copied with process_vm_readv /
//!   process_vm_writev given its pid and the tensors' addresses (how vLLM's CPU backend is
//!   reached; see VLLM-CPU.md).
//!
//! Memory a client registers may shrink, vanish or change at any time. No byte of it is ever
//! touched by a plain load or store here: every copy goes through a system call, which fails
//! (EFAULT, a short transfer, EOF) where a load would have died of SIGBUS or SIGSEGV, and that
//! failure is [`DeviceError::Gone`] (INTERRUPTED) for the request that met it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Why a process_vm transfer stopped.
enum VmFail {
    /// The call failed before moving a byte of its batch.
    Errno(std::io::Error),
    /// It moved fewer bytes than asked (a remote page was not there).
    Short { done: usize, want: usize },
}

/// Copies between `local[i]` and `remote[i]` (equal lengths; addresses in process `pid`) with
/// process_vm_readv (`write` false: remote → local) or process_vm_writev, up to IOV_MAX pairs
/// per call. The kernel checks every remote address: memory that is not there is an error
/// here, never a fault.
fn process_vm(
    pid: i32,
    local: &[libc::iovec],
    remote: &[libc::iovec],
    write: bool,
) -> Result<(), VmFail> {
    const IOV_MAX: usize = 1024;
    for (l, r) in local.chunks(IOV_MAX).zip(remote.chunks(IOV_MAX)) {
        let want: usize = l.iter().map(|v| v.iov_len).sum();
        // SAFETY: local iovecs point into caller buffers valid for their lengths (for a read,
        // buffers the caller lent us mutably); remote iovecs are addresses in process `pid`,
        // which the kernel checks (a missing page fails the call, it does not fault).
        let n = unsafe {
            if write {
                libc::process_vm_writev(pid, l.as_ptr(), l.len() as _, r.as_ptr(), r.len() as _, 0)
            } else {
                libc::process_vm_readv(pid, l.as_ptr(), l.len() as _, r.as_ptr(), r.len() as _, 0)
            }
        };
        if n < 0 {
            return Err(VmFail::Errno(std::io::Error::last_os_error()));
        }
        if n as usize != want {
            return Err(VmFail::Short {
                done: n as usize,
                want,
            });
        }
    }
    Ok(())
}

fn iovecs_mut(bufs: &mut [&mut [u8]]) -> Vec<libc::iovec> {
    bufs.iter_mut()
        .map(|d| libc::iovec {
            iov_base: d.as_mut_ptr().cast(),
            iov_len: d.len(),
        })
        .collect()
}

fn iovecs(bufs: &[&[u8]]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect()
}

struct Mapping {
    /// Where the file is mapped in this process. Only ever an address handed to the kernel
    /// (process_vm_readv/writev on ourselves), never dereferenced: the file may shrink.
    ptr: usize,
    /// Bytes registered (the file's size when it was mapped).
    len: u64,
    file: File,
}

/// Shared-memory files, one per tensor, held open and mapped into this process.
///
/// Copies go through process_vm_readv/writev on this process's own mapping of the files: the
/// kernel resolves each page and answers EFAULT (or a short count) where the file no longer
/// backs the mapping — the client truncated or shrank it — instead of the SIGBUS a memcpy
/// would raise, and unlike pwrite it never grows a file the client shrank. After each copy the
/// files it touched are checked to still be their registered size (bytes past the end of a file
/// inside its last page read as zeros through a mapping without a fault). Where process_vm is
/// not permitted (a seccomp filter), copies fall back to pread/pwrite on the files: a short
/// read is EOF, and a write first checks the file sizes (pwrite past the end would grow the
/// file; a shrink racing that check can still be grown back, at most to the registered size).
pub struct ShmMemory {
    maps: Vec<Mapping>,
    /// This process (the one holding the mappings).
    pid: i32,
    /// False once process_vm was refused: pread/pwrite from then on.
    vm: AtomicBool,
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
        Ok(Self::with(maps))
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
        Ok((Self::with(maps), files))
    }

    /// Maps already-open files.
    pub fn from_files(files: Vec<File>) -> Result<Self, DeviceError> {
        Ok(Self::with(
            files.into_iter().map(Self::map).collect::<Result<_, _>>()?,
        ))
    }

    fn with(maps: Vec<Mapping>) -> Self {
        Self {
            maps,
            pid: std::process::id() as i32,
            vm: AtomicBool::new(true),
        }
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
        // SAFETY: mapping a regular file we hold open, shared, for its whole length. The
        // mapping is only handed to the kernel as an address range, never dereferenced.
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
            file: f,
        })
    }

    /// Fills tensor `t` with deterministic pseudo-random bytes (the synthetic engine's
    /// "forward pass"; also used to poison destinations in tests).
    pub fn fill_random(&self, t: usize, seed: u64) -> Result<(), DeviceError> {
        const CHUNK: u64 = 4 << 20; // a multiple of 8: the stream continues across chunks
        let len = self
            .maps
            .get(t)
            .ok_or_else(|| DeviceError::Validation(format!("tensor {t} is not registered")))?
            .len;
        let mut buf = vec![0u8; len.min(CHUNK) as usize];
        let mut state = seed | 1;
        let mut offset = 0u64;
        while offset < len {
            let n = (len - offset).min(CHUNK);
            let b = &mut buf[..n as usize];
            crate::prng::fill_random_stream(b, &mut state);
            self.write(
                &[Region {
                    tensor: t as u32,
                    offset,
                    len: n,
                }],
                &[&*b],
            )?;
            offset += n;
        }
        Ok(())
    }

    fn remote(&self, regions: &[Region]) -> Vec<libc::iovec> {
        regions
            .iter()
            .map(|r| libc::iovec {
                iov_base: (self.maps[r.tensor as usize].ptr + r.offset as usize)
                    as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect()
    }

    /// Every file `regions` touch still has its registered size.
    fn still_whole(&self, regions: &[Region]) -> Result<(), DeviceError> {
        let mut seen = vec![false; self.maps.len()];
        for r in regions {
            let t = r.tensor as usize;
            if std::mem::replace(&mut seen[t], true) {
                continue;
            }
            let m = &self.maps[t];
            let now = m
                .file
                .metadata()
                .map_err(|e| DeviceError::Os(format!("fstat shared-memory file {t}: {e}")))?
                .len();
            if now < m.len {
                return Err(DeviceError::Gone(format!(
                    "shared-memory file of tensor {t} shrank from {} to {now} bytes",
                    m.len
                )));
            }
        }
        Ok(())
    }

    /// Maps a failed process_vm copy to an error, or `None`: process_vm is not permitted here
    /// (the caller falls back to pread/pwrite).
    fn vm_error(&self, regions: &[Region], f: VmFail, write: bool) -> Option<DeviceError> {
        match f {
            VmFail::Errno(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                if self.vm.swap(false, Ordering::Relaxed) {
                    crate::log::warn(&format!(
                        "process_vm_{}v on this process: {e}; shared-memory copies use \
                         pread/pwrite instead",
                        if write { "write" } else { "read" }
                    ));
                }
                None
            }
            VmFail::Errno(e) if e.raw_os_error() != Some(libc::EFAULT) => {
                Some(DeviceError::Os(format!("shared-memory copy: {e}")))
            }
            f => Some(self.still_whole(regions).err().unwrap_or_else(|| {
                let what = match f {
                    VmFail::Short { done, want } => format!("{done} of {want} bytes moved"),
                    VmFail::Errno(e) => e.to_string(),
                };
                DeviceError::Gone(format!(
                    "a shared-memory file no longer backs its registered range ({what})"
                ))
            })),
        }
    }

    fn pread(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        for (r, d) in regions.iter().zip(dst.iter_mut()) {
            let f = &self.maps[r.tensor as usize].file;
            let mut done = 0usize;
            while done < d.len() {
                let at = r.offset + done as u64;
                match f.read_at(&mut d[done..], at) {
                    Ok(0) => {
                        return Err(DeviceError::Gone(format!(
                            "shared-memory file of tensor {} ends at {at}, before {}",
                            r.tensor,
                            r.offset + r.len
                        )))
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(DeviceError::Os(format!("pread: {e}"))),
                }
            }
        }
        Ok(())
    }

    fn pwrite(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        // pwrite past the end would grow a file the client shrank: refuse first.
        self.still_whole(regions)?;
        for (r, s) in regions.iter().zip(src) {
            self.maps[r.tensor as usize]
                .file
                .write_all_at(s, r.offset)
                .map_err(|e| DeviceError::Os(format!("pwrite: {e}")))?;
        }
        Ok(())
    }

    #[cfg(test)]
    fn without_process_vm(self) -> Self {
        self.vm.store(false, Ordering::Relaxed);
        self
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
        if self.vm.load(Ordering::Relaxed) {
            let local = iovecs_mut(dst);
            match process_vm(self.pid, &local, &self.remote(regions), false) {
                Ok(()) => return self.still_whole(regions),
                Err(f) => {
                    if let Some(e) = self.vm_error(regions, f, false) {
                        return Err(e);
                    }
                }
            }
        }
        self.pread(regions, dst)?;
        self.still_whole(regions)
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, src.iter().map(|d| d.len()))?;
        if self.vm.load(Ordering::Relaxed) {
            match process_vm(self.pid, &iovecs(src), &self.remote(regions), true) {
                Ok(()) => return self.still_whole(regions),
                Err(f) => {
                    if let Some(e) = self.vm_error(regions, f, true) {
                        return Err(e);
                    }
                }
            }
        }
        self.pwrite(regions, src)?;
        self.still_whole(regions)
    }
}

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
        local: &[libc::iovec],
        write: bool,
    ) -> Result<(), DeviceError> {
        let remote: Vec<libc::iovec> = regions
            .iter()
            .map(|r| libc::iovec {
                // The client chose the address: an overflow is the kernel's EFAULT, not ours.
                iov_base: self.tensors[r.tensor as usize].0.wrapping_add(r.offset)
                    as *mut libc::c_void,
                iov_len: r.len as usize,
            })
            .collect();
        process_vm(self.pid, local, &remote, write).map_err(|f| match f {
            VmFail::Errno(e) => match e.raw_os_error() {
                Some(libc::ESRCH) => DeviceError::Gone(format!("process {} exited", self.pid)),
                Some(libc::EFAULT) => DeviceError::Gone(format!(
                    "a registered range is not mapped in process {} (memory unmapped?)",
                    self.pid
                )),
                _ => DeviceError::Os(format!(
                    "process_vm_{}v pid {}: {e}",
                    if write { "write" } else { "read" },
                    self.pid
                )),
            },
            VmFail::Short { done, want } => DeviceError::Gone(format!(
                "partial transfer with process {}: {done} of {want} bytes (memory unmapped?)",
                self.pid
            )),
        })
    }
}

impl KvMemory for ProcessMemory {
    fn tensor_sizes(&self) -> Vec<u64> {
        self.tensors.iter().map(|t| t.1).collect()
    }

    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, dst.iter().map(|d| d.len()))?;
        self.transfer(regions, &iovecs_mut(dst), false)
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        check(&self.tensor_sizes(), regions, src.iter().map(|d| d.len()))?;
        self.transfer(regions, &iovecs(src), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: usize, len: u64) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
        let dir = tempfile::tempdir().expect("tmp");
        let paths: Vec<_> = (0..n).map(|i| dir.path().join(format!("t{i}"))).collect();
        for p in &paths {
            File::create(p).expect("create").set_len(len).expect("size");
        }
        (dir, paths)
    }

    fn open(paths: &[std::path::PathBuf], vm: bool) -> ShmMemory {
        let refs: Vec<&Path> = paths.iter().map(std::path::PathBuf::as_path).collect();
        let m = ShmMemory::open(&refs).expect("open");
        if vm {
            m
        } else {
            m.without_process_vm()
        }
    }

    fn region(tensor: u32, offset: u64, len: u64) -> Region {
        Region {
            tensor,
            offset,
            len,
        }
    }

    #[test]
    fn shm_copies_round_trip_through_process_vm_and_through_pread_pwrite() {
        for vm in [true, false] {
            let (_d, paths) = files(2, 3 * 4096);
            let m = open(&paths, vm);
            let a: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            let b: Vec<u8> = (0..100u32).map(|i| (i * 7) as u8).collect();
            let rs = [region(1, 4000, 5000), region(0, 12188, 100)];
            m.write(&rs, &[&a, &b]).expect("write");
            let (mut x, mut y) = (vec![0u8; 5000], vec![0u8; 100]);
            m.read(&rs, &mut [&mut x, &mut y]).expect("read");
            assert_eq!((&x, &y), (&a, &b), "vm {vm}");
            // Another mapping of the same files sees the bytes.
            let mut z = vec![0u8; 100];
            open(&paths, !vm)
                .read(&rs[1..], &mut [&mut z])
                .expect("read");
            assert_eq!(z, b);
        }
    }

    #[test]
    fn shm_files_truncated_or_shrunk_make_copies_gone_not_a_fault() {
        for vm in [true, false] {
            for (shrunk, offset) in [(0, 0), (4096, 8192), (3 * 4096 - 1, 8192)] {
                let (_d, paths) = files(1, 3 * 4096);
                let m = open(&paths, vm);
                File::options()
                    .write(true)
                    .open(&paths[0])
                    .expect("open")
                    .set_len(shrunk)
                    .expect("shrink");
                let r = [region(0, offset, 4096)];
                let mut buf = vec![0u8; 4096];
                let e = m.read(&r, &mut [&mut buf]).expect_err("read");
                assert_eq!(e.code(), "INTERRUPTED", "vm {vm} {shrunk}: {e}");
                let e = m.write(&r, &[&buf]).expect_err("write");
                assert_eq!(e.code(), "INTERRUPTED", "vm {vm} {shrunk}: {e}");
                let now = std::fs::metadata(&paths[0]).expect("stat").len();
                assert_eq!(now, shrunk, "a write grew a file the client shrank");
                // Regions wholly inside what is left are still copied when the file is whole
                // again.
                File::options()
                    .write(true)
                    .open(&paths[0])
                    .expect("open")
                    .set_len(3 * 4096)
                    .expect("grow");
                m.write(&r, &[&buf]).expect("whole again");
            }
        }
    }

    #[test]
    fn fill_random_in_chunks_is_one_fill_random_of_the_tensor() {
        let len = (4 << 20) + 4096 + 8;
        let (_d, paths) = files(1, len);
        let m = open(&paths, true);
        m.fill_random(0, 42).expect("fill");
        let mut want = vec![0u8; len as usize];
        crate::prng::fill_random(&mut want, 42);
        let mut got = vec![0u8; len as usize];
        m.read(&[region(0, 0, len)], &mut [&mut got]).expect("read");
        assert!(got == want);
    }

    #[test]
    fn process_memory_unreachable_range_is_gone() {
        let len = 2 * 4096usize;
        // SAFETY: a fresh anonymous mapping with no access: nothing can be copied out of or into
        // it, and it keeps its range from being reused while the test runs.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let m = ProcessMemory::new(std::process::id() as i32, vec![(p as u64, len as u64)]);
        let mut buf = vec![0u8; 4096];
        let e = m
            .read(&[region(0, 0, 4096)], &mut [&mut buf])
            .expect_err("read");
        assert_eq!(e.code(), "INTERRUPTED", "{e}");
        let e = m
            .write(&[region(0, 4096, 4096)], &[&buf])
            .expect_err("write");
        assert_eq!(e.code(), "INTERRUPTED", "{e}");
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len) };
    }
}
