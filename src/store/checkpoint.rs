//! Segment checkpoints: a durable copy of one segment's record headers, so that an open reads
//! one small file per segment instead of walking every record header of the log.
//!
//! A checkpoint (`segment-<id>.ckpt`, docs/FORMAT.md "Checkpoints") is written when a segment
//! is sealed (in the background, after an `fdatasync` of the segment), for the active segment
//! at a clean stop (covering its records up to the frontier), and at an open for every clean
//! segment that had none. It is never trusted over the log: it must name the segment's id and
//! generation, cover a prefix of the file, and describe records that tile that prefix exactly
//! (each header re-verified with the segment's generation, sequence numbers increasing); the
//! whole file is checksummed. Anything else and recovery ignores it, reports why, and scans the
//! segment. What lies after the covered prefix (records appended after a clean stop) is
//! scanned as usual.
//!
//! What it costs: damage to a block record inside a checkpointed prefix is no longer found at
//! the open (its header is not read); it is found by the read that verifies the block (the
//! thaw ends at the intact prefix), by `cwm scrub`, and by `cwm fsck` (which never uses
//! checkpoints). Manifests, tombstones and catalog records are still read and verified at every
//! open, so a damaged one is reported there.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::error::{poisoned, StoreError};
use super::format::{self, record_len, RecordHeader, RecordKind, RECORD_HEADER_LEN};
use super::recovery::scan::{scan, Rec};
use super::recovery::{read_meta, RecoveryReport};
use super::segment::Segment;
use super::Store;
use crate::checksum::payload_checksum;
use crate::io::{self, IoEngine};

/// First bytes of a checkpoint file.
const MAGIC: &[u8; 8] = b"CWMCKPT1";
/// Bytes of the checkpoint header.
const HEADER: usize = 64;
/// Bytes of one entry: offset, length, the record's 64-byte header.
const ENTRY: usize = 16 + RECORD_HEADER_LEN;

/// File name of segment `id`'s checkpoint.
pub(crate) fn file_name(id: u64) -> String {
    format!("segment-{id:010}.ckpt")
}

/// Parses a segment id out of a checkpoint file name (or its temporary file's).
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    super::segment::parse_name(name)
        .filter(|(_, rest)| *rest == "ckpt" || *rest == "ckpt.tmp")
        .map(|(id, _)| id)
}

/// A record kept for a checkpoint: its header and place, and for a metadata record its
/// payload (a checkpoint holds those, so an open reads no manifest from the log).
pub(crate) type Kept = (Rec, Option<Vec<u8>>);

/// A checkpoint read back: the records of `[first_record, covered)`.
pub(crate) struct Checkpoint {
    /// Offset just past the last record it covers.
    pub covered: u64,
    /// The records, in offset order, tiling `[first_record, covered)`; metadata records with
    /// their payloads (checked against their headers' checksums).
    pub recs: Vec<Kept>,
    /// Highest sequence number of a record written into the segment (not a compaction copy).
    pub last_seq: u64,
}

/// Encodes the checkpoint of `seg` covering `recs` (which end at `covered`): the header, the
/// entries, the payloads of the metadata records in entry order, the checksum.
fn encode(seg: &Segment, covered: u64, recs: &[Kept]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + recs.len() * ENTRY + 8);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&seg.id.to_le_bytes());
    b.extend_from_slice(&seg.generation.to_le_bytes());
    b.extend_from_slice(&covered.to_le_bytes());
    b.extend_from_slice(&(recs.len() as u64).to_le_bytes());
    b.extend_from_slice(&crate::clock::now_unix_ms().to_le_bytes());
    b.resize(HEADER, 0);
    let mut h = [0u8; RECORD_HEADER_LEN];
    for (r, _) in recs {
        b.extend_from_slice(&r.offset.to_le_bytes());
        b.extend_from_slice(&r.len.to_le_bytes());
        r.h.encode(seg.generation, &mut h);
        b.extend_from_slice(&h);
    }
    for (_, p) in recs {
        if let Some(p) = p {
            b.extend_from_slice(p);
        }
    }
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Decodes and checks a checkpoint of `seg`, whose file is `file_len` bytes long, against
/// the segment (see the module documentation). `Err`: why it cannot be used.
fn decode(b: &[u8], seg: &Segment, file_len: u64) -> Result<Checkpoint, String> {
    if b.len() < HEADER + 8 {
        return Err(format!("{} bytes: not a checkpoint's length", b.len()));
    }
    let (body, sum) = b.split_at(b.len() - 8);
    if xxh3_64(body) != u64_at(sum, 0) {
        return Err("checksum mismatch".into());
    }
    if &body[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let (id, generation, covered, count) = (
        u64_at(body, 8),
        u64_at(body, 16),
        u64_at(body, 24),
        u64_at(body, 32),
    );
    if id != seg.id || generation != seg.generation {
        return Err(format!(
            "it describes segment {id} of generation {generation:#x}, not {} of {:#x}",
            seg.id, seg.generation
        ));
    }
    let end = file_len.min(seg.size);
    let sealed = seg.header.sealed_len;
    if covered < seg.first_record || covered > end || (sealed != 0 && covered > sealed) {
        return Err(format!(
            "it covers up to {covered}, beyond the segment's {end} bytes (sealed at {sealed})"
        ));
    }
    let entries_end = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(ENTRY))
        .and_then(|n| n.checked_add(HEADER))
        .filter(|&n| n <= body.len())
        .ok_or_else(|| format!("it counts {count} records, more than it holds"))?;
    let mut recs: Vec<Kept> = Vec::with_capacity(entries_end / ENTRY);
    let mut at = seg.first_record;
    let mut last_seq = 0u64;
    let mut payloads = &body[entries_end..];
    for e in body[HEADER..entries_end].chunks_exact(ENTRY) {
        let (offset, len) = (u64_at(e, 0), u64_at(e, 8));
        let h = RecordHeader::decode(&e[16..], seg.generation)
            .map_err(|why| format!("record header at {offset}: {why}"))?;
        let one = record_len(h.payload_len);
        let whole = len == one || (format::copies(h.kind) == 2 && len == 2 * one && !h.ditto);
        if offset != at || h.segment_id != seg.id || !whole {
            return Err(format!(
                "its record at {offset} ({len} bytes) does not follow the one before at {at}"
            ));
        }
        if !h.copied {
            if h.seq <= last_seq {
                return Err(format!("sequence numbers do not increase at {offset}"));
            }
            last_seq = h.seq;
        }
        at += len;
        let payload = if h.kind == RecordKind::Block {
            None
        } else {
            let n = usize::try_from(h.payload_len)
                .ok()
                .filter(|&n| n <= payloads.len())
                .ok_or_else(|| format!("the payload of its record at {offset} is cut short"))?;
            let (p, rest) = payloads.split_at(n);
            payloads = rest;
            if payload_checksum(p) != h.payload_xxh3 {
                return Err(format!(
                    "the payload of its record at {offset} does not verify"
                ));
            }
            Some(p.to_vec())
        };
        recs.push((Rec { h, offset, len }, payload));
    }
    if at != covered {
        return Err(format!("its records end at {at}, not at {covered}"));
    }
    if !payloads.is_empty() {
        return Err(format!("{} bytes follow its payloads", payloads.len()));
    }
    Ok(Checkpoint {
        covered,
        recs,
        last_seq,
    })
}

/// Reads segment `seg`'s checkpoint from `dir` (`file_len`: the segment file's length).
/// `Ok(None)`: there is none; `Err`: there is one that cannot be used, and why.
pub(crate) fn read(dir: &Path, seg: &Segment, file_len: u64) -> Result<Option<Checkpoint>, String> {
    let path = dir.join(file_name(seg.id));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    decode(&bytes, seg, file_len).map(Some)
}

/// Writes `seg`'s checkpoint covering `recs` (the records of `[first_record, covered)`, in
/// offset order) into `dir`, atomically: a temporary file, synced, renamed over the old one,
/// the directory synced. The caller has made the records durable.
pub(crate) fn write(dir: &Path, seg: &Segment, covered: u64, recs: &[Kept]) -> std::io::Result<()> {
    if recs
        .iter()
        .any(|(r, p)| (r.h.kind == RecordKind::Block) == p.is_some())
    {
        return Err(std::io::Error::other(
            "a metadata record's payload is not at hand",
        ));
    }
    let bytes = encode(seg, covered, recs);
    let path = dir.join(file_name(seg.id));
    let tmp: PathBuf = dir.join(format!("{}.tmp", file_name(seg.id)));
    crate::fail_point!("checkpoint-write", a => {
        if a == crate::failpoint::Action::ShortWrite {
            // What a crash mid-write leaves: half a temporary file.
            let _ = std::fs::write(&tmp, &bytes[..bytes.len() / 2]);
        }
        return Err(std::io::Error::other("injected fault at failpoint checkpoint-write"));
    });
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        io::sync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    // The segment left the log while this was written (a background checkpoint of a segment
    // compaction emptied right after its seal): compaction takes the log file away before it
    // removes the checkpoint, so one that arrived after that removal is removed here.
    if res.is_ok() && !seg.path.exists() {
        let _ = std::fs::remove_file(&path);
    }
    res
}

/// How many records the checkpoints of segments `ids` in `dir` list, going by their sizes
/// (for sizing the index before they are read; nothing is checked here).
pub(crate) fn listed_records(dir: &Path, ids: &[u64]) -> usize {
    ids.iter()
        .filter_map(|id| std::fs::metadata(dir.join(file_name(*id))).ok())
        .map(|m| (m.len() as usize).saturating_sub(HEADER + 8) / ENTRY)
        .sum()
}

/// Makes `seg`'s records durable (`fdatasync`) and writes its checkpoint covering `recs` up
/// to `covered` — when they tile it and the segment has not failed. Best effort: a failure is
/// logged, and the next open scans the segment instead.
pub(crate) fn sync_and_write(
    engine: &dyn IoEngine,
    dir: &Path,
    seg: &Segment,
    covered: u64,
    recs: &[Kept],
) {
    if recs.is_empty() || !tiles(seg.first_record, recs.iter().map(|k| &k.0), covered) {
        return;
    }
    let res = engine
        .fdatasync(seg.fd())
        .map_err(|e| {
            // The error may be the one a commit's own sync of this segment would have been
            // told (the kernel reports a write-back error once): the segment is failed, so
            // that sync refuses too instead of acknowledging what may not be durable.
            seg.fail();
            std::io::Error::other(e.to_string())
        })
        .and_then(|()| {
            if seg.failed.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("the segment failed"));
            }
            write(dir, seg, covered, recs)
        });
    if let Err(e) = res {
        crate::log::warn(&format!(
            "checkpoint of segment {} not written: {e}",
            seg.id
        ));
    }
}

/// Removes segment `id`'s checkpoint (best effort: a left-over one names a segment that no
/// longer exists, or a generation that no longer matches, and is removed or ignored at the
/// next open).
pub(crate) fn remove(dir: &Path, id: u64) {
    let _ = std::fs::remove_file(dir.join(file_name(id)));
}

/// Removes checkpoints (and temporary files of unfinished ones) in `dir` whose segment is not
/// in `live`; returns how many files went.
pub(crate) fn remove_orphans(dir: &Path, live: impl Fn(u64) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let tmp = name.ends_with(".tmp");
        if let Some(id) = parse_file_name(name) {
            if (tmp || !live(id)) && std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Removes every checkpoint (and unfinished one) in `dir`; returns how many files went.
pub(crate) fn remove_all(dir: &Path) -> usize {
    remove_orphans(dir, |_| false)
}

/// True when the records of a segment can be checkpointed: they tile `[first_record, end)`.
pub(crate) fn tiles<'r>(
    first_record: u64,
    recs: impl IntoIterator<Item = &'r Rec>,
    end: u64,
) -> bool {
    let mut at = first_record;
    for r in recs {
        if r.offset != at {
            return false;
        }
        at += r.len;
    }
    at == end
}

impl Store {
    /// Walks the record headers an open took from checkpoints (the segments it names in
    /// [`RecoveryReport::checkpointed_segments`]), as a full-scan open would have, and reports
    /// what that open would have reported: damaged regions, and the windows that lost a block
    /// to them. Blocks found damaged leave the index as a full-scan open leaves them (the
    /// windows referring to them thaw up to them; the next freeze holding one writes it
    /// again), and the damaged segment's checkpoint is removed, so the next open scans it and
    /// reports the damage itself. Run once after an open, in the background (`cwm serve` does,
    /// feeding `health`); a second call finds nothing left to walk.
    pub fn verify_checkpoints(&self) -> Result<RecoveryReport, StoreError> {
        let todo: Vec<(Arc<Segment>, u64)> = {
            let mut st = self.state.write().map_err(poisoned)?;
            let list = std::mem::take(&mut st.checkpointed);
            list.into_iter()
                .filter_map(|(id, covered)| st.segments.get(&id).map(|s| (s.clone(), covered)))
                .collect()
        };
        let mut rep = RecoveryReport::default();
        for (seg, covered) in todo {
            let (recs, frontier, torn, mut damaged) =
                scan(self.engine.as_ref(), &seg, covered, seg.first_record, 0)?;
            rep.segments += 1;
            rep.records += recs.len() as u64;
            // The second copy of every metadata record (the open read the first copy only,
            // and both where the first does not verify: that damage it reported itself).
            let mut copies = Vec::new();
            for r in recs.iter().filter(|r| r.h.kind != RecordKind::Block) {
                let _ = read_meta(self.engine.as_ref(), &seg, r, &mut copies)?;
            }
            for (from, to, why) in copies {
                if !why.starts_with("copy at +0") {
                    seg.damaged.store(true, Ordering::SeqCst);
                    rep.damaged_regions.push((seg.id, from, to, why));
                }
            }
            if let Some((off, why)) = torn {
                damaged.push((off, covered, why));
            } else if frontier < covered {
                damaged.push((
                    frontier,
                    covered,
                    "zeros where the checkpoint lists records".to_string(),
                ));
            }
            if damaged.is_empty() {
                continue;
            }
            // Its file is never written into again.
            seg.damaged.store(true, Ordering::SeqCst);
            // No checkpoint of it any more (nor one written from memory at a clean stop, if it
            // is the active segment): the next open scans it and reports the damage itself.
            remove(&self.cfg.dir, seg.id);
            let _ = seg.take_records();
            // The block records the walk did not find in this segment.
            let found: HashSet<u64> = recs.iter().map(|r| r.offset).collect();
            let mut st = self.state.write().map_err(poisoned)?;
            let lost: Vec<u128> = st
                .blocks
                .iter()
                .filter(|(_, b)| {
                    // Only what the checkpoint covered: records appended since the open (the
                    // active segment) were not walked.
                    b.loc.as_ref().is_some_and(|l| {
                        l.seg.id == seg.id && l.offset < covered && !found.contains(&l.offset)
                    })
                })
                .map(|(k, _)| *k)
                .collect();
            for k in &lost {
                if let Some(b) = st.blocks.get_mut(k) {
                    if let Some(l) = b.loc.take() {
                        l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
                        st.block_bytes -= l.len;
                    }
                }
            }
            let lost: HashSet<u128> = lost.into_iter().collect();
            for (name, w) in &st.windows {
                if w.keys.iter().any(|k| lost.contains(k)) {
                    rep.incomplete_windows.push(name.clone());
                }
            }
            for (from, to, why) in damaged {
                rep.damaged_regions.push((seg.id, from, to, why));
            }
        }
        Ok(rep)
    }
}
