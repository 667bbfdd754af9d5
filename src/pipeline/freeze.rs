//! Freeze: gather (+ checksum, + RAM tier) on one thread, write on another, so batch i is
//! written while batch i+1 is gathered; `captured` once the engine's blocks are free,
//! `durable` once the manifest is on disk.

use std::time::Instant;

use crossbeam_channel::bounded;

use super::*;
use crate::checksum::payload_checksum;
use crate::device;
use crate::store::format::payload_offset;
use crate::store::{BlockDesc, BlockImage, Store, WindowSpec};
use crate::tier::RamTier;

/// A gathered batch: block indices, their record images, their payload checksums.
type Batch = (Vec<usize>, SlotSet, Vec<u64>);

/// Freezes a session's blocks into a window. `opts.on_captured` runs (on the gather thread)
/// once the engine's blocks are no longer needed.
pub fn freeze(
    store: &Store,
    eng: &Engine,
    req: FreezeRequest,
    cfg: &PipelineConfig,
    opts: &FreezeOptions<'_>,
) -> Result<FreezeReport, PipelineError> {
    let t0 = Instant::now();
    let tier = opts.tier;
    let on_captured: &(dyn Fn() + Sync) = opts.on_captured.unwrap_or(&|| {});
    let ctl = Control {
        cancel: opts.cancel.as_ref(),
        progress: opts.progress.as_ref(),
        deadline: None,
    };
    let (spec, keys) = window_spec(eng, &req)?;
    let n = keys.len();
    let layout = &eng.layout;
    let bb = layout.block_bytes();
    let pool = eng.staging_pool(cfg, store.engine().as_ref())?;
    let batch = cfg.batch_blocks.clamp(1, pool.max_set());
    // A window that fits in the pool's capture share (and surely in the log) is captured
    // whole before the log is touched: the engine gets its blocks back at gather speed, even
    // while another freeze holds the log.
    if pool.captures(n) {
        if let Some(room) = store.reserve(&spec)? {
            if let Some(sets) = pool.take_capture(n, batch) {
                let c = Capture {
                    sets,
                    batch,
                    block_ids: &req.block_ids,
                    keys: &keys,
                    room,
                };
                return freeze_captured(eng, spec, c, cfg, ctl, tier, on_captured, t0);
            }
        }
    }
    let mut w = store.begin_window(spec)?;
    let todo: Vec<usize> = (0..n).filter(|&i| w.needs_write(i)).collect();
    let po = payload_offset(bb);
    let bbu = bb as usize;
    let (full_tx, full_rx) = bounded::<Batch>(1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let captured_at = std::sync::Mutex::new(0.0f64);
    let ids = &req.block_ids;
    let keys_ref = &keys;
    let todo_ref = &todo;
    let (gres, wres) = std::thread::scope(|s| {
        let captured_at = &captured_at;
        let stop = &stop;
        // Stage 1: gather + checksum (+ RAM tier) into staging slots.
        let g = s.spawn(move || -> Result<f64, PipelineError> {
            let mut busy = 0.0;
            for chunk in todo_ref.chunks(batch) {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(busy);
                }
                let mut set = pool.take(chunk.len());
                let tb = Instant::now();
                let cids: Vec<u64> = chunk.iter().map(|&i| ids[i]).collect();
                let mut sums = vec![0u64; chunk.len()];
                {
                    let mut slots = set.slices();
                    let mut pls: Vec<&mut [u8]> =
                        slots.iter_mut().map(|b| &mut b[po..po + bbu]).collect();
                    device::gather(
                        layout,
                        eng.mem.as_ref(),
                        &cids,
                        &mut pls,
                        cfg.threads,
                        Some(&mut sums),
                    )?;
                    if let Some(t) = tier.filter(|t| t.enabled()) {
                        for ((p, &i), &sum) in pls.iter().zip(chunk).zip(&sums) {
                            t.put(keys_ref[i], p, sum, false);
                        }
                    }
                }
                busy += tb.elapsed().as_secs_f64();
                // Gathered before the requester went: valid. After: it may have reused them.
                if ctl.cancelled() {
                    return Err(requester_gone());
                }
                if full_tx.send((chunk.to_vec(), set, sums)).is_err() {
                    return Ok(busy);
                }
            }
            if let Ok(mut c) = captured_at.lock() {
                *c = t0.elapsed().as_secs_f64();
            }
            on_captured();
            Ok(busy)
        });
        // Stage 2: write batch i while batch i+1 is gathered.
        let mut wres: Result<f64, StoreError> = Ok(0.0);
        let mut written = 0u64;
        for (idxs, mut set, sums) in full_rx.iter() {
            if wres.is_err() {
                continue; // drain: give the slots back so the gatherer can stop
            }
            let mut slots = set.slices();
            let mut imgs: Vec<BlockImage<'_>> = slots
                .iter_mut()
                .zip(idxs.iter().zip(&sums))
                .map(|(b, (&index, &sum))| BlockImage {
                    index,
                    image: &mut b[..],
                    checksum: Some(sum),
                })
                .collect();
            let tw = Instant::now();
            match w.write_blocks(&mut imgs) {
                Ok(()) => {
                    if let Ok(busy) = &mut wres {
                        *busy += tw.elapsed().as_secs_f64();
                    }
                    written += idxs.len() as u64;
                    ctl.report("freeze", written, todo_ref.len() as u64);
                }
                Err(e) => {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    wres = Err(e);
                }
            }
        }
        let gres = g
            .join()
            .unwrap_or_else(|_| Err(PipelineError::Validation("gather thread panicked".into())));
        (gres, wres)
    });
    let gather_secs = gres?;
    let write_secs = wres?;
    let tc = Instant::now();
    let info = w.commit()?;
    let commit_secs = tc.elapsed().as_secs_f64();
    let captured_secs = captured_at.lock().map(|c| *c).unwrap_or(0.0);
    Ok(FreezeReport {
        blocks_written: todo.len() as u64,
        blocks_deduplicated: (n - todo.len()) as u64,
        bytes: bb * n as u64,
        captured_secs,
        durable_secs: t0.elapsed().as_secs_f64(),
        gather_secs,
        write_secs,
        commit_secs,
        info,
    })
}

/// Checks a freeze request against the engine and describes the window it writes (with its
/// block keys).
fn window_spec(
    eng: &Engine,
    req: &FreezeRequest,
) -> Result<(WindowSpec, Vec<u128>), PipelineError> {
    let layout = &eng.layout;
    if req.tokens.is_empty() {
        return Err(PipelineError::Validation(
            "cannot freeze an empty session: it holds no tokens (EC-010)".into(),
        ));
    }
    let n = req.tokens.len().div_ceil(layout.block_size as usize);
    if req.block_ids.len() != n {
        return Err(PipelineError::Validation(format!(
            "{} tokens need {n} blocks of {} tokens, but {} block ids were given",
            req.tokens.len(),
            layout.block_size,
            req.block_ids.len()
        )));
    }
    device::check_block_ids(layout, &req.block_ids)?;
    let keys = eng.keys_with(&req.tokens, req.salt.as_deref());
    let bb = layout.block_bytes();
    let spec = WindowSpec {
        name: req.window.clone(),
        session: req.session.clone(),
        namespace: eng.namespace_with(req.salt.as_deref(), &eng.layout).label(),
        layout: layout.to_json(),
        tokens: req.tokens.clone(),
        blocks: keys.iter().map(|&key| BlockDesc { key, len: bb }).collect(),
        replace: req.replace,
        retention: req.retention,
        origin: req.origin,
    };
    Ok((spec, keys))
}

/// A whole window's staging, taken before the freeze writes anything.
struct Capture<'a> {
    /// Slot sets of `batch` blocks each, in window order.
    sets: Vec<SlotSet>,
    batch: usize,
    block_ids: &'a [u64],
    keys: &'a [u128],
    /// Log room reserved for the window: once `captured`, the log cannot refuse it for room.
    room: crate::store::Reservation<'a>,
}

/// A freeze whose window fits in staging: gather every block (the engine's blocks are free
/// once this returns to `captured`), checksum them while waiting for the log, then write what
/// the log does not hold yet, giving each batch's slots back as soon as they are written.
/// Blocks the log already holds are gathered too: whether the log still holds them is only
/// known under its lock, and once `captured` the engine may reuse its blocks.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site: the freeze's or thaw's own state"
)]
fn freeze_captured(
    eng: &Engine,
    spec: WindowSpec,
    c: Capture<'_>,
    cfg: &PipelineConfig,
    ctl: Control<'_>,
    tier: Option<&RamTier>,
    on_captured: &(dyn Fn() + Sync),
    t0: Instant,
) -> Result<FreezeReport, PipelineError> {
    let layout = &eng.layout;
    let n = c.block_ids.len();
    let bb = layout.block_bytes();
    let (po, bbu) = (payload_offset(bb), bb as usize);
    let mut sets = c.sets;
    let tg = Instant::now();
    for (k, set) in sets.iter_mut().enumerate() {
        let from = k * c.batch;
        let to = from + set.len();
        let mut slots = set.slices();
        let mut pls: Vec<&mut [u8]> = slots.iter_mut().map(|b| &mut b[po..po + bbu]).collect();
        device::gather(
            layout,
            eng.mem.as_ref(),
            &c.block_ids[from..to],
            &mut pls,
            cfg.threads,
            None,
        )?;
    }
    let captured_secs = t0.elapsed().as_secs_f64();
    let mut gather_secs = tg.elapsed().as_secs_f64();
    if ctl.cancelled() {
        // Part of the gather may have read blocks the engine already reused.
        return Err(requester_gone());
    }
    on_captured();
    // Checksums on the verify threads while this thread waits for the log.
    let (sums, w) = {
        let mut views: Vec<Vec<&mut [u8]>> = sets.iter_mut().map(SlotSet::slices).collect();
        let pls: Vec<&[u8]> = views
            .iter_mut()
            .flat_map(|v| v.iter().map(|b| &b[po..po + bbu]))
            .collect();
        let pls = &pls;
        std::thread::scope(|s| {
            let per = n.div_ceil(cfg.verify_threads.max(1)).max(1);
            let hs: Vec<_> = pls
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        let t = Instant::now();
                        let v: Vec<u64> = c.iter().map(|p| payload_checksum(p)).collect();
                        (v, t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            let w = c.room.begin(spec);
            let mut sums = Vec::with_capacity(n);
            let mut busy = 0.0f64;
            for h in hs {
                if let Ok((v, t)) = h.join() {
                    sums.extend(v);
                    busy = busy.max(t);
                }
            }
            gather_secs += busy;
            (sums, w)
        })
    };
    let mut w = w?;
    if sums.len() != n {
        return Err(PipelineError::Validation("checksum thread panicked".into()));
    }
    // Into the RAM tier once their checksums are known, and only the blocks this freeze
    // writes: a block the log holds already may hold other bytes there (GPU kernels need not
    // be bit-reproducible), and the tier must mirror the log.
    if let Some(t) = tier.filter(|t| t.enabled()) {
        for (k, set) in sets.iter_mut().enumerate() {
            let from = k * c.batch;
            for (j, b) in set.slices().iter().enumerate() {
                if w.needs_write(from + j) {
                    t.put(c.keys[from + j], &b[po..po + bbu], sums[from + j], false);
                }
            }
        }
    }
    let todo = (0..n).filter(|&i| w.needs_write(i)).count();
    let tw = Instant::now();
    let mut written = 0u64;
    for (k, mut set) in sets.into_iter().enumerate() {
        let from = k * c.batch;
        let mut slots = set.slices();
        let mut imgs: Vec<BlockImage<'_>> = slots
            .iter_mut()
            .enumerate()
            .filter(|(j, _)| w.needs_write(from + j))
            .map(|(j, b)| BlockImage {
                index: from + j,
                image: &mut b[..],
                checksum: Some(sums[from + j]),
            })
            .collect();
        if !imgs.is_empty() {
            w.write_blocks(&mut imgs)?;
            written += imgs.len() as u64;
            ctl.report("freeze", written, todo as u64);
        }
    }
    let write_secs = tw.elapsed().as_secs_f64();
    let tc = Instant::now();
    let info = w.commit()?;
    Ok(FreezeReport {
        blocks_written: todo as u64,
        blocks_deduplicated: (n - todo) as u64,
        bytes: bb * n as u64,
        captured_secs,
        durable_secs: t0.elapsed().as_secs_f64(),
        gather_secs,
        write_secs,
        commit_secs: tc.elapsed().as_secs_f64(),
        info,
    })
}
