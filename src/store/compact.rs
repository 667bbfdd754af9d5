//! Compaction: copies the live records of sealed segments whose live ratio is low into the
//! append segment, then deletes the source segment once nothing in the index refers to it.
//!
//! Copies keep the original record's sequence number (header flag `copied`), so recovery
//! orders them exactly as it ordered the originals: a copied manifest can never shadow a newer
//! version or outlive a tombstone written after it. Manifests name their blocks by key, not by
//! location, so moving a block only updates the block index; manifests are never rewritten.
//!
//! One batch (at most `batch_bytes`) at a time: what is live is chosen and read and verified
//! without the appender lock (sealed segments never change); then, under it, what is still
//! live is handed out as copies (with a ticket, like a freeze's records), and after the lock
//! is released written once every record handed out before them is, `fdatasync`ed and the
//! index repointed (a record that died meanwhile is left behind: garbage never becomes live
//! again). Only
//! after every live record of a segment is durable elsewhere is the segment dropped from the
//! index and its file unlinked. A [`super::WindowReader`] opened before holds the segment's
//! `Arc` (and so its open file); POSIX keeps an unlinked inode readable, and segment ids and
//! files are never reused. A crash at any point leaves the originals, the copies, or both;
//! recovery prefers a copy whose bytes verify.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::append::Appender;
use super::error::{poisoned, StoreError};
use super::format::{RecordHeader, RecordKind};
use super::index::{Loc, State};
use super::recovery::scan::{scan, Rec};
use super::segment::Segment;
use super::verify::verify_meta;
use super::Store;
use crate::io::{self, AlignedBuf, Op};

/// What compaction does.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Sealed segments whose live bytes are below this fraction of their record bytes are
    /// compacted (default 0.5; 1.0 compacts every segment holding any garbage).
    pub live_ratio: f64,
    /// Most bytes copied per second (0: unlimited).
    pub rate: u64,
    /// Most bytes copied under one hold of the appender lock (a freeze waits at most this).
    pub batch_bytes: u64,
    /// Most segments compacted in one call (0: every candidate).
    pub max_segments: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            live_ratio: 0.5,
            rate: 0,
            batch_bytes: 8 << 20,
            max_segments: 0,
        }
    }
}

/// What one compaction call did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactReport {
    /// Segments emptied and deleted.
    pub segments_removed: Vec<u64>,
    /// Segments left in place, and why (a damaged live record: run `cwm fsck --repair`).
    pub segments_skipped: Vec<(u64, String)>,
    /// Records copied.
    pub records_copied: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Records dropped (garbage).
    pub records_dropped: u64,
    /// Bytes of the deleted segments (records and header pages).
    pub bytes_reclaimed: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Progress of a compaction, reported after every batch.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CompactProgress {
    /// Segments finished.
    pub segments_done: usize,
    /// Segments chosen.
    pub segments_total: usize,
    /// Bytes copied so far.
    pub bytes_copied: u64,
}

/// Why a record of the source segment is copied.
enum Keep {
    /// The indexed record of a stored block.
    Block,
    /// The newest catalog record of its key.
    Meta,
    /// The manifest of this live window.
    Window(String),
    /// A non-visible manifest (its window is incomplete) that is the newest event of its name
    /// while an older manifest of that name survives elsewhere.
    Shadow,
    /// The tombstone that is the newest event of its name, while an older manifest of that
    /// name survives elsewhere: dropping it would bring that manifest back.
    Tomb,
}

struct Throttle {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Throttle {
    fn after(&mut self, n: u64) {
        self.bytes += n;
        if self.rate > 0 {
            let want = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
            let el = self.start.elapsed();
            if want > el {
                std::thread::sleep(want - el);
                return;
            }
        }
        // Let a freeze, delete or catalog write waiting on the appender lock take it.
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn same(l: &Loc, seg: &Segment, offset: u64) -> bool {
    l.seg.id == seg.id && l.offset == offset
}

/// What of a segment is live, for one look at the index.
struct Live<'a> {
    st: &'a State,
    seg: &'a Segment,
    live_seqs: std::collections::HashSet<u64>,
    manifests: HashMap<u64, &'a str>,
}

impl<'a> Live<'a> {
    fn new(st: &'a State, seg: &'a Segment) -> Self {
        Self {
            st,
            seg,
            live_seqs: st.windows.values().map(|w| w.info.seq).collect(),
            manifests: st
                .windows
                .values()
                .filter(|w| w.manifest.seg.id == seg.id)
                .map(|w| (w.manifest.offset, w.info.name.as_str()))
                .collect(),
        }
    }

    /// Why record `r` of the segment must be copied, or `None` (garbage). A record once
    /// garbage never becomes live again.
    fn keep(&self, r: &Rec) -> Option<Keep> {
        let (st, seg) = (self.st, self.seg);
        match r.h.kind {
            RecordKind::Block => st
                .blocks
                .get(&r.h.key)
                .and_then(|b| b.loc.as_ref())
                .is_some_and(|l| same(l, seg, r.offset))
                .then_some(Keep::Block),
            // The newest record of its key; a deletion only while an older record of the key
            // survives in another segment (dropping it would bring that one back).
            RecordKind::Meta => st
                .meta
                .get(&r.h.key)
                .is_some_and(|(_, p, l)| {
                    same(l, seg, r.offset)
                        && (p.as_slice() != super::catalog::META_DELETED
                            || st
                                .segments
                                .values()
                                .any(|s| s.id != seg.id && s.has_meta(r.h.key)))
                })
                .then_some(Keep::Meta),
            RecordKind::Manifest => match self.manifests.get(&r.offset) {
                Some(name) => Some(Keep::Window((*name).to_string())),
                // The original (or another copy) of a live manifest: drop.
                None if self.live_seqs.contains(&r.h.seq) => None,
                None => shadows(st, seg, r).then_some(Keep::Shadow),
            },
            RecordKind::Tombstone => (st
                .tombs
                .get(&r.h.key)
                .is_some_and(|l| same(l, seg, r.offset))
                && shadows(st, seg, r))
            .then_some(Keep::Tomb),
        }
    }
}

/// Compaction copies handed out and not yet written: when dropped so (an error, a panic),
/// they are cut back — their segment takes no more appends and is never checkpointed — so
/// no checkpoint lists room that was never written.
struct Unwritten<'s> {
    store: &'s Store,
    locs: Vec<Loc>,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if !self.locs.is_empty() {
            self.store.cut_back(&self.locs);
        }
    }
}

/// True when the manifest or tombstone `r` of `seg` is the newest event of its name and some
/// other segment holds a manifest of that name (which it must keep shadowing).
fn shadows(st: &State, seg: &Segment, r: &Rec) -> bool {
    st.names.get(&r.h.key) == Some(&r.h.seq)
        && st
            .segments
            .values()
            .any(|s| s.id != seg.id && s.has_manifest(r.h.key))
}

impl Store {
    /// Sealed segments (never the append segment) whose live ratio is below `live_ratio`,
    /// emptiest first.
    pub fn compact_candidates(&self, live_ratio: f64) -> Result<Vec<u64>, StoreError> {
        let app = self.lock_appender()?;
        let active = app
            .active
            .as_ref()
            .filter(|s| !s.sealed.load(Ordering::SeqCst))
            .map(|s| s.id);
        let st = self.state.read().map_err(poisoned)?;
        let mut c: Vec<(f64, u64)> = st
            .segments
            .values()
            .filter(|s| Some(s.id) != active && s.sealed.load(Ordering::SeqCst))
            // Freezes in progress have records there that no index holds yet.
            .filter(|s| s.writers.load(Ordering::SeqCst) == 0)
            .filter_map(|s| {
                let used = s.frontier().saturating_sub(s.first_record);
                let live = s.live.load(Ordering::SeqCst);
                let r = if used == 0 {
                    0.0
                } else {
                    live as f64 / used as f64
                };
                (r < live_ratio).then_some((r, s.id))
            })
            .collect();
        c.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        Ok(c.into_iter().map(|(_, id)| id).collect())
    }

    /// Compacts the candidate segments (see [`CompactOptions`]); `progress` is called after
    /// every batch. A segment with a damaged live record is skipped (reported), never
    /// deleted; an I/O error writing copies stops the call with that error (the index still
    /// points at the originals, so nothing is lost).
    pub fn compact(
        &self,
        opts: &CompactOptions,
        progress: &mut dyn FnMut(&CompactProgress),
    ) -> Result<CompactReport, StoreError> {
        let mut ids = self.compact_candidates(opts.live_ratio)?;
        if opts.max_segments > 0 {
            ids.truncate(opts.max_segments);
        }
        self.compact_segments(&ids, opts, progress)
    }

    /// Compacts exactly these segments, whatever their live ratio (repair uses it to rewrite
    /// segments holding damage). The append segment is skipped: seal it first
    /// ([`Store::seal_active`]).
    pub fn compact_segments(
        &self,
        ids: &[u64],
        opts: &CompactOptions,
        progress: &mut dyn FnMut(&CompactProgress),
    ) -> Result<CompactReport, StoreError> {
        let _one = self.compacting.lock().map_err(poisoned)?;
        let t = Instant::now();
        let mut rep = CompactReport::default();
        let active = self
            .lock_appender()?
            .active
            .as_ref()
            .filter(|s| !s.sealed.load(Ordering::SeqCst))
            .map(|s| s.id);
        let ids: Vec<u64> = ids.iter().copied().filter(|i| Some(*i) != active).collect();
        let total = ids.len();
        let mut throttle = Throttle {
            start: Instant::now(),
            bytes: 0,
            rate: opts.rate,
        };
        for (n, id) in ids.iter().enumerate() {
            let seg = {
                let st = self.state.read().map_err(poisoned)?;
                match st.segments.get(id) {
                    Some(s) => s.clone(),
                    None => continue,
                }
            };
            // Its rotation's seal may still be under way (records of it still in flight).
            seg.wait_sealed();
            let mut tick = |bytes: u64| {
                progress(&CompactProgress {
                    segments_done: n,
                    segments_total: total,
                    bytes_copied: bytes,
                })
            };
            match self.compact_segment(&seg, opts, &mut rep, &mut throttle, &mut tick) {
                Ok(()) => {}
                Err(e @ StoreError::Corruption { .. }) => {
                    crate::log::warn(&format!("compaction skipped segment {id}: {e}"));
                    seg.damaged.store(true, Ordering::SeqCst);
                    rep.segments_skipped.push((*id, e.to_string()));
                }
                Err(e) => {
                    rep.seconds = t.elapsed().as_secs_f64();
                    return Err(e);
                }
            }
            progress(&CompactProgress {
                segments_done: n + 1,
                segments_total: total,
                bytes_copied: rep.bytes_copied,
            });
        }
        rep.seconds = t.elapsed().as_secs_f64();
        Ok(rep)
    }

    fn compact_segment(
        &self,
        seg: &Arc<Segment>,
        opts: &CompactOptions,
        rep: &mut CompactReport,
        throttle: &mut Throttle,
        tick: &mut dyn FnMut(u64),
    ) -> Result<(), StoreError> {
        let recs = self.records_of(seg)?;
        let mut i = 0;
        while i < recs.len() {
            // Choose and read a batch without the appender lock (reading is most of the time,
            // and freezes wait for that lock)...
            let mut batch: Vec<(&Rec, Keep)> = Vec::new();
            let mut bytes = 0u64;
            {
                let st = self.state.read().map_err(poisoned)?;
                let live = Live::new(&st, seg);
                while i < recs.len()
                    && (batch.is_empty() || bytes + recs[i].len <= opts.batch_bytes)
                {
                    let r = &recs[i];
                    i += 1;
                    match live.keep(r) {
                        Some(k) => {
                            bytes += r.len;
                            batch.push((r, k));
                        }
                        None => rep.records_dropped += 1,
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let imgs = self.read_batch(seg, &batch)?;
            // ...then, under it, copy what is still live (what died meanwhile stays behind; a
            // bad read of a record that died is no reason to keep the segment).
            let app = self.lock_appender()?;
            let chosen = batch.len();
            let (batch, imgs): (Vec<(&Rec, Keep)>, Vec<AlignedBuf>) = {
                let st = self.state.read().map_err(poisoned)?;
                let live = Live::new(&st, seg);
                let mut kept = (Vec::new(), Vec::new());
                for ((r, _), img) in batch.into_iter().zip(imgs) {
                    if let Some(k) = live.keep(r) {
                        kept.0.push((r, k));
                        kept.1.push(img?);
                    }
                }
                kept
            };
            rep.records_dropped += (chosen - batch.len()) as u64;
            if batch.is_empty() {
                continue;
            }
            let bytes: u64 = batch.iter().map(|(r, _)| r.len).sum();
            self.copy_batch(app, seg, &batch, imgs)?;
            rep.records_copied += batch.len() as u64;
            rep.bytes_copied += bytes;
            tick(rep.bytes_copied);
            throttle.after(bytes);
        }
        // Nothing may refer to the segment any more; then it leaves the index and the disk.
        // (The appender lock is held to the end: nothing new can refer to it meanwhile.)
        let _app = self.lock_appender()?;
        {
            let st = self.state.read().map_err(poisoned)?;
            let referenced = st
                .blocks
                .values()
                .any(|b| b.loc.as_ref().is_some_and(|l| l.seg.id == seg.id))
                || st.windows.values().any(|w| w.manifest.seg.id == seg.id)
                || st.meta.values().any(|(_, p, l)| {
                    l.seg.id == seg.id && p.as_slice() != super::catalog::META_DELETED
                });
            if !st.segments.contains_key(&seg.id) {
                return Ok(());
            }
            // A freeze in progress wrote records here that no index holds yet: the segment
            // stays (what was copied is garbage here now; a later pass removes it).
            if seg.writers.load(Ordering::SeqCst) > 0 {
                return Ok(());
            }
            if referenced {
                return Err(StoreError::Validation(format!(
                    "segment {} is still referenced after compaction",
                    seg.id
                )));
            }
        }
        // The unlink is made durable before the segment leaves the index: while its file may
        // still come back at the next open, later compactions must still see the manifests it
        // holds (they keep the tombstones shadowing them).
        crate::fail_point!("segment-unlink", _a => {
            return Err(super::error::injected_error("segment-unlink"));
        });
        // Out of the log: kept for a new segment to be written into (once nothing reads it), or
        // removed — before its checkpoint goes (one still being written in the background
        // removes itself once it finds the log file gone: `checkpoint::write`).
        self.recycler
            .retire(&self.cfg.dir, seg)
            .map_err(|e| StoreError::from_fs("remove", &seg.path, e))?;
        super::checkpoint::remove(&self.cfg.dir, seg.id);
        io::sync_dir(&self.cfg.dir)
            .map_err(|e| StoreError::from_fs("sync directory", &self.cfg.dir, e))?;
        {
            let mut st = self.state.write().map_err(poisoned)?;
            // Tombstones and catalog deletions left behind shadow nothing any more.
            st.tombs.retain(|_, l| l.seg.id != seg.id);
            st.meta.retain(|_, (_, p, l)| {
                l.seg.id != seg.id || p.as_slice() != super::catalog::META_DELETED
            });
            st.segments.remove(&seg.id);
        }
        self.used.fetch_sub(seg.frontier(), Ordering::SeqCst);
        rep.bytes_reclaimed += seg.frontier();
        rep.segments_removed.push(seg.id);
        Ok(())
    }

    /// The records of sealed segment `seg`: from its checkpoint when it has a usable one that
    /// covers every record (one small read, its entries checked as an open checks them), else
    /// by walking the record headers. Either way each record compaction keeps is read and
    /// verified before it is copied.
    fn records_of(&self, seg: &Arc<Segment>) -> Result<Vec<Rec>, StoreError> {
        let frontier = seg.frontier();
        if self.cfg.use_checkpoints {
            if let Ok(Some(c)) = super::checkpoint::read(&self.cfg.dir, seg, seg.size) {
                if c.covered == frontier {
                    return Ok(c.recs.into_iter().map(|(r, _)| r).collect());
                }
            }
        }
        let (recs, _, _, _) = scan(self.engine.as_ref(), seg, frontier, seg.first_record, 0)?;
        Ok(recs)
    }

    /// Reads the records of a batch of `seg` and verifies each (no lock needed: sealed
    /// segments do not change): the image, or why it cannot be copied.
    fn read_batch(
        &self,
        seg: &Arc<Segment>,
        batch: &[(&Rec, Keep)],
    ) -> Result<Vec<Result<AlignedBuf, StoreError>>, StoreError> {
        let mut imgs: Vec<AlignedBuf> = batch
            .iter()
            .map(|(r, _)| AlignedBuf::zeroed(r.len as usize))
            .collect();
        {
            let mut ops: Vec<Op<'_>> = imgs
                .iter_mut()
                .zip(batch)
                .map(|(img, (r, _))| Op::read(seg.fd(), r.offset, &mut img[..]))
                .collect();
            self.engine
                .run(&mut ops)
                .map_err(|e| StoreError::Corruption {
                    window: String::new(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("segment {}: unreadable record: {e}", seg.id),
                })?;
        }
        Ok(imgs
            .into_iter()
            .zip(batch)
            .map(|(img, (r, _))| match verify_meta(&img, seg, r.h.kind) {
                // A metadata record is copied as two fresh copies, even when only one of
                // its copies was intact here.
                Ok((h, p)) if super::format::copies(h.kind) == 2 => Ok(double_image(p)),
                Ok(_) => Ok(img),
                Err(d) => Err(StoreError::Corruption {
                    window: String::new(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!(
                        "segment {} offset {}: live {:?} record does not verify: {d}",
                        seg.id, r.offset, r.h.kind
                    ),
                }),
            })
            .collect())
    }

    /// Copies a batch of records of `seg`, read and verified: under the appender lock (`app`,
    /// given up here) the copies are handed out with a ticket, in runs that each fit in one
    /// segment; each run is then written once every record handed out before it is (other
    /// freezes append and write meanwhile), synced, and the index repointed. Records still
    /// live when the batch was chosen under the lock; one that dies before it is repointed is
    /// left behind (its copy is garbage).
    fn copy_batch(
        &self,
        app: MutexGuard<'_, Appender>,
        seg: &Arc<Segment>,
        batch: &[(&Rec, Keep)],
        mut imgs: Vec<AlignedBuf>,
    ) -> Result<(), StoreError> {
        let mut app = Some(app);
        let mut start = 0;
        while start < batch.len() {
            let mut guard = match app.take() {
                Some(a) => a,
                None => self.lock_appender()?,
            };
            let mut flight = self.in_flight();
            // Declared after `flight`, dropped before it: room handed out and never written
            // (an error, a panic) is cut back before the ticket is given back.
            let mut pending = Unwritten {
                store: self,
                locs: Vec::new(),
            };
            // A run never spans a rotation: a segment's seal waits for the tickets taken
            // before it, and this run's is taken at its first hand-out.
            for i in start..batch.len() {
                let len = imgs[i].len() as u64;
                if !pending.locs.is_empty() && !Store::fits_as_is(&guard, len) {
                    break;
                }
                pending
                    .locs
                    .push(self.append_copy(&mut guard, &batch[i].0.h, &mut imgs[i])?);
                flight.add(1)?;
            }
            drop(guard);
            let end = start + pending.locs.len();
            // Copies, like metadata records, are written only once every record handed out
            // before them is (recovery's rule for room never written: FORMAT.md).
            flight.wait_for_earlier()?;
            self.write_copies(seg, &imgs[start..end], &pending.locs)?;
            let locs = std::mem::take(&mut pending.locs);
            drop(flight);
            self.sync(&locs[0].seg)?;
            self.repoint(seg, &batch[start..end], locs)?;
            start = end;
        }
        Ok(())
    }

    /// Points the index at the copies of `batch` (written and synced) where it still points
    /// at the originals in `seg`.
    fn repoint(
        &self,
        seg: &Arc<Segment>,
        batch: &[(&Rec, Keep)],
        locs: Vec<Loc>,
    ) -> Result<(), StoreError> {
        let mut st = self.state.write().map_err(poisoned)?;
        for ((r, k), loc) in batch.iter().zip(locs) {
            match k {
                Keep::Block => {
                    if let Some(b) = st.blocks.get_mut(&r.h.key) {
                        if b.loc.as_ref().is_some_and(|l| same(l, seg, r.offset)) {
                            seg.live.fetch_sub(r.len, Ordering::SeqCst);
                            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                            b.loc = Some(loc);
                        }
                    }
                }
                Keep::Meta => {
                    loc.seg.note_meta(r.h.key);
                    if let Some((_, _, l)) = st.meta.get_mut(&r.h.key) {
                        if same(l, seg, r.offset) {
                            seg.live.fetch_sub(r.len, Ordering::SeqCst);
                            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                            *l = loc;
                        }
                    }
                }
                Keep::Window(name) => {
                    loc.seg.note_manifest(r.h.key);
                    if let Some(w) = st.windows.get_mut(name) {
                        if same(&w.manifest, seg, r.offset) {
                            seg.live.fetch_sub(r.len, Ordering::SeqCst);
                            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                            w.manifest = loc;
                        }
                    }
                }
                Keep::Shadow => loc.seg.note_manifest(r.h.key),
                Keep::Tomb => {
                    if let Some(l) = st.tombs.get_mut(&r.h.key) {
                        if same(l, seg, r.offset) {
                            seg.live.fetch_sub(r.len, Ordering::SeqCst);
                            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
                            *l = loc;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes compaction copies (images with their headers) where they were handed out; on a
    /// failure they are cut off again.
    fn write_copies(
        &self,
        seg: &Segment,
        imgs: &[AlignedBuf],
        locs: &[Loc],
    ) -> Result<(), StoreError> {
        crate::fail_point!("compaction-copy", a => {
            if a == crate::failpoint::Action::ShortWrite {
                if let (Some(img), Some(l)) = (imgs.first(), locs.first()) {
                    super::append::short_write(self.engine.as_ref(), l, img);
                }
            }
            self.cut_back(locs);
            return Err(super::error::injected_error("compaction-copy"));
        });
        let res = {
            let mut ops: Vec<Op<'_>> = imgs
                .iter()
                .zip(locs)
                .map(|(img, l)| Op::write(l.seg.fd(), l.offset, &img[..]))
                .collect();
            self.engine.run(&mut ops)
        };
        res.map_err(|e| {
            self.cut_back(locs);
            StoreError::io(
                format!("writing compaction copies of segment {}", seg.id),
                e,
            )
        })
    }

    /// Appends a compaction copy of a record (original sequence number, flag `copied`) into
    /// the append segment; the image's header is rewritten for its new segment.
    fn append_copy(
        &self,
        app: &mut Appender,
        h: &RecordHeader,
        image: &mut [u8],
    ) -> Result<Loc, StoreError> {
        let len = image.len() as u64;
        let seg = self.segment_for(app, len)?;
        let offset = seg.frontier.fetch_add(len, Ordering::SeqCst);
        self.used.fetch_add(len, Ordering::SeqCst);
        let nh = RecordHeader {
            segment_id: seg.id,
            copied: true,
            ditto: false,
            ..*h
        };
        let po = super::format::payload_offset(h.payload_len);
        seg.note_record(
            super::recovery::scan::Rec { h: nh, offset, len },
            (h.kind != RecordKind::Block)
                .then(|| image.get(po..po + h.payload_len as usize))
                .flatten(),
        );
        if super::format::copies(h.kind) == 2 {
            // Two copies, each re-sealed for the new segment.
            let one = (len / 2) as usize;
            let (first, second) = image.split_at_mut(one);
            nh.encode(seg.generation, first);
            RecordHeader { ditto: true, ..nh }.encode(seg.generation, second);
        } else {
            nh.encode(seg.generation, image);
        }
        Ok(Loc { seg, offset, len })
    }

    /// Seals the append segment (its unused tail is given back); the next append starts a
    /// new segment.
    pub fn seal_active(&self) -> Result<(), StoreError> {
        let app = self.lock_appender()?;
        if let Some(s) = &app.active {
            // Everything handed out in it is written before its sealed length is recorded.
            self.quiesce()?;
            s.seal_recorded(self.engine.as_ref());
            self.checkpoint_sealed(s);
        }
        Ok(())
    }

    /// Windows not exposed because a block of their newest manifest is missing: (name,
    /// version).
    pub fn incomplete_windows(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .incomplete
            .iter()
            .map(|(n, (v, _))| (n.clone(), *v))
            .collect())
    }

    /// Writes a durable tombstone for an incomplete window (its newest manifest, whose blocks
    /// are not all in the log), so recovery stops reporting it. Returns its version.
    pub fn tombstone_incomplete(&self, name: &str) -> Result<u64, StoreError> {
        let mut app = self.lock_name(super::name_key(name))?;
        let (version, manifest_seq) = {
            let st = self.state.read().map_err(poisoned)?;
            *st.incomplete
                .get(name)
                .ok_or_else(|| StoreError::NotFound(name.to_string()))?
        };
        let t = super::Tombstone {
            name: name.to_string(),
            version,
            manifest_seq,
        };
        let key = super::name_key(name);
        let (loc, seq) = self.append_synced(&mut app, RecordKind::Tombstone, key, &t.encode())?;
        let mut st = self.state.write().map_err(poisoned)?;
        st.names.insert(key, seq);
        if let Some(old) = st.tombs.insert(key, loc) {
            old.seg.live.fetch_sub(old.len, Ordering::SeqCst);
        }
        st.incomplete.remove(name);
        Ok(version)
    }

    /// Bytes of records no longer referenced, outside the append segment (what a compaction
    /// with `live_ratio` 1.0 and nothing else running brings to zero).
    pub fn garbage_bytes(&self) -> Result<u64, StoreError> {
        let app = self.lock_appender()?;
        let active = app.active.as_ref().map(|s| s.id);
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .segments
            .values()
            .filter(|s| Some(s.id) != active)
            .map(|s| {
                s.frontier()
                    .saturating_sub(s.first_record)
                    .saturating_sub(s.live.load(Ordering::SeqCst))
            })
            .sum())
    }

    /// Checks the in-memory index against itself and the directory: reference counts equal
    /// the windows' references, every referenced record lies in a segment of the index, live
    /// bytes per segment are at least what the index refers to and at most what was written,
    /// and the segment files on disk are exactly the indexed ones. Returns the violations.
    pub fn check_invariants(&self) -> Result<Vec<String>, StoreError> {
        let _app = self.lock_appender()?;
        let st = self.state.read().map_err(poisoned)?;
        let mut v = Vec::new();
        let mut refs: HashMap<u128, u64> = HashMap::new();
        let mut live: HashMap<u64, u64> = HashMap::new();
        let located: u64 = st
            .blocks
            .values()
            .filter_map(|b| b.loc.as_ref().map(|l| l.len))
            .sum();
        if located != st.block_bytes {
            v.push(format!(
                "block bytes counted {} but the index locates {located}",
                st.block_bytes
            ));
        }
        let indexed: usize = st.by_first.values().map(|s| s.len()).sum();
        if indexed != st.windows.len() {
            v.push(format!(
                "first-block index holds {indexed} names for {} windows",
                st.windows.len()
            ));
        }
        for w in st.windows.values() {
            let first = w.keys.first().and_then(|k| st.by_first.get(k));
            if !first.is_some_and(|s| s.contains(&w.info.name)) {
                v.push(format!(
                    "window {:?} missing from the first-block index",
                    w.info.name
                ));
            }
            for k in &w.keys {
                *refs.entry(*k).or_default() += 1;
            }
            *live.entry(w.manifest.seg.id).or_default() += w.manifest.len;
            if !st.segments.contains_key(&w.manifest.seg.id) {
                v.push(format!(
                    "window {:?}: manifest in removed segment {}",
                    w.info.name, w.manifest.seg.id
                ));
            }
        }
        for (k, b) in &st.blocks {
            let want = refs.get(k).copied().unwrap_or(0);
            if b.refs != want {
                v.push(format!(
                    "block {k:032x}: refcount {} but {want} references",
                    b.refs
                ));
            }
            // A block lost to damage has no record to count.
            let Some(l) = &b.loc else { continue };
            *live.entry(l.seg.id).or_default() += l.len;
            if !st.segments.contains_key(&l.seg.id) {
                v.push(format!("block {k:032x} in removed segment {}", l.seg.id));
            }
        }
        for k in refs.keys() {
            if !st.blocks.contains_key(k) {
                v.push(format!("block {k:032x} referenced but not indexed"));
            }
        }
        for (k, l) in &st.tombs {
            *live.entry(l.seg.id).or_default() += l.len;
            if !st.segments.contains_key(&l.seg.id) {
                v.push(format!(
                    "tombstone {k:032x} in removed segment {}",
                    l.seg.id
                ));
            }
        }
        for (k, (_, _, l)) in &st.meta {
            *live.entry(l.seg.id).or_default() += l.len;
            if !st.segments.contains_key(&l.seg.id) {
                v.push(format!(
                    "catalog record {k:032x} in removed segment {}",
                    l.seg.id
                ));
            }
        }
        for s in st.segments.values() {
            let counted = s.live.load(Ordering::SeqCst);
            let want = live.get(&s.id).copied().unwrap_or(0);
            let written = s.frontier().saturating_sub(s.first_record);
            if counted != want || counted > written {
                v.push(format!(
                    "segment {}: live {counted}, referenced {want}, written {written}",
                    s.id
                ));
            }
        }
        let mut files: Vec<u64> = std::fs::read_dir(&self.cfg.dir)
            .map_err(|e| StoreError::from_fs("list", &self.cfg.dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| super::segment::parse_file_name(&e.file_name().to_string_lossy()))
            .collect();
        files.sort_unstable();
        let indexed: Vec<u64> = st.segments.keys().copied().collect();
        if files != indexed {
            v.push(format!(
                "segment files {files:?} differ from the index {indexed:?}"
            ));
        }
        Ok(v)
    }
}

/// A metadata record image of two copies holding `payload` (headers are written by
/// [`Store::append_copy`]).
fn double_image(payload: &[u8]) -> AlignedBuf {
    let len = payload.len() as u64;
    let one = super::format::record_len(len) as usize;
    let po = super::format::payload_offset(len);
    let mut img = AlignedBuf::zeroed(2 * one);
    img[po..po + payload.len()].copy_from_slice(payload);
    img[one + po..one + po + payload.len()].copy_from_slice(payload);
    img
}
