//! The staging pool: one 4 KiB-aligned region allocated once per registered engine, cut into
//! record-image slots, registered with the I/O engine as fixed buffers, and lent out in sets
//! to freezes and thaws. Memory use stays at the pool's size whatever the window size, and
//! the same pages go engine memory → staging → disk with no other copy.
//!
//! A freeze whose window fits in half the pool captures it whole first
//! ([`StagingPool::take_capture`]): the engine's blocks are free at gather speed, and the
//! writes to the log follow. Captures together never hold more than half the pool, so the
//! streaming freeze captures may be waiting behind always finds slots; a capture whose share
//! is reserved goes before streaming takes, so it is not starved by their smaller sets.

use std::sync::{Arc, Condvar, Mutex};

use crate::io::{AlignedBuf, IoEngine};

/// Free slot indices, how many slots whole-window captures hold or have reserved, and how
/// many captures wait for free slots.
struct Free {
    slots: Vec<usize>,
    captured: usize,
    pending: usize,
}

/// A pool of equal slots inside one region.
pub struct StagingPool {
    region: Arc<AlignedBuf>,
    slot_len: usize,
    nslots: usize,
    free: Mutex<Free>,
    cv: Condvar,
    fixed: bool,
}

impl StagingPool {
    /// A pool of `bytes` (at least two slots) of `slot_len`-byte slots (a multiple of 4 KiB),
    /// registered with `io` as fixed buffers when it can be. `None` when memory is short.
    #[must_use]
    pub fn new(bytes: u64, slot_len: usize, io: Option<&dyn IoEngine>) -> Option<Arc<Self>> {
        let (slot_len, nslots) = Self::geometry(bytes, slot_len);
        let region = Arc::new(AlignedBuf::try_zeroed(nslots.checked_mul(slot_len)?)?);
        let fixed = io.is_some_and(|e| e.register_fixed(region.clone()));
        Some(Arc::new(Self {
            region,
            slot_len,
            nslots,
            free: Mutex::new(Free {
                slots: (0..nslots).rev().collect(),
                captured: 0,
                pending: 0,
            }),
            cv: Condvar::new(),
            fixed,
        }))
    }

    /// (slot length, slots) of a pool of `bytes` with `slot_len`-byte slots.
    fn geometry(bytes: u64, slot_len: usize) -> (usize, usize) {
        let slot_len = crate::io::align_up(slot_len as u64) as usize;
        (slot_len, ((bytes as usize) / slot_len).max(2))
    }

    /// Whether this pool is the one [`StagingPool::new`] makes for `bytes` and `slot_len`
    /// (so an engine can take it over instead of allocating its own).
    #[must_use]
    pub fn is_sized_for(&self, bytes: u64, slot_len: usize) -> bool {
        Self::geometry(bytes, slot_len) == (self.slot_len, self.nslots)
    }

    /// Slot length in bytes.
    #[must_use]
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Number of slots.
    #[must_use]
    pub fn slots(&self) -> usize {
        self.nslots
    }

    /// Bytes of the pool.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        (self.nslots * self.slot_len) as u64
    }

    /// Start of the region (for registering it with a device).
    #[must_use]
    pub fn region_ptr(&self) -> *mut u8 {
        self.region.as_ptr().cast_mut()
    }

    /// True when the I/O engine accepted the region as fixed buffers.
    #[must_use]
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Takes `n` slots (at most half the pool, so two sets can always be in flight), waiting
    /// until they are free and no capture with a reserved share is waiting.
    #[must_use]
    pub fn take(self: &Arc<Self>, n: usize) -> SlotSet {
        let n = n.clamp(1, (self.nslots / 2).max(1));
        let mut free = self.lock_free();
        while free.slots.len() < n || free.pending > 0 {
            free = self.wait(free);
        }
        self.split(&mut free.slots, n, false)
    }

    /// Takes slots for a whole window of `n` blocks at once, as sets of at most `batch`;
    /// `None` when `n` exceeds half the pool (the window streams instead). Waits first until
    /// captures' share has room for `n` (other captures hold it only until their writes),
    /// then, ahead of streaming takes, until `n` slots are free (streaming sets are given
    /// back as their batches are written or scattered, whatever captures wait for).
    #[must_use]
    pub fn take_capture(self: &Arc<Self>, n: usize, batch: usize) -> Option<Vec<SlotSet>> {
        let half = self.nslots / 2;
        if n == 0 || n > half {
            return None;
        }
        let mut free = self.lock_free();
        while free.captured + n > half {
            free = self.wait(free);
        }
        free.captured += n;
        free.pending += 1;
        while free.slots.len() < n {
            free = self.wait(free);
        }
        free.pending -= 1;
        let sets = (0..n)
            .step_by(batch.max(1))
            .map(|from| self.split(&mut free.slots, batch.max(1).min(n - from), true))
            .collect();
        self.cv.notify_all();
        Some(sets)
    }

    /// Whether a window of `n` blocks is captured whole ([`StagingPool::take_capture`]).
    #[must_use]
    pub fn captures(&self, n: usize) -> bool {
        n > 0 && n <= self.nslots / 2
    }

    fn wait<'a>(&self, g: std::sync::MutexGuard<'a, Free>) -> std::sync::MutexGuard<'a, Free> {
        match self.cv.wait(g) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Free> {
        match self.free.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The `n` lowest-numbered free slots, ascending: consecutive blocks land in consecutive
    /// memory.
    fn split(self: &Arc<Self>, free: &mut Vec<usize>, n: usize, capture: bool) -> SlotSet {
        free.sort_unstable_by(|a, b| b.cmp(a));
        let at = free.len() - n;
        let mut idx = free.split_off(at);
        idx.reverse();
        SlotSet {
            pool: self.clone(),
            idx,
            capture,
        }
    }

    /// The largest set [`StagingPool::take`] hands out.
    #[must_use]
    pub fn max_set(&self) -> usize {
        (self.nslots / 2).max(1)
    }
}

/// Slots lent from a pool; returned when dropped.
pub struct SlotSet {
    pool: Arc<StagingPool>,
    idx: Vec<usize>,
    /// Part of a whole-window capture (counted in the pool's capture share).
    capture: bool,
}

impl SlotSet {
    /// Number of slots.
    #[must_use]
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    /// Never true (a set holds at least one slot).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }

    /// Mutable views of every slot, in order.
    pub fn slices(&mut self) -> Vec<&mut [u8]> {
        let base = self.pool.region.as_ptr() as *mut u8;
        let len = self.pool.slot_len;
        self.idx
            .iter()
            .map(|&i| {
                // SAFETY: slot i lies inside the region (i < nslots); the pool lends each slot
                // to one set at a time, so no other view of these bytes exists while this set
                // lives, and `&mut self` ties the slices to this set's exclusive borrow.
                unsafe { std::slice::from_raw_parts_mut(base.add(i * len), len) }
            })
            .collect()
    }
}

impl Drop for SlotSet {
    fn drop(&mut self) {
        let mut free = self.pool.lock_free();
        if self.capture {
            free.captured -= self.idx.len();
        }
        free.slots.append(&mut self.idx);
        self.pool.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_disjoint_and_returned() {
        let pool = StagingPool::new(10 * 8192, 8192, None).expect("pool");
        assert_eq!(pool.slots(), 10);
        let mut a = pool.take(4);
        let mut b = pool.take(4);
        let pa: Vec<usize> = a.slices().iter().map(|s| s.as_ptr() as usize).collect();
        let pb: Vec<usize> = b.slices().iter().map(|s| s.as_ptr() as usize).collect();
        assert!(pa.iter().all(|p| !pb.contains(p)));
        assert!(pa.iter().all(|p| p % 4096 == 0));
        for s in a.slices() {
            s.fill(1);
        }
        drop(a);
        let c = pool.take(5); // at most half the pool
        assert_eq!(c.len(), 5);
        drop(b);
        drop(c);
        assert_eq!(pool.take(5).len(), 5);
    }

    #[test]
    fn captures_hold_at_most_half_the_pool_and_go_first() {
        let pool = StagingPool::new(16 * 4096, 4096, None).expect("pool");
        assert!(pool.take_capture(9, 4).is_none(), "more than half: streams");
        assert!(pool.take_capture(0, 4).is_none());
        let a = pool.take_capture(5, 2).expect("5 of 16 slots");
        assert_eq!(
            a.iter().map(SlotSet::len).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        // A second capture of 4 waits for the share (5 + 4 > 8) though 11 slots are free,
        // until `a` is written and dropped.
        std::thread::scope(|s| {
            let h = s.spawn(|| pool.take_capture(4, 4).map(|v| v.len()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!h.is_finished(), "captures hold at most half the pool");
            drop(a);
            assert_eq!(h.join().expect("join"), Some(1));
        });
        // Streaming sets hold 12 of 16: a capture of 8 waits for free slots, and streaming
        // takes queue behind it.
        let s1 = pool.take(8);
        let s2 = pool.take(4);
        std::thread::scope(|s| {
            let c = s.spawn(|| pool.take_capture(8, 8).map(|v| v.len()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            let t = s.spawn(|| pool.take(1).len());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!c.is_finished() && !t.is_finished());
            drop(s1);
            assert_eq!(c.join().expect("join"), Some(1));
            assert_eq!(t.join().expect("join"), 1);
        });
        drop(s2);
    }
}
