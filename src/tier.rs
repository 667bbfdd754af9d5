//! The RAM tier: an LRU of recently frozen or thawed blocks' payloads in host memory, in front
//! of the disk, so a recent window thaws without reading the log. Off by default on the host
//! backend (capacity 0).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

struct Inner {
    map: HashMap<u128, (Arc<[u8]>, u64)>,
    lru: BTreeMap<u64, u128>,
    bytes: u64,
    tick: u64,
}

/// LRU of block payloads by key, bounded in bytes.
pub struct RamTier {
    capacity: u64,
    inner: Mutex<Inner>,
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
            }),
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
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }

    /// Looks a block up (and marks it recently used).
    #[must_use]
    pub fn get(&self, key: u128) -> Option<Arc<[u8]>> {
        let mut g = self.inner.lock().ok()?;
        let i = &mut *g;
        i.tick += 1;
        let tick = i.tick;
        let (v, t) = i.map.get_mut(&key)?;
        i.lru.remove(t);
        *t = tick;
        i.lru.insert(tick, key);
        Some(v.clone())
    }

    /// Inserts a copy of a payload, evicting least recently used blocks to make room.
    pub fn put(&self, key: u128, payload: &[u8]) {
        let len = payload.len() as u64;
        if len > self.capacity {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        let i = &mut *g;
        if i.map.contains_key(&key) {
            return;
        }
        while i.bytes + len > self.capacity {
            let Some((&t, &k)) = i.lru.iter().next() else {
                break;
            };
            i.lru.remove(&t);
            if let Some((v, _)) = i.map.remove(&k) {
                i.bytes -= v.len() as u64;
            }
        }
        i.tick += 1;
        let tick = i.tick;
        i.map.insert(key, (Arc::from(payload), tick));
        i.lru.insert(tick, key);
        i.bytes += len;
    }

    /// Drops a block (deleted windows, detected corruption).
    pub fn remove(&self, key: u128) {
        if let Ok(mut g) = self.inner.lock() {
            let i = &mut *g;
            if let Some((v, t)) = i.map.remove(&key) {
                i.lru.remove(&t);
                i.bytes -= v.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction_keeps_recent() {
        let t = RamTier::new(300);
        t.put(1, &[1; 100]);
        t.put(2, &[2; 100]);
        t.put(3, &[3; 100]);
        assert!(t.get(1).is_some()); // 1 is now most recent
        t.put(4, &[4; 100]); // evicts 2
        assert!(t.get(2).is_none());
        assert_eq!(t.get(4).as_deref(), Some(&[4u8; 100][..]));
        assert!(t.bytes() <= 300);
        t.put(5, &[0; 400]); // larger than the tier: ignored
        assert!(t.get(5).is_none());
    }
}
