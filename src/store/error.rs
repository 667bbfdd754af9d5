//! The store's error type: every failure of the store layer, each with a stable wire code
//! ([`StoreError::code`]), and the constructors the layer uses to classify OS and engine errors
//! (a full disk is NO_SPACE, not IO_ERROR).

use crate::error::ErrorCode;
use std::path::{Path, PathBuf};

use crate::io::IoError;

/// Errors of the store layer. Each maps to a stable wire code through [`StoreError::code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Bad input from the caller.
    #[error("invalid input: {0}")]
    Validation(String),
    /// No such window.
    #[error("window {0:?} not found")]
    NotFound(String),
    /// A window of that name exists and replacing it was not asked for.
    #[error("window {0:?} already exists (delete it first, or ask to replace it)")]
    AlreadyExists(String),
    /// The window changed since the caller read its version.
    #[error("window {name:?} is at version {actual}, not {expected}: it was modified concurrently; re-read it and retry")]
    ConcurrentModification {
        /// Window name.
        name: String,
        /// Version the caller expected.
        expected: u64,
        /// Version found.
        actual: u64,
    },
    /// The write does not fit in the configured capacity; nothing was written.
    #[error("storage quota exceeded: this write needs {needed} bytes but {free} of {capacity} are free; delete unused windows to free space")]
    QuotaExceeded {
        /// Bytes the write needs.
        needed: u64,
        /// Bytes free under the capacity.
        free: u64,
        /// Configured capacity.
        capacity: u64,
    },
    /// The file system is out of space.
    #[error("the file system is full: {0}; free disk space or lower the capacity")]
    NoSpace(String),
    /// Stored bytes failed verification.
    #[error("corruption in window {window:?} block {block}: {detail}; the first {intact_blocks} blocks are intact")]
    Corruption {
        /// Window name.
        window: String,
        /// Index of the first bad block.
        block: usize,
        /// Number of leading blocks that verified.
        intact_blocks: usize,
        /// What failed.
        detail: String,
    },
    /// The log could not be recovered in the chosen mode.
    #[error("recovery failed: {0}")]
    Recovery(String),
    /// Another process holds the data directory.
    #[error("data directory {dir} is in use by process {pid}; stop it or use another directory")]
    Locked {
        /// Data directory.
        dir: PathBuf,
        /// Holder's pid (0 when unknown).
        pid: u32,
    },
    /// A disk operation failed; the affected segment is read-only from now on.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The engine error.
        #[source]
        source: IoError,
    },
    /// A file-system call failed.
    #[error("{context}: {source}")]
    Fs {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Stable upper-case error code (the wire protocol's `error.code`).
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Validation(_) => ErrorCode::Validation,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::ConcurrentModification { .. } => ErrorCode::ConcurrentModification,
            StoreError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            StoreError::NoSpace(_) => ErrorCode::NoSpace,
            StoreError::Corruption { .. } | StoreError::Recovery(_) => ErrorCode::Corruption,
            StoreError::Locked { .. } => ErrorCode::Busy,
            StoreError::Io { .. } | StoreError::Fs { .. } => ErrorCode::IoError,
        }
    }

    /// A file-system error on `path` while doing `what`; ENOSPC and EDQUOT are NO_SPACE.
    pub(super) fn from_fs(what: &str, path: &Path, e: std::io::Error) -> Self {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            return StoreError::NoSpace(format!("{what} {}: {e}", path.display()));
        }
        StoreError::Fs {
            context: format!("{what} {}", path.display()),
            source: e,
        }
    }

    /// An I/O engine error while doing `context`; a full disk is NO_SPACE.
    pub(super) fn io(context: impl Into<String>, e: IoError) -> Self {
        let context = context.into();
        if e.is_no_space() {
            return StoreError::NoSpace(format!("{context}: {e}"));
        }
        StoreError::Io { context, source: e }
    }
}

/// The error for a poisoned internal lock (`map_err(poisoned)`).
pub(super) fn poisoned<T>(_: T) -> StoreError {
    StoreError::Validation("internal lock poisoned by an earlier panic".into())
}

/// The error an injected fault (feature `failpoints`) answers.
#[cfg(feature = "failpoints")]
pub(crate) fn injected_error(site: &str) -> StoreError {
    StoreError::Io {
        context: format!("failpoint {site}"),
        source: IoError::Os {
            op: "write",
            offset: 0,
            source: crate::failpoint::injected(site),
        },
    }
}
