//! The durable block log: segments of checksummed records, an in-memory index rebuilt at open,
//! the window commit protocol, deletes, capacity, and verified reads.
//!
//! Write path of one window ([`Store::begin_window`] → [`WindowWriter::write_blocks`] →
//! [`WindowWriter::commit`]): the capacity check happens before any byte is written; block
//! records not already in the log are appended (blocks present are referenced, not rewritten);
//! every touched segment is `fdatasync`ed; then the manifest record is appended and
//! `fdatasync`ed; only then does the window become visible. One writer appends at a time (the
//! appender lock), so a failed write can never leave a hole before a later durable record.
//!
//! The store is its own catalog: manifests and tombstones in the log are the truth, and
//! [`Store::open`] rebuilds windows, the block index and reference counts from them
//! (docs/FORMAT.md argues why there is no second database).

mod compact;
pub mod format;
pub mod manifest;
pub mod name;
mod recovery;
mod segment;
mod verify;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::checksum::payload_checksum;

use crate::io::{self, AlignedBuf, EngineKind, IoEngine, IoError, Op};
pub use compact::{CompactOptions, CompactProgress, CompactReport};
use format::{
    payload_offset, record_len, stored_len, RecordHeader, RecordKind, PAGE, SEGMENT_HEADER_LEN,
};
pub use manifest::{BlockRef, Manifest, Tombstone};
pub(crate) use recovery::set_aside_invalid_segments;
pub use recovery::{RecoveryMode, RecoveryReport};
use segment::Segment;
pub use verify::LogProblem;

/// Errors of the store layer. Each maps to a stable wire code through [`StoreError::code`].
#[derive(Debug, thiserror::Error)]
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
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Validation(_) => "VALIDATION",
            StoreError::NotFound(_) => "NOT_FOUND",
            StoreError::AlreadyExists(_) => "ALREADY_EXISTS",
            StoreError::ConcurrentModification { .. } => "CONCURRENT_MODIFICATION",
            StoreError::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            StoreError::NoSpace(_) => "NO_SPACE",
            StoreError::Corruption { .. } | StoreError::Recovery(_) => "CORRUPTION",
            StoreError::Locked { .. } => "BUSY",
            StoreError::Io { .. } | StoreError::Fs { .. } => "IO_ERROR",
        }
    }

    fn from_fs(what: &str, path: &Path, e: std::io::Error) -> Self {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            return StoreError::NoSpace(format!("{what} {}: {e}", path.display()));
        }
        StoreError::Fs {
            context: format!("{what} {}", path.display()),
            source: e,
        }
    }

    fn io(context: impl Into<String>, e: IoError) -> Self {
        let context = context.into();
        if e.is_no_space() {
            return StoreError::NoSpace(format!("{context}: {e}"));
        }
        StoreError::Io { context, source: e }
    }
}

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
}

impl StoreConfig {
    /// Defaults for `dir`: 1 GiB segments, unlimited capacity, io_uring at QD 32, tolerate-tail.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_size: 1 << 30,
            capacity: u64::MAX,
            engine: EngineKind::Uring,
            queue_depth: 32,
            recovery: RecoveryMode::TolerateTail,
        }
    }
}

/// Where a record lives.
#[derive(Clone)]
pub(crate) struct Loc {
    pub seg: Arc<Segment>,
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone)]
pub(crate) struct BlockEntry {
    /// Where the block's record is; `None` when recovery found the window's manifest but not
    /// this block (lost to damage): the windows referring to it thaw up to it, and the next
    /// freeze that holds the block writes it again (it is never deduplicated against).
    pub loc: Option<Loc>,
    pub payload_len: u64,
    pub checksum: u64,
    pub refs: u64,
}

#[derive(Clone)]
pub(crate) struct WindowEntry {
    pub info: WindowInfo,
    pub manifest: Loc,
    pub keys: Vec<u128>,
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
}

#[derive(Default)]
pub(crate) struct State {
    /// Newest catalog record per key: (sequence number, payload, where it is).
    pub meta: HashMap<u128, (u64, Vec<u8>, Loc)>,
    /// Per window-name key, the sequence number of the newest manifest or tombstone written
    /// for it (the event recovery resolves the name to; compaction keeps it while needed).
    pub names: HashMap<u128, u64>,
    /// Per window-name key whose newest event is a tombstone: where that tombstone is. Only
    /// these tombstones count as live bytes.
    pub tombs: HashMap<u128, Loc>,
    /// Windows whose newest manifest is not exposed because a block is missing (recovery's
    /// `incomplete_windows`): name -> (version, manifest sequence number).
    pub incomplete: BTreeMap<String, (u64, u64)>,
    pub blocks: HashMap<u128, BlockEntry>,
    pub windows: BTreeMap<String, WindowEntry>,
    pub segments: BTreeMap<u64, Arc<Segment>>,
}

pub(crate) struct Appender {
    pub active: Option<Arc<Segment>>,
    pub next_seq: u64,
    pub next_segment: u64,
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
}

/// A block record image handed to [`WindowWriter::write_blocks`].
pub struct BlockImage<'b> {
    /// Index of the block in the window.
    pub index: usize,
    /// `record_len(len)` bytes, 4 KiB-aligned, payload at `payload_offset(len)`; the store
    /// fills in the header.
    pub image: &'b mut [u8],
    /// Payload checksum when the caller already computed it.
    pub checksum: Option<u64>,
}

/// What [`Store::scrub_catalog`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogScrub {
    /// Catalog records and tombstones verified.
    pub records: u64,
    /// Catalog records that did not verify and were written again from memory.
    pub rewritten: u64,
    /// Tombstones that did not verify (the window they deleted may come back at the next
    /// open).
    pub bad_tombstones: Vec<String>,
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
    /// I/O engine in use.
    pub engine: &'static str,
}

/// The block log. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    cfg: StoreConfig,
    engine: Arc<dyn IoEngine>,
    state: RwLock<State>,
    appender: Mutex<Appender>,
    used: AtomicU64,
    capacity: AtomicU64,
    /// Log bytes promised but not yet in `used`: windows being written (their exact need,
    /// until commit or drop) and windows captured before they are written ([`Reservation`]).
    reserved: AtomicU64,
    /// One compaction at a time (the background thread, the op, repair).
    compacting: Mutex<()>,
    _lock: File,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Validation("internal lock poisoned by an earlier panic".into())
}

/// Size of the segment made for one-page records when a full-size one does not fit on the
/// file system.
const SMALL_SEGMENT: u64 = 16 * PAGE;

/// The 128-bit key under which a window's manifests and tombstones are written.
#[must_use]
pub fn name_key(name: &str) -> u128 {
    xxh3_128(name.as_bytes())
}

impl Store {
    /// Opens (or creates) the store in `cfg.dir` with the engine the config names.
    pub fn open(cfg: StoreConfig) -> Result<(Store, RecoveryReport), StoreError> {
        let engine = io::build_engine(cfg.engine, cfg.queue_depth);
        Self::open_with_engine(cfg, engine)
    }

    /// Opens the store with a caller-built engine (tests wrap engines to inject faults).
    pub fn open_with_engine(
        cfg: StoreConfig,
        engine: Arc<dyn IoEngine>,
    ) -> Result<(Store, RecoveryReport), StoreError> {
        if cfg.segment_size < 16 * PAGE || cfg.segment_size % PAGE != 0 {
            return Err(StoreError::Validation(format!(
                "segment size {} must be a multiple of 4096 and at least 65536",
                cfg.segment_size
            )));
        }
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| StoreError::from_fs("create data directory", &cfg.dir, e))?;
        let lock = lock_dir(&cfg.dir)?;
        let (state, appender, used, report) = recovery::recover(&cfg, engine.as_ref())?;
        let store = Store {
            capacity: AtomicU64::new(cfg.capacity),
            reserved: AtomicU64::new(0),
            cfg,
            engine,
            state: RwLock::new(state),
            appender: Mutex::new(appender),
            used: AtomicU64::new(used),
            compacting: Mutex::new(()),
            _lock: lock,
        };
        Ok((store, report))
    }

    /// The data directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The I/O engine.
    #[must_use]
    pub fn engine(&self) -> &Arc<dyn IoEngine> {
        &self.engine
    }

    /// Changes the capacity (takes effect for the next write).
    pub fn set_capacity(&self, capacity: u64) {
        self.capacity.store(capacity, Ordering::SeqCst);
    }

    /// Figures for `stat`, metrics and tests.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        let capacity = self.capacity.load(Ordering::SeqCst);
        let used = self.used.load(Ordering::SeqCst);
        let segments: Vec<SegmentStats> = st
            .segments
            .values()
            .map(|s| SegmentStats {
                id: s.id,
                frontier: s.frontier(),
                live: s.live.load(Ordering::SeqCst),
                failed: s.failed.load(Ordering::SeqCst),
            })
            .collect();
        Ok(StoreStats {
            capacity,
            used_bytes: used,
            live_bytes: segments.iter().map(|s| s.live).sum(),
            free_bytes: capacity.saturating_sub(used),
            reserved_bytes: self.reserved.load(Ordering::SeqCst),
            windows: st.windows.len() as u64,
            blocks: st.blocks.len() as u64,
            segments,
            engine: self.engine.name(),
        })
    }

    /// Visible windows, ordered by name.
    pub fn list(&self) -> Result<Vec<WindowInfo>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        Ok(st.windows.values().map(|w| w.info.clone()).collect())
    }

    /// A page of windows (by name), optionally of one session, and how many match in all.
    pub fn list_page(
        &self,
        offset: usize,
        limit: usize,
        session: Option<&str>,
    ) -> Result<(Vec<WindowInfo>, usize), StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        let matching = st
            .windows
            .values()
            .filter(|w| session.is_none_or(|s| w.info.session == s));
        let mut total = 0usize;
        let mut page = Vec::with_capacity(limit.min(1024));
        for w in matching {
            if total >= offset && page.len() < limit {
                page.push(w.info.clone());
            }
            total += 1;
        }
        Ok((page, total))
    }

    /// One window's catalog entry.
    pub fn get(&self, name: &str) -> Result<WindowInfo, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let st = self.state.read().map_err(poisoned)?;
        st.windows
            .get(&name)
            .map(|w| w.info.clone())
            .ok_or(StoreError::NotFound(name))
    }

    /// True when a block with this key is stored (and referenced), and not lost to damage.
    pub fn contains_block(&self, key: u128) -> Result<bool, StoreError> {
        Ok(self
            .state
            .read()
            .map_err(poisoned)?
            .blocks
            .get(&key)
            .is_some_and(|b| b.loc.is_some()))
    }

    /// The window holding the longest prefix of these (chained) block keys, and how many
    /// leading blocks it holds; the newest such window on a tie. `None` when no window starts
    /// with `keys[0]`. With `only`, just that window is considered.
    pub fn longest_prefix(
        &self,
        keys: &[u128],
        only: Option<&str>,
    ) -> Result<Option<(WindowInfo, usize)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        let mut best: Option<(&WindowInfo, usize)> = None;
        let only = match only {
            Some(n) => Some(name::validate_name(n).map_err(StoreError::Validation)?),
            None => None,
        };
        let candidates: Box<dyn Iterator<Item = &WindowEntry>> = match &only {
            Some(n) => Box::new(st.windows.get(n).into_iter()),
            None => Box::new(st.windows.values()),
        };
        for w in candidates {
            // A block lost to damage ends the usable prefix.
            let n = w
                .keys
                .iter()
                .zip(keys)
                .take_while(|(a, b)| a == b && st.blocks.get(a).is_some_and(|e| e.loc.is_some()))
                .count();
            let better = match best {
                None => n > 0,
                Some((b, bn)) => n > bn || (n == bn && w.info.seq > b.seq),
            };
            if better {
                best = Some((&w.info, n));
            }
        }
        Ok(best.map(|(i, n)| (i.clone(), n)))
    }

    /// Reference count of a stored block (0 when absent).
    pub fn block_refs(&self, key: u128) -> Result<u64, StoreError> {
        Ok(self
            .state
            .read()
            .map_err(poisoned)?
            .blocks
            .get(&key)
            .map_or(0, |b| b.refs))
    }

    fn lock_appender(&self) -> Result<MutexGuard<'_, Appender>, StoreError> {
        self.appender.lock().map_err(poisoned)
    }

    /// Bytes a window needs in the log given the current index: new block records, the
    /// manifest record and any segment headers rotation adds.
    fn plan_bytes(
        &self,
        app: &Appender,
        st: &State,
        spec: &WindowSpec,
        manifest_len: u64,
    ) -> Result<(u64, Vec<bool>), StoreError> {
        let seg_room = self.cfg.segment_size - SEGMENT_HEADER_LEN;
        let mut writes = Vec::with_capacity(spec.blocks.len());
        let mut seen = std::collections::HashSet::new();
        let mut lens = Vec::new();
        for b in &spec.blocks {
            let stored = st.blocks.get(&b.key).is_some_and(|e| e.loc.is_some());
            let w = !stored && seen.insert(b.key);
            writes.push(w);
            if w {
                lens.push(record_len(b.len));
            }
        }
        lens.push(stored_len(RecordKind::Manifest, manifest_len));
        // Simulate appends, rotation included.
        let (mut frontier, mut size) = match &app.active {
            Some(s) if !s.sealed.load(Ordering::SeqCst) => (s.frontier(), s.size),
            _ => (self.cfg.segment_size, self.cfg.segment_size),
        };
        let mut needed = 0u64;
        for l in lens {
            if l > seg_room {
                return Err(StoreError::Validation(format!(
                    "a record of {l} bytes does not fit in a segment of {} bytes; raise segment_size",
                    self.cfg.segment_size
                )));
            }
            if frontier + l > size {
                frontier = SEGMENT_HEADER_LEN;
                size = self.cfg.segment_size;
                needed += SEGMENT_HEADER_LEN;
            }
            frontier += l;
            needed += l;
        }
        Ok((needed, writes))
    }

    /// Starts writing a window: validates the spec, checks capacity (before any byte is
    /// written), and takes the appender lock until commit or drop.
    pub fn begin_window(&self, spec: WindowSpec) -> Result<WindowWriter<'_>, StoreError> {
        self.begin_inner(spec, 0)
    }

    /// [`Store::begin_window`] for a writer holding `own` reserved bytes, which its own need
    /// replaces.
    fn begin_inner(&self, mut spec: WindowSpec, own: u64) -> Result<WindowWriter<'_>, StoreError> {
        validate_spec(&mut spec)?;
        let app = self.lock_appender()?;
        let st = self.state.read().map_err(poisoned)?;
        let existing = check_replace(&st, &spec)?;
        let manifest_len = manifest_payload_len(&spec);
        let (needed, writes) = self.plan_bytes(&app, &st, &spec, manifest_len)?;
        drop(st);
        let capacity = self.capacity.load(Ordering::SeqCst);
        // The writer holds its exact need until commit or drop; `own` is handed over. Room
        // promised to windows captured and waiting for the log is not free (compare and swap:
        // `reserve` takes room without the appender lock).
        let mut cur = self.reserved.load(Ordering::SeqCst);
        loop {
            let used = self.used.load(Ordering::SeqCst);
            let others = cur.saturating_sub(own);
            let free = capacity.saturating_sub(used).saturating_sub(others);
            // A reservation is honoured even if writers that take no reservation (catalog
            // records, tombstones, compaction copies) took some of its room meanwhile: the
            // engine was told `captured` on its strength. Capacity is then exceeded by at most
            // what they took.
            if needed > free && !(own > 0 && needed <= own) {
                return Err(StoreError::QuotaExceeded {
                    needed,
                    free,
                    capacity,
                });
            }
            let next = cur.saturating_sub(own) + needed;
            match self
                .reserved
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let n = spec.blocks.len();
        Ok(WindowWriter {
            store: self,
            hold: needed,
            app,
            version: existing.map_or(1, |v| v + 1),
            replaces: existing,
            spec,
            writes,
            written: vec![None; n],
            touched: Vec::new(),
            failed: None,
        })
    }

    /// For a window captured before it is written: the refusals [`Store::begin_window`]
    /// would give now (bad name, no blocks, ALREADY_EXISTS, a version mismatch), without
    /// waiting for the appender lock, then a reservation of log room for every record the
    /// window could need — all its blocks, deduplicated or not, its manifest, and a segment
    /// header per possible rotation — so that once the engine is told `captured`, the log
    /// cannot refuse it for room. `Ok(None)`: the log might not hold that bound; the caller
    /// streams instead and `begin_window` decides exactly.
    pub fn reserve(&self, spec: &WindowSpec) -> Result<Option<Reservation<'_>>, StoreError> {
        let mut v = WindowSpec {
            name: spec.name.clone(),
            blocks: spec.blocks.clone(),
            replace: spec.replace,
            ..Default::default()
        };
        validate_spec(&mut v)?;
        {
            let st = self.state.read().map_err(poisoned)?;
            check_replace(&st, &v)?;
        }
        // The manifest holds the normalised name (NFKC may lengthen it).
        let manifest = manifest_payload_len(spec) - spec.name.len() as u64 + v.name.len() as u64;
        let lens: Vec<u64> = spec
            .blocks
            .iter()
            .map(|b| record_len(b.len))
            .chain([stored_len(RecordKind::Manifest, manifest)])
            .collect();
        let total: u64 = lens.iter().sum();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let room = (self.cfg.segment_size - SEGMENT_HEADER_LEN)
            .saturating_sub(longest)
            .max(1);
        let rotations = (lens.len() as u64).min(1 + total / room);
        let bound = total + SEGMENT_HEADER_LEN * rotations;
        let capacity = self.capacity.load(Ordering::SeqCst);
        let mut cur = self.reserved.load(Ordering::SeqCst);
        loop {
            let used = self.used.load(Ordering::SeqCst);
            if used.saturating_add(cur).saturating_add(bound) > capacity {
                return Ok(None);
            }
            match self.reserved.compare_exchange(
                cur,
                cur + bound,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    return Ok(Some(Reservation {
                        store: self,
                        bytes: bound,
                    }))
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Appends one record image (header filled in here) and returns where it went. Rotates
    /// to a new segment when the active one is full, sealed or failed. A metadata record is
    /// written twice, back to back (`image` holds room for both: [`stored_len`] bytes); its
    /// [`Loc`] covers both copies.
    fn append(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload_len: u64,
        checksum: u64,
        image: &mut [u8],
    ) -> Result<Loc, StoreError> {
        let len = stored_len(kind, payload_len);
        let one = record_len(payload_len) as usize;
        if image.len() < len as usize {
            return Err(StoreError::Validation(format!(
                "record image of {} bytes for a {kind:?} record of {len}",
                image.len()
            )));
        }
        let seg = self.segment_for(app, len)?;
        let offset = seg.frontier.fetch_add(len, Ordering::SeqCst);
        self.used.fetch_add(len, Ordering::SeqCst);
        let seq = app.next_seq;
        app.next_seq += 1;
        let h = RecordHeader {
            kind,
            seq,
            key,
            payload_len,
            payload_xxh3: checksum,
            segment_id: seg.id,
            copied: false,
            ditto: false,
        };
        let po = payload_offset(payload_len);
        h.encode(seg.generation, &mut image[..PAGE as usize]);
        if po == PAGE as usize {
            image[format::RECORD_HEADER_LEN..PAGE as usize].fill(0);
            // The padding after the payload, up to the record's last page end: whatever an
            // earlier use of the staging slot left there must not reach the disk.
            let end = (len as usize).min(image.len());
            if let Some(pad) = image.get_mut(po + payload_len as usize..end) {
                pad.fill(0);
            }
        } else {
            image[po + payload_len as usize..PAGE as usize].fill(0);
        }
        if format::copies(kind) == 2 {
            let (first, second) = image.split_at_mut(one);
            second[..one].copy_from_slice(first);
            RecordHeader { ditto: true, ..h }.encode(seg.generation, &mut second[..one]);
        }
        Ok(Loc { seg, offset, len })
    }

    fn segment_for(&self, app: &mut Appender, len: u64) -> Result<Arc<Segment>, StoreError> {
        if let Some(s) = &app.active {
            if !s.sealed.load(Ordering::SeqCst) && s.frontier() + len <= s.size {
                return Ok(s.clone());
            }
            s.seal_recorded(self.engine.as_ref());
        }
        let id = app.next_segment;
        crate::fail_point!("segment-rotate", a => {
            if a == crate::failpoint::Action::ShortWrite {
                // The file is created and preallocated but its header page never arrives
                // (what a crash inside Segment::create leaves behind).
                let path = self.cfg.dir.join(segment::file_name(id));
                if let Ok((f, _)) = io::open_direct(&path, true) {
                    let _ = segment::preallocate(&f, self.cfg.segment_size);
                }
            }
            return Err(injected_error("segment-rotate"));
        });
        // A record larger than a segment gets a segment of its own size: recovery scans a
        // segment only up to the size in its header, so a record written past it would be
        // acknowledged and then cut off as a torn tail.
        let size = self
            .cfg
            .segment_size
            .max((SEGMENT_HEADER_LEN + len).next_multiple_of(PAGE));
        let seg = match Segment::create(&self.cfg.dir, id, size, self.engine.as_ref()) {
            Ok(s) => s,
            // The file system is full (EC-052). A one-page record (a tombstone, a catalog
            // record) still gets a small segment, so deleting windows to free space keeps
            // working on a full disk.
            Err(StoreError::NoSpace(m)) if len <= 2 * PAGE => {
                crate::log::warn(&format!(
                    "{m}; segment {id} created with {} bytes only",
                    SMALL_SEGMENT
                ));
                Segment::create(&self.cfg.dir, id, SMALL_SEGMENT, self.engine.as_ref())
                    .or_else(|_| {
                        // Room for this one record only.
                        let least = SEGMENT_HEADER_LEN + len;
                        Segment::create(&self.cfg.dir, id, least, self.engine.as_ref())
                    })
                    .map_err(|_| StoreError::NoSpace(m))?
            }
            Err(e) => return Err(e),
        };
        let seg = Arc::new(seg);
        app.next_segment += 1;
        self.used.fetch_add(SEGMENT_HEADER_LEN, Ordering::SeqCst);
        self.state
            .write()
            .map_err(poisoned)?
            .segments
            .insert(id, seg.clone());
        app.active = Some(seg.clone());
        Ok(seg)
    }

    /// After a failed write or sync: marks each segment of `locs` failed (read-only) and cuts
    /// it back to before the first of these records, so that what failed cannot reappear at
    /// the next open. Only records appended last (under the appender lock) are ever passed.
    pub(crate) fn cut_back<'l>(&self, locs: impl IntoIterator<Item = &'l Loc>) {
        let mut cut: Vec<(Arc<Segment>, u64)> = Vec::new();
        for l in locs {
            match cut.iter_mut().find(|(s, _)| s.id == l.seg.id) {
                Some((_, o)) => *o = (*o).min(l.offset),
                None => cut.push((l.seg.clone(), l.offset)),
            }
        }
        for (seg, offset) in cut {
            seg.failed.store(true, Ordering::SeqCst);
            seg.sealed.store(true, Ordering::SeqCst);
            let f = seg.frontier.fetch_min(offset, Ordering::SeqCst);
            if f > offset {
                self.used.fetch_sub(f - offset, Ordering::SeqCst);
            }
            // Best effort: on a dying device the truncation may fail too; recovery then finds
            // the record torn or whole (an unacknowledged outcome, either way consistent).
            let _ = seg.file.set_len(offset.max(seg.first_record));
            let _ = seg.file.sync_all();
        }
    }

    fn sync(&self, seg: &Segment) -> Result<(), StoreError> {
        if seg.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                context: format!("syncing segment {}", seg.id),
                source: IoError::Os {
                    op: "fdatasync",
                    offset: 0,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                },
            });
        }
        crate::fail_point!("fdatasync", _a => {
            seg.fail();
            return Err(injected_error("fdatasync"));
        });
        self.engine.fdatasync(seg.fd()).map_err(|e| {
            // Never retried as if nothing happened: the segment becomes read-only.
            seg.fail();
            crate::log::warn(&format!(
                "fdatasync of {} failed ({e}); the segment is now read-only",
                seg.path.display()
            ));
            StoreError::io(format!("syncing segment {}", seg.id), e)
        })
    }

    /// Opens a window for reading: reads and verifies its manifest, snapshots block locations.
    pub fn open_window(&self, name: &str) -> Result<WindowReader, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let (entry, locs) = {
            let st = self.state.read().map_err(poisoned)?;
            let w = st
                .windows
                .get(&name)
                .ok_or_else(|| StoreError::NotFound(name.clone()))?
                .clone();
            // A block lost to damage (None) fails verification when it is read: the window
            // thaws up to it.
            let locs: Vec<Option<Loc>> = w
                .keys
                .iter()
                .map(|k| st.blocks.get(k).and_then(|b| b.loc.clone()))
                .collect();
            (w, locs)
        };
        let mut image = AlignedBuf::zeroed(entry.manifest.len as usize);
        self.engine
            .read_exact_at(entry.manifest.seg.fd(), entry.manifest.offset, &mut image)
            .map_err(|e| match e {
                // The segment ends before a record the index holds (the file was truncated), or
                // the medium cannot return it: the window is damaged, as an unreadable block
                // would make it.
                IoError::Short { op: "read", .. } => StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest cut short (the segment file was truncated?): {e}"),
                },
                IoError::Os { .. } if e.errno() == Some(libc::EIO) => StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest unreadable: {e}"),
                },
                e => StoreError::io(format!("reading the manifest of {name:?}"), e),
            })?;
        let (h, payload) =
            verify_meta(&image, &entry.manifest.seg, RecordKind::Manifest).map_err(|d| {
                StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest: {d}"),
                }
            })?;
        let manifest = Manifest::decode(payload).map_err(|e| StoreError::Corruption {
            window: name.clone(),
            block: 0,
            intact_blocks: 0,
            detail: format!("manifest payload: {e}"),
        })?;
        if h.key != name_key(&name) || manifest.name != name {
            return Err(StoreError::Corruption {
                window: name,
                block: 0,
                intact_blocks: 0,
                detail: "manifest belongs to another window".into(),
            });
        }
        Ok(WindowReader {
            info: entry.info,
            manifest,
            locs,
        })
    }

    /// Reads blocks `start..start + images.len()` of a window into record images (each at
    /// least `record_len` bytes, 4 KiB-aligned) in one batch, and verifies header and payload
    /// checksums of every one. Payloads are at [`WindowReader::payload`].
    pub fn read_blocks(
        &self,
        r: &WindowReader,
        start: usize,
        images: &mut [&mut [u8]],
    ) -> Result<(), StoreError> {
        let unreadable = self.read_images(r, start, images)?;
        for (i, img) in images.iter().enumerate() {
            match &unreadable {
                Some((k, e)) if *k == i => {
                    return Err(r.corruption(start + i, format!("unreadable: {e}")))
                }
                _ => r.verify(start + i, img)?,
            }
        }
        Ok(())
    }

    /// Reads record images without verifying them: the caller must pass each through
    /// [`WindowReader::verify`] before using its payload (the pipeline verifies on its scatter
    /// threads). Returns the position (in `images`) and error of the first unreadable block.
    pub(crate) fn read_images(
        &self,
        r: &WindowReader,
        start: usize,
        images: &mut [&mut [u8]],
    ) -> Result<Option<(usize, IoError)>, StoreError> {
        let end = start + images.len();
        if end > r.locs.len() {
            return Err(StoreError::Validation(format!(
                "blocks {start}..{end} out of range: window {:?} has {} blocks",
                r.info.name,
                r.locs.len()
            )));
        }
        let mut ops = Vec::with_capacity(images.len());
        for (i, img) in images.iter_mut().enumerate() {
            // A lost block is not read: its verification fails.
            let Some(loc) = &r.locs[start + i] else {
                continue;
            };
            let len = loc.len as usize;
            if img.len() < len {
                return Err(StoreError::Validation(format!(
                    "read buffer of {} bytes for a record of {len}",
                    img.len()
                )));
            }
            ops.push(Op::read(loc.seg.fd(), loc.offset, &mut img[..len]));
        }
        let io_res = self.engine.run(&mut ops);
        drop(ops);
        let Err(e) = io_res else { return Ok(None) };
        // After a failed batch, re-read block by block: the first unreadable block bounds the
        // intact prefix exactly, and no image left over from an earlier use is trusted.
        crate::log::warn(&format!("read error in window {:?}: {e}", r.info.name));
        for (i, img) in images.iter_mut().enumerate() {
            let Some(loc) = &r.locs[start + i] else {
                continue;
            };
            if let Err(e) =
                self.engine
                    .read_exact_at(loc.seg.fd(), loc.offset, &mut img[..loc.len as usize])
            {
                return Ok(Some((i, e)));
            }
        }
        Ok(None)
    }

    /// Reads and verifies a whole window into memory (tests, `cwm demo`, small windows).
    pub fn read_window(&self, name: &str) -> Result<(Manifest, Vec<Vec<u8>>), StoreError> {
        let r = self.open_window(name)?;
        let mut out = Vec::with_capacity(r.locs.len());
        for i in 0..r.locs.len() {
            let mut img = AlignedBuf::zeroed(r.record_len(i) as usize);
            self.read_blocks(&r, i, &mut [&mut img[..]])?;
            out.push(r.payload(i, &img).to_vec());
        }
        Ok((r.manifest, out))
    }

    /// Stores a whole window from in-memory payloads (tests, small windows).
    pub fn put_window(
        &self,
        spec: WindowSpec,
        payloads: &[&[u8]],
    ) -> Result<WindowInfo, StoreError> {
        if payloads.len() != spec.blocks.len() {
            return Err(StoreError::Validation(format!(
                "{} payloads for {} blocks",
                payloads.len(),
                spec.blocks.len()
            )));
        }
        let mut w = self.begin_window(spec)?;
        for (i, p) in payloads.iter().enumerate() {
            if !w.needs_write(i) {
                continue;
            }
            let mut img = AlignedBuf::zeroed(record_len(p.len() as u64) as usize);
            let po = payload_offset(p.len() as u64);
            img[po..po + p.len()].copy_from_slice(p);
            w.write_blocks(&mut [BlockImage {
                index: i,
                image: &mut img[..],
                checksum: None,
            }])?;
        }
        w.commit()
    }

    /// Writes a catalog record (sessions, idempotent outcomes) durably; the newest record of a
    /// key is what [`Store::meta`] returns, also after a restart.
    pub fn put_meta(&self, key: u128, payload: &[u8]) -> Result<(), StoreError> {
        if payload.is_empty() {
            return Err(StoreError::Validation(
                "a catalog record needs a payload".into(),
            ));
        }
        let mut app = self.lock_appender()?;
        let len = stored_len(RecordKind::Meta, payload.len() as u64);
        let needed = len + SEGMENT_HEADER_LEN; // room for segment headers if the append rotates
        let capacity = self.capacity.load(Ordering::SeqCst);
        let free = capacity.saturating_sub(self.used.load(Ordering::SeqCst));
        if needed > free {
            return Err(StoreError::QuotaExceeded {
                needed,
                free,
                capacity,
            });
        }
        let (loc, seq) = self.append_synced(&mut app, RecordKind::Meta, key, payload)?;
        let old = self
            .state
            .write()
            .map_err(poisoned)?
            .meta
            .insert(key, (seq, payload.to_vec(), loc));
        // The superseded record is garbage now (compaction drops it).
        if let Some((_, _, l)) = old {
            l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The newest catalog records with their sequence numbers (ordering them against windows'
    /// manifests).
    pub fn meta_with_seq(&self) -> Result<Vec<(u128, u64, Vec<u8>)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .meta
            .iter()
            .map(|(k, (seq, v, _))| (*k, *seq, v.clone()))
            .collect())
    }

    /// Re-reads and verifies, from the disk, the records the index holds besides windows: the
    /// newest catalog record of every key and every live tombstone. A catalog record whose
    /// bytes no longer verify is written again from the copy in memory (at the next open the
    /// store would otherwise fall back to an older record of its key, or lose it); a tombstone
    /// that no longer verifies is reported (at the next open, the window it deleted could come
    /// back: delete that window again).
    pub fn scrub_catalog(&self) -> Result<CatalogScrub, StoreError> {
        let (metas, tombs) = {
            let st = self.state.read().map_err(poisoned)?;
            let metas: Vec<(u128, Vec<u8>, Loc)> = st
                .meta
                .iter()
                .map(|(k, (_, v, l))| (*k, v.clone(), l.clone()))
                .collect();
            let tombs: Vec<(u128, Loc)> = st.tombs.iter().map(|(k, l)| (*k, l.clone())).collect();
            (metas, tombs)
        };
        let bad = |l: &Loc, kind: RecordKind| -> Option<String> {
            let mut img = AlignedBuf::zeroed(l.len as usize);
            let mut op = [Op::read(l.seg.fd(), l.offset, &mut img[..])];
            match self.engine.run(&mut op) {
                Err(e) => Some(format!("unreadable: {e}")),
                Ok(()) => verify_copies(&img, &l.seg, kind).err(),
            }
        };
        let mut out = CatalogScrub {
            records: (metas.len() + tombs.len()) as u64,
            ..Default::default()
        };
        for (key, payload, loc) in metas {
            if let Some(why) = bad(&loc, RecordKind::Meta) {
                // Rewritten only if it is still the newest record of its key.
                let current = self
                    .state
                    .read()
                    .map_err(poisoned)?
                    .meta
                    .get(&key)
                    .is_some_and(|(_, _, l)| l.seg.id == loc.seg.id && l.offset == loc.offset);
                if current {
                    crate::log::warn(&format!(
                        "scrub: catalog record {key:032x} in segment {} does not verify ({why}); written again",
                        loc.seg.id
                    ));
                    self.put_meta(key, &payload)?;
                    out.rewritten += 1;
                }
            }
        }
        for (key, loc) in tombs {
            if let Some(why) = bad(&loc, RecordKind::Tombstone) {
                out.bad_tombstones.push(format!(
                    "tombstone of name key {key:032x} in segment {} offset {}: {why}",
                    loc.seg.id, loc.offset
                ));
            }
        }
        Ok(out)
    }

    /// Every catalog record key with its newest payload.
    pub fn meta(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .meta
            .iter()
            .map(|(k, (_, v, _))| (*k, v.clone()))
            .collect())
    }

    /// Deletes a window: writes a durable tombstone, then drops its block references. Blocks
    /// nobody references any more become garbage (space reclaimed by compaction).
    pub fn delete_window(
        &self,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<WindowInfo, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let mut app = self.lock_appender()?;
        let entry = {
            let st = self.state.read().map_err(poisoned)?;
            st.windows
                .get(&name)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(name.clone()))?
        };
        if let Some(e) = expected_version {
            if e != entry.info.version {
                return Err(StoreError::ConcurrentModification {
                    name,
                    expected: e,
                    actual: entry.info.version,
                });
            }
        }
        let t = Tombstone {
            name: name.clone(),
            version: entry.info.version,
            manifest_seq: entry.info.seq,
        };
        let payload = t.encode();
        let (loc, seq) =
            self.append_synced(&mut app, RecordKind::Tombstone, name_key(&name), &payload)?;
        let mut st = self.state.write().map_err(poisoned)?;
        st.names.insert(name_key(&name), seq);
        if let Some(old) = st.tombs.insert(name_key(&name), loc) {
            old.seg.live.fetch_sub(old.len, Ordering::SeqCst);
        }
        st.windows.remove(&name);
        release_window(&mut st, &entry);
        Ok(entry.info)
    }

    /// Appends a small record from an in-memory payload and writes it (no sync).
    /// Appends one record and makes it durable (its segment cut back if that fails); counts
    /// it live. Returns where it is and its sequence number.
    pub(crate) fn append_synced(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload: &[u8],
    ) -> Result<(Loc, u64), StoreError> {
        let loc = self.append_payload(app, kind, key, payload)?;
        if let Err(e) = self.sync(&loc.seg) {
            self.cut_back([&loc]);
            return Err(e);
        }
        loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
        Ok((loc, app.next_seq - 1))
    }

    fn append_payload(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload: &[u8],
    ) -> Result<Loc, StoreError> {
        let len = payload.len() as u64;
        let mut img = AlignedBuf::zeroed(stored_len(kind, len) as usize);
        let po = payload_offset(len);
        img[po..po + payload.len()].copy_from_slice(payload);
        let sum = payload_checksum(payload);
        let loc = self.append(app, kind, key, len, sum, &mut img)?;
        let _site = match kind {
            RecordKind::Manifest => "manifest-write",
            RecordKind::Meta => "meta-write",
            _ => "",
        };
        crate::fail_point!(_site, a => {
            if a == crate::failpoint::Action::ShortWrite {
                short_write(self.engine.as_ref(), &loc, &img);
            }
            self.cut_back([&loc]);
            return Err(injected_error(_site));
        });
        if let Err(e) = self.engine.write_all_at(loc.seg.fd(), loc.offset, &img) {
            self.cut_back([&loc]);
            return Err(StoreError::io(format!("writing a {kind:?} record"), e));
        }
        Ok(loc)
    }
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

/// Writes part of a record image (feature `failpoints`, action `short-write`): the first half
/// of its pages, or for a one-page record its first 2 KiB (a torn page).
#[cfg(feature = "failpoints")]
pub(crate) fn short_write(engine: &dyn IoEngine, loc: &Loc, img: &[u8]) {
    let page = PAGE as usize;
    let pages = img.len() / page;
    if pages > 1 {
        let _ = engine.write_all_at(loc.seg.fd(), loc.offset, &img[..(pages / 2) * page]);
    } else if pages == 1 {
        let mut b = AlignedBuf::zeroed(page);
        b[..page / 2].copy_from_slice(&img[..page / 2]);
        let _ = engine.write_all_at(loc.seg.fd(), loc.offset, &b);
    }
}

/// Drops a window's references (its manifest and blocks) from the live figures.
fn release_window(st: &mut State, entry: &WindowEntry) {
    entry
        .manifest
        .seg
        .live
        .fetch_sub(entry.manifest.len, Ordering::SeqCst);
    for k in &entry.keys {
        let remove = match st.blocks.get_mut(k) {
            Some(b) => {
                b.refs -= 1;
                b.refs == 0
            }
            None => false,
        };
        if remove {
            if let Some(Some(l)) = st.blocks.remove(k).map(|b| b.loc) {
                l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
            }
        }
    }
}

fn manifest_payload_len(spec: &WindowSpec) -> u64 {
    // Mirrors Manifest::encode.
    (4 + 2 + 2 + 8 + 8)
        + (4 + spec.name.len() as u64)
        + (4 + spec.session.len() as u64)
        + (4 + spec.namespace.len() as u64)
        + (4 + spec.layout.len() as u64)
        + 4
        + 4 * spec.tokens.len() as u64
        + 4
        + 32 * spec.blocks.len() as u64
}

/// What [`check_meta`] found: the first good copy (or why none is), and a bad copy's fault.
pub(crate) type MetaCheck<'a> = (Result<(RecordHeader, &'a [u8]), String>, Option<String>);

/// Verifies each copy a metadata record image holds (two, or the one recovery found intact)
/// exactly once. Returns the first copy that verifies (header, payload) or why none does, and
/// why a copy does not verify, if one does not.
pub(crate) fn check_meta<'a>(image: &'a [u8], seg: &Segment, kind: RecordKind) -> MetaCheck<'a> {
    match verify_image(image, seg, kind) {
        Ok((h, p)) => {
            let one = record_len(h.payload_len) as usize;
            let bad = (format::copies(kind) == 2 && image.len() >= 2 * one)
                .then(|| verify_image(&image[one..2 * one], seg, kind).err())
                .flatten()
                .map(|e| format!("copy at +{one}: {e}"));
            (Ok((h, p)), bad)
        }
        Err(e0) => {
            // The second copy starts half-way when the image holds two of them.
            let half = image.len() / 2;
            let second = (format::copies(kind) == 2 && half > 0 && half % PAGE as usize == 0)
                .then(|| verify_image(&image[half..], seg, kind).ok())
                .flatten()
                .filter(|(h, _)| h.ditto && record_len(h.payload_len) as usize == half);
            let bad = format!("copy at +0: {e0}");
            (second.ok_or_else(|| e0.clone()), Some(bad))
        }
    }
}

/// The first copy of a metadata record image that verifies: its header and payload.
pub(crate) fn verify_meta<'a>(
    image: &'a [u8],
    seg: &Segment,
    kind: RecordKind,
) -> Result<(RecordHeader, &'a [u8]), String> {
    check_meta(image, seg, kind).0
}

/// Verifies every copy a metadata record image holds: `Err` says which fails and why.
pub(crate) fn verify_copies(image: &[u8], seg: &Segment, kind: RecordKind) -> Result<(), String> {
    match check_meta(image, seg, kind) {
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        (Ok(_), None) => Ok(()),
    }
}

/// Verifies a record image read from `seg`: header checksum (with the segment's generation),
/// kind, and payload checksum. Returns the header and the payload.
pub(crate) fn verify_image<'a>(
    image: &'a [u8],
    seg: &Segment,
    kind: RecordKind,
) -> Result<(RecordHeader, &'a [u8]), String> {
    let h = RecordHeader::decode(image, seg.generation).map_err(|e| format!("header: {e}"))?;
    if h.kind != kind {
        return Err(format!("expected a {kind:?} record, found {:?}", h.kind));
    }
    if h.segment_id != seg.id {
        return Err("record belongs to another segment".into());
    }
    let po = payload_offset(h.payload_len);
    let end = po + h.payload_len as usize;
    if end > image.len() {
        return Err("record longer than the bytes read".into());
    }
    let payload = &image[po..end];
    if payload_checksum(payload) != h.payload_xxh3 {
        return Err("payload checksum mismatch".into());
    }
    // The bytes no checksum covers (after the header in a header page, after the payload up
    // to the record's end) are written as zeros (from segment format 2 on): anything else is
    // damage, reported rather than ignored.
    if seg.first_record >= SEGMENT_HEADER_LEN {
        let rl = (record_len(h.payload_len) as usize).min(image.len());
        let header_pad = format::RECORD_HEADER_LEN..po.min(PAGE as usize);
        if image[header_pad]
            .iter()
            .chain(&image[end.min(rl)..rl])
            .any(|&b| b != 0)
        {
            return Err("non-zero padding".into());
        }
    }
    Ok((h, payload))
}

/// Normalises the name and refuses empty windows and zero-length blocks.
fn validate_spec(spec: &mut WindowSpec) -> Result<(), StoreError> {
    spec.name = name::validate_name(&spec.name).map_err(StoreError::Validation)?;
    if spec.blocks.is_empty() {
        return Err(StoreError::Validation(
            "cannot freeze an empty window: it has no blocks (EC-010)".into(),
        ));
    }
    if let Some(i) = spec.blocks.iter().position(|b| b.len == 0) {
        return Err(StoreError::Validation(format!(
            "block {i} has zero bytes; zero-length blocks are refused (EC-014)"
        )));
    }
    Ok(())
}

/// The version of the window `spec` would replace, or the refusal its `replace` asks for.
fn check_replace(st: &State, spec: &WindowSpec) -> Result<Option<u64>, StoreError> {
    let existing = st.windows.get(&spec.name).map(|w| w.info.version);
    match (existing, spec.replace) {
        (Some(_), Replace::No) => Err(StoreError::AlreadyExists(spec.name.clone())),
        (Some(v), Replace::IfVersion(e)) if v != e => Err(StoreError::ConcurrentModification {
            name: spec.name.clone(),
            expected: e,
            actual: v,
        }),
        (None, Replace::IfVersion(e)) if e != 0 => Err(StoreError::NotFound(spec.name.clone())),
        _ => Ok(existing),
    }
}

/// Log room promised to a window captured before it is written ([`Store::reserve`]);
/// released on drop, or handed to its writer by [`Reservation::begin`].
pub struct Reservation<'a> {
    store: &'a Store,
    bytes: u64,
}

impl<'a> Reservation<'a> {
    /// Bytes reserved.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// [`Store::begin_window`] for the reserved window: the room promised to other windows
    /// is not free, this one's is.
    pub fn begin(mut self, spec: WindowSpec) -> Result<WindowWriter<'a>, StoreError> {
        let own = self.bytes;
        let w = self.store.begin_inner(spec, own)?;
        self.bytes = 0; // handed over to the writer
        Ok(w)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Writes one window; holds the appender lock. Dropping it without [`WindowWriter::commit`]
/// aborts: nothing becomes visible, blocks already written are garbage.
pub struct WindowWriter<'a> {
    store: &'a Store,
    /// Bytes of `Store::reserved` this writer holds until commit or drop.
    hold: u64,
    app: MutexGuard<'a, Appender>,
    spec: WindowSpec,
    version: u64,
    replaces: Option<u64>,
    writes: Vec<bool>,
    written: Vec<Option<(Loc, u64)>>,
    touched: Vec<Arc<Segment>>,
    failed: Option<String>,
}

impl Drop for WindowWriter<'_> {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.hold, Ordering::SeqCst);
    }
}

impl WindowWriter<'_> {
    /// The (normalised) window name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Number of blocks.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.spec.blocks.len()
    }

    /// False when block `i` is already stored (dedup) or repeats an earlier block of this
    /// window: the caller need not supply its bytes.
    #[must_use]
    pub fn needs_write(&self, i: usize) -> bool {
        self.writes.get(i).copied().unwrap_or(false)
    }

    /// Number of blocks that must be written.
    #[must_use]
    pub fn blocks_to_write(&self) -> usize {
        self.writes.iter().filter(|w| **w).count()
    }

    /// Writes block records in one batch. Each image holds its payload at
    /// `payload_offset(len)`; the header is filled in here.
    pub fn write_blocks(&mut self, blocks: &mut [BlockImage<'_>]) -> Result<(), StoreError> {
        if let Some(f) = &self.failed {
            return Err(StoreError::Validation(format!(
                "this freeze already failed ({f}); start again"
            )));
        }
        let mut locs: Vec<(usize, Loc, u64)> = Vec::with_capacity(blocks.len());
        let planned = self.plan_appends(blocks, &mut locs);
        if let Err(e) = planned {
            // Space may have been handed out without being written: no more appends there.
            self.store.cut_back(locs.iter().map(|l| &l.1));
            if !locs.is_empty() {
                self.failed = Some(e.to_string());
            }
            return Err(e);
        }
        crate::fail_point!("block-write", a => {
            if let (Some(b), Some((_, loc, _))) = (blocks.first(), locs.first()) {
                if a == crate::failpoint::Action::ShortWrite {
                    short_write(self.store.engine.as_ref(), loc, &b.image[..loc.len as usize]);
                }
            }
            self.store.cut_back(locs.iter().map(|l| &l.1));
            self.failed = Some("injected fault".into());
            return Err(injected_error("block-write"));
        });
        let mut ops: Vec<Op<'_>> = blocks
            .iter()
            .zip(&locs)
            .map(|(b, (_, loc, _))| {
                Op::write(loc.seg.fd(), loc.offset, &b.image[..loc.len as usize])
            })
            .collect();
        let res = self.store.engine.run(&mut ops);
        drop(ops);
        if let Err(e) = res {
            // A hole may now sit before later records: no more appends to these segments, and
            // what this batch wrote is cut off again.
            self.store.cut_back(locs.iter().map(|l| &l.1));
            self.failed = Some(e.to_string());
            return Err(StoreError::io(
                format!("writing blocks of window {:?}", self.spec.name),
                e,
            ));
        }
        for (i, loc, sum) in locs {
            self.written[i] = Some((loc, sum));
        }
        Ok(())
    }

    fn plan_appends(
        &mut self,
        blocks: &mut [BlockImage<'_>],
        locs: &mut Vec<(usize, Loc, u64)>,
    ) -> Result<(), StoreError> {
        for b in blocks.iter_mut() {
            let i = b.index;
            let Some(desc) = self.spec.blocks.get(i).copied() else {
                return Err(StoreError::Validation(format!(
                    "block index {i} out of range"
                )));
            };
            if !self.writes[i] || self.written[i].is_some() || locs.iter().any(|l| l.0 == i) {
                return Err(StoreError::Validation(format!(
                    "block {i} does not need writing (already stored or already written)"
                )));
            }
            let rl = record_len(desc.len) as usize;
            if b.image.len() < rl || b.image.as_ptr() as usize % io::ALIGN != 0 {
                return Err(StoreError::Validation(format!(
                    "block {i}: image must be {rl} bytes, 4 KiB-aligned"
                )));
            }
            let po = payload_offset(desc.len);
            let sum = match b.checksum {
                Some(s) => s,
                None => payload_checksum(&b.image[po..po + desc.len as usize]),
            };
            let loc = self.store.append(
                &mut self.app,
                RecordKind::Block,
                desc.key,
                desc.len,
                sum,
                &mut b.image[..rl],
            )?;
            if !self.touched.iter().any(|s| s.id == loc.seg.id) {
                self.touched.push(loc.seg.clone());
            }
            locs.push((i, loc, sum));
        }
        Ok(())
    }

    /// Makes the window durable and visible: sync blocks, write and sync the manifest,
    /// publish. Returns only after the manifest is durable.
    pub fn commit(mut self) -> Result<WindowInfo, StoreError> {
        if let Some(f) = &self.failed {
            return Err(StoreError::Validation(format!(
                "this freeze already failed ({f}); start again"
            )));
        }
        if let Some(i) =
            (0..self.writes.len()).find(|&i| self.writes[i] && self.written[i].is_none())
        {
            return Err(StoreError::Validation(format!(
                "block {i} of window {:?} was never written",
                self.spec.name
            )));
        }
        // 1. Blocks durable.
        for seg in std::mem::take(&mut self.touched) {
            self.store.sync(&seg)?;
        }
        // 2. Checksums of blocks present already come from the index.
        let mut blocks = Vec::with_capacity(self.spec.blocks.len());
        let mut sums: HashMap<u128, u64> = HashMap::new();
        {
            let st = self.store.state.read().map_err(poisoned)?;
            for (i, d) in self.spec.blocks.iter().enumerate() {
                let sum = match &self.written[i] {
                    Some((_, s)) => *s,
                    None => match sums.get(&d.key) {
                        Some(s) => *s,
                        None => match st.blocks.get(&d.key) {
                            Some(b) if b.payload_len == d.len => b.checksum,
                            Some(_) => {
                                return Err(StoreError::Validation(format!(
                                    "block {i} has the key of a stored block of another length"
                                )))
                            }
                            None => {
                                return Err(StoreError::Validation(format!(
                                    "block {i} is neither stored nor written"
                                )))
                            }
                        },
                    },
                };
                sums.insert(d.key, sum);
                blocks.push(BlockRef {
                    key: d.key,
                    len: d.len,
                    checksum: sum,
                });
            }
        }
        let m = Manifest {
            name: self.spec.name.clone(),
            version: self.version,
            created_unix_ms: segment::now_unix_ms(),
            session: std::mem::take(&mut self.spec.session),
            namespace: std::mem::take(&mut self.spec.namespace),
            layout: std::mem::take(&mut self.spec.layout),
            tokens: std::mem::take(&mut self.spec.tokens),
            blocks,
        };
        let payload = m.encode();
        // 3. Manifest durable.
        let mloc = self.store.append_payload(
            &mut self.app,
            RecordKind::Manifest,
            name_key(&m.name),
            &payload,
        )?;
        let seq = self.app.next_seq - 1;
        mloc.seg.note_manifest(name_key(&m.name));
        if let Err(e) = self.store.sync(&mloc.seg) {
            // Not durable, not acknowledged: cut the manifest off so a later open cannot show
            // a window whose freeze failed.
            self.store.cut_back([&mloc]);
            return Err(e);
        }
        // 4. Publish.
        let info = WindowInfo {
            name: m.name.clone(),
            version: m.version,
            seq,
            session: m.session.clone(),
            namespace: m.namespace.clone(),
            num_tokens: m.tokens.len() as u64,
            num_blocks: m.blocks.len() as u64,
            bytes: m.blocks.iter().map(|b| b.len).sum(),
            created_unix_ms: m.created_unix_ms,
        };
        let mut st = self.store.state.write().map_err(poisoned)?;
        for (i, b) in m.blocks.iter().enumerate() {
            if let Some(e) = st.blocks.get_mut(&b.key) {
                if e.loc.is_none() {
                    // A block lost to damage, written again: every window referring to it
                    // reads it from here on.
                    if let Some((loc, sum)) = self.written[i].take() {
                        loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                        e.loc = Some(loc);
                        e.checksum = sum;
                        e.payload_len = b.len;
                    }
                }
                e.refs += 1;
                continue;
            }
            if let Some((loc, sum)) = self.written[i].take() {
                loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                st.blocks.insert(
                    b.key,
                    BlockEntry {
                        loc: Some(loc),
                        payload_len: b.len,
                        checksum: sum,
                        refs: 1,
                    },
                );
            }
        }
        mloc.seg.live.fetch_add(mloc.len, Ordering::SeqCst);
        st.names.insert(name_key(&m.name), seq);
        st.incomplete.remove(&m.name);
        if let Some(t) = st.tombs.remove(&name_key(&m.name)) {
            // The tombstone is no longer the newest event of the name: garbage.
            t.seg.live.fetch_sub(t.len, Ordering::SeqCst);
        }
        let entry = WindowEntry {
            info: info.clone(),
            manifest: mloc,
            keys: m.blocks.iter().map(|b| b.key).collect(),
        };
        if let Some(old) = st.windows.insert(info.name.clone(), entry) {
            debug_assert_eq!(Some(old.info.version), self.replaces);
            release_window(&mut st, &old);
        }
        Ok(info)
    }
}

/// A window opened for reading: its verified manifest and where its blocks are.
pub struct WindowReader {
    /// Catalog entry.
    pub info: WindowInfo,
    /// The verified manifest.
    pub manifest: Manifest,
    locs: Vec<Option<Loc>>,
}

impl WindowReader {
    /// Number of blocks.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.locs.len()
    }

    /// Drops the window's first `k` blocks (and the `k * block_size` tokens they hold) from
    /// this reader: block `i` of the reader is then block `k + i` of the window (a thaw of a
    /// range whose start the engine already holds).
    pub fn skip_blocks(&mut self, k: usize, block_size: usize) {
        let k = k.min(self.locs.len());
        self.locs.drain(..k);
        self.manifest.blocks.drain(..k);
        let t = (k * block_size).min(self.manifest.tokens.len());
        self.manifest.tokens.drain(..t);
    }

    /// Bytes of the record image of block `i` (what a read buffer must hold).
    #[must_use]
    pub fn record_len(&self, i: usize) -> u64 {
        record_len(self.manifest.blocks[i].len)
    }

    /// Verifies the record image of block `b`: header checksum (with the segment generation),
    /// kind, segment, key, length and checksum against the manifest, payload xxh3.
    pub fn verify(&self, b: usize, image: &[u8]) -> Result<(), StoreError> {
        let want = self
            .manifest
            .blocks
            .get(b)
            .ok_or_else(|| StoreError::Validation(format!("block {b} out of range")))?;
        let Some(loc) = &self.locs[b] else {
            return Err(self.corruption(
                b,
                "the block's record was lost to damage (reported when the store was opened)".into(),
            ));
        };
        let res = verify_image(image, &loc.seg, RecordKind::Block).and_then(|(h, _)| {
            if h.key != want.key {
                Err("block key differs from the manifest's".to_string())
            } else if h.payload_len != want.len || h.payload_xxh3 != want.checksum {
                Err("block length or checksum differs from the manifest's".to_string())
            } else {
                Ok(())
            }
        });
        res.map_err(|d| self.corruption(b, d))
    }

    /// The CORRUPTION error for block `b`.
    #[must_use]
    pub fn corruption(&self, b: usize, detail: String) -> StoreError {
        StoreError::Corruption {
            window: self.info.name.clone(),
            block: b,
            intact_blocks: b,
            detail,
        }
    }

    /// The payload of block `i` inside a verified record image.
    #[must_use]
    pub fn payload<'b>(&self, i: usize, image: &'b [u8]) -> &'b [u8] {
        let len = self.manifest.blocks[i].len;
        let po = payload_offset(len);
        &image[po..po + len as usize]
    }
}

/// Takes an exclusive lock on `dir/LOCK` and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("LOCK");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::from_fs("open", &path, e))?;
    // SAFETY: flock on an owned descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        return Err(StoreError::Locked {
            dir: dir.to_path_buf(),
            pid: s.trim().parse().unwrap_or(0),
        });
    }
    let _ = f.set_len(0);
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// Milliseconds since the Unix epoch (UTC), as stored in manifests.
#[must_use]
pub fn now_unix_ms() -> i64 {
    segment::now_unix_ms()
}

/// Preallocates `len` bytes of `file` (used by benchmarks for the raw-disk ceiling file).
pub fn preallocate_file(file: &File, len: u64) -> std::io::Result<()> {
    segment::preallocate(file, len)
}
