//! The staging pool: one 4 KiB-aligned region allocated once per registered engine, cut into
//! record-image slots, registered with the I/O engine as fixed buffers, and lent out in sets
//! to freezes and thaws. Memory use stays at the pool's size whatever the window size, and
//! the same pages go engine memory → staging → disk with no other copy.

use std::sync::{Arc, Condvar, Mutex};

use crate::io::{AlignedBuf, IoEngine};

/// A pool of equal slots inside one region.
pub struct StagingPool {
    region: Arc<AlignedBuf>,
    slot_len: usize,
    nslots: usize,
    free: Mutex<Vec<usize>>,
    cv: Condvar,
    fixed: bool,
}

impl StagingPool {
    /// A pool of `bytes` (at least two slots) of `slot_len`-byte slots (a multiple of 4 KiB),
    /// registered with `io` as fixed buffers when it can be. `None` when memory is short.
    #[must_use]
    pub fn new(bytes: u64, slot_len: usize, io: Option<&dyn IoEngine>) -> Option<Arc<Self>> {
        let slot_len = crate::io::align_up(slot_len as u64) as usize;
        let nslots = ((bytes as usize) / slot_len).max(2);
        let region = Arc::new(AlignedBuf::try_zeroed(nslots.checked_mul(slot_len)?)?);
        let fixed = io.is_some_and(|e| e.register_fixed(region.clone()));
        Some(Arc::new(Self {
            region,
            slot_len,
            nslots,
            free: Mutex::new((0..nslots).rev().collect()),
            cv: Condvar::new(),
            fixed,
        }))
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
    /// until they are free.
    #[must_use]
    pub fn take(self: &Arc<Self>, n: usize) -> SlotSet {
        let n = n.clamp(1, (self.nslots / 2).max(1));
        let mut free = match self.free.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while free.len() < n {
            free = match self.cv.wait(free) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        // Lowest-numbered free slots, ascending: consecutive blocks land in consecutive memory.
        free.sort_unstable_by(|a, b| b.cmp(a));
        let at = free.len() - n;
        let mut idx = free.split_off(at);
        idx.reverse();
        SlotSet {
            pool: self.clone(),
            idx,
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
        let mut free = match self.pool.free.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        free.append(&mut self.idx);
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
}
