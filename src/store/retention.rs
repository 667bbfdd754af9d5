//! Retention: a window's class (pinned or unnamed) and TTL, how it has been used, its expiry,
//! and the eviction of unnamed windows under a byte budget.
//!
//! A window's class and expiry at creation are in its manifest (version 2; docs/FORMAT.md);
//! later changes (`pin`, `unpin`, `ttl`) are [`RetentionChange`] catalog records, the newest
//! for the window's current version applying ([`apply_changes`] at open). An expired window is
//! gone for every reader at once — lookups skip it whether or not its tombstone is written —
//! and [`Store::expire_due`] writes the tombstones. Eviction deletes whole unnamed windows
//! (tombstones), in the order of an [`EvictionPolicy`], until the live bytes reach a target;
//! compaction then gives the space back. A block shared with a pinned window stays (it keeps
//! a reference); a window's blocks are its prefix chain, so evicting a window never leaves a
//! block whose prefix is gone behind for a lookup to find.

use std::sync::atomic::Ordering;

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use super::error::{poisoned, StoreError};
use super::index::{State, WindowEntry};
use super::manifest::RetentionChange;
use super::{name, Class, Retention, Store, WindowInfo};

/// Most windows one eviction batch deletes (their tombstones share one sync; the appender
/// lock is held while they are written).
const EVICT_BATCH: usize = 64;

/// The catalog key of a window name's retention record.
#[must_use]
pub fn retention_key(name: &str) -> u128 {
    let mut b = Vec::with_capacity(16 + name.len());
    b.extend_from_slice(b"cwm-retention\0");
    b.extend_from_slice(name.as_bytes());
    xxh3_128(&b)
}

/// Applies the retention records of the catalog to the windows they name (at open): a record
/// counts when it is for the window's current version and newer than its manifest. Returns
/// how many applied.
pub(super) fn apply_changes(st: &mut State) -> usize {
    let mut changes: Vec<(u64, RetentionChange)> = st
        .meta
        .values()
        .filter(|(_, p, _)| RetentionChange::is_one(p))
        .filter_map(|(seq, p, _)| RetentionChange::decode(p).ok().map(|c| (*seq, c)))
        .collect();
    changes.sort_by_key(|(seq, _)| *seq);
    let mut n = 0;
    for (seq, c) in changes {
        if let Some(w) = st.windows.get_mut(&c.name) {
            if w.info.version == c.version && seq > w.info.seq {
                w.info.class = c.retention.class;
                w.info.expires_unix_ms = c.retention.expires_unix_ms;
                n += 1;
            }
        }
    }
    n
}

/// The order in which unnamed windows are evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionPolicy {
    /// Least recently used first (last thaw, or creation).
    #[default]
    Lru,
    /// S3-FIFO at window granularity: windows never thawed since they were saved go first,
    /// oldest first, except the newest tenth of the budget of them (a new entry gets its chance
    /// to be reused); then windows that were thawed, least recently used first; the protected
    /// new ones last.
    S3fifo,
    /// Oldest written first (manifest sequence order), whatever their use: the log is then
    /// reclaimed from its tail and compaction copies only blocks that newer windows still
    /// share.
    Fifo,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Self::Lru),
            "s3fifo" => Ok(Self::S3fifo),
            "fifo" => Ok(Self::Fifo),
            _ => Err(format!(
                "unknown eviction policy {s:?}: use lru, s3fifo or fifo"
            )),
        }
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lru => "lru",
            Self::S3fifo => "s3fifo",
            Self::Fifo => "fifo",
        })
    }
}

/// What one eviction pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvictReport {
    /// Windows evicted, in order.
    pub evicted: Vec<String>,
    /// Block bytes given up (garbage now; compaction reclaims them).
    pub bytes: u64,
    /// Block bytes after the pass.
    pub live_after: u64,
    /// Whether the target was reached (false: only pinned data is left above it).
    pub reached: bool,
}

/// Bytes of block payload by class: `pinned` counts every block a pinned window holds,
/// `unnamed` the blocks only unnamed windows hold.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ClassBytes {
    /// Held by at least one pinned window.
    pub pinned: u64,
    /// Held by unnamed windows only.
    pub unnamed: u64,
}

/// One eviction candidate: an unnamed window as the policy sees it.
#[derive(Debug, Clone)]
pub struct Cand {
    /// Window name.
    pub name: String,
    /// Its version (evicted only if still that one).
    pub version: u64,
    /// Manifest sequence number: insertion order.
    pub seq: u64,
    /// Last use, ms (or any monotonic clock).
    pub last_use: i64,
    /// Uses since insertion.
    pub hits: u64,
    /// Its bytes (sizes the protected part of S3-FIFO's small queue).
    pub bytes: u64,
}

/// The candidates in the order `policy` evicts them, `budget` being the byte budget (the
/// store's eviction and `cwm bench trace`'s simulation share it).
#[must_use]
pub fn order(mut c: Vec<Cand>, policy: EvictionPolicy, budget: u64) -> Vec<Cand> {
    match policy {
        EvictionPolicy::Lru => c.sort_by_key(|x| (x.last_use, x.seq)),
        EvictionPolicy::Fifo => c.sort_by_key(|x| x.seq),
        EvictionPolicy::S3fifo => {
            // The newest never-thawed windows, up to a tenth of the budget, are protected.
            let mut fresh: Vec<&Cand> = c.iter().filter(|x| x.hits == 0).collect();
            fresh.sort_by_key(|x| std::cmp::Reverse(x.seq));
            let mut room = budget / 10;
            let mut protected = std::collections::HashSet::new();
            for x in fresh {
                if x.bytes > room {
                    break;
                }
                room -= x.bytes;
                protected.insert(x.seq);
            }
            c.sort_by_key(|x| {
                let rank = match (x.hits, protected.contains(&x.seq)) {
                    (0, false) => 0u8,
                    (_, false) => 1,
                    _ => 2,
                };
                // Never-thawed: oldest first (FIFO); thawed: least recently used first.
                let when = if x.hits == 0 {
                    x.seq as i64
                } else {
                    x.last_use
                };
                (rank, when, x.seq)
            });
        }
    }
    c
}

impl Store {
    /// Counts a thaw from `name` (its last use and hits).
    pub fn record_hit(&self, name: &str) {
        let Ok(st) = self.state.read() else { return };
        if let Some(w) = st.windows.get(name) {
            w.usage
                .last_use_ms
                .fetch_max(crate::clock::now_unix_ms(), Ordering::Relaxed);
            w.usage.hits.fetch_add(1, Ordering::Relaxed);
            self.usage_epoch.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A counter that moves with every use ([`Store::record_hit`]): usage needs saving again
    /// when it changed since the last [`Store::save_usage`].
    #[must_use]
    pub fn usage_epoch(&self) -> u64 {
        self.usage_epoch.load(Ordering::Relaxed)
    }

    /// Changes a window's class and expiry (`pin`, `unpin`, `ttl`), durably (a catalog
    /// record); with `expected_version`, only if that is its version.
    pub fn set_retention(
        &self,
        name: &str,
        expected_version: Option<u64>,
        retention: Retention,
    ) -> Result<WindowInfo, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        // Held to the end (and taken once no commit of the name is in progress): no replace
        // or delete of the window can come between the check, the record and the index.
        let mut app = self.lock_name(super::name_key(&name))?;
        let now = crate::clock::now_unix_ms();
        let version = {
            let st = self.state.read().map_err(poisoned)?;
            let w = st
                .windows
                .get(&name)
                .filter(|w| !w.expired(now))
                .ok_or_else(|| StoreError::NotFound(name.clone()))?;
            if let Some(e) = expected_version.filter(|e| *e != w.info.version) {
                return Err(StoreError::ConcurrentModification {
                    name,
                    expected: e,
                    actual: w.info.version,
                });
            }
            w.info.version
        };
        let rec = RetentionChange {
            name: name.clone(),
            version,
            retention,
        };
        self.put_meta_locked(&mut app, retention_key(&name), &rec.encode())?;
        let mut st = self.state.write().map_err(poisoned)?;
        let w = st
            .windows
            .get_mut(&name)
            .ok_or_else(|| StoreError::NotFound(name.clone()))?;
        w.info.class = retention.class;
        w.info.expires_unix_ms = retention.expires_unix_ms;
        Ok(w.info())
    }

    /// Deletes the retention records no window can use any more — their window deleted,
    /// evicted, expired or replaced since (a record applies only to the version it names,
    /// and only when newer than that version's manifest) — so a store whose windows come and
    /// go does not keep one record per name it ever pinned or gave a TTL. Under the appender
    /// lock (no `pin`/`ttl`, replace or delete comes between the look and the deletion), at
    /// most 256 per lock. Returns how many.
    pub fn forget_inert_retention(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        loop {
            let mut app = self.lock_appender()?;
            let inert: Vec<u128> = {
                let st = self.state.read().map_err(poisoned)?;
                st.meta
                    .iter()
                    .filter(|(_, (_, p, _))| RetentionChange::is_one(p))
                    .filter(|(_, (seq, p, _))| {
                        RetentionChange::decode(p).is_ok_and(|c| {
                            st.windows
                                .get(&c.name)
                                .is_none_or(|w| w.info.version != c.version || *seq < w.info.seq)
                        })
                    })
                    .map(|(k, _)| *k)
                    .take(256)
                    .collect()
            };
            if inert.is_empty() {
                return Ok(n);
            }
            n += self.delete_metas_locked(&mut app, &inert)?;
        }
    }

    /// Tombstones every window whose TTL has passed (they were already invisible). Returns
    /// them.
    pub fn expire_due(&self) -> Result<Vec<WindowInfo>, StoreError> {
        let now = crate::clock::now_unix_ms();
        let due: Vec<(String, u64)> = {
            let st = self.state.read().map_err(poisoned)?;
            st.windows
                .values()
                .filter(|w| w.expired(now))
                .map(|w| (w.info.name.clone(), w.info.version))
                .collect()
        };
        let mut out = Vec::with_capacity(due.len());
        for (name, version) in due {
            // (Its TTL may have been raised or dropped since the snapshot.)
            let still = |w: &WindowEntry| w.expired(crate::clock::now_unix_ms());
            match self.delete_where(&name, Some(version), still) {
                Ok(i) => out.push(i),
                // Replaced or deleted meanwhile: nothing to expire.
                Err(StoreError::NotFound(_) | StoreError::ConcurrentModification { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Whether any unnamed window (something eviction could give up) is stored.
    pub fn has_unnamed(&self) -> Result<bool, StoreError> {
        let now = crate::clock::now_unix_ms();
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .windows
            .values()
            .any(|w| w.info.class == Class::Unnamed && !w.expired(now)))
    }

    /// Block payload bytes by class.
    pub fn class_bytes(&self) -> Result<ClassBytes, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        let now = crate::clock::now_unix_ms();
        let mut pinned = std::collections::HashSet::new();
        for w in st.windows.values().filter(|w| !w.expired(now)) {
            if w.info.class == Class::Pinned {
                pinned.extend(w.keys.iter().copied());
            }
        }
        let mut out = ClassBytes::default();
        for (k, b) in &st.blocks {
            if pinned.contains(k) {
                out.pinned += b.payload_len;
            } else {
                out.unnamed += b.payload_len;
            }
        }
        Ok(out)
    }

    /// Bytes of the block records windows hold (what eviction measures against its target:
    /// manifests, tombstones and catalog records are small and compaction's business).
    pub fn block_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.state.read().map_err(poisoned)?.block_bytes)
    }

    /// The unnamed windows eviction may take, as the policies see them.
    fn candidates(&self) -> Result<Vec<Cand>, StoreError> {
        let now = crate::clock::now_unix_ms();
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .windows
            .values()
            .filter(|w| w.info.class == Class::Unnamed && !w.expired(now))
            .map(|w: &WindowEntry| {
                let i = w.info();
                Cand {
                    name: i.name,
                    version: i.version,
                    seq: i.seq,
                    last_use: i.last_use_unix_ms,
                    hits: i.hits,
                    bytes: i.bytes,
                }
            })
            .collect())
    }

    /// The segments the next `bytes` of eviction in `policy`'s order would free blocks in:
    /// those holding a block only the next victims refer to. Compacting one of them now would
    /// copy live blocks that the next pass gives up anyway, so compaction after an eviction
    /// leaves them alone.
    pub fn about_to_empty(
        &self,
        policy: EvictionPolicy,
        budget: u64,
        bytes: u64,
    ) -> Result<std::collections::HashSet<u64>, StoreError> {
        let mut out = std::collections::HashSet::new();
        if bytes == 0 {
            return Ok(out);
        }
        let next = order(self.candidates()?, policy, budget);
        let st = self.state.read().map_err(poisoned)?;
        let mut taken = 0u64;
        for c in next {
            if taken >= bytes {
                break;
            }
            let Some(w) = st.windows.get(&c.name) else {
                continue;
            };
            // (Counted as eviction counts them: the records of the blocks it frees.)
            for k in &w.keys {
                if let Some(l) = st
                    .blocks
                    .get(k)
                    .filter(|b| b.refs <= 1)
                    .and_then(|b| b.loc.as_ref())
                {
                    out.insert(l.seg.id);
                    taken = taken.saturating_add(l.len);
                }
            }
        }
        Ok(out)
    }

    /// Evicts unnamed windows in `policy`'s order until the block bytes
    /// ([`Store::block_bytes`]) are at most `target` (`budget`: the byte budget the policy
    /// sizes its queues by).
    pub fn evict(
        &self,
        policy: EvictionPolicy,
        target: u64,
        budget: u64,
    ) -> Result<EvictReport, StoreError> {
        let mut rep = EvictReport::default();
        let mut live = self.block_bytes()?;
        if live <= target {
            rep.live_after = live;
            rep.reached = true;
            return Ok(rep);
        }
        let cands = order(self.candidates()?, policy, budget);
        let mut next = 0;
        while live > target && next < cands.len() {
            // The next victims: as many as reach the target as the index stands (a block's
            // bytes go with its last reference), at most EVICT_BATCH, deleted together (one
            // sync for all their tombstones).
            let batch: Vec<(String, u64)> = {
                let st = self.state.read().map_err(poisoned)?;
                let mut dropped: std::collections::HashMap<u128, u64> =
                    std::collections::HashMap::new();
                let mut freed = 0u64;
                let mut out = Vec::new();
                while next < cands.len()
                    && out.len() < EVICT_BATCH
                    && live.saturating_sub(freed) > target
                {
                    let c = &cands[next];
                    next += 1;
                    let Some(w) = st.windows.get(&c.name) else {
                        continue;
                    };
                    for k in &w.keys {
                        if let Some(b) = st.blocks.get(k).filter(|b| b.holds == 0) {
                            let d = dropped.entry(*k).or_default();
                            *d += 1;
                            if *d == b.refs {
                                freed += b.loc.as_ref().map_or(0, |l| l.len);
                            }
                        }
                    }
                    out.push((c.name.clone(), c.version));
                }
                out
            };
            // (One may have been pinned since the snapshot: a pinned window is never evicted;
            // one thawed-and-replaced or deleted meanwhile is skipped.)
            let done = self.delete_many(&batch, |w| w.info.class == Class::Unnamed)?;
            rep.evicted.extend(done.into_iter().map(|i| i.name));
            let now_live = self.block_bytes()?;
            rep.bytes += live.saturating_sub(now_live);
            live = now_live;
        }
        rep.live_after = live;
        rep.reached = live <= target;
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(seq: u64, last_use: i64, hits: u64) -> Cand {
        Cand {
            name: format!("w{seq}"),
            version: 1,
            seq,
            last_use,
            hits,
            bytes: 10,
        }
    }

    fn names(c: Vec<Cand>) -> Vec<u64> {
        c.into_iter().map(|c| c.seq).collect()
    }

    /// Eviction and expiry choose from a snapshot; the delete re-checks under the appender
    /// lock, so a pin (or a TTL raised) in between wins.
    #[test]
    fn a_window_pinned_after_the_snapshot_is_not_evicted() -> Result<(), StoreError> {
        use crate::store::{BlockDesc, StoreConfig, WindowSpec};
        let dir = tempfile::tempdir().map_err(|e| StoreError::Validation(e.to_string()))?;
        let (store, _) = Store::open(StoreConfig::new(dir.path()))?;
        let spec = WindowSpec {
            name: "u".into(),
            blocks: vec![BlockDesc { key: 7, len: 4096 }],
            retention: Retention {
                class: Class::Unnamed,
                expires_unix_ms: Some(crate::clock::now_unix_ms() + 3_600_000),
            },
            ..Default::default()
        };
        let v = store.put_window(spec, &[&[1u8; 4096]])?.version;
        let pinned = Retention {
            class: Class::Pinned,
            expires_unix_ms: None,
        };
        store.set_retention("u", None, pinned)?;
        let evict = |w: &WindowEntry| w.info.class == Class::Unnamed;
        assert!(matches!(
            store.delete_where("u", Some(v), evict),
            Err(StoreError::ConcurrentModification { .. })
        ));
        let expire = |w: &WindowEntry| w.expired(crate::clock::now_unix_ms());
        assert!(matches!(
            store.delete_where("u", Some(v), expire),
            Err(StoreError::ConcurrentModification { .. })
        ));
        assert_eq!(store.get("u")?.class, Class::Pinned);
        Ok(())
    }

    #[test]
    fn lru_orders_by_last_use() {
        let c = vec![cand(1, 50, 2), cand(2, 10, 0), cand(3, 30, 1)];
        assert_eq!(names(order(c, EvictionPolicy::Lru, 1000)), [2, 3, 1]);
    }

    #[test]
    fn s3fifo_evicts_old_never_used_first_and_protects_the_newest() {
        // Budget 200: the newest never-thawed windows up to 20 bytes (two of 10) are protected.
        let c = vec![
            cand(1, 100, 0),
            cand(2, 5, 3),
            cand(3, 1, 1),
            cand(4, 100, 0),
            cand(5, 100, 0),
            cand(6, 100, 0),
        ];
        assert_eq!(
            names(order(c, EvictionPolicy::S3fifo, 200)),
            [1, 4, 3, 2, 5, 6]
        );
    }
}
