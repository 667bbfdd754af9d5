//! Catalog records: small keyed payloads the daemon keeps in the log (sessions, idempotent
//! outcomes), durable like manifests and kept twice; the newest record of a key is its value.
//! Also the catalog scrub, which re-verifies these records and live tombstones from the disk.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::error::{poisoned, StoreError};
use super::format::{stored_len, RecordKind, SEGMENT_HEADER_LEN};
use super::index::Loc;
use super::verify::verify_copies;
use super::Store;
use crate::io::{AlignedBuf, Op};

/// The payload of a catalog deletion ([`Store::delete_meta`]); never a valid record of any
/// kind (those start with `{` or their own magic).
pub const META_DELETED: &[u8] = b"CWMD";

/// What [`Store::scrub_catalog`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogScrub {
    /// Catalog records and tombstones verified.
    pub records: u64,
    /// Catalog records that did not verify and were written again from memory.
    pub rewritten: u64,
    /// Tombstones that did not verify (the window they deleted may come back at the next
    /// open).
    pub bad_tombstones: Vec<String>,
}

impl Store {
    /// Writes a catalog record (sessions, idempotent outcomes) durably; the newest record of a
    /// key is what [`Store::meta`] returns, also after a restart.
    pub fn put_meta(&self, key: u128, payload: &[u8]) -> Result<(), StoreError> {
        if payload.is_empty() {
            return Err(StoreError::Validation(
                "a catalog record needs a payload".into(),
            ));
        }
        let mut app = self.lock_appender()?;
        self.put_meta_locked(&mut app, key, payload)
    }

    /// [`Store::put_meta`] under an appender lock the caller holds.
    pub(super) fn put_meta_locked(
        &self,
        app: &mut super::append::Appender,
        key: u128,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let len = stored_len(RecordKind::Meta, payload.len() as u64);
        let needed = len + SEGMENT_HEADER_LEN; // room for segment headers if the append rotates
        let capacity = self.capacity.load(Ordering::SeqCst);
        let free = capacity.saturating_sub(self.used.load(Ordering::SeqCst));
        if needed > free {
            return Err(StoreError::QuotaExceeded {
                needed,
                free,
                capacity,
            });
        }
        let (loc, seq) = self.append_synced(app, RecordKind::Meta, key, payload)?;
        loc.seg.note_meta(key);
        let old = self
            .state
            .write()
            .map_err(poisoned)?
            .meta
            .insert(key, (seq, payload.to_vec(), loc));
        // The superseded record is garbage now (compaction drops it).
        if let Some((_, _, l)) = old {
            l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The newest catalog records with their sequence numbers (ordering them against windows'
    /// manifests).
    pub fn meta_with_seq(&self) -> Result<Vec<(u128, u64, Vec<u8>)>, StoreError> {
        let st = self.state.read().map_err(poisoned)?;
        Ok(st
            .meta
            .iter()
            .filter(|(_, (_, v, _))| v.as_slice() != META_DELETED)
            .map(|(k, (seq, v, _))| (*k, *seq, v.clone()))
            .collect())
    }

    /// Deletes the catalog record of `key` durably: a deletion record becomes its newest, so
    /// the key is gone, also after a restart; compaction drops the deletion once no older
    /// record of the key is left in another segment. False when there was none.
    pub fn delete_meta(&self, key: u128) -> Result<bool, StoreError> {
        let mut app = self.lock_appender()?;
        let present = self
            .state
            .read()
            .map_err(poisoned)?
            .meta
            .get(&key)
            .is_some_and(|(_, v, _)| v.as_slice() != META_DELETED);
        if present {
            self.put_meta_locked(&mut app, key, META_DELETED)?;
        }
        Ok(present)
    }

    /// Deletes the catalog records of `keys` whose current payload `still` accepts (looked at
    /// under the appender lock: no record of theirs is written in between), 1,024 a lock,
    /// each batch's deletions synced once. Returns how many.
    pub fn delete_metas_if(
        &self,
        keys: &[u128],
        still: impl Fn(u128, &[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for chunk in keys.chunks(1024) {
            let mut app = self.lock_appender()?;
            let chosen: Vec<u128> = {
                let st = self.state.read().map_err(poisoned)?;
                chunk
                    .iter()
                    .copied()
                    .filter(|k| {
                        st.meta
                            .get(k)
                            .is_some_and(|(_, v, _)| v.as_slice() != META_DELETED && still(*k, v))
                    })
                    .collect()
            };
            if !chosen.is_empty() {
                n += self.delete_metas_locked(&mut app, &chosen)?;
            }
        }
        Ok(n)
    }

    /// Deletes the catalog records of `keys` (the caller saw them present) under an appender
    /// lock the caller holds: their deletion records are written, then synced once per
    /// segment. Returns how many. Before an append that rotates, the deletions so far are
    /// synced and applied, so a failure cuts back only the segment it happens in — never the
    /// rotated one, whose length its seal records in the background.
    pub(super) fn delete_metas_locked(
        &self,
        app: &mut super::append::Appender,
        keys: &[u128],
    ) -> Result<usize, StoreError> {
        let mut locs: Vec<(u128, Loc, u64)> = Vec::with_capacity(keys.len());
        let mut done = 0;
        let len = super::format::stored_len(RecordKind::Meta, META_DELETED.len() as u64);
        for &key in keys {
            if !locs.is_empty() && !Self::fits_as_is(app, len) {
                done += self.apply_meta_deletions(std::mem::take(&mut locs))?;
            }
            match self.append_payload(app, RecordKind::Meta, key, META_DELETED) {
                Ok(loc) => locs.push((key, loc, app.next_seq - 1)),
                Err(e) => {
                    self.cut_back(locs.iter().map(|(_, l, _)| l));
                    return Err(e);
                }
            }
        }
        Ok(done + self.apply_meta_deletions(locs)?)
    }

    /// Syncs deletion records written in one segment and applies them to the index (cut back
    /// when the sync fails). Returns how many.
    fn apply_meta_deletions(&self, locs: Vec<(u128, Loc, u64)>) -> Result<usize, StoreError> {
        let Some((_, first, _)) = locs.first() else {
            return Ok(0);
        };
        if let Err(e) = self.sync(&first.seg) {
            self.cut_back(locs.iter().map(|(_, l, _)| l));
            return Err(e);
        }
        let mut st = self.state.write().map_err(poisoned)?;
        for (key, loc, seq) in &locs {
            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
            loc.seg.note_meta(*key);
            let old = st
                .meta
                .insert(*key, (*seq, META_DELETED.to_vec(), loc.clone()));
            if let Some((_, _, l)) = old {
                l.seg.live.fetch_sub(l.len, Ordering::SeqCst);
            }
        }
        Ok(locs.len())
    }

    /// Re-reads and verifies, from the disk, the records the index holds besides windows: the
    /// newest catalog record of every key and every live tombstone. A catalog record whose
    /// bytes no longer verify is written again from the copy in memory (at the next open the
    /// store would otherwise fall back to an older record of its key, or lose it); a tombstone
    /// that no longer verifies is reported (at the next open, the window it deleted could come
    /// back: delete that window again).
    pub fn scrub_catalog(&self) -> Result<CatalogScrub, StoreError> {
        let (metas, tombs) = {
            let st = self.state.read().map_err(poisoned)?;
            let metas: Vec<(u128, Vec<u8>, Loc)> = st
                .meta
                .iter()
                .map(|(k, (_, v, l))| (*k, v.clone(), l.clone()))
                .collect();
            let tombs: Vec<(u128, Loc)> = st.tombs.iter().map(|(k, l)| (*k, l.clone())).collect();
            (metas, tombs)
        };
        let bad = |l: &Loc, kind: RecordKind| -> Option<String> {
            let mut img = AlignedBuf::zeroed(l.len as usize);
            let mut op = [Op::read(l.seg.fd(), l.offset, &mut img[..])];
            match self.engine.run(&mut op) {
                Err(e) => Some(format!("unreadable: {e}")),
                Ok(()) => verify_copies(&img, &l.seg, kind).err(),
            }
        };
        let mut out = CatalogScrub {
            records: (metas.len() + tombs.len()) as u64,
            ..Default::default()
        };
        for (key, payload, loc) in metas {
            if let Some(why) = bad(&loc, RecordKind::Meta) {
                // Rewritten only if it is still the newest record of its key, looked at under
                // the appender lock: a record of the key written between the look and the
                // rewrite (a pin, a TTL, a session's new state) would otherwise be superseded
                // by this older payload, which the next open would then apply.
                let mut app = self.lock_appender()?;
                let current = self
                    .state
                    .read()
                    .map_err(poisoned)?
                    .meta
                    .get(&key)
                    .is_some_and(|(_, _, l)| l.seg.id == loc.seg.id && l.offset == loc.offset);
                crate::fail_point!("catalog-rewrite", _a => {});
                if current {
                    crate::log::warn(&format!(
                        "scrub: catalog record {key:032x} in segment {} does not verify ({why}); written again",
                        loc.seg.id
                    ));
                    self.put_meta_locked(&mut app, key, &payload)?;
                    out.rewritten += 1;
                }
            }
        }
        for (key, loc) in tombs {
            if let Some(why) = bad(&loc, RecordKind::Tombstone) {
                out.bad_tombstones.push(format!(
                    "tombstone of name key {key:032x} in segment {} offset {}: {why}",
                    loc.seg.id, loc.offset
                ));
            }
        }
        Ok(out)
    }

    /// Every catalog record key with its newest payload.
    pub fn meta(&self) -> Result<Vec<(u128, Vec<u8>)>, StoreError> {
        Ok(self
            .meta_with_seq()?
            .into_iter()
            .map(|(k, _, v)| (k, v))
            .collect())
    }
}
