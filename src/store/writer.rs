//! Writing windows. [`Store::begin_window`] checks the spec and capacity and holds the stored
//! blocks the window will refer to; [`WindowWriter::write_blocks`] appends the block records
//! not already in the log (concurrently with other freezes); [`WindowWriter::commit`] makes
//! them durable, checks the name again, appends the manifest, makes it durable, and only then
//! publishes the window into the index. [`Store::delete_window`] writes a
//! durable tombstone, then drops the window's references.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::append::{Appender, InFlightRecords};
use super::error::{poisoned, StoreError};
use super::format::{payload_offset, record_len, RecordKind};
use super::index::{drop_if_unused, release_window, BlockRecord, Loc, State, Unfound, WindowEntry};
use super::segment::Segment;
use super::{
    name, name_key, BlockImage, BlockRef, Manifest, Replace, Store, Tombstone, WindowInfo,
    WindowSpec,
};
use crate::checksum::payload_checksum;
use crate::io::{self, AlignedBuf, Op};

#[cfg(feature = "failpoints")]
use super::{append::short_write, error::injected_error};

impl Store {
    /// Starts writing a window: validates the spec, checks the name and capacity (before any
    /// byte is written), and holds the stored blocks it will refer to until commit or drop.
    pub fn begin_window(&self, spec: WindowSpec) -> Result<WindowWriter<'_>, StoreError> {
        self.begin_inner(spec, 0)
    }

    /// [`Store::begin_window`] for a writer holding `own` reserved bytes, which its own need
    /// replaces.
    pub(super) fn begin_inner(
        &self,
        mut spec: WindowSpec,
        own: u64,
    ) -> Result<WindowWriter<'_>, StoreError> {
        validate_spec(&mut spec)?;
        let app = self.lock_appender()?;
        let mut st = self.state.write().map_err(poisoned)?;
        check_replace(&st, &spec)?;
        let manifest_len = manifest_payload_len(&spec);
        let (needed, writes) = self.plan_bytes(&app, &st, &spec, manifest_len)?;
        drop(app);
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
        // Blocks this window refers to without writing them stay indexed until it commits or
        // gives up, whatever is deleted or evicted meanwhile.
        let mut held = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (b, w) in spec.blocks.iter().zip(&writes) {
            if *w || !seen.insert(b.key) {
                continue;
            }
            if let Some(e) = st.blocks.get_mut(&b.key) {
                e.holds += 1;
                held.push(b.key);
            }
        }
        drop(st);
        let n = spec.blocks.len();
        Ok(WindowWriter {
            store: self,
            hold: needed,
            held,
            spec,
            writes,
            written: vec![None; n],
            touched: Vec::new(),
            counted: Vec::new(),
            failed: None,
        })
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

    /// Deletes a window: writes a durable tombstone, then drops its block references. Blocks
    /// nobody references any more become garbage (space reclaimed by compaction).
    pub fn delete_window(
        &self,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<WindowInfo, StoreError> {
        self.delete_where(name, expected_version, |_| true)
    }

    /// [`Store::delete_window`] only while `still` holds for the window, checked under the
    /// appender lock (eviction and expiry chose it from a snapshot: a pin or a new TTL set
    /// since must win). Refused with CONCURRENT_MODIFICATION otherwise.
    pub(crate) fn delete_where(
        &self,
        name: &str,
        expected_version: Option<u64>,
        still: impl Fn(&WindowEntry) -> bool,
    ) -> Result<WindowInfo, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let mut app = self.lock_name(name_key(&name))?;
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
        if !still(&entry) {
            return Err(StoreError::ConcurrentModification {
                name,
                expected: entry.info.version,
                actual: entry.info.version,
            });
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
        forget_window(&mut st, &entry, loc, seq);
        Ok(entry.info())
    }
}

/// Takes a window whose tombstone (at `loc`, sequence number `seq`) is durable out of the
/// index: the tombstone becomes its name's newest event, its block references go. `entry` is
/// the caller's snapshot; what is released is the entry the index holds now — compaction
/// (which copies records without the appender lock) may have moved its manifest since, and
/// the snapshot's location would take the live bytes from the segment it left.
fn forget_window(st: &mut State, entry: &WindowEntry, loc: Loc, seq: u64) {
    let key = name_key(&entry.info.name);
    st.names.insert(key, seq);
    if let Some(old) = st.tombs.insert(key, loc) {
        old.seg.live.fetch_sub(old.len, Ordering::SeqCst);
    }
    if let Some(now) = st.windows.remove(&entry.info.name) {
        super::index::unindex_first(st, &now);
        release_window(st, &now);
    }
}

impl Store {
    /// [`Store::delete_where`] for many windows at once (eviction): each `(name, version)`
    /// still at that version and for which `still` holds gets a tombstone, all written under
    /// one hold of the appender lock and made durable by one sync per segment written; the
    /// windows of each segment's run leave the index together. Windows that changed meanwhile
    /// are skipped. Returns the windows deleted. On a write or sync error the run it hit is cut
    /// back (none of its windows deleted; runs in segments rotated before it stay deleted) and
    /// the error is returned.
    pub(crate) fn delete_many(
        &self,
        victims: &[(String, u64)],
        still: impl Fn(&WindowEntry) -> bool,
    ) -> Result<Vec<WindowInfo>, StoreError> {
        let mut app = self.lock_appender()?;
        let mut chosen: Vec<WindowEntry> = Vec::with_capacity(victims.len());
        {
            let st = self.state.read().map_err(poisoned)?;
            for (name, version) in victims {
                // A window being replaced is left for a later pass.
                if let Some(e) = st
                    .windows
                    .get(name)
                    .filter(|e| e.info.version == *version && still(e))
                    .filter(|_| !self.is_committing(name_key(name)))
                {
                    if !chosen.iter().any(|c| c.info.name == *name) {
                        chosen.push(e.clone());
                    }
                }
            }
        }
        let mut locs: Vec<(Loc, u64)> = Vec::with_capacity(chosen.len());
        let mut imgs: Vec<AlignedBuf> = Vec::with_capacity(chosen.len());
        let mut out = Vec::with_capacity(chosen.len());
        // Tombstones are written a run per segment (one write, not one each: the appender
        // lock is held meanwhile). Before a hand-out that rotates, the run so far is written,
        // synced and its windows evicted: a failure after it then cuts back only the segment
        // it happens in — never the rotated one, whose seal (in the background) records its
        // length and waits only for records that hold a ticket.
        let mut from = 0;
        for e in &chosen {
            let t = Tombstone {
                name: e.info.name.clone(),
                version: e.info.version,
                manifest_seq: e.info.seq,
            };
            let key = name_key(&e.info.name);
            let payload = t.encode();
            let len = super::format::stored_len(RecordKind::Tombstone, payload.len() as u64);
            if locs.len() > from && !Store::fits_as_is(&app, len) {
                self.finish_tombstones(&chosen[from..], &locs[from..], &imgs[from..], &mut out)?;
                from = locs.len();
            }
            match self.hand_out_payload(&mut app, RecordKind::Tombstone, key, &payload) {
                Ok((loc, img)) => {
                    locs.push((loc, app.next_seq - 1));
                    imgs.push(img);
                }
                Err(err) => {
                    self.cut_back(locs[from..].iter().map(|(l, _)| l));
                    return Err(err);
                }
            }
        }
        self.finish_tombstones(&chosen[from..], &locs[from..], &imgs[from..], &mut out)?;
        Ok(out)
    }

    /// Writes one run of tombstones handed out in one segment (`locs`, their images `imgs`,
    /// for the first `locs.len()` of `entries`), syncs it and forgets their windows, adding
    /// each to `out`. When the write or the sync fails the run is cut back and none of them
    /// is evicted.
    fn finish_tombstones(
        &self,
        entries: &[WindowEntry],
        locs: &[(Loc, u64)],
        imgs: &[AlignedBuf],
        out: &mut Vec<WindowInfo>,
    ) -> Result<(), StoreError> {
        let Some((first, _)) = locs.first() else {
            return Ok(());
        };
        let res = self
            .write_run(RecordKind::Tombstone, first, imgs)
            .and_then(|()| self.sync(&first.seg));
        if let Err(err) = res {
            self.cut_back(locs.iter().map(|(l, _)| l));
            return Err(err);
        }
        let mut st = self.state.write().map_err(poisoned)?;
        for (entry, (loc, seq)) in entries.iter().zip(locs) {
            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
            forget_window(&mut st, entry, loc.clone(), *seq);
            out.push(entry.info());
        }
        Ok(())
    }
}

/// Commits between handing out their manifest and publishing it: their names, and the keys of
/// the blocks they publish records of (written by them, not yet in the index) — a concurrent
/// commit referring to one of those keys waits, then refers to the record published.
#[derive(Default)]
pub(super) struct Committing {
    pub(super) names: std::collections::HashSet<u128>,
    blocks: HashMap<u128, u32>,
}

/// One commit's entries in [`Committing`] until dropped (its window published, or the commit
/// failed): waiters are woken.
pub(super) struct CommitGuard<'a> {
    store: &'a Store,
    name: u128,
    blocks: Vec<u128>,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        // A poisoned set leaves waiters waiting; nothing panics while holding it.
        if let Ok(mut c) = self.store.committing.lock() {
            c.names.remove(&self.name);
            for k in &self.blocks {
                if let Some(n) = c.blocks.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        c.blocks.remove(k);
                    }
                }
            }
            self.store.committed.notify_all();
        }
    }
}

/// Writes one window. Freezes run concurrently: each takes the appender lock only to be handed
/// room for a batch of block records, and again to commit. Dropping it without
/// [`WindowWriter::commit`] aborts: nothing becomes visible, blocks already written are
/// garbage.
pub struct WindowWriter<'a> {
    store: &'a Store,
    /// Bytes of `Store::reserved` this writer holds until commit or drop, less what it has
    /// appended since (that is in `used`).
    hold: u64,
    /// Keys of stored blocks it refers to without writing them (each holds its index entry).
    held: Vec<u128>,
    spec: WindowSpec,
    writes: Vec<bool>,
    written: Vec<Option<(Loc, u64)>>,
    /// Segments written to since the last sync.
    touched: Vec<Arc<Segment>>,
    /// Segments holding its unpublished block records (counted in their `writers`).
    counted: Vec<Arc<Segment>>,
    failed: Option<String>,
}

impl Drop for WindowWriter<'_> {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.hold, Ordering::SeqCst);
        self.release();
    }
}

impl<'a> WindowWriter<'a> {
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

    /// Shortens the window to its first `blocks` blocks and `tokens` tokens before commit
    /// (a fill that found a later block unusable); blocks written past them become garbage.
    pub fn truncate(&mut self, blocks: usize, tokens: usize) -> Result<(), StoreError> {
        if blocks == 0 || blocks > self.spec.blocks.len() || tokens == 0 {
            return Err(StoreError::Validation(format!(
                "cannot shorten window {:?} of {} blocks to {blocks} blocks",
                self.spec.name,
                self.spec.blocks.len()
            )));
        }
        self.spec.blocks.truncate(blocks);
        self.spec.tokens.truncate(tokens);
        self.writes.truncate(blocks);
        self.written.truncate(blocks);
        Ok(())
    }

    /// Number of blocks that must be written.
    #[must_use]
    pub fn blocks_to_write(&self) -> usize {
        self.writes.iter().filter(|w| **w).count()
    }

    /// Gives back what the writer holds in the index and the segments (at commit, after
    /// publishing; on drop).
    fn release(&mut self) {
        if !self.held.is_empty() {
            // A poisoned index is refused by every later call anyway.
            if let Ok(mut st) = self.store.state.write() {
                for k in std::mem::take(&mut self.held) {
                    if let Some(e) = st.blocks.get_mut(&k) {
                        e.holds -= 1;
                    }
                    drop_if_unused(&mut st, k);
                }
            }
        }
        for s in std::mem::take(&mut self.counted) {
            s.writers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Writes block records. Each image holds its payload at `payload_offset(len)`; the
    /// header is filled in here. Room is handed out for as many as fit in the active segment
    /// at a time, under the appender lock; they are written after it is released.
    pub fn write_blocks(&mut self, blocks: &mut [BlockImage<'_>]) -> Result<(), StoreError> {
        let mut done = 0;
        while done < blocks.len() {
            done += self.write_some(&mut blocks[done..])?;
        }
        Ok(())
    }

    /// Writes the leading blocks of `blocks` that fit in the active segment (at least one);
    /// returns how many.
    fn write_some(&mut self, blocks: &mut [BlockImage<'_>]) -> Result<usize, StoreError> {
        if let Some(f) = &self.failed {
            return Err(StoreError::Validation(format!(
                "this freeze already failed ({f}); start again"
            )));
        }
        let mut locs: Vec<(usize, Loc, u64)> = Vec::with_capacity(blocks.len());
        let mut flight = self.store.in_flight();
        let planned = self.plan_appends(blocks, &mut locs, &mut flight);
        if let Err(e) = planned {
            // Space may have been handed out without being written: no more appends there.
            self.store.cut_back(locs.iter().map(|l| &l.1));
            if !locs.is_empty() {
                self.failed = Some(e.to_string());
            }
            return Err(e);
        }
        let n = locs.len();
        crate::fail_point!("block-write", a => {
            if let (Some(b), Some((_, loc, _))) = (blocks.first(), locs.first()) {
                if a == crate::failpoint::Action::ShortWrite {
                    short_write(self.store.engine.as_ref(), loc, &b.image[..loc.len as usize]);
                }
            }
            self.store.cut_or_void_blocks(locs.iter().map(|l| &l.1));
            self.failed = Some("injected fault".into());
            return Err(injected_error("block-write"));
        });
        let mut ops: Vec<Op<'_>> = blocks[..n]
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
            // what this batch wrote is cut off again (or its headers zeroed).
            self.store.cut_or_void_blocks(locs.iter().map(|l| &l.1));
            self.failed = Some(e.to_string());
            return Err(StoreError::io(
                format!("writing blocks of window {:?}", self.spec.name),
                e,
            ));
        }
        drop(flight);
        for (i, loc, sum) in locs {
            self.written[i] = Some((loc, sum));
        }
        Ok(n)
    }

    /// Hands out room for the leading blocks of `blocks` that fit in the active segment (one
    /// block at least: the first rotates to a new segment when needed). The records are counted
    /// in flight before the appender lock is released.
    fn plan_appends(
        &mut self,
        blocks: &mut [BlockImage<'_>],
        locs: &mut Vec<(usize, Loc, u64)>,
        flight: &mut InFlightRecords<'_>,
    ) -> Result<(), StoreError> {
        let mut app = self.store.lock_appender()?;
        let res = self.plan_locked(&mut app, blocks, locs);
        // Handed out: in `used` now, so no longer promised (or a failed batch's records are
        // cut back, and the writer is done).
        self.consumed(locs.iter().map(|l| l.1.len).sum());
        flight.add(locs.len() as u64)?;
        res
    }

    /// `bytes` of this writer's promised room were appended (they count in `used` now): the
    /// promise shrinks by as much, so the two never count the same bytes.
    fn consumed(&mut self, bytes: u64) {
        let take = bytes.min(self.hold);
        self.hold -= take;
        self.store.reserved.fetch_sub(take, Ordering::SeqCst);
    }

    fn plan_locked(
        &mut self,
        app: &mut Appender,
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
            // A batch never spans a rotation: a segment is sealed only once everything handed
            // out in it is written, this batch's records included.
            if !locs.is_empty() && !Store::fits_as_is(app, rl as u64) {
                return Ok(());
            }
            let po = payload_offset(desc.len);
            let sum = match b.checksum {
                Some(s) => s,
                None => payload_checksum(&b.image[po..po + desc.len as usize]),
            };
            let loc = self.store.append(
                app,
                RecordKind::Block,
                desc.key,
                desc.len,
                sum,
                &mut b.image[..rl],
            )?;
            if !self.touched.iter().any(|s| s.id == loc.seg.id) {
                self.touched.push(loc.seg.clone());
            }
            if !self.counted.iter().any(|s| s.id == loc.seg.id) {
                loc.seg.writers.fetch_add(1, Ordering::SeqCst);
                self.counted.push(loc.seg.clone());
            }
            locs.push((i, loc, sum));
        }
        Ok(())
    }

    /// Makes the window durable and visible: sync blocks, then under the appender lock check
    /// the name again (another freeze or a delete may have changed it since
    /// [`Store::begin_window`]) and hand out the manifest's room; write and sync the manifest
    /// without the lock; publish. Returns only after the manifest is durable.
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
        // 1. Blocks durable (concurrently with other freezes).
        for seg in std::mem::take(&mut self.touched) {
            self.store.sync(&seg)?;
        }
        // 2. The name's version as of now, and the checksums of the blocks it refers to.
        let key = name_key(&self.spec.name);
        let (app, version, blocks, pending) = self.claim(key)?;
        let m = Manifest {
            name: self.spec.name.clone(),
            version,
            created_unix_ms: crate::clock::now_unix_ms(),
            session: std::mem::take(&mut self.spec.session),
            namespace: std::mem::take(&mut self.spec.namespace),
            layout: std::mem::take(&mut self.spec.layout),
            tokens: std::mem::take(&mut self.spec.tokens),
            blocks,
            retention: self.spec.retention,
            origin: self.spec.origin,
        };
        let payload = m.encode();
        // 3. Manifest durable, written and synced without the appender lock.
        let (mloc, seq) = self.write_manifest(app, key, &payload)?;
        // 4. Publish.
        let info = {
            let mut st = self.store.state.write().map_err(poisoned)?;
            let found = std::mem::take(&mut self.written)
                .into_iter()
                .zip(&m.blocks)
                .map(|(w, b)| {
                    w.map(|(loc, checksum)| BlockRecord {
                        loc,
                        payload_len: b.len,
                        checksum,
                    })
                });
            let (info, _replaced) = st.publish(&m, seq, mloc, found, Unfound::Skip);
            st.names.insert(key, seq);
            st.incomplete.remove(&m.name);
            if let Some(t) = st.tombs.remove(&key) {
                // The tombstone is no longer the newest event of the name: garbage.
                t.seg.live.fetch_sub(t.len, Ordering::SeqCst);
            }
            info
        };
        self.release();
        drop(pending);
        Ok(info)
    }

    /// Step 2 of [`WindowWriter::commit`], under the appender lock (returned): once no other
    /// commit of the name, nor of a block this one would publish its own record of, is between
    /// handing out its manifest and publishing it, checks the name again and decides the
    /// manifest's block references (so two commits never publish different records of one key
    /// under their checksums); holds the stored records it refers to and enters the name and
    /// its own blocks' keys in the committing set until the returned guard is dropped.
    fn claim(
        &mut self,
        key: u128,
    ) -> Result<
        (
            MutexGuard<'a, Appender>,
            u64,
            Vec<BlockRef>,
            CommitGuard<'a>,
        ),
        StoreError,
    > {
        loop {
            let app = self.store.lock_name(key)?;
            let mut st = self.store.state.write().map_err(poisoned)?;
            let existing = check_replace(&st, &self.spec)?;
            let (blocks, from_index) = self.block_refs(&st)?;
            let mut own: Vec<u128> = blocks
                .iter()
                .map(|b| b.key)
                .filter(|k| !from_index.contains(k))
                .collect();
            own.sort_unstable();
            own.dedup();
            let mut c = self.store.committing.lock().map_err(poisoned)?;
            if own.iter().any(|k| c.blocks.contains_key(k)) {
                // Another commit publishes its record of one of these keys: wait for it, then
                // refer to the record it published.
                drop(st);
                drop(app);
                let _c = self
                    .store
                    .committed
                    .wait_while(c, |c| own.iter().any(|k| c.blocks.contains_key(k)))
                    .map_err(poisoned)?;
                continue;
            }
            // The stored records the manifest now names are held until it is published (or
            // the commit fails): a writer that held one and gives up meanwhile must not let it
            // leave the index, or the window would be published over this writer's own copy
            // of the block under the other record's checksum.
            for k in from_index {
                if let Some(e) = st.blocks.get_mut(&k) {
                    e.holds += 1;
                    self.held.push(k);
                }
            }
            c.names.insert(key);
            for k in &own {
                *c.blocks.entry(*k).or_insert(0) += 1;
            }
            drop(c);
            drop(st);
            let guard = CommitGuard {
                store: self.store,
                name: key,
                blocks: own,
            };
            return Ok((app, existing.map_or(1, |v| v + 1), blocks, guard));
        }
    }

    /// Step 3 of [`WindowWriter::commit`]: the manifest's room is handed out under the
    /// appender lock (`app`, released here); the manifest is written once every record
    /// before it is, and synced, without the lock, so other freezes go on appending and
    /// writing meanwhile (the name is in the committing set, [`WindowWriter::claim`]). When
    /// its segment failed meanwhile (another freeze's write or sync), it is handed out again
    /// in a new segment (at most four tries): another freeze's failure does not fail this
    /// one. Returns where it is and its sequence number.
    fn write_manifest(
        &mut self,
        mut app: MutexGuard<'a, Appender>,
        key: u128,
        payload: &[u8],
    ) -> Result<(Loc, u64), StoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let h = self
                .store
                .append_ordered(&mut app, RecordKind::Manifest, key, payload)?;
            let seq = app.next_seq - 1;
            self.consumed(h.loc().len);
            h.loc().seg.note_manifest(key);
            // Compaction leaves a segment with unpublished records alone.
            if !self.counted.iter().any(|s| s.id == h.loc().seg.id) {
                h.loc().seg.writers.fetch_add(1, Ordering::SeqCst);
                self.counted.push(h.loc().seg.clone());
            }
            drop(app);
            h.wait_for_earlier()?;
            let failed = |l: &Loc| tries < 4 && l.seg.failed.load(Ordering::SeqCst);
            if failed(h.loc()) {
                // Its room is garbage in a read-only segment (cut off when it is the last).
                drop(h);
                app = self.store.lock_appender()?;
                continue;
            }
            let written = h.write()?;
            if failed(written.loc()) {
                // Another freeze's write or sync failed in the segment since: this copy is
                // zeroed (dropped) and the manifest written again in a new segment.
                drop(written);
                app = self.store.lock_appender()?;
                continue;
            }
            // Not durable, not acknowledged: dropped on an error, the manifest is cut off (or
            // zeroed) so a later open cannot show a window whose freeze failed — after `sync`
            // marked the segment failed, before a rotation may checkpoint it.
            self.store.sync(&written.loc().seg)?;
            return Ok((written.synced(), seq));
        }
    }

    /// The manifest's block references: checksums of blocks written here, of the others from
    /// the index (held there since the writer began, or stored by a concurrent freeze); and
    /// the keys whose checksum came from the index.
    fn block_refs(&self, st: &State) -> Result<(Vec<BlockRef>, Vec<u128>), StoreError> {
        let mut blocks = Vec::with_capacity(self.spec.blocks.len());
        let mut from_index = Vec::new();
        let mut sums: HashMap<u128, u64> = HashMap::new();
        for (i, d) in self.spec.blocks.iter().enumerate() {
            let sum = match (sums.get(&d.key), st.blocks.get(&d.key), &self.written[i]) {
                (Some(s), _, _) => *s,
                // Stored (held since the writer began, or published by a concurrent freeze
                // meanwhile): the window refers to that record, as a deduplication would —
                // its bytes may differ from this freeze's (GPU kernels need not be
                // bit-reproducible), and the manifest must describe the record it resolves to.
                // A copy written here is garbage.
                (None, Some(b), _) if b.loc.is_some() && b.payload_len == d.len => {
                    from_index.push(d.key);
                    b.checksum
                }
                (None, _, Some((_, s))) => *s,
                (None, Some(_), None) => {
                    return Err(StoreError::Validation(format!(
                        "block {i} has the key of a stored block of another length"
                    )))
                }
                (None, None, None) => {
                    return Err(StoreError::Validation(format!(
                        "block {i} is neither stored nor written"
                    )))
                }
            };
            sums.insert(d.key, sum);
            blocks.push(BlockRef {
                key: d.key,
                len: d.len,
                checksum: sum,
            });
        }
        Ok((blocks, from_index))
    }
}

/// Normalises the name and refuses empty windows, zero-length blocks and blocks over
/// [`MAX_BLOCK_BYTES`].
pub(super) fn validate_spec(spec: &mut WindowSpec) -> Result<(), StoreError> {
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
    // (A manifest read from the shared tier may claim any length: record sizes must not
    // overflow, and no KV block comes near this.)
    if let Some((i, b)) = spec
        .blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.len > MAX_BLOCK_BYTES)
    {
        return Err(StoreError::Validation(format!(
            "block {i} has {} bytes; at most {MAX_BLOCK_BYTES} a block",
            b.len
        )));
    }
    Ok(())
}

/// The largest block a window may hold (4 GiB).
pub const MAX_BLOCK_BYTES: u64 = 1 << 32;

/// The version of the window `spec` would replace, or the refusal its `replace` asks for.
pub(super) fn check_replace(st: &State, spec: &WindowSpec) -> Result<Option<u64>, StoreError> {
    // An expired window is gone: its name is free (its tombstone may not be written yet).
    let now = crate::clock::now_unix_ms();
    let existing = st
        .windows
        .get(&spec.name)
        .filter(|w| !w.expired(now))
        .map(|w| w.info.version);
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

/// Bytes of the manifest payload `spec` encodes to.
pub(super) fn manifest_payload_len(spec: &WindowSpec) -> u64 {
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
        + match (spec.origin, spec.retention == super::Retention::default()) {
            // The retention and origin trailers (a version-3 manifest).
            (Some(_), _) => 16 + 16,
            (None, true) => 0,
            // The retention trailer (a version-2 manifest).
            (None, false) => 16,
        }
}
