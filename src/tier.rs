//! The RAM tier: an LRU of recently frozen or thawed blocks' payloads in host memory, in front
//! of the disk, so a recent window thaws without reading the log. Off by default on the host
//! backend (capacity 0).
//!
//! Payloads live in one arena of equal slots (allocated at the first insert, slot = that
//! block's size), which every engine's device maps ([`RamTier::attach`]: page-locked and mapped
//! on a GPU) so a thaw from the tier is a single copy from host to device memory. Blocks of another
//! size go to the heap.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::KvMemory;
use crate::io::AlignedBuf;

enum Stored {
    Heap(Arc<[u8]>),
    Slot(usize, usize),
}

struct Arena {
    buf: AlignedBuf,
    slot: usize,
    free: Vec<usize>,
}

struct Inner {
    /// key → (payload, recency tick, xxh3 of the payload as its manifest records it).
    map: HashMap<u128, (Stored, u64, u64)>,
    lru: BTreeMap<u64, u128>,
    bytes: u64,
    tick: u64,
    arena: Option<Arena>,
}

impl Inner {
    fn bytes_of<'a>(&'a self, s: &'a Stored) -> &'a [u8] {
        match s {
            Stored::Heap(v) => v,
            Stored::Slot(i, len) => match &self.arena {
                Some(a) => &a.buf[i * a.slot..i * a.slot + len],
                None => &[],
            },
        }
    }

    fn evict_one(&mut self) -> bool {
        let Some((&t, &k)) = self.lru.iter().next() else {
            return false;
        };
        self.lru.remove(&t);
        if let Some((s, _, _)) = self.map.remove(&k) {
            self.release(s);
        }
        true
    }

    fn release(&mut self, s: Stored) {
        match s {
            Stored::Heap(v) => self.bytes -= heap_cost(v.len()),
            Stored::Slot(i, _) => {
                if let Some(a) = &mut self.arena {
                    self.bytes -= a.slot as u64;
                    a.free.push(i);
                }
            }
        }
    }
}

/// LRU of block payloads by key, bounded in bytes.
pub struct RamTier {
    capacity: u64,
    inner: Mutex<Inner>,
    mapped: AtomicBool,
}

/// Payloads of a window's blocks held in the tier, borrowed under its lock (nothing is evicted
/// while this lives).
pub struct TierHits<'a> {
    guard: MutexGuard<'a, Inner>,
    keys: Vec<u128>,
}

impl TierHits<'_> {
    /// The payloads, in the order asked for.
    #[must_use]
    pub fn payloads(&self) -> Vec<&[u8]> {
        self.keys
            .iter()
            .filter_map(|k| {
                self.guard
                    .map
                    .get(k)
                    .map(|(s, _, _)| self.guard.bytes_of(s))
            })
            .collect()
    }
}

/// The smallest arena slot (and what a smaller payload counts as): a free list of one entry
/// per slot stays at most an 512th of the tier, whatever block size an engine registers.
pub const MIN_SLOT: usize = 4096;

/// What a payload held outside the arena counts for: its bytes, and at least a slot (an
/// entry's bookkeeping is not free).
fn heap_cost(len: usize) -> u64 {
    len.max(MIN_SLOT) as u64
}

impl RamTier {
    /// A tier of `capacity` bytes (0 = disabled).
    #[must_use]
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                lru: BTreeMap::new(),
                bytes: 0,
                tick: 0,
                arena: None,
            }),
            mapped: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Capacity in bytes.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// True when the tier can hold anything.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Allocates the arena now for blocks of `slot` bytes (instead of at the first insert);
    /// blocks under [`MIN_SLOT`] get none.
    pub fn prepare(&self, slot: usize) {
        let mut g = self.lock();
        if g.arena.is_none() && slot >= MIN_SLOT {
            if let Some(buf) = AlignedBuf::try_zeroed(self.capacity as usize) {
                let n = buf.len() / slot;
                g.arena = Some(Arena {
                    buf,
                    slot,
                    free: (0..n).rev().collect(),
                });
            }
        }
    }

    /// Maps the arena into `mem`'s device (a GPU reads it directly): every engine's memory
    /// maps it for itself, so a second engine, or an engine registered again after a restart,
    /// also thaws from it with one copy (registering again with the same memory is a no-op).
    /// False when there is no arena yet or the device has nothing to map.
    pub fn attach(&self, mem: &dyn KvMemory) -> bool {
        let mut g = self.lock();
        let Some(a) = g.arena.as_mut() else {
            return false;
        };
        let ok = mem.register_staging(a.buf.as_mut_ptr(), a.buf.len());
        if ok {
            self.mapped.store(true, Ordering::SeqCst);
        }
        ok
    }

    /// A copy of one block (and marks it recently used).
    #[must_use]
    pub fn get(&self, key: u128) -> Option<Arc<[u8]>> {
        let mut g = self.lock();
        let i = &mut *g;
        i.tick += 1;
        let tick = i.tick;
        let (_, t, _) = i.map.get_mut(&key)?;
        let old = std::mem::replace(t, tick);
        i.lru.remove(&old);
        i.lru.insert(tick, key);
        let (s, _, _) = i.map.get(&key)?;
        Some(Arc::from(i.bytes_of(s)))
    }

    /// Whether every block of `keys` is held (without touching their recency); `None` when
    /// the tier is busy (a thaw holds it while it copies): callers on a hot path (lookup)
    /// must not wait for a whole thaw.
    #[must_use]
    pub fn contains_all(&self, keys: &[u128]) -> Option<bool> {
        let g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(keys.iter().all(|k| g.map.contains_key(k)))
    }

    /// Borrows every block of `keys` when all are present with the checksums `sums` (their
    /// manifest's) and marks them recently used, so a thaw can copy straight out of the
    /// tier. A block held with another checksum is a miss, not corruption: the tier holds
    /// other bytes for that key (a freeze's gather of a block the log already held) — the
    /// bytes themselves are verified by the thaw.
    #[must_use]
    pub fn all(&self, keys: &[u128], sums: &[u64]) -> Option<TierHits<'_>> {
        let mut g = self.lock();
        if keys.len() != sums.len()
            || !keys
                .iter()
                .zip(sums)
                .all(|(k, sum)| g.map.get(k).is_some_and(|e| e.2 == *sum))
        {
            return None;
        }
        let i = &mut *g;
        for k in keys {
            i.tick += 1;
            let tick = i.tick;
            if let Some((_, t, _)) = i.map.get_mut(k) {
                let old = std::mem::replace(t, tick);
                i.lru.remove(&old);
                i.lru.insert(tick, *k);
            }
        }
        Some(TierHits {
            guard: g,
            keys: keys.to_vec(),
        })
    }

    /// Inserts a copy of a payload whose xxh3 is `sum`, evicting least recently used blocks to
    /// make room. A block already held stays as it is, unless `replace` (the bytes were just
    /// read from the log and verified) and it is held with another checksum.
    pub fn put(&self, key: u128, payload: &[u8], sum: u64, replace: bool) {
        let len = payload.len() as u64;
        if len == 0 || len > self.capacity {
            return;
        }
        let mut g = self.lock();
        let i = &mut *g;
        match i.map.get(&key) {
            Some(e) if !replace || e.2 == sum => return,
            Some(_) => {
                if let Some((s, t, _)) = i.map.remove(&key) {
                    i.lru.remove(&t);
                    i.release(s);
                }
            }
            None => {}
        }
        if i.arena.is_none() && !self.mapped.load(Ordering::SeqCst) && payload.len() >= MIN_SLOT {
            if let Some(buf) = AlignedBuf::try_zeroed(self.capacity as usize) {
                let slot = payload.len();
                let n = buf.len() / slot;
                i.arena = Some(Arena {
                    buf,
                    slot,
                    free: (0..n).rev().collect(),
                });
            }
        }
        let in_arena = i.arena.as_ref().is_some_and(|a| a.slot == payload.len());
        let cost = if in_arena {
            i.arena.as_ref().map_or(len, |a| a.slot as u64)
        } else {
            heap_cost(payload.len())
        };
        while i.bytes + cost > self.capacity
            || (in_arena && i.arena.as_ref().is_some_and(|a| a.free.is_empty()))
        {
            if !i.evict_one() {
                return;
            }
        }
        let stored = match (in_arena, i.arena.as_mut()) {
            (true, Some(a)) => match a.free.pop() {
                Some(s) => {
                    a.buf[s * a.slot..s * a.slot + payload.len()].copy_from_slice(payload);
                    Stored::Slot(s, payload.len())
                }
                None => return,
            },
            _ => Stored::Heap(Arc::from(payload)),
        };
        i.tick += 1;
        let tick = i.tick;
        i.map.insert(key, (stored, tick, sum));
        i.lru.insert(tick, key);
        i.bytes += cost;
    }

    /// Fault injection (tests, `cwm torture`): flips bit 0 of byte `at` of a held payload, as
    /// a memory error would; false when the block is not held or is shorter.
    #[doc(hidden)]
    pub fn flip_bit(&self, key: u128, at: usize) -> bool {
        let mut g = self.lock();
        let i = &mut *g;
        match i.map.get_mut(&key) {
            Some((Stored::Heap(v), _, _)) => match Arc::get_mut(v).and_then(|v| v.get_mut(at)) {
                Some(b) => {
                    *b ^= 1;
                    true
                }
                None => false,
            },
            Some((Stored::Slot(s, len), _, _)) if at < *len => match i.arena.as_mut() {
                Some(a) => {
                    a.buf[*s * a.slot + at] ^= 1;
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Drops a block (deleted windows, detected corruption).
    pub fn remove(&self, key: u128) {
        let mut g = self.lock();
        if let Some((s, t, _)) = g.map.remove(&key) {
            g.lru.remove(&t);
            g.release(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_all_never_waits_for_a_thaw() {
        let t = RamTier::new(1 << 20);
        t.put(1, &[7u8; 100], 1, false);
        t.put(2, &[8u8; 100], 2, false);
        assert_eq!(t.contains_all(&[1, 2]), Some(true));
        assert_eq!(t.contains_all(&[1, 3]), Some(false));
        let hits = t.all(&[1, 2], &[1, 2]).unwrap(); // a thaw copying out of the tier
        assert_eq!(t.contains_all(&[1, 2]), None);
        drop(hits);
        assert_eq!(t.contains_all(&[1, 2]), Some(true));
    }

    #[test]
    fn lru_eviction_keeps_recent() {
        let s = MIN_SLOT;
        let t = RamTier::new(3 * s as u64);
        t.put(1, &vec![1; s], 1, false);
        t.put(2, &vec![2; s], 2, false);
        t.put(3, &vec![3; s], 3, false);
        assert!(t.get(1).is_some()); // 1 is now most recent
        t.put(4, &vec![4; s], 4, false); // evicts 2
        assert!(t.get(2).is_none());
        assert_eq!(t.get(4).as_deref(), Some(&vec![4u8; s][..]));
        assert!(t.bytes() <= 3 * s as u64);
        t.put(5, &vec![0; 4 * s], 5, false); // larger than the tier: ignored
        assert!(t.get(5).is_none());
        // Another size goes to the heap, within the same bound, counted as a slot at least.
        t.put(6, &[6; 50], 6, false);
        assert_eq!(t.get(6).as_deref(), Some(&[6u8; 50][..]));
        assert!(t.bytes() <= 3 * s as u64);
        let hits = t.all(&[4, 6], &[4, 6]).expect("both present");
        assert_eq!(hits.payloads()[1], &[6u8; 50][..]);
        drop(hits);
        assert!(t.all(&[2, 4], &[2, 4]).is_none());
        t.remove(4);
        assert!(t.get(4).is_none());
    }

    /// A block held with other bytes than its manifest's (another freeze's gather of a block
    /// the log already held) is a miss, not corruption; a freeze never replaces what is held,
    /// bytes read from the log (verified) do.
    #[test]
    fn a_block_held_with_another_checksum_is_a_miss() {
        let t = RamTier::new(1 << 20);
        t.put(1, &[1u8; 100], 11, false);
        t.put(1, &[2u8; 100], 22, false);
        assert!(t.all(&[1], &[22]).is_none(), "other bytes held: a miss");
        assert_eq!(
            t.all(&[1], &[11]).expect("held").payloads()[0],
            &[1u8; 100][..]
        );
        let before = t.bytes();
        t.put(1, &[2u8; 100], 22, true);
        assert!(t.all(&[1], &[11]).is_none());
        assert_eq!(
            t.all(&[1], &[22]).expect("replaced").payloads()[0],
            &[2u8; 100][..]
        );
        assert_eq!(t.bytes(), before, "replacing frees the old copy");
        t.put(1, &[3u8; 100], 22, true);
        assert_eq!(
            t.get(1).as_deref(),
            Some(&[2u8; 100][..]),
            "same checksum: kept"
        );
        assert!(t.all(&[1, 2], &[22]).is_none(), "one checksum per key");
    }

    /// A device memory that records which regions it was asked to map.
    struct Mapper(Mutex<Vec<(usize, usize)>>);

    impl KvMemory for Mapper {
        fn tensor_sizes(&self) -> Vec<u64> {
            Vec::new()
        }
        fn read(
            &self,
            _: &[crate::device::Region],
            _: &mut [&mut [u8]],
        ) -> Result<(), crate::device::DeviceError> {
            Ok(())
        }
        fn write(
            &self,
            _: &[crate::device::Region],
            _: &[&[u8]],
        ) -> Result<(), crate::device::DeviceError> {
            Ok(())
        }
        fn register_staging(&self, ptr: *mut u8, len: usize) -> bool {
            if let Ok(mut v) = self.0.lock() {
                v.push((ptr as usize, len));
            }
            true
        }
    }

    /// Blocks smaller than a slot get no arena (an arena of 1-byte slots would keep a free
    /// list eight times the tier's size) and each counts as a slot: a tier of 16 slots holds
    /// at most 16 of them.
    #[test]
    fn tiny_blocks_get_no_arena_and_count_as_a_slot() {
        let t = RamTier::new(16 * MIN_SLOT as u64);
        t.prepare(1);
        assert!(t.lock().arena.is_none());
        for k in 0..100u128 {
            t.put(k, &[k as u8], k as u64, false);
        }
        assert!(t.lock().arena.is_none());
        assert_eq!(t.lock().map.len(), 16);
        assert_eq!(t.bytes(), 16 * MIN_SLOT as u64);
        assert_eq!(t.get(99).as_deref(), Some(&[99u8][..]));
    }

    /// Every engine maps the arena into its own device: a second engine, or the same engine
    /// registered again after a restart (a new memory), thaws from the tier with one copy too.
    #[test]
    fn every_engine_memory_maps_the_arena() {
        let t = RamTier::new(1 << 20);
        let (a, b) = (
            Mapper(Mutex::new(Vec::new())),
            Mapper(Mutex::new(Vec::new())),
        );
        assert!(!t.attach(&a), "no arena before the first block");
        t.prepare(4096);
        assert!(t.attach(&a));
        assert!(t.attach(&b));
        let (ra, rb) = (a.0.lock().unwrap().clone(), b.0.lock().unwrap().clone());
        assert_eq!(ra.len(), 1);
        assert_eq!(ra, rb, "the same arena, mapped by both");
        assert_eq!(ra[0].1, 1 << 20);
    }
}
