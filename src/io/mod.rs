//! The I/O engine layer: positioned reads, writes and `fdatasync` on raw file descriptors,
//! batched, with every transfer finished in full or reported as an error.
//!
//! Two engines sit behind [`IoEngine`]: [`uring::UringEngine`] (io_uring on one dedicated
//! thread, fixed buffers, a configurable queue depth; the default) and [`psync::PsyncEngine`]
//! (pread/pwrite; the fallback when io_uring cannot be set up). [`fault::FaultEngine`] wraps
//! either to inject ENOSPC, EIO, short writes and fsync failures in tests. This layer knows
//! nothing of records or windows.

pub mod buf;
pub mod fault;
pub mod psync;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

pub use buf::{align_up, AlignedBuf, ALIGN};

/// Errors of the I/O engine layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The operating system refused an operation.
    #[error("{op} at offset {offset} failed: {source}")]
    Os {
        /// `read`, `write` or `fdatasync`.
        op: &'static str,
        /// File offset of the transfer.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A transfer stopped early and could not be finished (end of file, or a device that
    /// accepted zero bytes).
    #[error("short {op} at offset {offset}: {done} of {wanted} bytes transferred")]
    Short {
        /// `read` or `write`.
        op: &'static str,
        /// File offset where the transfer began.
        offset: u64,
        /// Bytes transferred before it stopped.
        done: u64,
        /// Bytes asked for.
        wanted: u64,
    },
    /// The engine's thread is gone (it panicked or was shut down).
    #[error("the I/O engine is not running")]
    EngineGone,
}

impl IoError {
    /// The raw OS error number, when there is one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            IoError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the error says the device is out of space.
    #[must_use]
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(self, IoError::Short { op: "write", .. })
    }
}

/// What a buffer of an [`Op`] is used for.
pub enum OpBuf<'a> {
    /// Write these bytes.
    Write(&'a [u8]),
    /// Read into these bytes, filling them completely.
    Read(&'a mut [u8]),
}

/// One positioned transfer. With O_DIRECT files, buffer address, length and offset must all
/// be multiples of 4 KiB.
pub struct Op<'a> {
    /// Open file descriptor.
    pub fd: RawFd,
    /// File offset.
    pub offset: u64,
    /// Source or destination bytes.
    pub buf: OpBuf<'a>,
}

impl<'a> Op<'a> {
    /// A write of `bytes` at `offset`.
    #[must_use]
    pub fn write(fd: RawFd, offset: u64, bytes: &'a [u8]) -> Self {
        Self {
            fd,
            offset,
            buf: OpBuf::Write(bytes),
        }
    }

    /// A read filling `bytes` from `offset`.
    #[must_use]
    pub fn read(fd: RawFd, offset: u64, bytes: &'a mut [u8]) -> Self {
        Self {
            fd,
            offset,
            buf: OpBuf::Read(bytes),
        }
    }
}

/// A batched, blocking I/O engine. Implementations run the ops of one call concurrently (up to
/// their queue depth) and return only when every op has finished: in full, or with an error.
/// A short transfer is continued until complete or reported; it is never taken as success.
pub trait IoEngine: Send + Sync {
    /// Short name for logs and benchmarks (`io_uring`, `psync`, …).
    fn name(&self) -> &'static str;

    /// Runs every op; returns the first error seen after all ops have stopped.
    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), IoError>;

    /// `fdatasync(fd)`.
    fn fdatasync(&self, fd: RawFd) -> Result<(), IoError>;

    /// Registers `region` so transfers inside it can use the engine's fixed-buffer path (zero
    /// page pinning per op). Returns false when the engine has no such path or the kernel
    /// refused; transfers then still work, without it.
    fn register_fixed(&self, region: Arc<AlignedBuf>) -> bool {
        let _ = region;
        false
    }

    /// Convenience: one write.
    fn write_all_at(&self, fd: RawFd, offset: u64, bytes: &[u8]) -> Result<(), IoError> {
        self.run(&mut [Op::write(fd, offset, bytes)])
    }

    /// Convenience: one read.
    fn read_exact_at(&self, fd: RawFd, offset: u64, bytes: &mut [u8]) -> Result<(), IoError> {
        self.run(&mut [Op::read(fd, offset, bytes)])
    }
}

/// Which engine to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// io_uring, falling back to psync when it cannot be set up.
    Uring,
    /// pread/pwrite.
    Psync,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "psync" | "pread" => Ok(EngineKind::Psync),
            other => Err(format!("unknown I/O engine {other:?}: use uring or psync")),
        }
    }
}

/// Builds an engine. io_uring setup failures fall back to psync with one log line.
#[must_use]
pub fn build_engine(kind: EngineKind, queue_depth: u32) -> Arc<dyn IoEngine> {
    match kind {
        EngineKind::Psync => Arc::new(psync::PsyncEngine::new()),
        EngineKind::Uring => match uring::UringEngine::new(queue_depth) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                crate::log::warn(&format!(
                    "io_uring unavailable ({e}); falling back to the pread/pwrite engine"
                ));
                Arc::new(psync::PsyncEngine::new())
            }
        },
    }
}

/// Opens (or creates) a file for O_DIRECT I/O. When the file system refuses O_DIRECT (tmpfs,
/// some overlays) the file is opened buffered instead and `false` is returned; the caller still
/// makes data durable with `fdatasync`.
pub fn open_direct(path: &Path, create: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create);
    let direct = o.clone().custom_flags(libc::O_DIRECT).open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                crate::log::warn(&format!(
                    "O_DIRECT refused by the file system under {}; using buffered I/O with fdatasync",
                    path.parent().unwrap_or(path).display()
                ));
            });
            Ok((o.open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// `fsync` of a directory, so that file creations and deletions in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
