//! Recovery: scan record headers of every segment (payloads only for metadata records), tell a
//! torn tail (nothing valid after it) from a damaged region (valid records after it: skipped
//! and reported), apply manifests and tombstones in sequence order (either copy of each), and
//! expose every window whose manifest survives; a block lost to damage ends its window's
//! usable prefix.
//!
//! `scan.rs` walks one segment's records; `segment_files.rs` opens segment files and reads
//! their headers (and sets aside invalid ones for `cwm fsck --repair`); `windows.rs` applies
//! manifests and tombstones and publishes the surviving windows; this file holds [`recover`],
//! its steps over the segments, and the newest segment's return to service.

pub(crate) mod scan;
mod segment_files;
mod windows;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use super::append::Appender;
use super::checkpoint;
use super::error::StoreError;
use super::format::{self, record_len, HeaderError, RecordHeader, RecordKind, SegmentHeader, PAGE};
use super::index::{Loc, State};
use super::keyhash::KeyMap;
use super::manifest::{Manifest, Tombstone};
use super::segment::{self, Segment};
use super::verify::{check_meta, verify_image};
use super::{name_key, StoreConfig};
use crate::io::{AlignedBuf, IoEngine};

use scan::{scan, Rec};
pub(crate) use segment_files::set_aside_invalid_segments;
use segment_files::{
    highest_named_id, holds_records, open_segment_file, read_segment_header, segment_ids,
};

/// What recovery tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryMode {
    /// Any invalid record (a torn tail included), damaged manifest or incomplete window fails
    /// the open with a report.
    Strict,
    /// Torn segment tails (a crash mid-write) are cut off; damaged manifests and incomplete
    /// windows are reported and left invisible. The default.
    #[default]
    TolerateTail,
}

impl std::str::FromStr for RecoveryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Self::Strict),
            "tolerate-tail" => Ok(Self::TolerateTail),
            o => Err(format!(
                "unknown recovery mode {o:?}: use strict or tolerate-tail"
            )),
        }
    }
}

/// What recovery found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: u64,
    /// Valid records found.
    pub records: u64,
    /// Windows exposed.
    pub windows: u64,
    /// Segments whose scan stopped at an invalid (torn) header: (segment id, offset, why).
    pub torn_tails: Vec<(u64, u64, String)>,
    /// Manifests or tombstones whose payload failed its checksum: (segment id, offset).
    pub damaged_records: Vec<(u64, u64)>,
    /// Damaged regions inside segments skipped to reach later valid records:
    /// (segment id, from, to, why).
    pub damaged_regions: Vec<(u64, u64, u64, String)>,
    /// Windows whose manifest refers to a block recovery did not find (its record was lost to
    /// damage): they are listed and thaw up to that block. Names.
    pub incomplete_windows: Vec<String>,
    /// Segment files removed because their header was never written (crash at creation).
    pub removed_empty_segments: Vec<u64>,
    /// Bytes of torn tails cut off.
    pub truncated_bytes: u64,
    /// Segments whose records were read from their checkpoint instead of their headers
    /// (docs/FORMAT.md "Checkpoints").
    pub checkpointed_segments: u64,
    /// Checkpoints that could not be used (the segment was scanned instead; a new checkpoint
    /// is written when the scan finds it clean): (segment id, why).
    pub ignored_checkpoints: Vec<(u64, String)>,
    /// Seconds spent loading segments (checkpoints read, the rest scanned, records gathered).
    pub load_seconds: f64,
    /// Seconds spent applying manifests and tombstones and publishing the windows.
    pub publish_seconds: f64,
    /// Windows whose saved usage (last use, hits; `usage.bin`) was applied.
    pub usage_restored: u64,
    /// Why the saved usage was ignored (a damaged or unreadable `usage.bin`), if it was.
    pub ignored_usage: Option<String>,
}

/// What [`Recovery::scan_segment`] found in one segment.
struct Scanned {
    /// The records, in offset order.
    recs: Vec<Rec>,
    /// For each record, the payload its checkpoint holds (metadata records it covers).
    payloads: Vec<Option<Vec<u8>>>,
    /// Where appends may resume.
    frontier: u64,
    /// Where the records taken from the checkpoint end (the first record's offset when none
    /// were).
    checkpointed: u64,
    /// No damage found by the scan (a checkpoint may be written from these records).
    clean: bool,
}

/// A manifest or tombstone found in the log, and where.
enum Meta {
    Manifest(Manifest, Loc),
    Tombstone(Tombstone, Loc),
}

/// A block record found in the log. Its segment is named by id, not held (no reference count
/// touched per record while a million are gathered).
struct Cand {
    seq: u64,
    seg: u64,
    offset: u64,
    len: u64,
    payload_len: u64,
    checksum: u64,
}

/// The block records found for one key: almost always one (kept inline: a million keys cost
/// no million allocations), several for a block written again or copied by compaction.
enum Cands {
    One(Cand),
    Many(Vec<Cand>),
}

impl Cands {
    fn push(&mut self, c: Cand) {
        match self {
            Cands::Many(v) => v.push(c),
            Cands::One(_) => {
                let Cands::One(first) = std::mem::replace(self, Cands::Many(Vec::new())) else {
                    return;
                };
                *self = Cands::Many(vec![first, c]);
            }
        }
    }

    fn as_slice(&self) -> &[Cand] {
        match self {
            Cands::One(c) => std::slice::from_ref(c),
            Cands::Many(v) => v,
        }
    }
}

/// The index, the appender, the bytes in the log, and the report.
type Recovered = (State, Appender, u64, RecoveryReport);

/// Rebuilds the index from the log in `cfg.dir`, in steps: load every segment in id order
/// ([`Recovery::load_segment`]), apply manifests and tombstones in sequence order
/// ([`Recovery::apply_name_events`]), publish the surviving windows
/// ([`Recovery::publish_windows`]), and make the newest segment the active one again
/// ([`Recovery::resume_active`]).
pub(super) fn recover(cfg: &StoreConfig, engine: &dyn IoEngine) -> Result<Recovered, StoreError> {
    let ids = segment_ids(&cfg.dir)?;
    let mut r = Recovery {
        cfg,
        engine,
        strict: cfg.recovery == RecoveryMode::Strict,
        report: RecoveryReport::default(),
        state: State::default(),
        metas: Vec::new(),
        cands: KeyMap::default(),
        max_seq: 0,
        used: 0,
        last: None,
        heal: None,
        page: AlignedBuf::zeroed(PAGE as usize),
        ids: ids.clone(),
        to_seal: Vec::new(),
    };
    // The block index is sized once from what the checkpoints list (rehashing a million
    // entries while they arrive costs more than the checkpoints' reads).
    if cfg.use_checkpoints {
        r.cands.reserve(checkpoint::listed_records(&cfg.dir, &ids));
    }
    let t = std::time::Instant::now();
    for (n, &id) in ids.iter().enumerate() {
        r.load_segment(id, n + 1 == ids.len())?;
    }
    r.report.load_seconds = t.elapsed().as_secs_f64();
    // Segments holding damage: their files are never written into again.
    let damaged = r.report.damaged_regions.iter().map(|d| d.0);
    for id in damaged.chain(r.report.damaged_records.iter().map(|d| d.0)) {
        if let Some(s) = r.state.segments.get(&id) {
            s.damaged.store(true, Ordering::SeqCst);
        }
    }
    let t = std::time::Instant::now();
    for (_, _, loc) in r.state.meta.values() {
        loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
    }
    checkpoint::remove_orphans(&cfg.dir, |id| r.state.segments.contains_key(&id));
    let (live, refs) = r.apply_name_events();
    r.publish_windows(live, &refs)?;
    r.report.publish_seconds = t.elapsed().as_secs_f64();
    r.report.windows = r.state.windows.len() as u64;
    let active = r.resume_active()?;
    for s in std::mem::take(&mut r.to_seal) {
        if active.as_ref().is_none_or(|a| a.id != s.id) {
            s.finish_seal(engine);
        }
    }
    // Past every id any file of the directory names (a free file kept for reuse, a checkpoint,
    // a segment set aside), not only the segments': a free file's
    // name never collides with a new segment's.
    let next_segment = ids
        .last()
        .copied()
        .unwrap_or(0)
        .max(highest_named_id(&cfg.dir)?)
        .checked_add(1)
        .ok_or_else(|| StoreError::Recovery("segment ids are exhausted".to_string()))?;
    Ok((
        r.state,
        Appender {
            active,
            next_seq: r.max_seq + 1,
            next_segment,
        },
        r.used,
        r.report,
    ))
}

/// A recovery under way: what the segments loaded so far hold.
struct Recovery<'a> {
    cfg: &'a StoreConfig,
    engine: &'a dyn IoEngine,
    /// [`RecoveryMode::Strict`]: refuse what tolerate-tail reports.
    strict: bool,
    report: RecoveryReport,
    /// The index being rebuilt (catalog records and segments while loading; windows, blocks,
    /// names and tombstones after).
    state: State,
    /// Manifests and tombstones found, with their sequence numbers.
    metas: Vec<(u64, Meta)>,
    /// Block records found, by key.
    cands: KeyMap<Cands>,
    /// Highest sequence number found.
    max_seq: u64,
    /// Bytes of the log (up to each segment's frontier).
    used: u64,
    /// The newest segment loaded.
    last: Option<Arc<Segment>>,
    /// The metadata record ending the newest segment whose second copy is missing: (offset,
    /// length, header); written again once the tail is reset.
    heal: Option<(u64, u64, RecordHeader)>,
    /// A page buffer for header reads.
    page: AlignedBuf,
    /// The ids of the segments in the directory, in order.
    ids: Vec<u64>,
    /// Older segments found unsealed and whole: their sealed lengths are recorded after the
    /// open chose the append segment.
    to_seal: Vec<Arc<Segment>>,
}

impl Recovery<'_> {
    /// Loads segment `id` (`newest`: the last one of the directory): its header, then its
    /// records (damage and a torn tail reported, or refused when strict); gathers its block
    /// records, manifests and tombstones, and indexes its catalog records.
    fn load_segment(&mut self, id: u64, newest: bool) -> Result<(), StoreError> {
        let path = self.cfg.dir.join(segment::file_name(id));
        let (file, file_len) = open_segment_file(&path)?;
        let Some(header) = self.segment_header(id, newest, &file, file_len, &path)? else {
            drop(file);
            std::fs::remove_file(&path).map_err(|e| StoreError::from_fs("remove", &path, e))?;
            self.report.removed_empty_segments.push(id);
            return Ok(());
        };
        let seg = Arc::new(Segment::loaded(id, file, path.clone(), header));
        self.report.segments += 1;
        let Scanned {
            recs,
            mut payloads,
            frontier,
            checkpointed,
            clean,
        } = self.scan_segment(&seg, file_len, &path, newest)?;
        seg.frontier.store(frontier, Ordering::SeqCst);
        self.used += frontier;
        // The newest segment ends with a metadata record whose second copy is missing: it is
        // written again once the tail is reset (`resume_active`), so the record is kept twice
        // again.
        self.heal = recs
            .last()
            .filter(|r| {
                newest
                    && !r.h.ditto
                    && format::copies(r.h.kind) == 2
                    && r.len == record_len(r.h.payload_len)
                    && r.offset + r.len == frontier
            })
            .map(|r| (r.offset, r.len, r.h));
        // A checkpoint is written from these records (or they are kept for one): metadata
        // payloads are kept as they are read.
        let active = newest && seg.header.sealed_len == 0;
        let keep = clean
            && checkpoint::tiles(seg.first_record, &recs, frontier)
            && (active || checkpointed < frontier);
        // Metadata records are read a batch at a time, concurrently (one request each would
        // wait out the device's latency once per manifest); those a checkpoint holds are not
        // read at all.
        for (n, batch) in recs.chunks(META_BATCH).enumerate() {
            let at = n * META_BATCH;
            let mut imgs =
                read_meta_images(self.engine, &seg, batch, &payloads[at..at + batch.len()])?;
            for (i, (r, img)) in batch.iter().zip(imgs.iter_mut()).enumerate() {
                let raw = self.gather_record(
                    &seg,
                    *r,
                    img.take(),
                    payloads[at + i].as_deref(),
                    keep,
                    &path,
                )?;
                if raw.is_some() {
                    payloads[at + i] = raw;
                }
            }
        }
        if keep {
            let kept: Vec<checkpoint::Kept> = recs.into_iter().zip(payloads).collect();
            if active {
                // Kept in memory while it is the active segment; checkpointed when sealed or
                // at a clean stop.
                if let Ok(mut g) = seg.records.lock() {
                    *g = Some(kept);
                }
            } else {
                self.write_checkpoint(&seg, frontier, &kept);
            }
        }
        // Cut off torn tails and unused preallocation so stale bytes can never be read as
        // records after later appends.
        if file_len > frontier && !newest {
            seg.file
                .set_len(frontier)
                .map_err(|e| StoreError::from_fs("truncate", &path, e))?;
        }
        // An older segment found unsealed (a crash while its rotation's seal was under way)
        // and whole: its sealed length is recorded once the open knows it is not the append
        // segment again (the newer one may be an empty file, removed), so a later truncation
        // is caught.
        if !newest
            && seg.header.sealed_len == 0
            && self.report.damaged_regions.iter().all(|d| d.0 != id)
        {
            self.to_seal.push(seg.clone());
        }
        self.state.segments.insert(id, seg.clone());
        self.last = Some(seg);
        Ok(())
    }

    /// Segment `id`'s header (either copy; a damaged copy is reported). `None`: the newest
    /// segment holds no header and no record (a crash while creating it): it is removed.
    fn segment_header(
        &mut self,
        id: u64,
        newest: bool,
        file: &File,
        file_len: u64,
        path: &Path,
    ) -> Result<Option<SegmentHeader>, StoreError> {
        let (header, header_damage) =
            read_segment_header(self.engine, file, file_len, path, &mut self.page)?;
        if let Some((from, to, why)) = header_damage {
            if self.strict {
                return Err(StoreError::Recovery(format!(
                    "{}: segment header copy at {from}..{to} is damaged ({why}); run `cwm fsck`",
                    path.display()
                )));
            }
            self.report.damaged_regions.push((id, from, to, why));
        }
        match header {
            Ok(h) if h.segment_id == id => Ok(Some(h)),
            Err(HeaderError::Empty) if newest => {
                // Crash while creating the newest segment: it holds nothing. Records are only
                // appended after the header pages are durable, the first one at page 2 (page 1
                // in a version 1 segment): a segment whose header pages are zero but whose
                // first record page is not lost its header some other way, and is never
                // removed (its records may be acknowledged).
                if holds_records(self.engine, file, file_len, path, &mut self.page)? {
                    return Err(StoreError::Recovery(format!(
                        "segment header of {} is zeroed but the segment holds records; run \
                         `cwm fsck --repair` to set it aside",
                        path.display()
                    )));
                }
                Ok(None)
            }
            Ok(_) => Err(StoreError::Recovery(format!(
                "{} has the header of another segment; run `cwm fsck`",
                path.display()
            ))),
            Err(e) => Err(StoreError::Recovery(format!(
                "segment header of {} is invalid ({e}); run `cwm fsck --repair` to set it aside",
                path.display()
            ))),
        }
    }

    /// Takes the records of `seg` from its checkpoint where it has a usable one, scans the
    /// rest, and reports (or, when strict, refuses) its damaged regions, a sealed length its
    /// records fall short of, and its torn tail. Returns the records, the frontier and where
    /// the checkpointed records end (the first record's offset when none were).
    fn scan_segment(
        &mut self,
        seg: &Segment,
        file_len: u64,
        path: &Path,
        newest: bool,
    ) -> Result<Scanned, StoreError> {
        let id = seg.id;
        let header = seg.header;
        let ckpt = if self.cfg.use_checkpoints {
            checkpoint::read(&self.cfg.dir, seg, file_len)
        } else {
            Ok(None)
        };
        let (ck, start, last_seq) = match ckpt {
            Ok(Some(c)) => {
                self.report.checkpointed_segments += 1;
                self.state.checkpointed.push((id, c.covered));
                (c.recs, c.covered, c.last_seq)
            }
            Ok(None) => (Vec::new(), seg.first_record, 0),
            Err(why) => {
                crate::log::warn(&format!(
                    "{}: checkpoint ignored ({why}); scanning the segment",
                    path.display()
                ));
                self.report.ignored_checkpoints.push((id, why));
                (Vec::new(), seg.first_record, 0)
            }
        };
        let (mut recs, mut payloads): (Vec<Rec>, Vec<Option<Vec<u8>>>) = ck.into_iter().unzip();
        let checkpointed = start;
        let (more, mut frontier, mut torn, mut damaged) =
            scan(self.engine, seg, file_len, start, last_seq)?;
        recs.extend(more);
        payloads.resize(recs.len(), None);
        if header.sealed_len == 0
            && !damaged.is_empty()
            && (newest || self.only_fresh_blocks_after(id)?)
        {
            let mut held = HeldElsewhere::new(self);
            unwritten_tail(&mut recs, &mut frontier, &mut torn, &mut damaged, |r| {
                held.holds(r, id)
            });
        }
        if header.sealed_len > frontier {
            // Sealed at that length, its records end earlier: truncated, or its tail damaged.
            damaged.push((
                frontier,
                header.sealed_len,
                format!(
                    "the segment was sealed at {} bytes but its records end at {frontier} \
                     (file of {file_len} bytes): truncated or damaged",
                    header.sealed_len
                ),
            ));
        }
        if let Some((from, to, why)) = damaged.first() {
            if self.strict {
                return Err(StoreError::Recovery(format!(
                    "{}: invalid record header at offset {from} ({why}), valid records resume at {to}; run `cwm fsck`",
                    path.display()
                )));
            }
        }
        let clean = damaged.is_empty();
        for (from, to, why) in damaged {
            self.report.damaged_regions.push((id, from, to, why));
        }
        if let Some((off, why)) = torn {
            if self.strict {
                return Err(StoreError::Recovery(format!(
                    "{}: invalid record header at offset {off} ({why}); strict recovery refuses a torn tail (open with tolerate-tail to cut it off)",
                    path.display()
                )));
            }
            self.report.truncated_bytes += file_len.saturating_sub(off);
            self.report.torn_tails.push((id, off, why));
        }
        // `unwritten_tail` may have cut records off the end.
        payloads.truncate(recs.len());
        let scanned = Scanned {
            recs,
            payloads,
            frontier,
            checkpointed,
            clean: clean && self.cfg.use_checkpoints,
        };
        Ok(scanned)
    }

    /// For an unsealed segment `id` that is not the newest (a rotation's seal was under way at
    /// the crash, or a failure sealed it): true when every later segment is unsealed too and
    /// holds nothing but block records of freezes (no metadata record, no compaction copy).
    /// Only then may room handed out in `id` be unwritten: a metadata record or a compaction
    /// copy is written only once every record handed out before it is, and a rotation's seal
    /// is recorded only once every record handed out in its segment is — so after any of
    /// them, a hole in `id` is damage. Read only when `id` holds damage (a crash during a
    /// rotation's seal): the later segments' record headers are scanned here once more.
    fn only_fresh_blocks_after(&mut self, id: u64) -> Result<bool, StoreError> {
        let later: Vec<u64> = self.ids.iter().copied().filter(|&i| i > id).collect();
        for later_id in later {
            let path = self.cfg.dir.join(segment::file_name(later_id));
            let (file, file_len) = open_segment_file(&path)?;
            let (header, _) =
                read_segment_header(self.engine, &file, file_len, &path, &mut self.page)?;
            let header = match header {
                Ok(h) if h.segment_id == later_id && h.sealed_len == 0 => h,
                // A crash while creating it: it holds nothing.
                Err(HeaderError::Empty) => continue,
                _ => return Ok(false),
            };
            let seg = Segment::loaded(later_id, file, path, header);
            let (recs, ..) = scan(self.engine, &seg, file_len, seg.first_record, 0)?;
            if recs
                .iter()
                .any(|r| r.h.kind != RecordKind::Block || r.h.copied)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes the checkpoint of a segment found clean that had none (or an unusable or
    /// partial one), after making its records durable (they were read back, but a block
    /// record of a freeze that never committed may not have been synced). Best effort: without
    /// one, the next open scans the segment again.
    fn write_checkpoint(&self, seg: &Segment, covered: u64, recs: &[checkpoint::Kept]) {
        checkpoint::sync_and_write(self.engine, &self.cfg.dir, seg, covered, recs);
    }

    /// Takes in one record of `seg`: a block record becomes a candidate for the manifests
    /// that refer to its key; a metadata record is read and verified (either copy), and a
    /// catalog record indexed, a manifest or tombstone kept for
    /// [`Recovery::apply_name_events`].
    /// `ckpt`: the payload a checkpoint holds for a metadata record; `keep`: return the
    /// payload read (for a checkpoint of this segment).
    fn gather_record(
        &mut self,
        seg: &Arc<Segment>,
        r: Rec,
        img: Option<AlignedBuf>,
        ckpt: Option<&[u8]>,
        keep: bool,
        path: &Path,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let id = seg.id;
        self.max_seq = self.max_seq.max(r.h.seq);
        self.report.records += 1;
        if r.h.kind == RecordKind::Manifest {
            seg.note_manifest(r.h.key);
        }
        if r.h.kind == RecordKind::Meta {
            seg.note_meta(r.h.key);
        }
        match r.h.kind {
            RecordKind::Block => {
                let c = Cand {
                    seq: r.h.seq,
                    seg: id,
                    offset: r.offset,
                    len: r.len,
                    payload_len: r.h.payload_len,
                    checksum: r.h.payload_xxh3,
                };
                match self.cands.entry(r.h.key) {
                    std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(c),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Cands::One(c));
                    }
                }
            }
            RecordKind::Manifest | RecordKind::Tombstone | RecordKind::Meta => {
                let loc = Loc {
                    seg: seg.clone(),
                    offset: r.offset,
                    len: r.len,
                };
                let mut bad_copy = Vec::new();
                let read = match (ckpt, img) {
                    (Some(p), _) => Ok(decode_payload(&r, p).map(|m| (m, None))),
                    (None, Some(img)) => Ok(decode_meta(&img, seg, &r, &mut bad_copy)
                        .map(|(m, p)| (m, keep.then(|| p.to_vec())))),
                    (None, None) => read_meta(self.engine, seg, &r, &mut bad_copy)
                        .map(|o| o.map(|(m, p)| (m, keep.then_some(p)))),
                };
                for (from, to, why) in bad_copy {
                    if self.strict {
                        return Err(StoreError::Recovery(format!(
                            "{}: a copy of the {:?} record at offset {from} is damaged ({why})",
                            path.display(),
                            r.h.kind
                        )));
                    }
                    self.report.damaged_regions.push((id, from, to, why));
                }
                match read {
                    Ok(Some((m, raw))) => {
                        let m = match m {
                            MetaPayload::Catalog(bytes) => {
                                // The newest record of a key is live (counted once every
                                // segment is loaded); a compaction copy (same sequence number)
                                // wins over its original.
                                let newer = self
                                    .state
                                    .meta
                                    .get(&r.h.key)
                                    .is_none_or(|(s, _, _)| *s <= r.h.seq);
                                if newer {
                                    self.state.meta.insert(r.h.key, (r.h.seq, bytes, loc));
                                }
                                return Ok(raw);
                            }
                            MetaPayload::Manifest(m) => Meta::Manifest(m, loc),
                            MetaPayload::Tombstone(t) => Meta::Tombstone(t, loc),
                        };
                        self.metas.push((r.h.seq, m));
                        return Ok(raw);
                    }
                    Ok(None) | Err(_) => {
                        if self.strict {
                            return Err(StoreError::Recovery(format!(
                                "{}: damaged {:?} record at offset {}",
                                path.display(),
                                r.h.kind,
                                r.offset
                            )));
                        }
                        self.report.damaged_records.push((id, r.offset));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The newest segment stays the active one if it has room: cut its tail, re-preallocate
    /// (zeros), and make that durable before anything is appended after the recovered
    /// records; then write the missing second copy of its last record, if any
    /// ([`Recovery::heal`]).
    fn resume_active(&mut self) -> Result<Option<Arc<Segment>>, StoreError> {
        let mut active = None;
        if let Some(seg) = self.last.take() {
            let f = seg.frontier();
            // A segment sealed at rotation stays sealed (its header says so).
            if f + PAGE < seg.size && seg.header.sealed_len == 0 {
                match reset_tail(&seg.file, f, seg.size) {
                    Ok(()) => {
                        if let Some((offset, len, h)) = self.heal {
                            if f + len + PAGE < seg.size {
                                let added = rewrite_copy(self.engine, &seg, offset, len, h)?;
                                self.used += added;
                                // The checkpoint's list merges the two copies, as a scan
                                // would.
                                if let Ok(mut g) = seg.records.lock() {
                                    if let Some(last) = g.as_mut().and_then(|v| v.last_mut()) {
                                        if last.0.offset == offset && added > 0 {
                                            last.0.len += added;
                                        }
                                    }
                                }
                            }
                        }
                        seg.sealed.store(false, Ordering::SeqCst);
                        active = Some(seg);
                    }
                    // A full file system (EC-052): the segment stays sealed at its last record,
                    // and the store opens; appends get NO_SPACE (or a small segment) as usual.
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        crate::log::warn(&format!(
                            "{}: no space to re-preallocate the newest segment; it stays sealed",
                            seg.path.display()
                        ));
                        let _ = seg.file.set_len(f);
                    }
                    Err(e) => return Err(StoreError::from_fs("reset the tail of", &seg.path, e)),
                }
            } else {
                let _ = seg.file.set_len(f);
            }
        }
        Ok(active)
    }
}

/// In the newest (unsealed) segment — or an unsealed one followed only by unsealed segments
/// holding nothing but freezes' block records (a crash while its rotation's seal was under way:
/// [`Recovery::only_fresh_blocks_after`]) — a damaged region after the last record that must be
/// there is room handed out at a crash and never written, and everything from the first such
/// region on is the torn tail (cut off at the open); a region before that record stays damage.
///
/// What must be there: a metadata record, and a compaction copy whose original no other
/// segment holds (`held_elsewhere` false). Metadata records are written only once every record
/// handed out before them is written, so nothing acknowledged lies after the last one — only
/// block records of freezes in flight (no manifest refers to them) and compaction copies. A batch of copies is written all at once, concurrently (in a reused file, where
/// ext4 overwrites in place, in any order), and synced before its source can be removed: while
/// a copy's original still stands, a crash may have left any of the batch's copies unwritten,
/// and losing the copies loses nothing. Once the source was removed, the batch was synced, so
/// a hole before such a copy is damage, reported.
fn unwritten_tail(
    recs: &mut Vec<Rec>,
    frontier: &mut u64,
    torn: &mut Option<(u64, String)>,
    damaged: &mut Vec<(u64, u64, String)>,
    mut held_elsewhere: impl FnMut(&Rec) -> bool,
) {
    let barrier = recs
        .iter()
        .rev()
        .find(|r| {
            (r.h.kind != RecordKind::Block && !r.h.copied) || (r.h.copied && !held_elsewhere(r))
        })
        .map_or(0, |r| r.offset + r.len);
    let Some(pos) = damaged.iter().position(|(from, _, _)| *from >= barrier) else {
        return;
    };
    let from = damaged[pos].0;
    damaged.truncate(pos);
    recs.retain(|r| r.offset < from);
    *frontier = from;
    *torn = Some((
        from,
        "room handed out at a crash, never written (only block records no manifest refers to, \
         and compaction copies whose originals stand, follow)"
            .to_string(),
    ));
}

/// Whether the records of another segment loaded so far hold a compaction copy's original (the
/// same block, or the metadata record of the same sequence number): see [`unwritten_tail`].
/// Looked up only for the newest segment's copies after its last metadata record, when it holds
/// damage.
struct HeldElsewhere<'r, 'a> {
    recovery: &'r Recovery<'a>,
    /// Sequence numbers of the manifests and tombstones loaded (built at the first lookup of one).
    meta_seqs: Option<std::collections::HashSet<u64>>,
}

impl<'r, 'a> HeldElsewhere<'r, 'a> {
    fn new(recovery: &'r Recovery<'a>) -> Self {
        Self {
            recovery,
            meta_seqs: None,
        }
    }

    /// True when a segment other than `seg` holds the original of copy `r`.
    fn holds(&mut self, r: &Rec, seg: u64) -> bool {
        let rc = self.recovery;
        match r.h.kind {
            RecordKind::Block => rc.cands.get(&r.h.key).is_some_and(|c| {
                c.as_slice().iter().any(|c| {
                    c.seg != seg
                        && c.checksum == r.h.payload_xxh3
                        && c.payload_len == r.h.payload_len
                })
            }),
            // Only the newest catalog record of a key is kept: a newer one elsewhere
            // supersedes the copy.
            RecordKind::Meta => rc
                .state
                .meta
                .get(&r.h.key)
                .is_some_and(|(s, _, l)| l.seg.id != seg && *s >= r.h.seq),
            RecordKind::Manifest | RecordKind::Tombstone => self
                .meta_seqs
                .get_or_insert_with(|| rc.metas.iter().map(|(s, _)| *s).collect())
                .contains(&r.h.seq),
        }
    }
}

/// Writes the missing copy of the metadata record at `offset` (the segment's last record, `len`
/// bytes, header `h`) at the frontier, durably; returns the bytes added. Not referred to by the
/// index until the next open, which merges the two copies.
fn rewrite_copy(
    engine: &dyn IoEngine,
    seg: &Segment,
    offset: u64,
    len: u64,
    h: RecordHeader,
) -> Result<u64, StoreError> {
    let mut img = AlignedBuf::zeroed(len as usize);
    let ctx = |e| {
        StoreError::io(
            format!("rewriting a record copy in {}", seg.path.display()),
            e,
        )
    };
    engine
        .read_exact_at(seg.fd(), offset, &mut img)
        .map_err(ctx)?;
    if verify_image(&img, seg, h.kind).is_err() {
        return Ok(0);
    }
    RecordHeader { ditto: true, ..h }.encode(seg.generation, &mut img[..PAGE as usize]);
    let at = seg.frontier();
    engine.write_all_at(seg.fd(), at, &img).map_err(ctx)?;
    engine.fdatasync(seg.fd()).map_err(ctx)?;
    seg.frontier.store(at + len, Ordering::SeqCst);
    Ok(len)
}

fn reset_tail(file: &File, frontier: u64, size: u64) -> std::io::Result<()> {
    file.set_len(frontier)?;
    segment::preallocate(file, size)?;
    file.sync_all()
}

pub(crate) enum MetaPayload {
    Manifest(Manifest),
    Tombstone(Tombstone),
    Catalog(Vec<u8>),
}

/// Metadata records read at once at open.
const META_BATCH: usize = 256;

/// The images of the metadata records among `recs` (`None` for block records), read
/// concurrently.
///
/// Records whose payload a checkpoint holds are not read:
/// [`Store::verify_checkpoints`](crate::store::Store::verify_checkpoints) checks both of their
/// copies in the log after the open, as the scan of a segment without a checkpoint does at the
/// open.
fn read_meta_images(
    engine: &dyn IoEngine,
    seg: &Segment,
    recs: &[Rec],
    payloads: &[Option<Vec<u8>>],
) -> Result<Vec<Option<AlignedBuf>>, StoreError> {
    let mut imgs: Vec<Option<AlignedBuf>> = recs
        .iter()
        .zip(payloads)
        .map(|(r, p)| {
            (r.h.kind != RecordKind::Block && p.is_none())
                .then(|| AlignedBuf::zeroed(r.len as usize))
        })
        .collect();
    let mut ops: Vec<crate::io::Op<'_>> = recs
        .iter()
        .zip(imgs.iter_mut())
        .filter_map(|(r, img)| {
            img.as_mut()
                .map(|b| crate::io::Op::read(seg.fd(), r.offset, &mut b[..]))
        })
        .collect();
    if !ops.is_empty() {
        engine
            .run(&mut ops)
            .map_err(|e| StoreError::io("reading manifests during recovery", e))?;
    }
    drop(ops);
    Ok(imgs)
}

pub(crate) fn read_meta(
    engine: &dyn IoEngine,
    seg: &Segment,
    r: &Rec,
    damaged: &mut Vec<(u64, u64, String)>,
) -> Result<Option<(MetaPayload, Vec<u8>)>, StoreError> {
    let mut img = AlignedBuf::zeroed(r.len as usize);
    engine
        .read_exact_at(seg.fd(), r.offset, &mut img)
        .map_err(|e| StoreError::io("reading a manifest during recovery", e))?;
    Ok(decode_meta(&img, seg, r, damaged).map(|(m, p)| (m, p.to_vec())))
}

/// The payload of the metadata record `r` from its image: either copy that verifies (a copy
/// that does not is reported).
fn decode_meta<'i>(
    img: &'i [u8],
    seg: &Segment,
    r: &Rec,
    damaged: &mut Vec<(u64, u64, String)>,
) -> Option<(MetaPayload, &'i [u8])> {
    let (good, bad) = check_meta(img, seg, r.h.kind);
    let Ok((_, p)) = good else {
        return None;
    };
    if let Some(why) = bad {
        damaged.push((r.offset, r.offset + r.len, why));
    }
    decode_payload(r, p).map(|m| (m, p))
}

/// The payload `p` of metadata record `r`, decoded (`None`: it does not decode, or a manifest
/// names another window than its header's key).
fn decode_payload(r: &Rec, p: &[u8]) -> Option<MetaPayload> {
    match r.h.kind {
        RecordKind::Manifest => Manifest::decode(p)
            .ok()
            .and_then(|m| (name_key(&m.name) == r.h.key).then_some(MetaPayload::Manifest(m))),
        RecordKind::Tombstone => Tombstone::decode(p).ok().map(MetaPayload::Tombstone),
        RecordKind::Meta => Some(MetaPayload::Catalog(p.to_vec())),
        RecordKind::Block => None,
    }
}
