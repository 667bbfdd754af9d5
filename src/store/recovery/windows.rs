//! From name events to visible windows: manifests and tombstones applied in sequence order,
//! then each surviving window's blocks resolved to the records found and the window published
//! into the index.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Cand, Cands, Meta, Recovery};
use crate::io::{AlignedBuf, IoEngine};
use crate::store::error::StoreError;
use crate::store::format::RecordKind;
use crate::store::index::{BlockRecord, Loc, Unfound};
use crate::store::keyhash::KeyMap;
use crate::store::manifest::Manifest;
use crate::store::name_key;
use crate::store::segment::Segment;
use crate::store::verify::verify_image;

impl Recovery<'_> {
    /// Applies manifests and tombstones in sequence order: the newest event of a name decides
    /// (a manifest replaces whatever the name held; a tombstone removes the version it names).
    /// Records each name's newest event and its live tombstone in the index; returns the
    /// surviving manifest of each name: name -> (sequence number, manifest, where).
    ///
    /// Also returns, for each block key with several records, when manifests began and
    /// stopped referring to it ([`Refs`]) — what tells a block written again after it was
    /// dropped from copies written at once ([`generation_floor`]).
    pub(super) fn apply_name_events(&mut self) -> (BTreeMap<String, (u64, Manifest, Loc)>, Refs) {
        let state = &mut self.state;
        let mut metas = std::mem::take(&mut self.metas);
        // The sort is stable and segments were scanned in id order, so of a record and its
        // compaction copy (same sequence number) the copy comes last and wins.
        metas.sort_by_key(|(s, _)| *s);
        let mut refs: Refs = self
            .cands
            .iter()
            .filter(|(_, c)| matches!(c, Cands::Many(_)))
            .map(|(k, _)| (*k, Vec::new()))
            .collect();
        // Per name: the manifest it holds (its sequence number and its keys that have several
        // records), until the name's next event ends it.
        let mut open: BTreeMap<String, (u64, Vec<u128>)> = BTreeMap::new();
        // A manifest stops referring to its keys at its name's next event.
        let end = |refs: &mut Refs, started: Option<(u64, Vec<u128>)>, at: u64| {
            for k in started.map(|(_, ks)| ks).unwrap_or_default() {
                if let Some(v) = refs.get_mut(&k) {
                    v.push((at, -1));
                }
            }
        };
        let mut live: BTreeMap<String, (u64, Manifest, Loc)> = BTreeMap::new();
        for (seq, m) in metas {
            match m {
                Meta::Manifest(m, loc) => {
                    let key = name_key(&m.name);
                    state.names.insert(key, seq);
                    state.tombs.remove(&key);
                    // (A compaction copy of the manifest already open — the same sequence
                    // number — neither ends nor starts a reference.)
                    let copy = open.get(&m.name).is_some_and(|(s, _)| *s == seq);
                    if !refs.is_empty() && !copy {
                        let mut ks: Vec<u128> = m
                            .blocks
                            .iter()
                            .map(|b| b.key)
                            .filter(|k| refs.contains_key(k))
                            .collect();
                        ks.sort_unstable();
                        ks.dedup();
                        let started = open.remove(&m.name);
                        end(&mut refs, started, seq);
                        for k in &ks {
                            if let Some(v) = refs.get_mut(k) {
                                v.push((seq, 1));
                            }
                        }
                        open.insert(m.name.clone(), (seq, ks));
                    }
                    live.insert(m.name.clone(), (seq, m, loc));
                }
                Meta::Tombstone(t, loc) => {
                    // The newest tombstone of a name (a copy over its original) is live while it
                    // is the name's newest event.
                    state.names.insert(name_key(&t.name), seq);
                    state.tombs.insert(name_key(&t.name), loc);
                    // Whatever version the name holds at this point of the sequence is older than
                    // the tombstone, so it is deleted: usually the version the tombstone names, but
                    // compaction may have dropped that manifest (it was dead) while an older one of
                    // the name survives in a segment not compacted yet.
                    let started = open.remove(&t.name);
                    end(&mut refs, started, seq);
                    live.remove(&t.name);
                }
            }
        }
        for loc in state.tombs.values() {
            loc.seg.live.fetch_add(loc.len, Ordering::SeqCst);
        }
        (live, refs)
    }

    /// Publishes the surviving windows into the index, oldest first, each block resolved to the
    /// newest matching record written before its manifest. A block not found was lost to
    /// damage (a manifest is only written once its blocks are durable): the window is still
    /// exposed, reported incomplete, and thaws up to it (strict recovery refuses it).
    pub(super) fn publish_windows(
        &mut self,
        live: BTreeMap<String, (u64, Manifest, Loc)>,
        refs: &Refs,
    ) -> Result<(), StoreError> {
        self.state.blocks.reserve(self.cands.len());
        for cs in self.cands.values_mut() {
            if let Cands::Many(v) = cs {
                v.sort_by_key(|c| c.seq);
            }
        }
        // Blocks already resolved to one of several matching records: key -> (the newest
        // matching one, the one chosen among those up to it).
        let mut chosen: KeyMap<(usize, usize)> = KeyMap::default();
        let mut windows: Vec<(u64, Manifest, Loc)> = live.into_values().collect();
        windows.sort_by_key(|(s, _, _)| *s);
        for (seq, m, mloc) in windows {
            let resolved = resolve_blocks(
                self.engine,
                &self.state.segments,
                &self.cands,
                refs,
                &mut chosen,
                &m,
                seq,
            );
            if resolved.iter().any(Option::is_none) {
                if self.strict {
                    return Err(StoreError::Recovery(format!(
                        "window {:?} refers to a block that is not in the log",
                        m.name
                    )));
                }
                self.report.incomplete_windows.push(m.name.clone());
            }
            let segments = &self.state.segments;
            let found: Vec<Option<BlockRecord>> = resolved
                .into_iter()
                .map(|c| {
                    c.and_then(|c| {
                        Some(BlockRecord {
                            loc: Loc {
                                seg: segments.get(&c.seg)?.clone(),
                                offset: c.offset,
                                len: c.len,
                            },
                            payload_len: c.payload_len,
                            checksum: c.checksum,
                        })
                    })
                })
                .collect();
            self.state
                .publish(&m, seq, mloc, found, Unfound::IndexAsLost);
        }
        Ok(())
    }
}

/// Resolves every block of manifest `m` (sequence number `seq`) to the newest matching record
/// written before it (`None`: not found, lost to damage); where several match, the one
/// [`pick_duplicate`] chooses, the same for every window that resolves to the same newest
/// (`chosen`).
fn resolve_blocks<'c>(
    engine: &dyn IoEngine,
    segments: &BTreeMap<u64, Arc<Segment>>,
    cands: &'c KeyMap<Cands>,
    refs: &Refs,
    chosen: &mut KeyMap<(usize, usize)>,
    m: &Manifest,
    seq: u64,
) -> Vec<Option<&'c Cand>> {
    let mut resolved = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        let found = cands.get(&b.key).and_then(|cs| {
            let cs = cs.as_slice();
            let i = cs
                .iter()
                .rposition(|c| c.seq < seq && c.checksum == b.checksum && c.payload_len == b.len)?;
            if cs.len() == 1 {
                // No duplicate to choose from.
                return Some(&cs[i]);
            }
            let i = match chosen.get(&b.key) {
                Some(&(newest, j)) if newest == i => j,
                _ => {
                    let floor = refs
                        .get(&b.key)
                        .map_or(0, |r| generation_floor(r, cs[i].seq));
                    let j = pick_duplicate(engine, segments, cs, i, floor);
                    chosen.insert(b.key, (i, j));
                    j
                }
            };
            Some(&cs[i])
        });
        resolved.push(found);
    }
    resolved
}

/// Of the records that match `cs[i]` (same checksum and length) up to it — an original and
/// its compaction copies, identical when intact, or copies of one block written by freezes
/// that ran at once — the newest whose bytes verify; `i` when there is only one or none
/// verifies (reads then report the damage). A copy written by a freeze whose write failed
/// (torn: its header whole, its payload not) stays in the log when other records followed it,
/// and must not shadow the intact record the committed window referred to. Only duplicates
/// pay for reading payloads.
///
/// Records written before `floor` (the block was dropped then, [`generation_floor`]) are an
/// older generation: garbage, not copies made at once with `cs[i]`, and never read here.
fn pick_duplicate(
    engine: &dyn IoEngine,
    segments: &BTreeMap<u64, Arc<Segment>>,
    cs: &[Cand],
    i: usize,
    floor: u64,
) -> usize {
    let dups: Vec<usize> = (0..=i)
        .rev()
        .take_while(|&j| cs[j].seq > floor)
        .filter(|&j| cs[j].checksum == cs[i].checksum && cs[j].payload_len == cs[i].payload_len)
        .collect();
    if dups.len() < 2 {
        return i;
    }
    for j in dups {
        let c = &cs[j];
        let Some(seg) = segments.get(&c.seg) else {
            continue;
        };
        let mut img = AlignedBuf::zeroed(c.len as usize);
        if engine.read_exact_at(seg.fd(), c.offset, &mut img).is_ok()
            && verify_image(&img, seg, RecordKind::Block).is_ok()
        {
            return j;
        }
    }
    i
}

/// For keys with several records: each manifest's start (`+1`) and end (`-1`, at its name's
/// next event) of referring to the key, in sequence order.
pub(super) type Refs = KeyMap<Vec<(u64, i32)>>;

/// The last moment before `at` (the newest matching record's sequence number) when no window
/// referred to the block any more — the count of references fell to zero there — so the block
/// was dropped, and any record of it written after that is a new generation (a later freeze
/// wrote it again). 0 when there is none: every record up to `at` may be a copy of one
/// generation (compaction copies, or freezes that wrote the block at once, one of which may
/// have failed and left a torn copy). Events of one sequence number are counted together (a
/// replacing version that keeps the block starts where the replaced one ends). Linear: a
/// shared prefix block may be referred to by every window.
fn generation_floor(refs: &[(u64, i32)], at: u64) -> u64 {
    let (mut count, mut floor, mut i) = (0i64, 0, 0);
    while i < refs.len() && refs[i].0 < at {
        let s = refs[i].0;
        while i < refs.len() && refs[i].0 == s {
            count += i64::from(refs[i].1);
            i += 1;
        }
        if count == 0 {
            floor = s;
        }
    }
    floor
}

#[cfg(test)]
mod tests {
    /// `generation_floor` over references given as (start, end) intervals (`u64::MAX`: not
    /// ended).
    fn generation_floor(intervals: &[(u64, u64)], at: u64) -> u64 {
        let mut ev: Vec<(u64, i32)> = Vec::new();
        for &(s, e) in intervals {
            ev.push((s, 1));
            if e != u64::MAX {
                ev.push((e, -1));
            }
        }
        ev.sort_by_key(|&(t, _)| t);
        super::generation_floor(&ev, at)
    }

    #[test]
    fn a_block_dropped_and_written_again_starts_a_generation() {
        // Referred to from 10 to 20, dropped, written again at 30.
        assert_eq!(generation_floor(&[(10, 20)], 30), 20);
        // Another window held it past 20: never dropped.
        assert_eq!(generation_floor(&[(10, 20), (15, 40)], 30), 0);
        // Never referred to before the record: no floor (copies written at once).
        assert_eq!(generation_floor(&[(50, u64::MAX)], 30), 0);
        // A reference that ended after the record does not count.
        assert_eq!(generation_floor(&[(10, 35)], 30), 0);
        // The latest drop wins.
        assert_eq!(generation_floor(&[(1, 5), (8, 12), (14, 18)], 30), 18);
        // A reference ending where another starts (a replace that keeps the block): not
        // dropped.
        assert_eq!(generation_floor(&[(1, 10), (10, u64::MAX)], 30), 0);
    }
}
