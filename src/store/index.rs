//! The in-memory index, rebuilt from the log at every open: where each record lives, the
//! visible windows, the block index with its reference counts, the newest catalog record per
//! key, and the newest event (manifest or tombstone) of each window name. [`State::publish`]
//! is the one place a window becomes visible (at commit and at recovery); [`release_window`]
//! drops its references. Also here: the lookups answered from the index alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use super::error::{poisoned, StoreError};
use super::keyhash::KeyMap;
use super::manifest::Manifest;
use super::segment::Segment;
use super::{name, Store, WindowInfo};

/// Where a record lives.
#[derive(Clone)]
pub(crate) struct Loc {
    /// The segment.
    pub seg: Arc<Segment>,
    /// Offset of the record in the segment.
    pub offset: u64,
    /// Bytes of the record (both copies of a metadata record).
    pub len: u64,
}

/// A stored block: where its record is, what it holds, how many windows refer to it.
#[derive(Clone)]
pub(crate) struct BlockEntry {
    /// Where the block's record is; `None` when recovery found the window's manifest but not
    /// this block (lost to damage): the windows referring to it thaw up to it, and the next
    /// freeze that holds the block writes it again (it is never deduplicated against).
    pub loc: Option<Loc>,
    /// Payload bytes.
    pub payload_len: u64,
    /// Payload checksum.
    pub checksum: u64,
    /// Windows referring to it (a window holding it twice counts twice).
    pub refs: u64,
    /// Freezes in progress that will refer to it without writing it (deduplicated against
    /// it when they began): the entry stays while any holds it, even with no window left.
    pub holds: u64,
}

/// A visible window: its catalog entry, where its manifest is, its block keys in order.
#[derive(Clone)]
pub(crate) struct WindowEntry {
    /// Catalog entry (its `last_use_unix_ms` and `hits` are filled from `usage` on the way out).
    pub info: WindowInfo,
    /// Where its manifest record is.
    pub manifest: Loc,
    /// Its block keys, in order.
    pub keys: Vec<u128>,
    /// Thaws from it (in memory only).
    pub usage: Arc<Usage>,
}

/// How a window has been used since the store was opened.
#[derive(Default)]
pub(crate) struct Usage {
    /// Last thaw, ms since the Unix epoch (its creation until the first).
    pub last_use_ms: AtomicI64,
    /// Thaws.
    pub hits: AtomicU64,
}

impl WindowEntry {
    /// The catalog entry with its usage as of now.
    pub(crate) fn info(&self) -> WindowInfo {
        let mut i = self.info.clone();
        i.last_use_unix_ms = self.usage.last_use_ms.load(Ordering::Relaxed);
        i.hits = self.usage.hits.load(Ordering::Relaxed);
        i
    }

    /// Whether its TTL has passed at `now_ms`: then it is gone for every reader, whether or
    /// not its tombstone is written yet.
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        self.info.expires_unix_ms.is_some_and(|e| e <= now_ms)
    }
}

/// The index: everything the store knows without reading the log.
#[derive(Default)]
pub(crate) struct State {
    /// Newest catalog record per key: (sequence number, payload, where it is).
    pub meta: KeyMap<(u64, Vec<u8>, Loc)>,
    /// Per window-name key, the sequence number of the newest manifest or tombstone written
    /// for it (the event recovery resolves the name to; compaction keeps it while needed).
    pub names: KeyMap<u64>,
    /// Per window-name key whose newest event is a tombstone: where that tombstone is. Only
    /// these tombstones count as live bytes.
    pub tombs: KeyMap<Loc>,
    /// Windows whose newest manifest is not exposed because a block is missing (recovery's
    /// `incomplete_windows`): name -> (version, manifest sequence number).
    pub incomplete: BTreeMap<String, (u64, u64)>,
    /// Every block some window refers to, by key.
    pub blocks: KeyMap<BlockEntry>,
    /// Bytes of the block records `blocks` locates (kept as they are indexed and dropped, so
    /// eviction reads it without walking the index).
    pub block_bytes: u64,
    /// Visible windows, by name.
    pub windows: BTreeMap<String, WindowEntry>,
    /// Names of the windows whose first block has this key (lookups start here, so their
    /// cost follows the windows sharing a prompt's first block, not all windows).
    pub by_first: KeyMap<std::collections::BTreeSet<String>>,
    /// Every segment of the log, by id.
    pub segments: BTreeMap<u64, Arc<Segment>>,
    /// Segments whose records the open took from their checkpoint, with the offset it covers
    /// up to: what [`Store::verify_checkpoints`] walks.
    pub checkpointed: Vec<(u64, u64)>,
}

/// A block record found for a window being published: written by its commit, or found in the
/// log by recovery.
pub(crate) struct BlockRecord {
    /// Where the record is.
    pub loc: Loc,
    /// Payload bytes.
    pub payload_len: u64,
    /// Payload checksum.
    pub checksum: u64,
}

/// What [`State::publish`] does with a block of the window that is neither in the index nor
/// given a record. The two callers differed here; each keeps its behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unfound {
    /// Index it as lost to damage (no location; the manifest's length and checksum, one
    /// reference): the window thaws up to it. Recovery.
    IndexAsLost,
    /// Leave it out of the index. Commit: it never happens there (before the manifest is
    /// written, commit checks every block is written or indexed, and the writer's holds keep
    /// the entries of blocks it did not write from being removed meanwhile).
    Skip,
}

impl State {
    /// Publishes a window: the manifest `m` (sequence number `seq`, its record at `manifest`)
    /// becomes the visible window of its name. `found` yields, for each block of `m` in
    /// order, the record written or found for it, if any. Every block gains a reference; a
    /// block not indexed yet is indexed at its record, and one indexed as lost to damage is
    /// found again there (every window refers to it from then on, each verifying it against
    /// its own manifest). The manifest and newly indexed block records count as live; a window
    /// the name held before is released. Returns the window's catalog entry and the version
    /// it replaced.
    ///
    /// The name's newest-event bookkeeping (`names`, `tombs`, `incomplete`) is the caller's:
    /// commit does it after publishing, recovery before (in sequence order).
    pub(crate) fn publish(
        &mut self,
        m: &Manifest,
        seq: u64,
        manifest: Loc,
        found: impl IntoIterator<Item = Option<BlockRecord>>,
        unfound: Unfound,
    ) -> (WindowInfo, Option<u64>) {
        // Live bytes added per segment, applied once per segment after the loop (an atomic
        // per block would serialise a recovery publishing a million of them).
        let mut live: Vec<(Arc<Segment>, u64)> = Vec::new();
        let mut add_live =
            |seg: &Arc<Segment>, n: u64| match live.iter_mut().find(|(s, _)| Arc::ptr_eq(s, seg)) {
                Some((_, t)) => *t += n,
                None => live.push((seg.clone(), n)),
            };
        for (b, f) in m.blocks.iter().zip(found) {
            let vacant = match self.blocks.entry(b.key) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    let e = o.get_mut();
                    e.refs += 1;
                    if let (None, Some(f)) = (&e.loc, f) {
                        add_live(&f.loc.seg, f.loc.len);
                        self.block_bytes += f.loc.len;
                        e.loc = Some(f.loc);
                        e.payload_len = f.payload_len;
                        e.checksum = f.checksum;
                    }
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => v,
            };
            let entry = match f {
                Some(f) => {
                    add_live(&f.loc.seg, f.loc.len);
                    self.block_bytes += f.loc.len;
                    BlockEntry {
                        loc: Some(f.loc),
                        payload_len: f.payload_len,
                        checksum: f.checksum,
                        refs: 1,
                        holds: 0,
                    }
                }
                None if unfound == Unfound::IndexAsLost => BlockEntry {
                    loc: None,
                    payload_len: b.len,
                    checksum: b.checksum,
                    refs: 1,
                    holds: 0,
                },
                None => continue,
            };
            vacant.insert(entry);
        }
        for (seg, n) in live {
            seg.live.fetch_add(n, Ordering::SeqCst);
        }
        manifest.seg.live.fetch_add(manifest.len, Ordering::SeqCst);
        let info = WindowInfo {
            name: m.name.clone(),
            version: m.version,
            seq,
            session: m.session.clone(),
            namespace: m.namespace.clone(),
            num_tokens: m.tokens.len() as u64,
            num_blocks: m.blocks.len() as u64,
            bytes: m.blocks.iter().map(|b| b.len).sum(),
            created_unix_ms: m.created_unix_ms,
            class: m.retention.class,
            expires_unix_ms: m.retention.expires_unix_ms,
            last_use_unix_ms: m.created_unix_ms,
            hits: 0,
            origin: m.origin,
        };
        let entry = WindowEntry {
            info: info.clone(),
            manifest,
            keys: m.blocks.iter().map(|b| b.key).collect(),
            usage: Arc::new(Usage {
                last_use_ms: AtomicI64::new(m.created_unix_ms),
                hits: AtomicU64::new(0),
            }),
        };
        // (Recovery publishes each name once, so it never replaces a window.)
        if let Some(k) = entry.keys.first() {
            self.by_first.entry(*k).or_default().insert(m.name.clone());
        }
        let replaced = self.windows.insert(m.name.clone(), entry).map(|old| {
            if old.keys.first() != m.blocks.first().map(|b| &b.key) {
                unindex_first(self, &old);
            }
            release_window(self, &old);
            old.info.version
        });
        (info, replaced)
    }
}

/// Removes a window from the first-block index.
pub(crate) fn unindex_first(st: &mut State, entry: &WindowEntry) {
    if let Some(k) = entry.keys.first() {
        if let Some(set) = st.by_first.get_mut(k) {
            set.remove(&entry.info.name);
            if set.is_empty() {
                st.by_first.remove(k);
            }
        }
    }
}

/// Drops a window's references (its manifest and blocks) from the live figures.
pub(crate) fn release_window(st: &mut State, entry: &WindowEntry) {
    entry
        .manifest
        .seg
        .live
        .fetch_sub(entry.manifest.len, Ordering::SeqCst);
    for k in &entry.keys {
        if let Some(b) = st.blocks.get_mut(k) {
            b.refs -= 1;
        }
        drop_if_unused(st, *k);
    }
}

/// Removes block `k` from the index when no window refers to it and no freeze holds it (its
/// record becomes garbage).
pub(crate) fn drop_if_unused(st: &mut State, k: u128) {
    if !st
        .blocks
        .get(&k)
        .is_some_and(|b| b.refs == 0 && b.holds == 0)
    {
        return;
    }
    if let Some(Some(l)) = st.blocks.remove(&k).map(|b| b.loc) {
        l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
        st.block_bytes -= l.len;
    }
}

/// Lookups answered from the index alone.
impl Store {
    /// Visible windows, ordered by name.
    pub fn list(&self) -> Result<Vec<WindowInfo>, StoreError> {
        let now = crate::clock::now_unix_ms();
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .windows
            .values()
            .filter(|w| !w.expired(now))
            .map(WindowEntry::info)
            .collect())
    }

    /// A page of windows (by name), optionally of one session, and how many match in all.
    pub fn list_page(
        &self,
        offset: usize,
        limit: usize,
        session: Option<&str>,
    ) -> Result<(Vec<WindowInfo>, usize), StoreError> {
        let now = crate::clock::now_unix_ms();
        let st = self.state.read().map_err(poisoned)?;
        let matching = st
            .windows
            .values()
            .filter(|w| !w.expired(now) && session.is_none_or(|s| w.info.session == s));
        let mut total = 0usize;
        let mut page = Vec::with_capacity(limit.min(1024));
        for w in matching {
            if total >= offset && page.len() < limit {
                page.push(w.info());
            }
            total += 1;
        }
        Ok((page, total))
    }

    /// One window's catalog entry.
    pub fn get(&self, name: &str) -> Result<WindowInfo, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let now = crate::clock::now_unix_ms();
        let st = self.state.read().map_err(poisoned)?;
        st.windows
            .get(&name)
            .filter(|w| !w.expired(now))
            .map(WindowEntry::info)
            .ok_or(StoreError::NotFound(name))
    }

    /// True when a block with this key is stored (and referenced), and not lost to damage.
    pub fn contains_block(&self, key: u128) -> Result<bool, StoreError> {
        Ok(self
            .state
            .read()
            .map_err(poisoned)?
            .blocks
            .get(&key)
            .is_some_and(|b| b.loc.is_some()))
    }

    /// The window holding the longest prefix of these (chained) block keys, and how many
    /// leading blocks it holds; the newest such window on a tie. `None` when no window starts
    /// with `keys[0]`. With `only`, just that window is considered.
    pub fn longest_prefix(
        &self,
        keys: &[u128],
        only: Option<&str>,
    ) -> Result<Option<(WindowInfo, usize)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        let mut best: Option<(&WindowEntry, usize)> = None;
        let only = match only {
            Some(n) => Some(name::validate_name(n).map_err(StoreError::Validation)?),
            None => None,
        };
        let candidates: Box<dyn Iterator<Item = &WindowEntry>> = match (&only, keys.first()) {
            (Some(n), _) => Box::new(st.windows.get(n).into_iter()),
            (None, Some(k)) => Box::new(
                st.by_first
                    .get(k)
                    .into_iter()
                    .flatten()
                    .filter_map(|n| st.windows.get(n)),
            ),
            (None, None) => Box::new(std::iter::empty()),
        };
        let now = crate::clock::now_unix_ms();
        for w in candidates.filter(|w| !w.expired(now)) {
            // A block lost to damage ends the usable prefix.
            let n = w
                .keys
                .iter()
                .zip(keys)
                .take_while(|(a, b)| a == b && st.blocks.get(a).is_some_and(|e| e.loc.is_some()))
                .count();
            let better = match best {
                None => n > 0,
                Some((b, bn)) => n > bn || (n == bn && w.info.seq > b.info.seq),
            };
            if better {
                best = Some((w, n));
            }
        }
        Ok(best.map(|(w, n)| (w.info(), n)))
    }

    /// Reference count of a stored block (0 when absent).
    pub fn block_refs(&self, key: u128) -> Result<u64, StoreError> {
        Ok(self
            .state
            .read()
            .map_err(poisoned)?
            .blocks
            .get(&key)
            .map_or(0, |b| b.refs))
    }
}
