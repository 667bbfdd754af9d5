//! `cwm fsck`: offline verification of a data directory. Recovery runs first (its report
//! lists torn tails, damaged regions and incomplete windows); then every block of every window
//! is read and both checksums verified. Each window is reported ok, damaged (with its intact
//! prefix) or lost. [`repair`] drops what cannot be read and rewrites damaged segments;
//! [`verify_windows`] is also the daemon's scrub.

use serde::Serialize;

use crate::io::AlignedBuf;
use crate::store::{RecoveryReport, Store, StoreConfig, StoreError};

/// One window's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct WindowCheck {
    /// Window name.
    pub name: String,
    /// `ok`, `damaged` or `lost`.
    pub status: &'static str,
    /// Blocks in the window.
    pub blocks: u64,
    /// Leading blocks that verify.
    pub intact_blocks: u64,
    /// What failed, if anything.
    pub detail: Option<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct FsckReport {
    /// What recovery found.
    pub recovery: RecoveryReport,
    /// Per window.
    pub windows: Vec<WindowCheck>,
    /// Windows whose manifest exists but some block's record was lost to damage (listed;
    /// they thaw up to that block).
    pub lost: Vec<String>,
    /// Damage anywhere in the log, garbage records and padding included (a full read of
    /// every record, [`Store::verify_log`]).
    pub log_problems: Vec<crate::store::LogProblem>,
    /// Bytes of block payload verified.
    pub bytes_verified: u64,
    /// Seconds spent verifying.
    pub seconds: f64,
}

impl FsckReport {
    /// True when every window verified and recovery found nothing to cut or skip.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.log_problems.is_empty()
            && self.recovery.torn_tails.is_empty()
            && self.recovery.damaged_regions.is_empty()
            && self.recovery.damaged_records.is_empty()
            && self.windows.iter().all(|w| w.status == "ok")
    }
}

/// Reads and verifies every block of every visible window of an open store (manifest, both
/// checksums of each block), at most `rate` bytes/s (0: unlimited). `progress(done, total)` is
/// called after each window. Returns the verdicts and the payload bytes verified.
pub fn verify_windows(
    store: &Store,
    rate: u64,
    progress: &dyn Fn(usize, usize),
) -> Result<(Vec<WindowCheck>, u64), StoreError> {
    let t = std::time::Instant::now();
    let names: Vec<String> = store.list()?.into_iter().map(|w| w.name).collect();
    let mut windows = Vec::with_capacity(names.len());
    let mut bytes = 0u64;
    for (i, name) in names.iter().enumerate() {
        let check = match store.open_window(name) {
            // Deleted since the list was taken (a running daemon): nothing to verify.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => WindowCheck {
                name: name.clone(),
                status: "lost",
                blocks: 0,
                intact_blocks: 0,
                detail: Some(e.to_string()),
            },
            Ok(r) => {
                let n = r.num_blocks();
                let mut bufs: Vec<AlignedBuf> = Vec::new();
                let mut bad = None;
                // Batches of up to 32 blocks (one submission each); a batch that fails is
                // re-read block by block so the first bad block is named exactly.
                let mut b = 0;
                while b < n {
                    let k = (n - b).min(32);
                    for i in 0..k {
                        let want = r.record_len(b + i) as usize;
                        if bufs.len() <= i {
                            bufs.push(AlignedBuf::zeroed(want));
                        } else if bufs[i].len() < want {
                            bufs[i] = AlignedBuf::zeroed(want);
                        }
                    }
                    let batch_ok = {
                        let mut imgs: Vec<&mut [u8]> =
                            bufs[..k].iter_mut().map(|x| &mut x[..]).collect();
                        store.read_blocks(&r, b, &mut imgs).is_ok()
                    };
                    if batch_ok {
                        bytes += r.manifest.blocks[b..b + k]
                            .iter()
                            .map(|x| x.len)
                            .sum::<u64>();
                    } else {
                        for i in b..b + k {
                            match store.read_blocks(&r, i, &mut [&mut bufs[i - b][..]]) {
                                Ok(()) => bytes += r.manifest.blocks[i].len,
                                Err(e) => {
                                    bad = Some((i, e.to_string()));
                                    break;
                                }
                            }
                        }
                        if bad.is_some() {
                            break;
                        }
                    }
                    b += k;
                    if rate > 0 {
                        let want = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
                        if let Some(d) = want.checked_sub(t.elapsed()) {
                            std::thread::sleep(d);
                        }
                    }
                }
                match bad {
                    None => WindowCheck {
                        name: name.clone(),
                        status: "ok",
                        blocks: n as u64,
                        intact_blocks: n as u64,
                        detail: None,
                    },
                    Some((b, d)) => WindowCheck {
                        name: name.clone(),
                        status: "damaged",
                        blocks: n as u64,
                        intact_blocks: b as u64,
                        detail: Some(d),
                    },
                }
            }
        };
        windows.push(check);
        progress(i + 1, names.len());
    }
    Ok((windows, bytes))
}

/// Verifies `cfg.dir`; `progress(done, total)` is called after each window.
pub fn check(cfg: StoreConfig, progress: &dyn Fn(usize, usize)) -> Result<FsckReport, StoreError> {
    let t = std::time::Instant::now();
    // A check walks every record header (checkpoints would skip the block records' headers).
    let mut cfg = cfg;
    cfg.use_checkpoints = false;
    let (store, recovery) = Store::open(cfg)?;
    let (windows, bytes) = verify_windows(&store, 0, progress)?;
    let log_problems = store.verify_log()?;
    Ok(FsckReport {
        log_problems,
        lost: recovery.incomplete_windows.clone(),
        recovery,
        windows,
        bytes_verified: bytes,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// What `cwm fsck --repair` changed.
#[derive(Debug, Serialize)]
pub struct RepairReport {
    /// The check before repairing.
    pub before: FsckReport,
    /// Every change, in order, in words.
    pub changes: Vec<String>,
    /// Windows deleted (a tombstone written) because a block is damaged or missing.
    pub tombstoned: Vec<String>,
    /// Segments rewritten (live records copied out, then the file deleted).
    pub segments_rewritten: Vec<u64>,
    /// Bytes given back by the rewrite.
    pub bytes_reclaimed: u64,
    /// The check after repairing (reopened from disk).
    pub after: FsckReport,
}

/// Repairs `cfg.dir` (offline): recovery (tolerate-tail) cuts torn tails; every window that
/// does not verify, and every window whose blocks are not all in the log, gets a tombstone
/// (the window is dropped whole: a shorter prefix is not written as a new version, because
/// the store cannot tell which tokens a block prefix covers); then every segment holding a
/// damaged region, a damaged record or garbage is rewritten by compaction, so the damaged
/// bytes leave the disk. The catalog is the log itself: reopening rebuilds it. A damaged
/// catalog (Meta) record is dropped with its segment's rewrite; its key then resolves to its
/// previous intact record, if any. `progress(stage, done, total)` reports each stage.
pub fn repair(
    cfg: StoreConfig,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<RepairReport, StoreError> {
    let mut cfg = cfg;
    cfg.recovery = crate::store::RecoveryMode::TolerateTail;
    cfg.use_checkpoints = false;
    // Segments rewritten because they hold damage are removed, never written into again.
    cfg.recycle_segments = 0;
    // Segments whose header is unreadable fail every open: they go out of the log first
    // (renamed, kept for inspection); windows with records there are deleted below.
    let mut changes = Vec::new();
    for (file, why) in crate::store::set_aside_invalid_segments(&cfg.dir)? {
        changes.push(format!(
            "set aside a segment as {file} ({why}); its records are not recovered"
        ));
    }
    let before = check(cfg.clone(), &|d, t| progress("verifying", d, t))?;
    let mut tombstoned = Vec::new();
    let (store, rep) = Store::open(cfg.clone())?;
    for (seg, off, why) in &before.recovery.torn_tails {
        changes.push(format!(
            "cut the torn tail of segment {seg} at offset {off} ({why})"
        ));
    }
    let _ = rep;
    for w in before.windows.iter().filter(|w| w.status != "ok") {
        store.delete_window(&w.name, None)?;
        changes.push(format!(
            "deleted window {:?} ({}: {})",
            w.name,
            w.status,
            w.detail.as_deref().unwrap_or("")
        ));
        tombstoned.push(w.name.clone());
    }
    for (name, version) in store.incomplete_windows()? {
        store.tombstone_incomplete(&name)?;
        changes.push(format!(
            "deleted window {name:?} version {version} (a block is missing from the log)"
        ));
        tombstoned.push(name);
    }
    let mut damaged: Vec<u64> = before
        .recovery
        .damaged_regions
        .iter()
        .map(|d| d.0)
        .chain(before.recovery.damaged_records.iter().map(|d| d.0))
        .chain(before.log_problems.iter().map(|p| p.segment))
        .collect();
    for p in &before.log_problems {
        changes.push(format!(
            "rewrote segment {} (damage at offset {}: {})",
            p.segment, p.offset, p.what
        ));
    }
    for (seg, from, to, why) in &before.recovery.damaged_regions {
        changes.push(format!(
            "dropped the damaged region {from}..{to} of segment {seg} ({why})"
        ));
    }
    for (seg, off) in &before.recovery.damaged_records {
        changes.push(format!(
            "dropped the damaged manifest, tombstone or catalog record at segment {seg} offset {off}"
        ));
    }
    damaged.sort_unstable();
    damaged.dedup();
    store.seal_active()?;
    let mut ids = store.compact_candidates(1.0)?;
    ids.extend(damaged);
    ids.sort_unstable();
    ids.dedup();
    let total = ids.len();
    let crep = store.compact_segments(
        &ids,
        &crate::store::CompactOptions {
            live_ratio: 1.0,
            ..Default::default()
        },
        &mut |p| progress("rewriting", p.segments_done, total),
    )?;
    for (id, why) in &crep.segments_skipped {
        changes.push(format!("could not rewrite segment {id}: {why}"));
    }
    if !crep.segments_removed.is_empty() {
        changes.push(format!(
            "rewrote segments {:?}: {} live records copied, {} bytes given back",
            crep.segments_removed, crep.records_copied, crep.bytes_reclaimed
        ));
    }
    drop(store);
    let after = check(cfg, &|d, t| progress("re-verifying", d, t))?;
    Ok(RepairReport {
        before,
        changes,
        tombstoned,
        segments_rewritten: crep.segments_removed,
        bytes_reclaimed: crep.bytes_reclaimed,
        after,
    })
}
