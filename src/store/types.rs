//! The store's public value types: its configuration, what a freeze describes
//! ([`WindowSpec`], [`BlockDesc`], [`Replace`], [`BlockImage`]), what the catalog knows of a
//! window ([`WindowInfo`]), and the figures of [`Store::stats`](super::Store::stats).

use std::path::PathBuf;

use serde::Serialize;

use super::RecoveryMode;
use crate::io::EngineKind;

/// Store configuration.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    /// Segment file size; default 1 GiB. A multiple of 4 KiB, at least 64 KiB.
    pub segment_size: u64,
    /// Capacity: the most bytes of records (live or not yet reclaimed) the log may hold.
    pub capacity: u64,
    /// I/O engine.
    pub engine: EngineKind,
    /// io_uring queue depth; default 32.
    pub queue_depth: u32,
    /// What recovery tolerates.
    pub recovery: RecoveryMode,
    /// Read segment checkpoints at open instead of every record header where they are valid
    /// (docs/FORMAT.md "Checkpoints"); default true. `cwm fsck` turns it off (a full scan).
    pub use_checkpoints: bool,
    /// Files of compacted segments kept to write new segments into (an overwrite costs less
    /// than filling a fresh preallocated file). They are disk space outside `capacity`.
    /// Default 4; 0 removes every compacted segment's file.
    pub recycle_segments: usize,
    /// Bytes a reused file's record limit runs ahead of its records (each raise rewrites and
    /// syncs both header pages; recovery reads at most this far past the last record of a
    /// reused file); default 64 MiB.
    pub limit_step: u64,
}

impl StoreConfig {
    /// Defaults for `dir`: 1 GiB segments, unlimited capacity, io_uring at QD 32, tolerate-tail,
    /// up to 4 segment files kept for reuse.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_size: 1 << 30,
            capacity: u64::MAX,
            engine: EngineKind::Uring,
            queue_depth: 32,
            recovery: RecoveryMode::TolerateTail,
            use_checkpoints: true,
            recycle_segments: 4,
            limit_step: 64 << 20,
        }
    }
}

/// What the catalog knows of a window without reading its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowInfo {
    /// Name.
    pub name: String,
    /// Version under this name (from 1).
    pub version: u64,
    /// Sequence number of its manifest record (orders windows; not wall time).
    pub seq: u64,
    /// Session it was frozen from.
    pub session: String,
    /// Namespace of its keys.
    pub namespace: String,
    /// Number of tokens.
    pub num_tokens: u64,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Sum of block payload bytes.
    pub bytes: u64,
    /// Creation time, ms since the Unix epoch, UTC.
    pub created_unix_ms: i64,
    /// Whether it may be evicted (unnamed) or not (pinned).
    pub class: Class,
    /// When it expires (ms since the Unix epoch, UTC); `None`: never.
    pub expires_unix_ms: Option<i64>,
    /// Last thaw from it (ms since the Unix epoch; its creation until then). Kept in memory:
    /// after a restart it starts again from the creation time.
    pub last_use_unix_ms: i64,
    /// Thaws from it since the store was opened.
    pub hits: u64,
    /// The request that froze it, if it carried an idempotency key (its manifest's
    /// [`origin`](super::Manifest::origin)); not on the wire.
    #[serde(skip)]
    pub origin: Option<u128>,
}

/// Whether a window may be evicted under a capacity budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Kept until deleted (or its TTL passes); never evicted. Named windows, by default.
    #[default]
    Pinned,
    /// Evictable: automatically saved data, and windows unpinned on purpose.
    Unnamed,
}

impl Class {
    /// The name on the wire and in listings.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Pinned => "pinned",
            Class::Unnamed => "unnamed",
        }
    }
}

/// How long a window is kept: its class and its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Retention {
    /// Pinned or evictable.
    pub class: Class,
    /// Expiry, ms since the Unix epoch, UTC; `None`: never.
    pub expires_unix_ms: Option<i64>,
}

impl Retention {
    /// Whether it has expired at `now_ms`.
    #[must_use]
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_unix_ms.is_some_and(|e| e <= now_ms)
    }
}

/// How a freeze treats an existing window of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replace {
    /// Refuse with ALREADY_EXISTS.
    #[default]
    No,
    /// Replace whatever version is there.
    Any,
    /// Replace only if the current version is this one (CONCURRENT_MODIFICATION otherwise).
    IfVersion(u64),
}

/// A block to be stored: its key and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDesc {
    /// 128-bit block key (computed by the caller).
    pub key: u128,
    /// Payload bytes.
    pub len: u64,
}

/// Everything a freeze tells the store about a window, except block bytes.
#[derive(Debug, Clone, Default)]
pub struct WindowSpec {
    /// Window name (validated and NFKC-normalised by the store).
    pub name: String,
    /// Session id.
    pub session: String,
    /// Namespace (model id + layout fingerprint + salt).
    pub namespace: String,
    /// Opaque layout descriptor.
    pub layout: Vec<u8>,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Ordered blocks.
    pub blocks: Vec<BlockDesc>,
    /// What to do when the name exists.
    pub replace: Replace,
    /// Class and expiry (default: pinned, never expires).
    pub retention: Retention,
    /// The request freezing it, when it carries an idempotency key (see
    /// [`Manifest::origin`](super::Manifest::origin)).
    pub origin: Option<u128>,
}

/// A block record image handed to
/// [`WindowWriter::write_blocks`](super::WindowWriter::write_blocks).
pub struct BlockImage<'b> {
    /// Index of the block in the window.
    pub index: usize,
    /// `record_len(len)` bytes, 4 KiB-aligned, payload at `payload_offset(len)`; the store
    /// fills in the header.
    pub image: &'b mut [u8],
    /// Payload checksum when the caller already computed it.
    pub checksum: Option<u64>,
}

/// Per-segment figures.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentStats {
    /// Segment id.
    pub id: u64,
    /// Bytes appended (records and header page).
    pub frontier: u64,
    /// Bytes still referenced.
    pub live: u64,
    /// Read-only after an I/O failure.
    pub failed: bool,
    /// Written into a reused file (a compacted segment's): its record limit (0: a new file).
    pub record_limit: u64,
}

/// Store-wide figures.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStats {
    /// Configured capacity.
    pub capacity: u64,
    /// Bytes of records in the log (live and garbage).
    pub used_bytes: u64,
    /// Bytes of records still referenced.
    pub live_bytes: u64,
    /// `capacity - used_bytes`.
    pub free_bytes: u64,
    /// Of `free_bytes`, promised to windows being written or captured and waiting for the log.
    pub reserved_bytes: u64,
    /// Visible windows.
    pub windows: u64,
    /// Distinct stored blocks.
    pub blocks: u64,
    /// Segments.
    pub segments: Vec<SegmentStats>,
    /// Files of compacted segments kept for new segments to be written into (disk space
    /// outside `capacity`).
    pub free_segment_files: u64,
    /// I/O engine in use.
    pub engine: &'static str,
}
