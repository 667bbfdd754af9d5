//! Log room. Capacity is checked before any byte of a window is written: [`Store::plan_bytes`]
//! computes exactly what a window needs given the index (new block records, its manifest, the
//! segment headers rotation adds), and [`Store::reserve`] promises room ahead of writing to a
//! window captured before it can be written ([`Reservation`]), so that once the engine is told
//! `captured`, the log cannot refuse it for room.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::append::Appender;
use super::error::{poisoned, StoreError};
use super::format::{record_len, stored_len, RecordKind, SEGMENT_HEADER_LEN};
use super::index::State;
use super::writer::{check_replace, manifest_payload_len, validate_spec};
use super::{Store, WindowSpec, WindowWriter};

impl Store {
    /// Bytes a window needs in the log given the current index: new block records, the
    /// manifest record and any segment headers rotation adds.
    pub(super) fn plan_bytes(
        &self,
        app: &Appender,
        st: &State,
        spec: &WindowSpec,
        manifest_len: u64,
    ) -> Result<(u64, Vec<bool>), StoreError> {
        let seg_room = self.cfg.segment_size - SEGMENT_HEADER_LEN;
        let mut writes = Vec::with_capacity(spec.blocks.len());
        let mut seen = HashSet::new();
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

    /// At most the log room a window of `blocks` blocks of `block_len` bytes and `tokens`
    /// tokens takes, none of them deduplicated (its block records, its manifest, two segment
    /// headers): what an eviction for its room must free.
    #[must_use]
    pub fn room_for(&self, blocks: u64, block_len: u64, tokens: u64) -> u64 {
        let manifest = 1024 + 4 * tokens + 32 * blocks;
        blocks.saturating_mul(record_len(block_len))
            + stored_len(RecordKind::Manifest, manifest)
            + 2 * SEGMENT_HEADER_LEN
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
