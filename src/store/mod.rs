//! The durable block log: segments of checksummed records, an in-memory index rebuilt at open,
//! the window commit protocol, deletes, capacity, and verified reads.
//!
//! Write path of one window ([`Store::begin_window`] → [`WindowWriter::write_blocks`] →
//! [`WindowWriter::commit`]): the capacity check happens before any byte is written; block
//! records not already in the log are appended (blocks present are referenced, not rewritten);
//! every touched segment is `fdatasync`ed; then the manifest record is appended and
//! `fdatasync`ed; only then does the window become visible. Freezes write their block records
//! concurrently, and a commit writes and syncs its manifest without the appender lock;
//! metadata records are written only once every record handed out before them is written, so
//! a hole before a later metadata record is always damage (`append.rs`).
//!
//! The store is its own catalog: manifests and tombstones in the log are the truth, and
//! [`Store::open`] rebuilds windows, the block index and reference counts from them
//! (docs/FORMAT.md argues why there is no second database).
//!
//! ```
//! use cwm::store::{BlockDesc, Store, StoreConfig, StoreError, WindowSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let blocks = [vec![1u8; 4096], vec![2u8; 4096]];
//! {
//!     let (store, _) = Store::open(StoreConfig::new(dir.path()))?;
//!     let spec = WindowSpec {
//!         name: "chat-1".into(),
//!         tokens: (0..32).collect(),
//!         blocks: (0..2).map(|i| BlockDesc { key: 100 + i, len: 4096 }).collect(),
//!         ..Default::default()
//!     };
//!     let info = store.put_window(spec, &[&blocks[0], &blocks[1]])?; // durable on return
//!     assert_eq!((info.name.as_str(), info.num_blocks), ("chat-1", 2));
//! }
//! // Reopened (a restart): the index is rebuilt from the log; reads are verified.
//! let (store, report) = Store::open(StoreConfig::new(dir.path()))?;
//! assert_eq!(report.windows, 1);
//! let (manifest, payloads) = store.read_window("chat-1")?;
//! assert_eq!(manifest.tokens.len(), 32);
//! assert_eq!(payloads, blocks);
//! store.delete_window("chat-1", None)?;
//! assert!(matches!(store.read_window("chat-1"), Err(StoreError::NotFound(_))));
//! # Ok(())
//! # }
//! ```
//!
//! # Map
//!
//! - `mod.rs`: [`Store`], [`Store::open`], store-wide figures ([`Store::stats`]).
//! - `error.rs`: [`StoreError`] and its wire codes.
//! - `types.rs`: the public value types ([`StoreConfig`], [`WindowSpec`], [`BlockDesc`],
//!   [`Replace`], [`BlockImage`], [`WindowInfo`], [`StoreStats`]).
//! - `format.rs`, `manifest.rs`: the bytes on disk (headers; manifest and tombstone payloads).
//! - `name.rs`: window names (validation, NFKC).
//! - `segment.rs`: one segment file (create, seal, fail). `lock.rs`: the data directory's
//!   `LOCK` file.
//! - `index.rs`: the in-memory index, publishing a window into it, lookups.
//! - `append.rs`: the appender (record appends, segment rotation, `fdatasync`, cut-back after
//!   a failure).
//! - `capacity.rs`: log room (what a window needs; [`Reservation`]s).
//! - `writer.rs`: [`Store::begin_window`], [`WindowWriter`] and its commit,
//!   [`Store::delete_window`].
//! - `reader.rs`: [`Store::open_window`], [`WindowReader`], verified block reads.
//! - `catalog.rs`: catalog records ([`Store::put_meta`]) and [`Store::scrub_catalog`].
//! - `verify.rs`: record verification, and [`Store::verify_log`] over the whole log.
//! - `recovery/`: rebuilding the index from the log at open ([`RecoveryReport`]).
//! - `compact.rs`: compaction (copying live records out of sparse segments).
//! - `checkpoint.rs`: segment checkpoints (a segment's record headers in one file, read at
//!   open instead of walking them).

mod append;
mod capacity;
mod catalog;
mod checkpoint;
mod compact;
mod error;
pub mod format;
mod index;
mod keyhash;
mod lock;
pub mod manifest;
pub mod name;
mod reader;
mod recovery;
mod recycle;
pub mod retention;
mod segment;
mod types;
mod usage;
mod verify;
mod writer;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use xxhash_rust::xxh3::xxh3_128;

use crate::io::{self, IoEngine};
use append::Appender;
use error::poisoned;
use format::PAGE;
use index::State;
use lock::lock_dir;

pub use capacity::Reservation;
pub use catalog::CatalogScrub;
pub use compact::{CompactOptions, CompactProgress, CompactReport};
pub use error::StoreError;
pub use manifest::{BlockRef, Manifest, RetentionChange, Tombstone};
pub use reader::WindowReader;
pub(crate) use recovery::set_aside_invalid_segments;
pub use recovery::{RecoveryMode, RecoveryReport};
pub use retention::{ClassBytes, EvictReport, EvictionPolicy};
pub use types::{
    BlockDesc, BlockImage, Class, Replace, Retention, SegmentStats, StoreConfig, StoreStats,
    WindowInfo, WindowSpec,
};
pub use verify::LogProblem;
pub use writer::{WindowWriter, MAX_BLOCK_BYTES};

// The wall clock lives in `crate::clock`; this path stays for the store's users.
pub use crate::clock::now_unix_ms;

/// The block log. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    cfg: StoreConfig,
    engine: Arc<dyn IoEngine>,
    state: RwLock<State>,
    appender: Mutex<Appender>,
    /// Records handed out but not yet written.
    in_flight: Arc<append::InFlight>,
    /// Commits between handing out their manifest and publishing it (`WindowWriter::commit`
    /// writes and syncs it without the appender lock): other changes of those names, and
    /// other commits referring to the blocks they publish, wait.
    committing: Mutex<writer::Committing>,
    /// Signalled when a commit leaves `committing`.
    committed: std::sync::Condvar,
    used: AtomicU64,
    capacity: AtomicU64,
    /// Log bytes promised but not yet in `used`: windows being written (their exact need,
    /// until commit or drop) and windows captured before they are written ([`Reservation`]).
    reserved: AtomicU64,
    /// One compaction at a time (the background thread, the op, repair).
    compacting: Mutex<()>,
    /// Checkpoints being written in the background ([`Store::wait_checkpoints`]).
    checkpoints: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Counts uses ([`Store::record_hit`]): the daemon saves usage when it moved.
    usage_epoch: AtomicU64,
    /// Files of compacted segments kept for new segments to be written into.
    recycler: recycle::Recycler,
    _lock: File,
}

impl Drop for Store {
    /// A clean stop: the background checkpoints finish, and the active segment is
    /// checkpointed up to its frontier.
    fn drop(&mut self) {
        self.checkpoint();
        if let Err(e) = self.save_usage() {
            crate::log::warn(&format!("saving window usage at the stop failed: {e}"));
        }
    }
}

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
        let (mut state, appender, used, mut report) = recovery::recover(&cfg, engine.as_ref())?;
        retention::apply_changes(&mut state);
        match usage::restore(&cfg.dir, &mut state) {
            Ok(n) => report.usage_restored = n,
            Err(why) => {
                crate::log::warn(&format!(
                    "{}: ignored ({why}); windows start with no usage",
                    cfg.dir.join(usage::FILE).display()
                ));
                report.ignored_usage = Some(why);
            }
        }
        let recycler = recycle::Recycler::load(&cfg.dir, cfg.recycle_segments);
        let store = Store {
            capacity: AtomicU64::new(cfg.capacity),
            reserved: AtomicU64::new(0),
            cfg,
            engine,
            state: RwLock::new(state),
            appender: Mutex::new(appender),
            in_flight: Arc::default(),
            committing: Mutex::new(writer::Committing::default()),
            committed: std::sync::Condvar::new(),
            used: AtomicU64::new(used),
            compacting: Mutex::new(()),
            checkpoints: Mutex::new(Vec::new()),
            usage_epoch: AtomicU64::new(0),
            recycler,
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

    /// The capacity, when one is set (`None`: unlimited).
    #[must_use]
    pub fn capacity(&self) -> Option<u64> {
        Some(self.capacity.load(Ordering::SeqCst)).filter(|c| *c != 0 && *c != u64::MAX)
    }

    /// Bytes the log's segments take (what the capacity limits).
    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Log room promised to freezes in progress and not yet written.
    #[must_use]
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::SeqCst)
    }

    /// Whether a window needing `need` more bytes of log fits now, beside the room promised
    /// to freezes in progress.
    #[must_use]
    pub fn has_room(&self, need: u64) -> bool {
        self.used
            .load(Ordering::SeqCst)
            .saturating_add(self.reserved.load(Ordering::SeqCst))
            .saturating_add(need)
            <= self.capacity.load(Ordering::SeqCst)
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
                record_limit: s.limit(),
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
            free_segment_files: self.recycler.len() as u64,
            engine: self.engine.name(),
        })
    }
}

/// Preallocates `len` bytes of `file` (used by benchmarks for the raw-disk ceiling file).
pub fn preallocate_file(file: &File, len: u64) -> std::io::Result<()> {
    segment::preallocate(file, len)
}
