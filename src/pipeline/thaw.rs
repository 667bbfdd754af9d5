//! Thaw: read + verify on one thread, scatter on another; a corrupt block stops the thaw after
//! the intact prefix is scattered, and the report says what the engine must recompute. A
//! window held whole by the RAM tier is scattered from there while other threads verify it.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;

use super::*;
use crate::checksum::payload_checksum;
use crate::device;
use crate::store::{Store, WindowReader};
use crate::tier::RamTier;

/// Thaws a window into the engine's blocks `req.block_ids`.
pub fn thaw(
    store: &Store,
    eng: &Engine,
    req: &ThawRequest,
    cfg: &PipelineConfig,
    opts: &ThawOptions<'_>,
) -> Result<ThawReport, PipelineError> {
    let t0 = Instant::now();
    let ctl = Control {
        cancel: opts.cancel.as_ref(),
        progress: opts.progress.as_ref(),
        deadline: opts.deadline,
    };
    let tier = opts.tier.filter(|t| t.enabled());
    let plan = Plan::new(store, eng, req, cfg, tier)?;
    let mut report = ThawReport {
        window: plan.r.info.name.clone(),
        num_blocks: plan.n as u64,
        blocks_restored: 0,
        tokens_restored: 0,
        tokens_to_recompute: plan.total_tokens,
        bytes: 0,
        blocks_from_tier: 0,
        blocks_streamed: 0,
        permuted: plan.compat == Compat::Permute,
        corruption: None,
        tier_corruption: None,
        loaded_secs: 0.0,
        read_secs: 0.0,
        verify_secs: 0.0,
        scatter_secs: 0.0,
    };
    // RAM tier: when every block is there (and verifies), no disk read at all. On a GPU the
    // tier's arena is mapped into the device, so this is one copy, host to device.
    if let Some(t) = tier {
        if from_tier(eng, req, cfg, ctl, t, &plan, &mut report, t0)? {
            store.record_hit(&report.window);
            return Ok(report);
        }
    }
    let run = DiskThaw {
        store,
        eng,
        req,
        cfg,
        ctl,
        tier,
        plan: &plan,
        t0,
    };
    run.run(&mut report)?;
    report.tokens_restored = (report.blocks_restored * plan.bs).min(plan.total_tokens);
    report.tokens_to_recompute = plan.total_tokens - report.tokens_restored;
    report.bytes = report.blocks_restored * plan.bb;
    report.loaded_secs = t0.elapsed().as_secs_f64();
    if report.blocks_restored > 0 {
        store.record_hit(&report.window);
    }
    Ok(report)
}

/// What a thaw restores, checked before any byte moves: the window (open), its layout and
/// how it maps onto the engine's, the blocks and tokens of the restored range.
struct Plan {
    r: WindowReader,
    wl: Layout,
    compat: Compat,
    /// Blocks restored.
    n: usize,
    /// Tokens per block.
    bs: u64,
    /// Bytes per block.
    bb: u64,
    /// Tokens of the restored range.
    total_tokens: u64,
    /// Bytes of the restored range.
    window_bytes: u64,
}

impl Plan {
    fn new(
        store: &Store,
        eng: &Engine,
        req: &ThawRequest,
        cfg: &PipelineConfig,
        tier: Option<&RamTier>,
    ) -> Result<Self, PipelineError> {
        let mut r = store.open_window(&req.window)?;
        let c = Checked::new(
            eng,
            req,
            cfg,
            tier,
            &WindowView {
                name: &r.info.name,
                layout: &r.manifest.layout,
                namespace: &r.manifest.namespace,
                tokens: &r.manifest.tokens,
                num_blocks: r.num_blocks(),
            },
        )?;
        if req.first_block > 0 {
            r.skip_blocks(req.first_block, c.bs as usize);
        }
        Ok(Self {
            r,
            wl: c.wl,
            compat: c.compat,
            n: c.n,
            bs: c.bs,
            bb: c.bb,
            total_tokens: c.total_tokens,
            window_bytes: c.window_bytes,
        })
    }
}

/// What a thaw needs to know of a window before any byte moves (from its manifest, or from
/// the spec of a window being fetched).
pub struct WindowView<'a> {
    /// Window name.
    pub name: &'a str,
    /// Layout descriptor (JSON).
    pub layout: &'a [u8],
    /// Namespace label.
    pub namespace: &'a str,
    /// Token ids.
    pub tokens: &'a [u32],
    /// Blocks of the window.
    pub num_blocks: usize,
}

/// A thaw request checked against a window: layout, namespace, tokens, range, destination
/// ids and the memory it needs (EC-022).
pub(super) struct Checked {
    pub(super) wl: Layout,
    pub(super) compat: Compat,
    /// Blocks restored (from `req.first_block`).
    pub(super) n: usize,
    /// Tokens per block.
    pub(super) bs: u64,
    /// Bytes per block.
    pub(super) bb: u64,
    /// Tokens of the restored range.
    pub(super) total_tokens: u64,
    /// Bytes of the restored range.
    pub(super) window_bytes: u64,
}

impl Checked {
    pub(super) fn new(
        eng: &Engine,
        req: &ThawRequest,
        cfg: &PipelineConfig,
        tier: Option<&RamTier>,
        w: &WindowView<'_>,
    ) -> Result<Self, PipelineError> {
        let wl = Layout::from_json(w.layout)?;
        let compat = eng.layout.compat(&wl)?;
        // The window's KV must be this engine's model's (and this request's adapter, salt and
        // inputs): with the window's own layout, the namespaces must agree exactly.
        let want = eng.namespace_with(req.salt.as_deref(), &wl).label();
        if w.namespace != want {
            return Err(PipelineError::NamespaceMismatch {
                window: w.name.to_string(),
                window_ns: w.namespace.to_string(),
                want,
            });
        }
        let bs = u64::from(eng.layout.block_size);
        let avail = w.num_blocks;
        let first = req.first_block;
        if first > 0 && (!req.prefix || first >= avail) {
            return Err(PipelineError::Validation(format!(
                "first_block {first} needs prefix and must be below the {avail} blocks of window {:?}",
                w.name
            )));
        }
        let n = if req.prefix {
            req.block_ids.len().min(avail - first)
        } else {
            avail
        };
        // Tokens up to the end of the restored range.
        let end_tokens = ((first + n) as u64 * bs).min(w.tokens.len() as u64);
        if let Some(expect) = &req.expect_tokens {
            let have = &w.tokens[..end_tokens as usize];
            let at = have.iter().zip(expect.iter()).position(|(a, b)| a != b);
            let at =
                at.or_else(|| (expect.len() < have.len() && !req.prefix).then_some(expect.len()));
            if let Some(at) = at {
                return Err(PipelineError::TokenMismatch {
                    window: w.name.to_string(),
                    at,
                });
            }
        }
        let total_tokens = end_tokens.saturating_sub(first as u64 * bs);
        if !req.prefix && req.block_ids.len() != n {
            return Err(PipelineError::Validation(format!(
                "window {:?} has {n} blocks but {} destination block ids were given",
                w.name,
                req.block_ids.len()
            )));
        }
        device::check_block_ids(&eng.layout, &req.block_ids)?;
        let bb = eng.layout.block_bytes();
        // EC-022: what this thaw must newly allocate — the staging pool on first use, transpose
        // scratch for a layout upgrade, RAM-tier growth — against what the machine has.
        let window_bytes = bb * n as u64;
        let needed = if eng.staging().is_none() {
            cfg.staging_bytes
        } else {
            0
        } + if compat == Compat::Permute {
            bb * cfg.batch_blocks as u64
        } else {
            0
        } + tier.map_or(0, |t| {
            window_bytes.min(t.capacity().saturating_sub(t.bytes()))
        });
        let available = cfg.memory_available.unwrap_or_else(memory_available);
        if needed > available {
            return Err(PipelineError::InsufficientMemory { needed, available });
        }
        Ok(Self {
            wl,
            compat,
            n,
            bs,
            bb,
            total_tokens,
            window_bytes,
        })
    }
}

/// Thaws the whole range from the RAM tier when it holds every block: true when done. A
/// corrupt block there is dropped (and noted in the report) and the caller reads the disk.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, the thaw's own state"
)]
fn from_tier(
    eng: &Engine,
    req: &ThawRequest,
    cfg: &PipelineConfig,
    ctl: Control<'_>,
    t: &RamTier,
    plan: &Plan,
    report: &mut ThawReport,
    t0: Instant,
) -> Result<bool, PipelineError> {
    let (r, n) = (&plan.r, plan.n);
    t.attach(eng.mem.as_ref());
    let keys: Vec<u128> = r.manifest.blocks[..n].iter().map(|b| b.key).collect();
    let sums: Vec<u64> = r.manifest.blocks[..n].iter().map(|b| b.checksum).collect();
    let outcome = t.all(&keys, &sums).and_then(|hits| {
        let pls = hits.payloads();
        (pls.len() == n).then(|| {
            let dst = &req.block_ids[..n];
            scatter_verifying(eng, &plan.wl, plan.compat, dst, &pls, &sums, cfg, ctl)
        })
    });
    match outcome {
        Some(TierThaw::Done {
            verify_secs,
            scatter_secs,
        }) => {
            report.blocks_restored = n as u64;
            report.blocks_from_tier = n as u64;
            report.tokens_restored = plan.total_tokens;
            report.tokens_to_recompute = 0;
            report.bytes = plan.window_bytes;
            report.verify_secs = verify_secs;
            report.scatter_secs = scatter_secs;
            report.loaded_secs = t0.elapsed().as_secs_f64();
            return Ok(true);
        }
        Some(TierThaw::Corrupt(bad)) => {
            // The disk copy is read instead; every destination block is written again.
            crate::log::warn(&format!(
                "thaw of {:?}: block {bad} is corrupt in the RAM tier; dropped it, reading the window from disk",
                r.info.name
            ));
            t.remove(keys[bad]);
            report.tier_corruption = Some(format!("block {bad}"));
        }
        Some(TierThaw::Failed(e)) => return Err(e),
        Some(TierThaw::TimedOut { verified, bad }) => {
            if let Some(b) = bad {
                t.remove(keys[b]);
            }
            return Err(PipelineError::Timeout {
                window: r.info.name.clone(),
                limit_secs: t0.elapsed().as_secs_f64(),
                blocks_restored: verified as u64,
                num_blocks: n as u64,
            });
        }
        None => {}
    }
    Ok(false)
}

/// A thaw from the log: two readers keep the I/O queue full while the calling thread
/// verifies and scatters batches in order.
struct DiskThaw<'a> {
    store: &'a Store,
    eng: &'a Engine,
    req: &'a ThawRequest,
    cfg: &'a PipelineConfig,
    ctl: Control<'a>,
    tier: Option<&'a RamTier>,
    plan: &'a Plan,
    t0: Instant,
}

type ReadMsg = (usize, Result<ReadBatch, StoreError>);

impl DiskThaw<'_> {
    fn run(&self, report: &mut ThawReport) -> Result<(), PipelineError> {
        let pool = self
            .eng
            .staging_pool(self.cfg, self.store.engine().as_ref())?;
        let batch = self.cfg.batch_blocks.clamp(1, pool.max_set());
        let (full_tx, full_rx) = bounded::<ReadMsg>(2);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let next = std::sync::Mutex::new(0usize);
        std::thread::scope(|s| {
            let (stop, next) = (&stop, &next);
            // Stage 1: two readers keep the I/O queue full (one batch is submitted while the
            // other completes) while earlier batches are verified and scattered. Sets are
            // taken in batch order, so the earliest batch always gets staging first.
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let full_tx = full_tx.clone();
                    s.spawn(move || self.read_batches(pool, batch, next, stop, &full_tx))
                })
                .collect();
            drop(full_tx);
            // Stage 2, in batch order: verify (in parallel), then scatter the verified prefix.
            let mut out = Ok(());
            let mut pending = std::collections::BTreeMap::new();
            let mut expected = 0usize;
            for (start, msg) in full_rx.iter() {
                if out.is_err() || report.corruption.is_some() {
                    pending.clear();
                    continue; // drain: give the slots back so the readers can stop
                }
                pending.insert(start, msg);
                while let Some(msg) = pending.remove(&expected) {
                    expected += msg.as_ref().map_or(0, |b| b.set.len());
                    if let Err(e) = msg
                        .map_err(PipelineError::from)
                        .and_then(|b| self.scatter(b, report))
                    {
                        out = Err(e);
                    }
                    if out.is_err() || report.corruption.is_some() {
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        pending.clear();
                        break;
                    }
                }
            }
            report.read_secs = readers.into_iter().map(|h| h.join().unwrap_or(0.0)).sum();
            out
        })
    }

    /// One reader: takes the next batch's staging in order, reads it, sends it on; returns
    /// its busy seconds.
    fn read_batches(
        &self,
        pool: &Arc<crate::staging::StagingPool>,
        batch: usize,
        next: &std::sync::Mutex<usize>,
        stop: &std::sync::atomic::AtomicBool,
        full_tx: &crossbeam_channel::Sender<ReadMsg>,
    ) -> f64 {
        let n = self.plan.n;
        let mut busy = 0.0;
        loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return busy;
            }
            let (start, mut set) = {
                let Ok(mut g) = next.lock() else { return busy };
                let start = *g;
                if start >= n {
                    return busy;
                }
                let k = batch.min(n - start);
                *g += k;
                (start, pool.take(k))
            };
            let tr = Instant::now();
            let res = {
                let mut slots = set.slices();
                let mut imgs: Vec<&mut [u8]> = slots.iter_mut().map(|b| &mut b[..]).collect();
                self.store.read_images(&self.plan.r, start, &mut imgs)
            };
            busy += tr.elapsed().as_secs_f64();
            let msg = res.map(|unreadable| ReadBatch {
                start,
                set,
                unreadable,
            });
            let stop_now = msg.as_ref().map_or(true, |m| m.unreadable.is_some());
            if stop_now {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if full_tx.send((start, msg)).is_err() || stop_now {
                return busy;
            }
        }
    }

    /// Verifies one read batch and scatters its intact prefix; a corrupt block ends the thaw
    /// there (noted in the report), a cancel or the deadline with an error.
    fn scatter(&self, mut b: ReadBatch, report: &mut ThawReport) -> Result<(), PipelineError> {
        let (rr, n) = (&self.plan.r, self.plan.n);
        let slots = b.set.slices();
        let k = slots.len();
        let tv = Instant::now();
        let first_bad =
            first_bad_block(rr, b.start, &slots, b.unreadable.as_ref(), self.cfg.threads);
        report.verify_secs += tv.elapsed().as_secs_f64();
        let ts = Instant::now();
        let good = first_bad.as_ref().map_or(k, |(i, _)| *i);
        if good > 0 {
            let pls: Vec<&[u8]> = (0..good)
                .map(|j| rr.payload(b.start + j, slots[j]))
                .collect();
            device::scatter(
                &self.eng.layout,
                &self.plan.wl,
                self.plan.compat,
                self.eng.mem.as_ref(),
                &self.req.block_ids[b.start..b.start + good],
                &pls,
                self.cfg.threads,
            )?;
            if let Some(t) = self.tier {
                // Verified log bytes: they replace other bytes held for a key.
                for (j, p) in pls.iter().enumerate() {
                    let m = &rr.manifest.blocks[b.start + j];
                    t.put(m.key, p, m.checksum, true);
                }
            }
        }
        report.scatter_secs += ts.elapsed().as_secs_f64();
        report.blocks_restored = (b.start + good) as u64;
        self.ctl.report("thaw", report.blocks_restored, n as u64);
        if report.blocks_restored < n as u64 && self.ctl.cancelled() {
            return Err(requester_gone());
        }
        if first_bad.is_none() && report.blocks_restored < n as u64 && self.ctl.past_deadline() {
            return Err(PipelineError::Timeout {
                window: rr.info.name.clone(),
                limit_secs: self.t0.elapsed().as_secs_f64(),
                blocks_restored: report.blocks_restored,
                num_blocks: n as u64,
            });
        }
        if let Some((i, d)) = first_bad {
            let bad = b.start + i;
            crate::log::warn(&format!(
                "thaw of {:?}: block {bad} is corrupt ({d}); restored the first {bad} blocks, the engine recomputes the rest",
                rr.info.name
            ));
            if let Some(t) = self.tier {
                t.remove(rr.manifest.blocks[bad].key);
            }
            report.corruption = Some(format!("block {bad}: {d}"));
        }
        Ok(())
    }
}

/// How a thaw from the RAM tier ended.
enum TierThaw {
    /// Every block scattered and verified.
    Done { verify_secs: f64, scatter_secs: f64 },
    /// This block's payload does not match its checksum (the scatter stopped early).
    Corrupt(usize),
    /// The scatter failed.
    Failed(PipelineError),
    /// The deadline passed; the first `verified` blocks are scattered and verified (`bad`: a
    /// corrupt block found meanwhile).
    TimedOut { verified: usize, bad: Option<usize> },
}

/// Scatters tier payloads into `dst` while `cfg.verify_threads` threads check them against
/// `sums`, so a thaw from RAM costs max(copy, verification) instead of their sum. A block
/// counts as restored only once verified: on a mismatch the scatter stops and the caller
/// rewrites every block from disk; blocks already written hold bytes no report claims (the
/// engine overwrites or recomputes them).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site: the freeze's or thaw's own state"
)]
fn scatter_verifying(
    eng: &Engine,
    wl: &Layout,
    compat: Compat,
    dst: &[u64],
    pls: &[&[u8]],
    sums: &[u64],
    cfg: &PipelineConfig,
    ctl: Control<'_>,
) -> TierThaw {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    /// Blocks a verifier takes at a time, in window order: every unit below the highest one
    /// taken is finished (or holds the first bad block) once the verifiers are joined.
    const UNIT: usize = 4;
    let n = dst.len();
    let bad = AtomicUsize::new(usize::MAX);
    let next = AtomicUsize::new(0);
    // Verifiers take no unit at or past this (lowered when the scatter stops early).
    let limit = AtomicUsize::new(n);
    let tv = Instant::now();
    let (done, scatter_secs, failed, verify_secs) = std::thread::scope(|sc| {
        let verifiers: Vec<_> = (0..cfg.verify_threads.max(1))
            .map(|_| {
                sc.spawn(|| {
                    loop {
                        if bad.load(SeqCst) != usize::MAX {
                            break;
                        }
                        let from = next.fetch_add(UNIT, SeqCst);
                        if from >= limit.load(SeqCst) {
                            break;
                        }
                        let to = (from + UNIT).min(n);
                        if let Some(j) = (from..to).find(|&j| payload_checksum(pls[j]) != sums[j]) {
                            bad.fetch_min(j, SeqCst);
                            break;
                        }
                    }
                    tv.elapsed().as_secs_f64()
                })
            })
            .collect();
        // Scatter in chunks of 8 batches: the deadline, a corrupt block found meanwhile and
        // progress are looked at between chunks.
        let step = cfg.batch_blocks.max(1) * 8;
        let ts = Instant::now();
        let mut done = 0;
        let mut failed = None;
        while done < n && bad.load(SeqCst) == usize::MAX {
            if ctl.cancelled() {
                failed = Some(Some(requester_gone()));
                break;
            }
            if ctl.past_deadline() {
                failed = Some(None);
                break;
            }
            let to = (done + step).min(n);
            if let Err(e) = device::scatter(
                &eng.layout,
                wl,
                compat,
                eng.mem.as_ref(),
                &dst[done..to],
                &pls[done..to],
                cfg.threads,
            ) {
                failed = Some(Some(PipelineError::from(e)));
                break;
            }
            done = to;
            ctl.report("thaw", done as u64, n as u64);
        }
        let scatter_secs = ts.elapsed().as_secs_f64();
        // After a timeout (or a failure) only the units already handed out are waited for
        // (one taken in the meantime is finished too, but never claimed), so the verification
        // backlog does not overrun the deadline; otherwise every scattered block is verified.
        let claimable = if failed.is_some() {
            done.min(next.load(SeqCst))
        } else {
            done
        };
        limit.store(claimable, SeqCst);
        let mut verify_secs = 0.0f64;
        for h in verifiers {
            match h.join() {
                Ok(t) => verify_secs = verify_secs.max(t),
                Err(_) => {
                    // Not a corrupt block: the thaw fails instead of blaming the tier.
                    failed = failed.or(Some(Some(PipelineError::Validation(
                        "a tier verifier thread panicked".into(),
                    ))));
                }
            }
        }
        (claimable, scatter_secs, failed, verify_secs)
    });
    let bad = bad.load(SeqCst);
    match failed {
        Some(Some(e)) => TierThaw::Failed(e),
        Some(None) => TierThaw::TimedOut {
            verified: done.min(bad),
            bad: (bad != usize::MAX).then_some(bad),
        },
        None if bad != usize::MAX => TierThaw::Corrupt(bad),
        None => TierThaw::Done {
            verify_secs,
            scatter_secs,
        },
    }
}

/// A batch of record images read but not yet verified.
struct ReadBatch {
    start: usize,
    set: SlotSet,
    unreadable: Option<(usize, crate::io::IoError)>,
}

/// Verifies the images of blocks `start..` on up to `threads` threads; returns the first bad
/// one (position in the batch, why).
fn first_bad_block(
    r: &WindowReader,
    start: usize,
    slots: &[&mut [u8]],
    unreadable: Option<&(usize, crate::io::IoError)>,
    threads: usize,
) -> Option<(usize, String)> {
    let limit = unreadable.map_or(slots.len(), |(i, _)| *i);
    let per = limit.div_ceil(threads.max(1)).max(1);
    let found: Vec<Option<(usize, String)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..limit)
            .step_by(per)
            .map(|from| {
                let to = (from + per).min(limit);
                s.spawn(move || {
                    (from..to).find_map(|j| match r.verify(start + j, &slots[j][..]) {
                        Ok(()) => None,
                        Err(StoreError::Corruption { detail, .. }) => Some((j, detail)),
                        Err(e) => Some((j, e.to_string())),
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Some((0, "verifier panicked".into()))))
            .collect()
    });
    found
        .into_iter()
        .flatten()
        .next()
        .or_else(|| unreadable.map(|(i, e)| (*i, format!("unreadable: {e}"))))
}
