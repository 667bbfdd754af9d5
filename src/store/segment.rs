//! Segment files: fixed-size, preallocated, a header page and its copy first, records after
//! them.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::checkpoint::Kept;
use super::error::StoreError;
use super::format::{
    SegmentHeader, PAGE, SEGMENT_HEADER_LEN, SEGMENT_VERSION, SEGMENT_VERSION_NO_LIMIT,
};
use super::recovery::scan::Rec;
use crate::io::{self, AlignedBuf, IoEngine};

/// One open segment file.
pub(crate) struct Segment {
    pub id: u64,
    pub generation: u64,
    pub size: u64,
    pub file: File,
    pub path: PathBuf,
    /// Offset of the first record (after the header pages).
    pub first_record: u64,
    /// The header as written at creation (rewritten with the sealed length at rotation).
    pub header: SegmentHeader,
    /// Offset just past the last record written (or found at recovery).
    pub frontier: AtomicU64,
    /// The record limit in the header pages (format 3; 0: none). Room past it is handed out
    /// only after [`Segment::raise_limit`].
    pub limit: AtomicU64,
    /// Bytes of records something still refers to.
    pub live: AtomicU64,
    /// No more appends: full, or a write / fdatasync failed on it.
    pub sealed: AtomicBool,
    /// Sealed by a rotation whose background part has not finished: records handed out
    /// before it may still be in flight, and its sealed length is not recorded yet
    /// ([`Segment::finish_seal`]). Compaction leaves it alone meanwhile.
    pub sealing: AtomicBool,
    /// A write or fdatasync failed: the segment is read-only from now on. (Shared with the
    /// recycler, which looks at it after the segment is gone.)
    pub failed: Arc<AtomicBool>,
    /// Damage was found in it (at the open, by the checkpoint walk, a read or compaction) or
    /// its record limit could not be raised: its file is never reused (shared with the
    /// recycler, like `failed`).
    pub damaged: Arc<AtomicBool>,
    /// Window-name keys of every manifest record in this segment (live or not): compaction
    /// keeps a tombstone while some other segment still holds a manifest it shadows.
    pub manifest_names: Mutex<HashSet<u128>>,
    /// Keys of every catalog record in this segment (live or not): compaction keeps a
    /// catalog deletion while some other segment still holds a record of its key.
    pub meta_keys: Mutex<HashSet<u128>>,
    /// Freezes in progress with block records here that are not published yet: compaction
    /// leaves the segment on disk while any has (they are in no index yet).
    pub writers: AtomicU64,
    /// The records appended to this segment, in offset order, kept for its checkpoint
    /// (written when it is sealed or at a clean stop). `None`: not kept (a segment loaded
    /// sealed, or whose records do not tile it: no checkpoint is written from memory).
    pub records: Mutex<Option<Vec<Kept>>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segment({})", self.id)
    }
}

/// File name of segment `id`.
pub(crate) fn file_name(id: u64) -> String {
    format!("segment-{id:010}.log")
}

/// The segment id a file name `segment-<id>.<rest>` names, and its `<rest>` (`log`, `free`,
/// `ckpt`, `log.damaged`, ...).
pub(crate) fn parse_name(name: &str) -> Option<(u64, &str)> {
    let (id, rest) = name.strip_prefix("segment-")?.split_once('.')?;
    Some((id.parse().ok()?, rest))
}

/// Parses a segment id out of a file name written by [`file_name`].
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    parse_name(name)
        .filter(|(_, rest)| *rest == "log")
        .map(|(id, _)| id)
}

/// File name of the compacted segment `id`'s file kept for reuse (out of the log).
pub(crate) fn free_file_name(id: u64) -> String {
    format!("segment-{id:010}.free")
}

/// Parses a segment id out of a file name written by [`free_file_name`].
pub(crate) fn parse_free_file_name(name: &str) -> Option<u64> {
    parse_name(name)
        .filter(|(_, rest)| *rest == "free")
        .map(|(id, _)| id)
}

/// 64 random bits (a new segment's generation).
pub(crate) fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most v.len() bytes into v.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(v);
    }
    // Fallback: hash of time and pid through std's randomly keyed hasher.
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The header of a new segment `id` of `size` bytes: a fresh generation; format 3 when it has
/// a record limit (a reused file), else 2 (readable by builds before format 3).
fn new_header(id: u64, size: u64, record_limit: u64) -> SegmentHeader {
    SegmentHeader {
        segment_id: id,
        generation: random_u64(),
        segment_size: size,
        created_unix_ms: crate::clock::now_unix_ms(),
        version: if record_limit == 0 {
            SEGMENT_VERSION_NO_LIMIT
        } else {
            SEGMENT_VERSION
        },
        sealed_len: 0,
        record_limit,
    }
}

/// Writes `header` into both header pages of `file` (one write) and syncs them.
fn write_header_pages(
    engine: &dyn IoEngine,
    file: &File,
    header: &SegmentHeader,
) -> Result<(), StoreError> {
    // The header and, in page 1, its copy: one damaged page never loses the generation
    // every record header of the segment is checked with.
    let mut page = AlignedBuf::zeroed(SEGMENT_HEADER_LEN as usize);
    header.encode(&mut page[..PAGE as usize]);
    header.encode(&mut page[PAGE as usize..]);
    let fd = file.as_raw_fd();
    engine
        .write_all_at(fd, 0, &page)
        .and_then(|()| engine.fdatasync(fd))
        .map_err(|e| {
            StoreError::io(
                format!("writing the header of segment {}", header.segment_id),
                e,
            )
        })
}

/// Preallocates `len` bytes of `file` (zeros when read). File systems without fallocate are
/// tolerated (the file then grows as it is written).
pub(crate) fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an owned descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => file.set_len(len),
        _ => Err(e),
    }
}

impl Segment {
    /// The file's descriptor.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Creates segment `id` in a new file: preallocate, write and sync the header pages, sync
    /// the directory.
    pub fn create(
        dir: &Path,
        id: u64,
        size: u64,
        engine: &dyn IoEngine,
    ) -> Result<Segment, StoreError> {
        let path = dir.join(file_name(id));
        let fs = |what: &str, e: std::io::Error| StoreError::from_fs(what, &path, e);
        let (file, _direct) = io::open_direct(&path, true).map_err(|e| fs("create", e))?;
        if let Err(e) = preallocate(&file, size) {
            let _ = std::fs::remove_file(&path);
            return Err(fs("preallocate", e));
        }
        let header = new_header(id, size, 0);
        let res = write_header_pages(engine, &file, &header)
            .and_then(|()| io::sync_dir(dir).map_err(|e| fs("sync directory of", e)));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Segment::new(id, file, path, header))
    }

    /// Creates segment `id` in `free`, the file of a compacted segment kept for reuse: its
    /// blocks are allocated and written already, so records written into it need no extent
    /// conversion and their `fdatasync` no journal commit. The bytes it holds stay until
    /// overwritten: they belong to another generation, so none validates as a record here,
    /// and the header's record limit (`first_record + step`, raised as records need room)
    /// bounds what recovery reads of them. The new header is written and synced before the
    /// file is renamed into the log, so a crash leaves either a free file or a valid empty
    /// segment. On error the caller removes the free file (and creates a new one instead).
    pub fn create_in(
        dir: &Path,
        id: u64,
        size: u64,
        step: u64,
        free: &Path,
        engine: &dyn IoEngine,
    ) -> Result<Segment, StoreError> {
        let fs = |what: &str, e: std::io::Error| StoreError::from_fs(what, free, e);
        let (file, _direct) = io::open_direct(free, false).map_err(|e| fs("open", e))?;
        let len = file.metadata().map_err(|e| fs("stat", e))?.len();
        // A file longer than this segment (the segment size was lowered) is cut to it; a
        // shorter one (its unused tail was given back when it was sealed) grows.
        if len > size {
            file.set_len(size).map_err(|e| fs("truncate", e))?;
        }
        preallocate(&file, size).map_err(|e| fs("preallocate", e))?;
        let limit = SEGMENT_HEADER_LEN.saturating_add(step.max(PAGE)).min(size) & !(PAGE - 1);
        let header = new_header(id, size, limit);
        write_header_pages(engine, &file, &header)?;
        let path = dir.join(file_name(id));
        std::fs::rename(free, &path).map_err(|e| fs("rename", e))?;
        if let Err(e) = io::sync_dir(dir) {
            // Out of the log again; failing that, removed (a new file is created under the
            // name, which must not open this one).
            if std::fs::rename(&path, free).is_err() {
                let _ = std::fs::remove_file(&path);
            }
            return Err(fs("sync directory of", e));
        }
        Ok(Segment::new(id, file, path, header))
    }

    /// An open segment just created (no record yet).
    fn new(id: u64, file: File, path: PathBuf, header: SegmentHeader) -> Segment {
        Segment::with(id, file, path, header, false)
    }

    /// A segment found in the directory (at an open), sealed until recovery makes it the
    /// active one again; its frontier at its first record until its records are read.
    pub(crate) fn loaded(id: u64, file: File, path: PathBuf, header: SegmentHeader) -> Segment {
        Segment::with(id, file, path, header, true)
    }

    /// [`Segment::new`] (`found` false: records from the header's end, kept for its
    /// checkpoint) or [`Segment::loaded`] (`found` true).
    fn with(id: u64, file: File, path: PathBuf, header: SegmentHeader, found: bool) -> Segment {
        let first_record = if found {
            header.first_record()
        } else {
            SEGMENT_HEADER_LEN
        };
        Segment {
            id,
            generation: header.generation,
            size: header.segment_size,
            file,
            path,
            header,
            first_record,
            frontier: AtomicU64::new(first_record),
            limit: AtomicU64::new(header.record_limit),
            live: AtomicU64::new(0),
            sealed: AtomicBool::new(found),
            sealing: AtomicBool::new(false),
            failed: Arc::new(AtomicBool::new(false)),
            damaged: Arc::new(AtomicBool::new(false)),
            manifest_names: Mutex::new(HashSet::new()),
            meta_keys: Mutex::new(HashSet::new()),
            writers: AtomicU64::new(0),
            records: Mutex::new((!found).then(Vec::new)),
        }
    }

    /// The record limit (0: none).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::SeqCst)
    }

    /// Makes room up to `need` usable in a segment with a record limit: when `need` passes the
    /// limit, raises it to `need + step` (at most the segment size) in both header pages, one
    /// after the other, each synced — so both copies always cover every record handed out. The
    /// caller holds the appender lock (no other header rewrite runs).
    pub fn raise_limit(
        &self,
        need: u64,
        step: u64,
        engine: &dyn IoEngine,
    ) -> Result<(), StoreError> {
        let limit = self.limit();
        if limit == 0 || need <= limit {
            return Ok(());
        }
        let to = need.saturating_add(step.max(PAGE)).min(self.size) & !(PAGE - 1);
        crate::fail_point!("segment-raise-limit", _a => {
            return Err(super::error::injected_error("segment-raise-limit"));
        });
        let h = SegmentHeader {
            record_limit: to,
            ..self.header
        };
        self.rewrite_header(&h, engine).map_err(|e| {
            StoreError::io(
                format!("raising the record limit of {}", self.path.display()),
                e,
            )
        })?;
        self.limit.store(to, Ordering::SeqCst);
        Ok(())
    }

    /// Rewrites the header pages with `h`: page 0, `fdatasync`, then page 1, `fdatasync` —
    /// a rewrite torn by a crash leaves the other copy whole.
    fn rewrite_header(&self, h: &SegmentHeader, engine: &dyn IoEngine) -> Result<(), io::IoError> {
        let mut page = AlignedBuf::zeroed(PAGE as usize);
        h.encode(&mut page);
        for at in [0, PAGE] {
            engine.write_all_at(self.fd(), at, &page)?;
            engine.fdatasync(self.fd())?;
        }
        Ok(())
    }

    /// Notes that a manifest of window-name key `key` was written into this segment.
    pub fn note_manifest(&self, key: u128) {
        if let Ok(mut m) = self.manifest_names.lock() {
            m.insert(key);
        }
    }

    /// True when a manifest of window-name key `key` was written into this segment.
    pub fn has_manifest(&self, key: u128) -> bool {
        // A poisoned set answers "yes": keeping a tombstone is always safe.
        self.manifest_names
            .lock()
            .map_or(true, |m| m.contains(&key))
    }

    /// Notes that a catalog record of key `key` was written into this segment.
    pub fn note_meta(&self, key: u128) {
        if let Ok(mut m) = self.meta_keys.lock() {
            m.insert(key);
        }
    }

    /// True when a catalog record of key `key` was written into this segment.
    pub fn has_meta(&self, key: u128) -> bool {
        // A poisoned set answers "yes": keeping a deletion is always safe.
        self.meta_keys.lock().map_or(true, |m| m.contains(&key))
    }

    /// Marks the segment sealed and gives back its unused preallocated tail.
    pub fn seal(&self) {
        if !self.sealed.swap(true, Ordering::SeqCst) {
            let f = self.frontier.load(Ordering::SeqCst);
            let _ = self.file.set_len(f);
        }
    }

    /// Seals the segment (see [`Segment::seal`]) and records its sealed length durably in both
    /// header pages (one after the other, each synced: a torn rewrite leaves the other), so a
    /// later truncation of the file is detected. Best effort: a failed rewrite is logged, the
    /// segment stays sealed either way. Everything handed out in it must be written.
    pub fn seal_recorded(&self, engine: &dyn IoEngine) {
        if self.sealed.load(Ordering::SeqCst) {
            return;
        }
        self.seal();
        self.record_sealed_len(engine);
    }

    /// The background part of a rotation's seal, once everything handed out in the segment
    /// is written (or failed): gives back the unused preallocated tail, makes the records
    /// durable, then records the sealed length ([`Segment::seal_recorded`]). The truncation
    /// waits for this point because a file's size change waits for every direct write in
    /// flight on it: under the appender lock, it would stall every freeze.
    pub fn finish_seal(&self, engine: &dyn IoEngine) {
        if !self.failed.load(Ordering::SeqCst) {
            let _ = self.file.set_len(self.frontier());
            // The records reach the device before the header that vouches for them.
            if let Err(e) = engine.fdatasync(self.fd()) {
                crate::log::warn(&format!(
                    "fdatasync of {} before recording its sealed length failed ({e}); the \
                     segment is now read-only",
                    self.path.display()
                ));
                self.fail();
            }
        }
        self.record_sealed_len(engine);
    }

    /// Waits while a rotation's seal of the segment is under way ([`Segment::sealing`]): a
    /// few milliseconds, the time the writes in flight in it take.
    pub fn wait_sealed(&self) {
        while self.sealing.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Writes the sealed length into both header pages (format 2 and later; nothing for a
    /// failed segment).
    fn record_sealed_len(&self, engine: &dyn IoEngine) {
        if self.header.version < 2 || self.failed.load(Ordering::SeqCst) {
            return;
        }
        let h = SegmentHeader {
            sealed_len: self.frontier(),
            record_limit: self.limit(),
            ..self.header
        };
        if let Err(e) = self.rewrite_header(&h, engine) {
            crate::log::warn(&format!(
                "recording the sealed length in {} failed: {e}",
                self.path.display()
            ));
        }
    }

    /// Notes a record appended at `r.offset` (for the checkpoint).
    /// A metadata record comes with its payload.
    pub fn note_record(&self, r: Rec, payload: Option<&[u8]>) {
        if let Ok(mut g) = self.records.lock() {
            if let Some(v) = g.as_mut() {
                v.push((r, payload.map(<[u8]>::to_vec)));
            }
        }
    }

    /// Forgets the records from `offset` on (cut back after a failed write).
    pub fn forget_records_from(&self, offset: u64) {
        if let Ok(mut g) = self.records.lock() {
            if let Some(v) = g.as_mut() {
                v.retain(|(r, _)| r.offset < offset);
            }
        }
    }

    /// Takes the records kept for the checkpoint (none are kept after this).
    pub fn take_records(&self) -> Option<Vec<Kept>> {
        self.records.lock().ok().and_then(|mut g| g.take())
    }

    /// Marks the segment failed (read-only) after a write or fdatasync error.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.seal();
    }

    /// Offset just past the last record.
    pub fn frontier(&self) -> u64 {
        self.frontier.load(Ordering::SeqCst)
    }
}
