//! The appender: hands out room at the active segment's frontier (filling in record headers,
//! doubling metadata records), rotates to a new segment when the active one is full, sealed or
//! failed, makes records durable (`fdatasync`), and cuts a segment back after a failed write or
//! sync, so that a failed record cannot reappear at the next open.
//!
//! Room is handed out under the appender lock; block records are written after it is released,
//! so concurrent freezes write interleaved. Tombstones and catalog records first wait until
//! every record handed out is written ([`Store::quiesce`]); a commit's manifest and a batch of
//! compaction copies are handed out with a ticket and written after the lock is released, once
//! every record of a lower ticket is written ([`Store::append_ordered`]); a rotation's seal
//! waits for the tickets taken before it in the background ([`Store::seal_in_background`]).
//! Either way, in the log's order, everything before a metadata record, a compaction copy or
//! a recorded sealed length was written, and recovery can tell the unwritten room of freezes
//! in flight at a crash (block records after the last metadata record of the newest segment,
//! or of an older one whose seal was under way) from damage.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::checkpoint;
use super::error::{poisoned, StoreError};
use super::format::{
    self, payload_offset, record_len, stored_len, RecordHeader, RecordKind, PAGE,
    SEGMENT_HEADER_LEN,
};
use super::index::Loc;
use super::recovery::scan::Rec;
use super::segment::Segment;
use super::Store;
use crate::checksum::payload_checksum;
use crate::io::{AlignedBuf, IoError};

#[cfg(feature = "failpoints")]
use {super::error::injected_error, super::segment, crate::io, crate::io::IoEngine};

/// What the one writer of the log holds (under the appender lock).
pub(crate) struct Appender {
    /// The segment appends go to (`None`: the next append creates one).
    pub active: Option<Arc<Segment>>,
    /// Sequence number of the next record.
    pub next_seq: u64,
    /// Id of the next segment created.
    pub next_segment: u64,
}

/// Records handed out to writers whose bytes are not written yet (see the module
/// documentation): each batch of block records, and each manifest written outside the
/// appender lock, holds a ticket, taken under that lock, so ticket order is log order.
#[derive(Default)]
pub(crate) struct InFlight {
    tickets: Mutex<Tickets>,
    done: Condvar,
}

/// The tickets of [`InFlight`]: the next to hand out, those not yet done, and those of the
/// manifests written whose `fdatasync` has not yet succeeded or failed ([`Unsynced`]).
#[derive(Default)]
struct Tickets {
    next: u64,
    outstanding: std::collections::BTreeSet<u64>,
    unsynced: std::collections::BTreeSet<u64>,
}

impl InFlight {
    /// The ticket the next batch handed out will take (read under the appender lock: every
    /// record handed out so far holds a lower one, or none — written under that lock).
    pub(crate) fn next_ticket(&self) -> Result<u64, StoreError> {
        Ok(self.tickets.lock().map_err(poisoned)?.next)
    }

    /// Waits until every batch whose ticket is below `before` is written (or failed) and, for
    /// a manifest, its `fdatasync` succeeded or failed.
    pub(crate) fn wait_before(&self, before: u64) -> Result<(), StoreError> {
        let mut t = self.tickets.lock().map_err(poisoned)?;
        while t.outstanding.range(..before).next().is_some()
            || t.unsynced.range(..before).next().is_some()
        {
            t = self.done.wait(t).map_err(poisoned)?;
        }
        Ok(())
    }
}

/// One batch of records counted in [`InFlight`] until dropped (written, or failed).
pub(crate) struct InFlightRecords<'a> {
    of: &'a InFlight,
    ticket: Option<u64>,
}

impl InFlightRecords<'_> {
    /// Records `n` more records of the batch as handed out: the batch's one ticket is taken
    /// with the first (called under the appender lock, right after they were handed out, so
    /// ticket order is log order); the batch is done, all at once, when dropped.
    pub(crate) fn add(&mut self, n: u64) -> Result<(), StoreError> {
        if n == 0 || self.ticket.is_some() {
            return Ok(());
        }
        let mut t = self.of.tickets.lock().map_err(poisoned)?;
        let id = t.next;
        t.next += 1;
        t.outstanding.insert(id);
        self.ticket = Some(id);
        Ok(())
    }

    /// Waits until every record handed out before this batch is written (or failed).
    pub(crate) fn wait_for_earlier(&self) -> Result<(), StoreError> {
        let Some(id) = self.ticket else {
            return Ok(());
        };
        let mut t = self.of.tickets.lock().map_err(poisoned)?;
        while t.outstanding.range(..id).next().is_some() {
            t = self.of.done.wait(t).map_err(poisoned)?;
        }
        Ok(())
    }
}

impl<'a> InFlightRecords<'a> {
    /// The batch (a manifest) is written: its ticket is done — records after it may be
    /// written — but until the returned guard is dropped (its `fdatasync` succeeded, or
    /// failed and the segment is marked failed) [`Store::quiesce`] still waits for it, so a
    /// rotation's checkpoint never lists a manifest whose commit then fails.
    pub(crate) fn into_unsynced(mut self) -> Unsynced<'a> {
        if let Some(id) = self.ticket.take() {
            if let Ok(mut t) = self.of.tickets.lock() {
                t.outstanding.remove(&id);
                t.unsynced.insert(id);
                self.of.done.notify_all();
                return Unsynced {
                    of: Some((self.of, id)),
                };
            }
        }
        Unsynced { of: None }
    }
}

/// A manifest written and not yet known durable (see [`InFlightRecords::into_unsynced`]).
pub(crate) struct Unsynced<'a> {
    of: Option<(&'a InFlight, u64)>,
}

impl Drop for Unsynced<'_> {
    fn drop(&mut self) {
        if let Some((of, id)) = self.of {
            if let Ok(mut t) = of.tickets.lock() {
                t.unsynced.remove(&id);
                of.done.notify_all();
            }
        }
    }
}

impl Drop for InFlightRecords<'_> {
    fn drop(&mut self) {
        let Some(id) = self.ticket else {
            return;
        };
        // A poisoned lock leaves waiters waiting; nothing panics while holding it.
        if let Ok(mut t) = self.of.tickets.lock() {
            t.outstanding.remove(&id);
            self.of.done.notify_all();
        }
    }
}

/// A metadata record handed out by [`Store::append_ordered`] and not yet written. Dropped
/// unwritten (an error, a panic, its segment failed meanwhile), it is cut back — its segment
/// takes no more appends, and no checkpoint lists it — before its ticket is given back.
pub(super) struct Handed<'s> {
    store: &'s Store,
    kind: RecordKind,
    loc: Loc,
    img: AlignedBuf,
    flight: Option<InFlightRecords<'s>>,
}

impl<'s> Handed<'s> {
    /// Where the record goes.
    pub(super) fn loc(&self) -> &Loc {
        &self.loc
    }

    /// Waits until every record handed out before this one is written (or failed).
    pub(super) fn wait_for_earlier(&self) -> Result<(), StoreError> {
        match &self.flight {
            Some(f) => f.wait_for_earlier(),
            None => Ok(()),
        }
    }

    /// Writes the record once every record before it is written (without the appender
    /// lock); its ticket is given back whatever happens. The caller syncs it and then calls
    /// [`Written::synced`]; dropped before that, it is cut off (or zeroed).
    pub(super) fn write(mut self) -> Result<Written<'s>, StoreError> {
        self.wait_for_earlier()?;
        let loc = self
            .store
            .write_record(self.kind, self.loc.clone(), &self.img)?;
        // Written: its ticket is done without cutting it off.
        let unsynced = self.flight.take().map(InFlightRecords::into_unsynced);
        Ok(Written {
            store: self.store,
            loc,
            unsynced,
        })
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.flight.take() {
            self.store.cut_or_void(&self.loc);
            drop(f);
        }
    }
}

/// A manifest written by [`Handed::write`] and not yet known durable: until
/// [`Written::synced`], a rotation or clean stop waits for it. Dropped before that (its sync
/// failed, the segment failed meanwhile, a panic), it is cut off, or zeroed where records
/// follow it, before they may go on: a commit answered with an error never comes back.
pub(super) struct Written<'s> {
    store: &'s Store,
    loc: Loc,
    unsynced: Option<Unsynced<'s>>,
}

impl Written<'_> {
    /// Where it is.
    pub(super) fn loc(&self) -> &Loc {
        &self.loc
    }

    /// Its `fdatasync` succeeded: it stays, and rotations may checkpoint it.
    pub(super) fn synced(mut self) -> Loc {
        self.unsynced = None;
        self.loc.clone()
    }
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.unsynced.take() {
            self.store.cut_or_void(&self.loc);
            drop(u);
        }
    }
}

/// Clears [`Segment::sealing`] when dropped.
struct SealDone<'s>(&'s Segment);

impl Drop for SealDone<'_> {
    fn drop(&mut self) {
        self.0.sealing.store(false, Ordering::SeqCst);
    }
}

/// Size of the segment made for one-page records when a full-size one does not fit on the
/// file system.
const SMALL_SEGMENT: u64 = 16 * PAGE;

impl Store {
    /// Takes the appender lock.
    pub(super) fn lock_appender(&self) -> Result<MutexGuard<'_, Appender>, StoreError> {
        self.appender.lock().map_err(poisoned)
    }

    /// Takes the appender lock once no commit of the name with key `key` is between handing
    /// out its manifest and publishing it (that commit writes and syncs without the lock):
    /// whatever the caller checks and writes about the name then comes after it.
    pub(super) fn lock_name(&self, key: u128) -> Result<MutexGuard<'_, Appender>, StoreError> {
        loop {
            let app = self.lock_appender()?;
            let c = self.committing.lock().map_err(poisoned)?;
            if !c.names.contains(&key) {
                drop(c);
                return Ok(app);
            }
            drop(app);
            // The committing lock is held from the look to the wait: no wake-up is lost.
            let _c = self
                .committed
                .wait_while(c, |c| c.names.contains(&key))
                .map_err(poisoned)?;
        }
    }

    /// True while a commit of the name with key `key` is between handing out its manifest and
    /// publishing it (callers hold the appender lock).
    pub(super) fn is_committing(&self, key: u128) -> bool {
        self.committing
            .lock()
            .map(|c| c.names.contains(&key))
            .unwrap_or(true)
    }

    /// A batch of block records handed out, counted in flight until it is dropped.
    pub(super) fn in_flight(&self) -> InFlightRecords<'_> {
        InFlightRecords {
            of: &self.in_flight,
            ticket: None,
        }
    }

    /// Waits until every record handed out is written (or failed). Called with the appender
    /// lock held, so no more are handed out meanwhile; writers finish theirs without that
    /// lock.
    pub(super) fn quiesce(&self) -> Result<(), StoreError> {
        let mut t = self.in_flight.tickets.lock().map_err(poisoned)?;
        while !t.outstanding.is_empty() || !t.unsynced.is_empty() {
            t = self.in_flight.done.wait(t).map_err(poisoned)?;
        }
        Ok(())
    }

    /// [`Store::fits`], and below the active segment's record limit (no raise needed): a batch
    /// of records ends before a record that needs a raise, so that a failed raise (which ends
    /// the segment) never splits a batch over a rotation.
    pub(super) fn fits_as_is(app: &Appender, len: u64) -> bool {
        Self::fits(app, len)
            && app.active.as_ref().is_some_and(|s| {
                let l = s.limit();
                l == 0 || s.frontier() + len <= l
            })
    }

    /// True when a record of `len` bytes fits in the active segment (no rotation needed). A
    /// segment marked damaged (its record limit could not be raised) takes no more.
    pub(super) fn fits(app: &Appender, len: u64) -> bool {
        app.active.as_ref().is_some_and(|s| {
            !s.sealed.load(Ordering::SeqCst)
                && !s.damaged.load(Ordering::SeqCst)
                && s.frontier() + len <= s.size
        })
    }

    /// Appends one record image (header filled in here) and returns where it went. Rotates
    /// to a new segment when the active one is full, sealed or failed. A metadata record is
    /// written twice, back to back (`image` holds room for both: [`stored_len`] bytes); its
    /// [`Loc`] covers both copies.
    pub(super) fn append(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload_len: u64,
        checksum: u64,
        image: &mut [u8],
    ) -> Result<Loc, StoreError> {
        if kind != RecordKind::Block {
            self.quiesce()?;
        }
        self.hand_out(app, kind, key, payload_len, checksum, image)
    }

    /// [`Store::append`] without waiting for the records handed out before: the caller
    /// writes the record only once they are written ([`Store::append_ordered`]).
    fn hand_out(
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
        seg.note_record(
            Rec { h, offset, len },
            (kind != RecordKind::Block)
                .then(|| image.get(po..po + payload_len as usize))
                .flatten(),
        );
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

    /// The segment a record of `len` bytes goes to: the active one while it has room, else a
    /// new one (the active one is sealed). In a segment written into a reused file, the record
    /// limit is raised first when the record would pass it (a failed raise ends the segment;
    /// the record goes to a new one, and the hand-out fails if that one's raise fails too).
    pub(super) fn segment_for(
        &self,
        app: &mut Appender,
        len: u64,
    ) -> Result<Arc<Segment>, StoreError> {
        let mut tries = 0;
        loop {
            let seg = self.pick_segment(app, len)?;
            let need = seg.frontier() + len;
            match seg.raise_limit(need, self.cfg.limit_step, self.engine.as_ref()) {
                Ok(()) => return Ok(seg),
                Err(e) => {
                    // The records handed out so far lie below the limit both copies still
                    // cover: they stay good (no freeze in flight fails). The segment takes no
                    // more (`fits` is false for it: the next hand-out rotates the usual way,
                    // waiting for what is in flight, recording the length and syncing) and
                    // its file is never written into again.
                    crate::log::warn(&format!("segment {}: {e}; it is sealed", seg.id));
                    seg.damaged.store(true, Ordering::SeqCst);
                    tries += 1;
                    if tries >= 2 {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// [`Store::segment_for`] before the record limit is looked at.
    fn pick_segment(&self, app: &mut Appender, len: u64) -> Result<Arc<Segment>, StoreError> {
        if let Some(s) = &app.active {
            if Self::fits(app, len) {
                return Ok(s.clone());
            }
            self.seal_in_background(s)?;
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
        let mut created = self.new_segment(id, size, len);
        if matches!(created, Err(StoreError::NoSpace(_)))
            && self.drop_checkpoints() + self.recycler.drop_free() > 0
        {
            // Checkpoints only save scans: on a full file system the log comes first.
            created = Segment::create(&self.cfg.dir, id, size, self.engine.as_ref());
        }
        let seg = match created {
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

    /// Creates segment `id` of `size` bytes for a first record of `len` bytes: in a file kept
    /// for reuse when there is one nothing reads any more (its first record limit covers that
    /// record), else in a new file.
    fn new_segment(&self, id: u64, size: u64, len: u64) -> Result<Segment, StoreError> {
        // The record limit is kept in 4 KiB pages in 32 bits (16 TiB).
        if size <= u64::from(u32::MAX) * PAGE {
            if let Some(free) = self.recycler.take() {
                match Segment::create_in(
                    &self.cfg.dir,
                    id,
                    size,
                    self.cfg.limit_step.max(len),
                    &free,
                    self.engine.as_ref(),
                ) {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        crate::log::warn(&format!(
                            "reusing {} for segment {id} failed ({e}); a new file is created",
                            free.display()
                        ));
                        let _ = std::fs::remove_file(&free);
                    }
                }
            }
        }
        Segment::create(&self.cfg.dir, id, size, self.engine.as_ref())
    }

    /// After a failed write or sync: marks each segment of `locs` failed (read-only) and cuts
    /// it back to before the first of these records, so that what failed cannot reappear at
    /// the next open — when nothing was handed out after them. When another freeze's records
    /// follow (concurrent writers), the bytes stay: they belong to no acknowledged window, and
    /// the next open reports what is left of them.
    pub(crate) fn cut_back<'l>(&self, locs: impl IntoIterator<Item = &'l Loc>) {
        // Per segment: (segment, first offset, end of the last record).
        let mut cut: Vec<(Arc<Segment>, u64, u64)> = Vec::new();
        for l in locs {
            match cut.iter_mut().find(|(s, _, _)| s.id == l.seg.id) {
                Some((_, o, e)) => {
                    *o = (*o).min(l.offset);
                    *e = (*e).max(l.offset + l.len);
                }
                None => cut.push((l.seg.clone(), l.offset, l.offset + l.len)),
            }
        }
        for (seg, offset, end) in cut {
            seg.failed.store(true, Ordering::SeqCst);
            seg.sealed.store(true, Ordering::SeqCst);
            if seg
                .frontier
                .compare_exchange(end, offset, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            self.used.fetch_sub(end - offset, Ordering::SeqCst);
            seg.forget_records_from(offset);
            // Best effort: on a dying device the truncation may fail too; recovery then finds
            // the record torn or whole (an unacknowledged outcome, either way consistent).
            let _ = seg.file.set_len(offset.max(seg.first_record));
            let _ = seg.file.sync_all();
        }
    }

    /// A failed batch of block records: [`Store::cut_back`]; those that could not be cut back
    /// (records were handed out after them: concurrent freezes) get their header page
    /// overwritten with zeros and synced (best effort, as the cut-back is). Their bytes may be
    /// torn behind a whole header that names the same key, length and checksum as a copy
    /// another freeze committed; zeroed, the next open finds no record there — it reports a
    /// damaged region of a segment that failed anyway — instead of a copy that only reading
    /// its payload tells from a good one (docs/FORMAT.md, duplicate records).
    pub(super) fn cut_or_void_blocks<'l>(&self, locs: impl IntoIterator<Item = &'l Loc>) {
        let locs: Vec<&Loc> = locs.into_iter().collect();
        self.cut_back(locs.iter().copied());
        let zeros = AlignedBuf::zeroed(PAGE as usize);
        let mut touched: Vec<&Arc<Segment>> = Vec::new();
        for loc in locs {
            if loc.seg.frontier() <= loc.offset {
                continue;
            }
            match self.engine.write_all_at(loc.seg.fd(), loc.offset, &zeros) {
                Ok(()) => {
                    if !touched.iter().any(|s| s.id == loc.seg.id) {
                        touched.push(&loc.seg);
                    }
                }
                Err(e) => crate::log::warn(&format!(
                    "zeroing the header of a failed block record at {} of {} failed ({e}): \
                     the next open reads its payload to tell it from a good copy",
                    loc.offset,
                    loc.seg.path.display()
                )),
            }
        }
        for seg in touched {
            if let Err(e) = self.engine.fdatasync(seg.fd()) {
                crate::log::warn(&format!(
                    "syncing zeroed block headers in {} failed ({e})",
                    seg.path.display()
                ));
            }
        }
    }

    /// A manifest that failed: [`Store::cut_back`]; when records were handed out after it
    /// (concurrent freezes), the file could not be cut back, so its pages are overwritten
    /// with zeros and synced (best effort, as the cut-back is): a commit answered with an error
    /// must not reappear at the next open — where a later `pin` or replace of the version it
    /// would shadow was acknowledged meanwhile. The next open reports the zeros as a damaged
    /// region of a segment that failed anyway.
    pub(super) fn cut_or_void(&self, loc: &Loc) {
        self.cut_back([loc]);
        if loc.seg.frontier() <= loc.offset {
            return;
        }
        let zeros = AlignedBuf::zeroed(loc.len as usize);
        let res = self
            .engine
            .write_all_at(loc.seg.fd(), loc.offset, &zeros)
            .and_then(|()| self.engine.fdatasync(loc.seg.fd()));
        if let Err(e) = res {
            crate::log::warn(&format!(
                "zeroing a failed manifest at {} of {} failed ({e}): the next open may find it",
                loc.offset,
                loc.seg.path.display()
            ));
        }
    }

    /// A rotation's seal of the active segment `seg` (under the appender lock): it takes no
    /// more appends from now on; the rest runs in the background, so that freezes go on
    /// appending to the next segment meanwhile — once every record handed out in it is
    /// written (or failed) and every manifest in it synced (or failed), its unused tail is
    /// given back, its records synced, its sealed length recorded ([`Segment::finish_seal`])
    /// and its checkpoint written. Until then a crash leaves it unsealed behind a newer
    /// segment, possibly with room handed out and never written: recovery tells that from
    /// damage by what the newer segments hold (`recovery::unwritten_tail`). Joined with the
    /// checkpoints ([`Store::wait_checkpoints`]).
    fn seal_in_background(&self, seg: &Arc<Segment>) -> Result<(), StoreError> {
        if seg.sealed.load(Ordering::SeqCst) {
            // Sealed already: by a failure (read-only, nothing to record or checkpoint), by
            // `seal_active`, or found sealed at the open.
            return Ok(());
        }
        let before = self.in_flight.next_ticket()?;
        seg.sealing.store(true, Ordering::SeqCst);
        seg.sealed.store(true, Ordering::SeqCst);
        let (seg2, dir, engine, flight) = (
            seg.clone(),
            self.cfg.dir.clone(),
            self.engine.clone(),
            self.in_flight.clone(),
        );
        let job = move || {
            let seg = seg2;
            // `sealing` is cleared however this ends (a panic included): compaction waits
            // for it.
            let sealed = SealDone(&seg);
            if let Err(e) = flight.wait_before(before) {
                crate::log::warn(&format!("sealing segment {}: {e}", seg.id));
                return;
            }
            crate::fail_point!("segment-seal", _a => {
                // As if the header rewrite failed: sealed in memory, its length unrecorded
                // (the next open records it), no checkpoint.
                return;
            });
            seg.finish_seal(engine.as_ref());
            drop(sealed);
            if let Some(recs) = seg.take_records() {
                if !seg.failed.load(Ordering::SeqCst) {
                    checkpoint::sync_and_write(engine.as_ref(), &dir, &seg, seg.frontier(), &recs);
                }
            }
        };
        match self.spawn_joined("cwm-seal", job) {
            Ok(()) => {}
            Err(e) => {
                // No thread: sealed here, the old way (waiting for what is in flight).
                crate::log::warn(&format!("seal thread not started ({e}); sealing in line"));
                let sealed = SealDone(seg);
                self.in_flight.wait_before(before)?;
                seg.finish_seal(self.engine.as_ref());
                drop(sealed);
                self.checkpoint_sealed(seg);
            }
        }
        Ok(())
    }

    /// Writes the checkpoint of `seg`, just sealed with everything handed out in it written,
    /// in the background: its records are made durable first (`fdatasync`), then the
    /// checkpoint file is written (`checkpoint.rs`). Nothing when its records were not kept
    /// or it failed. Joined when the store is dropped.
    pub(super) fn checkpoint_sealed(&self, seg: &Arc<Segment>) {
        let Some(recs) = seg.take_records() else {
            return;
        };
        if seg.failed.load(Ordering::SeqCst) {
            return;
        }
        let (seg, dir, engine) = (seg.clone(), self.cfg.dir.clone(), self.engine.clone());
        let job = move || {
            checkpoint::sync_and_write(engine.as_ref(), &dir, &seg, seg.frontier(), &recs);
        };
        if let Err(e) = self.spawn_joined("cwm-checkpoint", job) {
            crate::log::warn(&format!("checkpoint thread not started: {e}"));
        }
    }

    /// Runs `job` on a thread of its own, joined by [`Store::wait_checkpoints`].
    fn spawn_joined(&self, name: &str, job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let h = std::thread::Builder::new().name(name.into()).spawn(job)?;
        if let Ok(mut v) = self.checkpoints.lock() {
            v.retain(|h| !h.is_finished());
            v.push(h);
        }
        Ok(())
    }

    /// Removes every checkpoint file (the file system is full and the log needs the room):
    /// the next open scans those segments. Returns how many were removed.
    fn drop_checkpoints(&self) -> usize {
        let n = checkpoint::remove_all(&self.cfg.dir);
        if n > 0 {
            crate::log::warn(&format!(
                "file system full: {n} segment checkpoints removed to make room (the next \
                 open scans those segments)"
            ));
        }
        n
    }

    /// A clean stop's checkpoints: waits for those being written in the background, then
    /// checkpoints the active segment up to its frontier (so the next open scans no record
    /// header). Dropping the store does the same; a daemon calls it once it has drained, since
    /// other threads may still hold the store.
    pub fn checkpoint(&self) {
        self.wait_checkpoints();
        self.checkpoint_active();
    }

    /// Waits for the checkpoints being written in the background, and for rotations' seals
    /// still under way (each waits for the records handed out in its segment).
    pub fn wait_checkpoints(&self) {
        let hs = self
            .checkpoints
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for h in hs {
            let _ = h.join();
        }
    }

    /// At a clean stop: checkpoints the active segment up to its frontier (its records made
    /// durable first), so the next open scans only what is appended after.
    pub(super) fn checkpoint_active(&self) {
        let Ok(app) = self.appender.lock() else {
            return;
        };
        if self.quiesce().is_err() {
            return;
        }
        let Some(seg) = &app.active else {
            return;
        };
        if seg.failed.load(Ordering::SeqCst) || seg.sealed.load(Ordering::SeqCst) {
            return;
        }
        let Some(recs) = seg.records.lock().ok().and_then(|g| g.clone()) else {
            return;
        };
        checkpoint::sync_and_write(
            self.engine.as_ref(),
            &self.cfg.dir,
            seg,
            seg.frontier(),
            &recs,
        );
    }

    /// `fdatasync`s a segment; a failure makes it read-only (never retried as if nothing
    /// happened).
    pub(super) fn sync(&self, seg: &Segment) -> Result<(), StoreError> {
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

    /// Appends a small record from an in-memory payload and writes it (no sync).
    pub(super) fn append_payload(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload: &[u8],
    ) -> Result<Loc, StoreError> {
        let (loc, img) = self.hand_out_payload(app, kind, key, payload)?;
        self.write_record(kind, loc, &img)
    }

    /// Hands out room for a small record from an in-memory payload (its image returned, not
    /// written): the caller writes it with [`Store::write_run`] before any hand-out that
    /// rotates ([`Store::fits_as_is`] false), still under the appender lock.
    pub(super) fn hand_out_payload(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload: &[u8],
    ) -> Result<(Loc, AlignedBuf), StoreError> {
        let len = payload.len() as u64;
        let mut img = AlignedBuf::zeroed(stored_len(kind, len) as usize);
        let po = payload_offset(len);
        img[po..po + payload.len()].copy_from_slice(payload);
        let sum = payload_checksum(payload);
        let loc = self.append(app, kind, key, len, sum, &mut img)?;
        Ok((loc, img))
    }

    /// Writes records of `kind` handed out back to back in one segment from `first` on, under
    /// the appender lock (their images in order), with one write instead of one each; on a
    /// failure the run is cut back ([`Store::write_record`]).
    pub(super) fn write_run(
        &self,
        kind: RecordKind,
        first: &Loc,
        imgs: &[AlignedBuf],
    ) -> Result<(), StoreError> {
        if let [img] = imgs {
            return self.write_record(kind, first.clone(), img).map(|_| ());
        }
        let mut buf = AlignedBuf::zeroed(imgs.iter().map(|b| b.len()).sum());
        let mut at = 0;
        for b in imgs {
            buf[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        let whole = Loc {
            seg: first.seg.clone(),
            offset: first.offset,
            len: at as u64,
        };
        self.write_record(kind, whole, &buf).map(|_| ())
    }

    /// Hands out room for a metadata record under the appender lock without waiting for the
    /// records handed out before it: it holds a ticket, and [`Handed::write`] writes it, after
    /// the lock is released, once every record before it is written — the log's order stays
    /// what recovery relies on, while other freezes go on appending and writing meanwhile.
    pub(super) fn append_ordered(
        &self,
        app: &mut Appender,
        kind: RecordKind,
        key: u128,
        payload: &[u8],
    ) -> Result<Handed<'_>, StoreError> {
        let len = payload.len() as u64;
        let mut img = AlignedBuf::zeroed(stored_len(kind, len) as usize);
        let po = payload_offset(len);
        img[po..po + payload.len()].copy_from_slice(payload);
        let sum = payload_checksum(payload);
        let loc = self.hand_out(app, kind, key, len, sum, &mut img)?;
        let mut flight = self.in_flight();
        if let Err(e) = flight.add(1) {
            self.cut_back([&loc]);
            return Err(e);
        }
        Ok(Handed {
            store: self,
            kind,
            loc,
            img,
            flight: Some(flight),
        })
    }

    /// Writes a record image handed out at `loc` (cut back when that fails).
    fn write_record(
        &self,
        kind: RecordKind,
        loc: Loc,
        img: &AlignedBuf,
    ) -> Result<Loc, StoreError> {
        let _site = match kind {
            RecordKind::Manifest => "manifest-write",
            RecordKind::Meta => "meta-write",
            RecordKind::Tombstone => "tombstone-write",
            _ => "",
        };
        crate::fail_point!(_site, a => {
            if a == crate::failpoint::Action::ShortWrite {
                short_write(self.engine.as_ref(), &loc, img);
            }
            self.cut_back([&loc]);
            return Err(injected_error(_site));
        });
        if let Err(e) = self.engine.write_all_at(loc.seg.fd(), loc.offset, img) {
            self.cut_back([&loc]);
            return Err(StoreError::io(format!("writing a {kind:?} record"), e));
        }
        Ok(loc)
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
