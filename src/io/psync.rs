//! The pread/pwrite engine: the fallback when io_uring cannot be set up, and a reference the
//! io_uring engine is tested against.

use std::os::fd::RawFd;

use super::{IoEngine, IoError, Op, OpBuf};

/// Synchronous positioned I/O, one op after another, short transfers continued.
#[derive(Debug, Default)]
pub struct PsyncEngine;

impl PsyncEngine {
    /// A new engine.
    #[must_use]
    pub fn new() -> Self {
        Self
    }
}

fn os(op: &'static str, offset: u64) -> IoError {
    IoError::Os {
        op,
        offset,
        source: std::io::Error::last_os_error(),
    }
}

/// Runs one op to completion with pread/pwrite.
pub(crate) fn run_one(op: &mut Op<'_>) -> Result<(), IoError> {
    let mut done = 0usize;
    match &mut op.buf {
        OpBuf::Write(bytes) => {
            while done < bytes.len() {
                let rest = &bytes[done..];
                // SAFETY: rest is a valid readable slice for its length.
                let n = unsafe {
                    libc::pwrite(
                        op.fd,
                        rest.as_ptr().cast(),
                        rest.len(),
                        (op.offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(os("write", op.offset + done as u64));
                }
                if n == 0 {
                    return Err(IoError::Short {
                        op: "write",
                        offset: op.offset,
                        done: done as u64,
                        wanted: bytes.len() as u64,
                    });
                }
                done += n as usize;
            }
        }
        OpBuf::Read(bytes) => {
            let wanted = bytes.len();
            while done < wanted {
                let rest = &mut bytes[done..];
                // SAFETY: rest is a valid writable slice for its length.
                let n = unsafe {
                    libc::pread(
                        op.fd,
                        rest.as_mut_ptr().cast(),
                        rest.len(),
                        (op.offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(os("read", op.offset + done as u64));
                }
                if n == 0 {
                    return Err(IoError::Short {
                        op: "read",
                        offset: op.offset,
                        done: done as u64,
                        wanted: wanted as u64,
                    });
                }
                done += n as usize;
            }
        }
    }
    Ok(())
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), IoError> {
        let mut first = None;
        for op in ops.iter_mut() {
            if let Err(e) = run_one(op) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn fdatasync(&self, fd: RawFd) -> Result<(), IoError> {
        loop {
            // SAFETY: fdatasync on a caller-owned descriptor has no memory effects.
            let r = unsafe { libc::fdatasync(fd) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(IoError::Os {
                    op: "fdatasync",
                    offset: 0,
                    source: e,
                });
            }
        }
    }
}
