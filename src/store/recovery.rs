//! Recovery: scan record headers of every segment (payloads only for metadata records), tell a
//! torn tail (nothing valid after it) from a damaged region (valid records after it: skipped
//! and reported), apply manifests and tombstones in sequence order (either copy of each), and
//! expose every window whose manifest survives; a block lost to damage ends its window's
//! usable prefix.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::format::{record_len, HeaderError, RecordHeader, RecordKind, SegmentHeader, PAGE};
use super::manifest::{Manifest, Tombstone};
use super::segment::{self, Segment};
use super::{
    name_key, Appender, BlockEntry, Loc, State, StoreConfig, StoreError, WindowEntry, WindowInfo,
};
use crate::io::{self, AlignedBuf, IoEngine};

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
}

pub(super) struct Rec {
    pub h: RecordHeader,
    pub offset: u64,
    pub len: u64,
}

enum Meta {
    Manifest(Manifest, Loc),
    Tombstone(Tombstone, Loc),
}

struct Cand {
    seq: u64,
    loc: Loc,
    payload_len: u64,
    checksum: u64,
}

const SCAN_WINDOW: usize = 256 * 1024;

type Recovered = (State, Appender, u64, RecoveryReport);

pub(super) fn recover(cfg: &StoreConfig, engine: &dyn IoEngine) -> Result<Recovered, StoreError> {
    let strict = cfg.recovery == RecoveryMode::Strict;
    let mut report = RecoveryReport::default();
    let mut ids: Vec<u64> = std::fs::read_dir(&cfg.dir)
        .map_err(|e| StoreError::from_fs("list", &cfg.dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment::parse_file_name(&e.file_name().to_string_lossy()))
        .collect();
    ids.sort_unstable();

    let mut state = State::default();
    let mut metas: Vec<(u64, Meta)> = Vec::new();
    let mut cands: HashMap<u128, Vec<Cand>> = HashMap::new();
    let mut max_seq = 0u64;
    let mut used = 0u64;
    let mut last: Option<Arc<Segment>> = None;
    let mut heal: Option<(u64, u64, RecordHeader)> = None;
    let mut page = AlignedBuf::zeroed(PAGE as usize);

    for (n, &id) in ids.iter().enumerate() {
        let path = cfg.dir.join(segment::file_name(id));
        let (file, file_len) = open_segment_file(&path)?;
        let (header, header_damage) =
            read_segment_header(engine, &file, file_len, &path, &mut page)?;
        if let Some((from, to, why)) = header_damage {
            if strict {
                return Err(StoreError::Recovery(format!(
                    "{}: segment header copy at {from}..{to} is damaged ({why}); run `cwm fsck`",
                    path.display()
                )));
            }
            report.damaged_regions.push((id, from, to, why));
        }
        let header = match header {
            Ok(h) if h.segment_id == id => h,
            Err(HeaderError::Empty) if n + 1 == ids.len() => {
                // Crash while creating the newest segment: it holds nothing. Records are only
                // appended after the header pages are durable, the first one at page 2 (page 1
                // in a version 1 segment): a segment whose header pages are zero but whose
                // first record page is not lost its header some other way, and is never
                // removed (its records may be acknowledged).
                if holds_records(engine, &file, file_len, &path, &mut page)? {
                    return Err(StoreError::Recovery(format!(
                        "segment header of {} is zeroed but the segment holds records; run \
                         `cwm fsck --repair` to set it aside",
                        path.display()
                    )));
                }
                drop(file);
                std::fs::remove_file(&path).map_err(|e| StoreError::from_fs("remove", &path, e))?;
                report.removed_empty_segments.push(id);
                continue;
            }
            Ok(_) => {
                return Err(StoreError::Recovery(format!(
                    "{} has the header of another segment; run `cwm fsck`",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(StoreError::Recovery(format!(
                "segment header of {} is invalid ({e}); run `cwm fsck --repair` to set it aside",
                path.display()
            )))
            }
        };
        let seg = Arc::new(Segment {
            id,
            generation: header.generation,
            size: header.segment_size,
            file,
            path: path.clone(),
            header,
            first_record: header.first_record(),
            frontier: AtomicU64::new(header.first_record()),
            live: AtomicU64::new(0),
            sealed: AtomicBool::new(true),
            failed: AtomicBool::new(false),
            manifest_names: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        report.segments += 1;
        let (recs, frontier, torn, mut damaged) = scan(engine, &seg, file_len)?;
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
            if strict {
                return Err(StoreError::Recovery(format!(
                    "{}: invalid record header at offset {from} ({why}), valid records resume at {to}; run `cwm fsck`",
                    path.display()
                )));
            }
        }
        for (from, to, why) in damaged {
            report.damaged_regions.push((id, from, to, why));
        }
        if let Some((off, why)) = torn {
            if strict {
                return Err(StoreError::Recovery(format!(
                    "{}: invalid record header at offset {off} ({why}); strict recovery refuses a torn tail (open with tolerate-tail to cut it off)",
                    path.display()
                )));
            }
            report.truncated_bytes += file_len.saturating_sub(off);
            report.torn_tails.push((id, off, why));
        }
        seg.frontier.store(frontier, Ordering::SeqCst);
        used += frontier;
        // The newest segment ends with a metadata record whose second copy is missing: it is
        // written again once the tail is reset (below), so the record is kept twice again.
        heal = recs
            .last()
            .filter(|r| {
                n + 1 == ids.len()
                    && !r.h.ditto
                    && super::format::copies(r.h.kind) == 2
                    && r.len == record_len(r.h.payload_len)
                    && r.offset + r.len == frontier
            })
            .map(|r| (r.offset, r.len, r.h));
        for r in recs {
            max_seq = max_seq.max(r.h.seq);
            report.records += 1;
            let loc = Loc {
                seg: seg.clone(),
                offset: r.offset,
                len: r.len,
            };
            if r.h.kind == RecordKind::Manifest {
                seg.note_manifest(r.h.key);
            }
            match r.h.kind {
                RecordKind::Block => cands.entry(r.h.key).or_default().push(Cand {
                    seq: r.h.seq,
                    loc,
                    payload_len: r.h.payload_len,
                    checksum: r.h.payload_xxh3,
                }),
                RecordKind::Manifest | RecordKind::Tombstone | RecordKind::Meta => {
                    let mut bad_copy = Vec::new();
                    let read = read_meta(engine, &seg, &r, &mut bad_copy);
                    for (from, to, why) in bad_copy {
                        if strict {
                            return Err(StoreError::Recovery(format!(
                                "{}: a copy of the {:?} record at offset {from} is damaged ({why})",
                                path.display(),
                                r.h.kind
                            )));
                        }
                        report.damaged_regions.push((id, from, to, why));
                    }
                    match read {
                        Ok(Some(m)) => {
                            let m = match m {
                                MetaPayload::Catalog(bytes) => {
                                    // The newest record of a key is live (counted below); a
                                    // compaction copy (same sequence number) wins over its
                                    // original.
                                    let newer = state
                                        .meta
                                        .get(&r.h.key)
                                        .is_none_or(|(s, _, _)| *s <= r.h.seq);
                                    if newer {
                                        state.meta.insert(r.h.key, (r.h.seq, bytes, loc));
                                    }
                                    continue;
                                }
                                MetaPayload::Manifest(m) => Meta::Manifest(m, loc),
                                MetaPayload::Tombstone(t) => Meta::Tombstone(t, loc),
                            };
                            metas.push((r.h.seq, m));
                        }
                        Ok(None) | Err(_) => {
                            if strict {
                                return Err(StoreError::Recovery(format!(
                                    "{}: damaged {:?} record at offset {}",
                                    path.display(),
                                    r.h.kind,
                                    r.offset
                                )));
                            }
                            report.damaged_records.push((id, r.offset));
                        }
                    }
                }
            }
        }
        // Cut off torn tails and unused preallocation so stale bytes can never be read as
        // records after later appends.
        if file_len > frontier && (n + 1 != ids.len()) {
            seg.file
                .set_len(frontier)
                .map_err(|e| StoreError::from_fs("truncate", &path, e))?;
        }
        state.segments.insert(id, seg.clone());
        last = Some(seg);
    }

    for (_, _, loc) in state.meta.values() {
        loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
    }

    // Apply manifests and tombstones in sequence order: the newest event of a name decides
    // (a manifest replaces whatever the name held; a tombstone removes the version it names).
    // The sort is stable and segments were scanned in id order, so of a record and its
    // compaction copy (same sequence number) the copy comes last and wins.
    metas.sort_by_key(|(s, _)| *s);
    let mut live: BTreeMap<String, (u64, Manifest, Loc)> = BTreeMap::new();
    for (seq, m) in metas {
        match m {
            Meta::Manifest(m, loc) => {
                let key = name_key(&m.name);
                state.names.insert(key, seq);
                state.tombs.remove(&key);
                live.insert(m.name.clone(), (seq, m, loc));
            }
            Meta::Tombstone(t, loc) => {
                // The newest tombstone of a name (a copy over its original) is live while it
                // is the name's newest event.
                state.names.insert(name_key(&t.name), seq);
                state.tombs.insert(name_key(&t.name), loc);
                // Whatever version the name holds at this point of the sequence is older than
                // the tombstone, so it is deleted: usually the version the tombstone names, but
                // compaction may have dropped that manifest (it was dead) while an older one of
                // the name survives in a segment not compacted yet.
                live.remove(&t.name);
            }
        }
    }
    for loc in state.tombs.values() {
        loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
    }
    for cs in cands.values_mut() {
        cs.sort_by_key(|c| c.seq);
    }
    // Blocks already resolved to one of several records with the same sequence number (an
    // original and its compaction copies): key -> chosen candidate index.
    let mut chosen: HashMap<u128, usize> = HashMap::new();
    let mut windows: Vec<(u64, Manifest, Loc)> = live.into_values().collect();
    windows.sort_by_key(|(s, _, _)| *s);
    for (seq, m, mloc) in windows {
        // Resolve every block to the newest matching record written before the manifest. A
        // block not found was lost to damage (a manifest is only written once its blocks are
        // durable): the window is still exposed and thaws up to it.
        let mut resolved = Vec::with_capacity(m.blocks.len());
        for b in &m.blocks {
            let found = cands.get(&b.key).and_then(|cs| {
                let i = cs.iter().rposition(|c| {
                    c.seq < seq && c.checksum == b.checksum && c.payload_len == b.len
                })?;
                let i = match chosen.get(&b.key) {
                    Some(&j) if cs[j].seq == cs[i].seq => j,
                    _ => {
                        let j = pick_duplicate(engine, cs, i);
                        chosen.insert(b.key, j);
                        j
                    }
                };
                Some(&cs[i])
            });
            resolved.push(found);
        }
        if resolved.iter().any(Option::is_none) {
            if strict {
                return Err(StoreError::Recovery(format!(
                    "window {:?} refers to a block that is not in the log",
                    m.name
                )));
            }
            report.incomplete_windows.push(m.name.clone());
        }
        for (b, c) in m.blocks.iter().zip(resolved) {
            match state.blocks.get_mut(&b.key) {
                Some(e) => {
                    e.refs += 1;
                    // Lost for an older window, found for this one (written again after the
                    // damage): every window reads it here; each verifies it against its own
                    // manifest.
                    if let (None, Some(c)) = (&e.loc, c) {
                        c.loc.seg.live.fetch_add(c.loc.len, Ordering::SeqCst);
                        e.loc = Some(c.loc.clone());
                        e.payload_len = c.payload_len;
                        e.checksum = c.checksum;
                    }
                }
                None => {
                    if let Some(c) = c {
                        c.loc.seg.live.fetch_add(c.loc.len, Ordering::SeqCst);
                    }
                    state.blocks.insert(
                        b.key,
                        BlockEntry {
                            loc: c.map(|c| c.loc.clone()),
                            payload_len: c.map_or(b.len, |c| c.payload_len),
                            checksum: c.map_or(b.checksum, |c| c.checksum),
                            refs: 1,
                        },
                    );
                }
            }
        }
        mloc.seg.live.fetch_add(mloc.len, Ordering::SeqCst);
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
        state.windows.insert(
            m.name.clone(),
            WindowEntry {
                info,
                manifest: mloc,
                keys: m.blocks.iter().map(|b| b.key).collect(),
            },
        );
    }
    report.windows = state.windows.len() as u64;

    // The newest segment stays the active one if it has room: cut its tail, re-preallocate
    // (zeros), and make that durable before anything is appended after the recovered records.
    let mut active = None;
    if let Some(seg) = last {
        let f = seg.frontier();
        // A segment sealed at rotation stays sealed (its header says so).
        if f + PAGE < seg.size && seg.header.sealed_len == 0 {
            match reset_tail(&seg.file, f, seg.size) {
                Ok(()) => {
                    if let Some((offset, len, h)) = heal {
                        if f + len + PAGE < seg.size {
                            used += rewrite_copy(engine, &seg, offset, len, h)?;
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
    let next_segment = ids.last().map_or(1, |l| l + 1);
    Ok((
        state,
        Appender {
            active,
            next_seq: max_seq + 1,
            next_segment,
        },
        used,
        report,
    ))
}

/// Opens a segment file for reading (O_DIRECT where possible); returns it and its length.
fn open_segment_file(path: &std::path::Path) -> Result<(File, u64), StoreError> {
    let (file, _) =
        io::open_direct(path, false).map_err(|e| StoreError::from_fs("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| StoreError::from_fs("stat", path, e))?
        .len();
    Ok((file, len))
}

/// For a segment whose header pages read as zeros: does its first record page (page 1 in
/// format 1, page 2 in format 2: both are looked at) hold anything? Only a segment that does
/// not is a crash while creating it.
fn holds_records(
    engine: &dyn IoEngine,
    file: &File,
    file_len: u64,
    path: &std::path::Path,
    page: &mut AlignedBuf,
) -> Result<bool, StoreError> {
    for at in [PAGE, 2 * PAGE] {
        if file_len < at + PAGE {
            break;
        }
        engine
            .read_exact_at(file.as_raw_fd(), at, page)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        if page.iter().any(|&b| b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A segment header (or why none decodes) and the damaged header page, if any.
type HeaderRead = (
    Result<SegmentHeader, HeaderError>,
    Option<(u64, u64, String)>,
);

/// Reads a segment's header: page 0, or its copy in page 1 when page 0 does not verify
/// (segment version 2). Also returns the damaged header page, if one of two is damaged.
fn read_segment_header(
    engine: &dyn IoEngine,
    file: &File,
    file_len: u64,
    path: &std::path::Path,
    page: &mut AlignedBuf,
) -> Result<HeaderRead, StoreError> {
    if file_len == 0 {
        return Ok((Err(HeaderError::Empty), None));
    }
    if file_len < PAGE {
        return Ok((Err(HeaderError::Truncated), None));
    }
    let mut read = |at: u64| -> Result<Result<SegmentHeader, HeaderError>, StoreError> {
        if file_len < at + PAGE {
            return Ok(Err(HeaderError::Truncated));
        }
        engine
            .read_exact_at(file.as_raw_fd(), at, page)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        // The rest of a header page is zero (from segment format 2 on, checked).
        Ok(SegmentHeader::decode(page).and_then(|h| {
            if h.version >= 2 && page[SegmentHeader::LEN..].iter().any(|&b| b != 0) {
                Err(HeaderError::Field(
                    "non-zero bytes after the segment header",
                ))
            } else {
                Ok(h)
            }
        }))
    };
    let first = read(0)?;
    match first {
        Ok(h) if h.version < 2 => Ok((Ok(h), None)),
        Ok(h) => {
            // A version 2 header has its copy in page 1.
            let damage = match read(PAGE)? {
                Ok(c) if c == h => None,
                Ok(_) => Some((PAGE, 2 * PAGE, "segment header copy differs".to_string())),
                Err(e) => Some((PAGE, 2 * PAGE, format!("segment header copy: {e}"))),
            };
            Ok((Ok(h), damage))
        }
        Err(e0) => match read(PAGE)? {
            Ok(c) if c.version >= 2 => {
                Ok((Ok(c), Some((0, PAGE, format!("segment header: {e0}")))))
            }
            Ok(_) | Err(_) => Ok((Err(e0), None)),
        },
    }
}

/// Of the records with the sequence number of `cs[i]` (an original and its compaction copies,
/// identical when intact), the newest whose bytes verify; `i` when there is only one or none
/// verifies (reads then report the damage). Only duplicates pay for reading payloads.
fn pick_duplicate(engine: &dyn IoEngine, cs: &[Cand], i: usize) -> usize {
    let seq = cs[i].seq;
    let dups: Vec<usize> = (0..=i)
        .rev()
        .take_while(|&j| cs[j].seq == seq)
        .filter(|&j| cs[j].checksum == cs[i].checksum && cs[j].payload_len == cs[i].payload_len)
        .collect();
    if dups.len() < 2 {
        return i;
    }
    for j in dups {
        let c = &cs[j];
        let mut img = AlignedBuf::zeroed(c.loc.len as usize);
        if engine
            .read_exact_at(c.loc.seg.fd(), c.loc.offset, &mut img)
            .is_ok()
            && super::verify_image(&img, &c.loc.seg, RecordKind::Block).is_ok()
        {
            return j;
        }
    }
    i
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
    if super::verify_image(&img, seg, h.kind).is_err() {
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

enum MetaPayload {
    Manifest(Manifest),
    Tombstone(Tombstone),
    Catalog(Vec<u8>),
}

fn read_meta(
    engine: &dyn IoEngine,
    seg: &Segment,
    r: &Rec,
    damaged: &mut Vec<(u64, u64, String)>,
) -> Result<Option<MetaPayload>, StoreError> {
    let mut img = AlignedBuf::zeroed(r.len as usize);
    engine
        .read_exact_at(seg.fd(), r.offset, &mut img)
        .map_err(|e| StoreError::io("reading a manifest during recovery", e))?;
    // Either copy that verifies; a copy that does not is reported.
    let (good, bad) = super::check_meta(&img, seg, r.h.kind);
    let Ok((_, p)) = good else {
        return Ok(None);
    };
    if let Some(why) = bad {
        damaged.push((r.offset, r.offset + r.len, why));
    }
    Ok(match r.h.kind {
        RecordKind::Manifest => Manifest::decode(p)
            .ok()
            .and_then(|m| (name_key(&m.name) == r.h.key).then_some(MetaPayload::Manifest(m))),
        RecordKind::Tombstone => Tombstone::decode(p).ok().map(MetaPayload::Tombstone),
        RecordKind::Meta => Some(MetaPayload::Catalog(p.to_vec())),
        RecordKind::Block => None,
    })
}

pub(super) type Scan = (
    Vec<Rec>,
    u64,
    Option<(u64, String)>,
    Vec<(u64, u64, String)>,
);

/// Walks the record headers of one segment. Reads 256 KiB windows while records are small and
/// single header pages once they are large, so the cost follows the number of records.
///
/// An invalid or all-zero header page followed, later in the segment, by a valid record of the
/// segment (a higher sequence number) is a damaged region: it is skipped and reported. Only
/// when nothing valid follows is it the end of the log (all zero: clean; otherwise a torn
/// tail). The second copy of a metadata record is merged into its first (one [`Rec`] covering
/// both); a copy whose twin is damaged stands alone. A jump in the sequence numbers of the
/// records written into the segment that no damaged region explains is reported as a region
/// too (records are never skipped silently).
pub(super) fn scan(
    engine: &dyn IoEngine,
    seg: &Segment,
    file_len: u64,
) -> Result<Scan, StoreError> {
    let mut recs: Vec<Rec> = Vec::new();
    let mut buf = AlignedBuf::zeroed(SCAN_WINDOW);
    let (mut win_start, mut win_len) = (0u64, 0u64);
    let mut off = seg.first_record;
    let mut last_seq = 0u64;
    let mut big = false;
    let mut damaged: Vec<(u64, u64, String)> = Vec::new();
    // A damaged region was skipped since the last record written in order (it explains a
    // jump in sequence numbers).
    let mut explained = false;
    let end = file_len.min(seg.size);
    let torn = loop {
        if off + PAGE > end {
            break None;
        }
        if !(off >= win_start && off + PAGE <= win_start + win_len) {
            let want = if big {
                PAGE
            } else {
                (end - off).min(SCAN_WINDOW as u64) & !(PAGE - 1)
            };
            engine
                .read_exact_at(seg.fd(), off, &mut buf[..want as usize])
                .map_err(|e| StoreError::io(format!("scanning {}", seg.path.display()), e))?;
            win_start = off;
            win_len = want;
        }
        let at = (off - win_start) as usize;
        let decoded = RecordHeader::decode(&buf[at..at + PAGE as usize], seg.generation);
        if let (Ok(h), Some(prev)) = (&decoded, recs.last_mut()) {
            if is_second_copy(prev, h, off) {
                prev.len += record_len(h.payload_len);
                off += record_len(h.payload_len);
                continue;
            }
        }
        let bad = match decoded {
            // Zeros: the clean end of the log, unless valid records follow (a hole).
            Err(HeaderError::Empty) if buf[at..at + PAGE as usize].iter().all(|&b| b == 0) => {
                Err(None)
            }
            Err(HeaderError::Empty) => Err(Some(
                "a page with zeros where a header belongs and bytes after them".to_string(),
            )),
            Err(e) => Err(Some(e.to_string())),
            Ok(h) if h.segment_id != seg.id => Err(Some("record of another segment".to_string())),
            // A compaction copy keeps its original's sequence number, out of append order.
            Ok(h) if !h.copied && h.seq <= last_seq => {
                Err(Some("sequence number does not increase".to_string()))
            }
            Ok(h) if off + record_len(h.payload_len) > end => {
                Err(Some("record runs past the end of the segment".to_string()))
            }
            Ok(h) => Ok(h),
        };
        let h = match bad {
            Ok(h) => h,
            Err(why) => {
                // A torn tail or the clean end, or damage in the middle? Look for a later
                // valid record.
                match find_next(engine, seg, off + PAGE, end, last_seq)? {
                    Next::At(next) => {
                        let why = why.unwrap_or_else(|| {
                            "zeroed page(s) followed by valid records".to_string()
                        });
                        damaged.push((off, next, why));
                        explained = true;
                        off = next;
                        win_len = 0;
                        continue;
                    }
                    // Zeros to the end: the clean end of the log.
                    Next::Nothing if why.is_none() => break None,
                    // Bytes that are no record follow zeros: a torn write, or damage.
                    Next::Nothing | Next::Garbage => {
                        break Some((
                            off,
                            why.unwrap_or_else(|| {
                                "zeroed page followed by bytes that are no record".to_string()
                            }),
                        ))
                    }
                }
            }
        };
        let len = record_len(h.payload_len);
        if !h.copied {
            if last_seq != 0 && h.seq > last_seq + 1 && !explained {
                let from = recs.last().map_or(seg.first_record, |r| r.offset + r.len);
                damaged.push((
                    from,
                    off,
                    format!(
                        "sequence gap: records {}..={} are missing",
                        last_seq + 1,
                        h.seq - 1
                    ),
                ));
            }
            last_seq = h.seq;
            explained = false;
        }
        recs.push(Rec {
            h,
            offset: off,
            len,
        });
        off += len;
        big = len > 16 * PAGE;
    };
    let frontier = match &torn {
        Some((o, _)) => *o,
        None => off.min(end.max(seg.first_record)),
    };
    // The log ends right after the first copy of a metadata record: its second copy was torn
    // off (or zeroed). The first copy is kept; the loss is reported.
    let torn = torn.or_else(|| {
        recs.last()
            .filter(|r| {
                super::format::copies(r.h.kind) == 2
                    && !r.h.ditto
                    && r.len == record_len(r.h.payload_len)
                    && r.offset + r.len == frontier
            })
            .map(|r| {
                (
                    frontier,
                    format!(
                        "the second copy of the {:?} record at {} is missing",
                        r.h.kind, r.offset
                    ),
                )
            })
    });
    Ok((recs, frontier, torn, damaged))
}

/// True when `h`, found at `off`, is the second copy of the metadata record `prev` that ends
/// right there.
fn is_second_copy(prev: &Rec, h: &RecordHeader, off: u64) -> bool {
    h.ditto
        && !prev.h.ditto
        && prev.offset + prev.len == off
        && prev.len == record_len(prev.h.payload_len)
        && prev.h.kind == h.kind
        && prev.h.seq == h.seq
        && prev.h.key == h.key
        && prev.h.payload_len == h.payload_len
        && prev.h.payload_xxh3 == h.payload_xxh3
        && prev.h.copied == h.copied
}

/// Finds the next page at or after `from` holding a valid record header of this segment with a
/// sequence number above `last_seq`. Skips holes (never-written preallocated space) with
/// `SEEK_DATA`, so a torn tail followed by unwritten space costs little to rule out.
fn find_next(
    engine: &dyn IoEngine,
    seg: &Segment,
    from: u64,
    end: u64,
    last_seq: u64,
) -> Result<Next, StoreError> {
    let mut buf = AlignedBuf::zeroed(SCAN_WINDOW);
    let mut off = from;
    let mut garbage = false;
    while off + PAGE <= end {
        // SAFETY: lseek on an owned descriptor; no memory is passed.
        let data = unsafe { libc::lseek(seg.fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `off`
        }
        let data = (data as u64) & !(PAGE - 1);
        if data > off {
            off = data;
            continue;
        }
        let want = (end - off).min(SCAN_WINDOW as u64) & !(PAGE - 1);
        if want == 0 {
            break;
        }
        engine
            .read_exact_at(seg.fd(), off, &mut buf[..want as usize])
            .map_err(|e| StoreError::io(format!("scanning {}", seg.path.display()), e))?;
        for p in 0..(want / PAGE) {
            let at = (p * PAGE) as usize;
            if let Ok(h) = RecordHeader::decode(&buf[at..at + PAGE as usize], seg.generation) {
                let o = off + p * PAGE;
                if h.segment_id == seg.id
                    && (h.copied || h.seq > last_seq)
                    && o + record_len(h.payload_len) <= end
                {
                    return Ok(Next::At(o));
                }
            }
        }
        garbage = garbage || buf[..want as usize].iter().any(|&b| b != 0);
        off += want;
    }
    Ok(if garbage {
        Next::Garbage
    } else {
        Next::Nothing
    })
}

/// What follows an invalid or empty header page.
enum Next {
    /// A valid record at this offset.
    At(u64),
    /// No valid record, but bytes that are not zero.
    Garbage,
    /// Zeros (or nothing) to the end.
    Nothing,
}

/// Renames every segment file of `dir` whose header is invalid (or names another segment) to
/// `<file>.damaged`, out of the log, so the store opens without it (`cwm fsck --repair`; the
/// windows with records there become incomplete and are deleted by the repair). The newest
/// segment with a zeroed header and no record is left to recovery, which removes it (a crash
/// while creating it). Returns what was set aside: (file, why).
pub(crate) fn set_aside_invalid_segments(
    dir: &std::path::Path,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| StoreError::from_fs("list", dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment::parse_file_name(e.file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    let engine = crate::io::psync::PsyncEngine::new();
    let mut page = AlignedBuf::zeroed(PAGE as usize);
    let mut out = Vec::new();
    for (n, &id) in ids.iter().enumerate() {
        let path = dir.join(segment::file_name(id));
        let (file, file_len) = open_segment_file(&path)?;
        // The same verdict recovery reaches (read_segment_header), so that what repair keeps
        // always opens.
        let (header, _) = read_segment_header(&engine, &file, file_len, &path, &mut page)?;
        let why = match header {
            Ok(h) if h.segment_id == id => continue,
            Ok(h) => format!("it has the header of segment {}", h.segment_id),
            Err(HeaderError::Empty) if n + 1 == ids.len() => {
                // Recovery removes it if no record follows (a crash while creating it).
                if !holds_records(&engine, &file, file_len, &path, &mut page)? {
                    continue;
                }
                "its header pages are zeroed but it holds records".to_string()
            }
            Err(e) => format!("invalid header: {e}"),
        };
        drop(file);
        let aside = dir.join(format!("{}.damaged", segment::file_name(id)));
        std::fs::rename(&path, &aside).map_err(|e| StoreError::from_fs("rename", &path, e))?;
        io::sync_dir(dir).map_err(|e| StoreError::from_fs("sync directory of", dir, e))?;
        out.push((aside.display().to_string(), why));
    }
    Ok(out)
}
