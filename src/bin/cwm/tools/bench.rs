//! `cwm bench …`: throughput of the store against the raw disk ceiling measured in the same
//! run, and recovery time. Results are JSON objects; the CLI prints them.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::progress::Progress;

use cwm::checksum::payload_checksum;
use cwm::io::{self, AlignedBuf, EngineKind, IoEngine, Op};
use cwm::prng::fill_random;
use cwm::store::format::{payload_offset, record_len};
use cwm::store::{BlockDesc, BlockImage, Store, StoreConfig, StoreError, WindowSpec};

/// Writes a window whose block record images are `imgs` (one per block, in order).
fn write_window(
    st: &Store,
    spec: WindowSpec,
    imgs: &mut [AlignedBuf],
) -> Result<cwm::store::WindowInfo, StoreError> {
    let mut w = st.begin_window(spec)?;
    let mut bi: Vec<BlockImage<'_>> = imgs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| BlockImage {
            index: i,
            image: &mut b[..],
            checksum: None,
        })
        .collect();
    w.write_blocks(&mut bi)?;
    w.commit()
}

/// A benchmark window: `n` blocks of `len` bytes keyed `key(i)`, 16 tokens a block.
fn bench_spec(name: String, n: usize, len: u64, key: impl Fn(usize) -> u128) -> WindowSpec {
    WindowSpec {
        name,
        session: "bench".into(),
        namespace: "bench".into(),
        layout: b"{}".to_vec(),
        tokens: (0..n as u32 * 16).collect(),
        blocks: (0..n).map(|i| BlockDesc { key: key(i), len }).collect(),
        ..Default::default()
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 / secs / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The `q` quantile of `v` (sorted here; 0 when empty).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[((v.len() - 1) as f64 * q) as usize]
    }
}

/// Joins the scoped threads of one pass: the first error, or a thread that panicked, named
/// `what`.
fn join_all(
    hs: Vec<std::thread::ScopedJoinHandle<'_, Result<(), StoreError>>>,
    what: &str,
) -> Result<(), StoreError> {
    let mut out = Ok(());
    for h in hs {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(StoreError::Validation(format!("{what} thread panicked"))));
        if out.is_ok() {
            out = r;
        }
    }
    out
}

/// Raw O_DIRECT sequential write (+ fdatasync) and read of `bytes` in `chunk`-sized ops through
/// `engine`: the ceiling the store is compared with. Two submitters alternate batches of
/// `batch` ops (so the queue never drains between batches), as the store's readers do.
pub fn raw_disk(
    engine: &dyn IoEngine,
    dir: &Path,
    bytes: u64,
    chunk: usize,
    batch: usize,
) -> Result<(f64, f64), StoreError> {
    let path = dir.join("raw-ceiling.bin");
    let fs = |e| StoreError::Fs {
        context: format!("raw ceiling file {}", path.display()),
        source: e,
    };
    let (file, _) = io::open_direct(&path, true).map_err(fs)?;
    cwm::store::preallocate_file(&file, bytes).map_err(fs)?;
    let fd = file.as_raw_fd();
    let n = (bytes / chunk as u64) as usize;
    let mut sets: Vec<Vec<AlignedBuf>> = (0..2)
        .map(|s| {
            (0..batch)
                .map(|i| {
                    let mut b = AlignedBuf::zeroed(chunk);
                    fill_random(&mut b, (s * batch + i) as u64 + 7);
                    b
                })
                .collect()
        })
        .collect();
    let pass = |sets: &mut Vec<Vec<AlignedBuf>>, write: bool| -> Result<f64, StoreError> {
        let t = Instant::now();
        let results: Result<(), StoreError> = std::thread::scope(|s| {
            let hs: Vec<_> = sets
                .iter_mut()
                .enumerate()
                .map(|(h, bufs)| {
                    s.spawn(move || -> Result<(), StoreError> {
                        let mut bi = h;
                        while bi * batch < n {
                            let first = bi * batch;
                            let k = batch.min(n - first);
                            let mut ops: Vec<Op<'_>> = bufs[..k]
                                .iter_mut()
                                .enumerate()
                                .map(|(j, b)| {
                                    let off = ((first + j) * chunk) as u64;
                                    if write {
                                        Op::write(fd, off, b)
                                    } else {
                                        Op::read(fd, off, b)
                                    }
                                })
                                .collect();
                            engine.run(&mut ops).map_err(|e| StoreError::Io {
                                context: "raw ceiling".into(),
                                source: e,
                            })?;
                            bi += 2;
                        }
                        Ok(())
                    })
                })
                .collect();
            join_all(hs, "raw")
        });
        results?;
        if write {
            engine.fdatasync(fd).map_err(|e| StoreError::Io {
                context: "raw fdatasync".into(),
                source: e,
            })?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let w = pass(&mut sets, true)?;
    let r = pass(&mut sets, false)?;
    drop(file);
    let _ = std::fs::remove_file(&path);
    let total = (n * chunk) as u64;
    Ok((gbps(total, w), gbps(total, r)))
}

/// The churn's freezes as bare I/O, the ceiling of the same shape: `clients` threads, each
/// repeating for `seconds` what one freeze of `blocks` blocks of `block` bytes asks of the
/// disk — the block records in one batch (a header page each), an fdatasync, a two-page
/// manifest record, an fdatasync — through `engine` into a file of its own, O_DIRECT.
/// Returns the aggregate GB/s of block payload bytes. No checksums, no gather, no index, no
/// socket: only the writes and syncs a freeze cannot avoid.
pub fn freeze_shaped_writes(
    engine: &dyn IoEngine,
    dir: &Path,
    clients: usize,
    (blocks, block): (usize, usize),
    seconds: f64,
) -> Result<f64, StoreError> {
    let rec = block + 4096;
    let per = (blocks * rec + 8192) as u64;
    // Room for a few hundred freezes per client, reused from the start when full.
    let span = per * 64;
    let payload_bytes = std::sync::atomic::AtomicU64::new(0);
    let t0 = Instant::now();
    let results: Result<(), StoreError> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let payload_bytes = &payload_bytes;
                s.spawn(move || -> Result<(), StoreError> {
                    let path = dir.join(format!("shape-ceiling-{c}.bin"));
                    let fs = |e| StoreError::Fs {
                        context: format!("ceiling file {}", path.display()),
                        source: e,
                    };
                    let (file, _) = io::open_direct(&path, true).map_err(fs)?;
                    cwm::store::preallocate_file(&file, span).map_err(fs)?;
                    let fd = file.as_raw_fd();
                    let io = |e| StoreError::Io {
                        context: "shape ceiling".into(),
                        source: e,
                    };
                    let recs: Vec<AlignedBuf> = (0..blocks)
                        .map(|i| {
                            let mut b = AlignedBuf::zeroed(rec);
                            fill_random(&mut b, (c * blocks + i) as u64 + 11);
                            b
                        })
                        .collect();
                    let manifest = AlignedBuf::zeroed(8192);
                    let mut at = 0u64;
                    while t0.elapsed().as_secs_f64() < seconds {
                        if at + per > span {
                            at = 0;
                        }
                        let mut ops: Vec<Op<'_>> = recs
                            .iter()
                            .enumerate()
                            .map(|(i, b)| Op::write(fd, at + (i * rec) as u64, b))
                            .collect();
                        engine.run(&mut ops).map_err(io)?;
                        drop(ops);
                        engine.fdatasync(fd).map_err(io)?;
                        let moff = at + (blocks * rec) as u64;
                        engine
                            .run(&mut [Op::write(fd, moff, &manifest)])
                            .map_err(io)?;
                        engine.fdatasync(fd).map_err(io)?;
                        at += per;
                        payload_bytes.fetch_add(
                            (blocks * block) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    Ok(())
                })
            })
            .collect();
        join_all(hs, "ceiling")
    });
    results?;
    Ok(gbps(
        payload_bytes.load(std::sync::atomic::Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    ))
}

/// Result of `cwm bench store`.
#[derive(Debug, Serialize)]
pub struct StoreBench {
    /// I/O engine.
    pub engine: &'static str,
    /// Bytes per run.
    pub bytes: u64,
    /// Block payload bytes.
    pub block_bytes: u64,
    /// Queue depth.
    pub queue_depth: u32,
    /// Runs (the figures are medians).
    pub runs: usize,
    /// Window write (blocks, fdatasync, manifest, fdatasync), GB/s.
    pub write_gbps: f64,
    /// Verified read after reopen, GB/s.
    pub read_gbps: f64,
    /// Raw O_DIRECT write + fdatasync, GB/s.
    pub raw_write_gbps: f64,
    /// Raw O_DIRECT read, GB/s.
    pub raw_read_gbps: f64,
    /// `write_gbps / raw_write_gbps`.
    pub write_ratio: f64,
    /// `read_gbps / raw_read_gbps`.
    pub read_ratio: f64,
    /// Reopen (recovery) time, seconds.
    pub reopen_seconds: f64,
    /// Per run, raw (write, read) GB/s just before and just after the store's passes.
    pub raw_passes: Vec<[f64; 4]>,
    /// A second, independent ceiling when `fio` is installed: fio's O_DIRECT io_uring
    /// sequential write (with a final fsync) of the same bytes, GB/s (median of the runs).
    pub fio_write_gbps: Option<f64>,
    /// Same, read.
    pub fio_read_gbps: Option<f64>,
    /// `write_gbps / fio_write_gbps`.
    pub fio_write_ratio: Option<f64>,
    /// `read_gbps / fio_read_gbps`.
    pub fio_read_ratio: Option<f64>,
    /// Writers of the concurrent write pass (0: not run).
    pub writers: usize,
    /// The same bytes written as `writers` windows at once, each by its own thread with its
    /// share of the queue depth, GB/s (all of them durable).
    pub concurrent_write_gbps: f64,
    /// `concurrent_write_gbps / raw_write_gbps`.
    pub concurrent_write_ratio: f64,
}

/// fio's sequential O_DIRECT io_uring write (ending in an fsync) and read of `bytes` in
/// `block`-byte requests, GB/s; `None` when fio is not installed or fails. Two jobs, each
/// over its half of the file at queue depth `qd`: the concurrency of the store's two
/// readers (and of the raw pass's two submitters), so the ceiling is not lowered by fio
/// having fewer requests in flight than the store.
pub fn fio(dir: &Path, bytes: u64, block: u64, qd: u32) -> Option<(f64, f64)> {
    let file = dir.join("fio-ceiling.bin");
    let half = (bytes / 2).next_multiple_of(block.max(1));
    let run = |rw: &str| -> Option<f64> {
        let out = std::process::Command::new("fio")
            .args([
                "--name=cwm-ceiling",
                &format!("--filename={}", file.display()),
                &format!("--rw={rw}"),
                &format!("--bs={block}"),
                &format!("--size={half}"),
                &format!("--offset_increment={half}"),
                "--numjobs=2",
                "--group_reporting",
                "--direct=1",
                "--ioengine=io_uring",
                &format!("--iodepth={qd}"),
                "--end_fsync=1",
                "--output-format=json",
            ])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let bw = v.pointer(&format!("/jobs/0/{rw}/bw_bytes"))?.as_f64()?;
        Some(bw / 1e9)
    };
    let w = run("write");
    let r = run("read");
    let _ = std::fs::remove_file(&file);
    Some((w?, r?))
}

/// Parameters of `cwm bench store`.
#[derive(Debug, Clone)]
pub struct StoreBenchArgs {
    /// Where to put the files (a temporary directory is made inside).
    pub dir: std::path::PathBuf,
    /// Bytes per run.
    pub bytes: u64,
    /// Block payload bytes.
    pub block_bytes: u64,
    /// I/O engine.
    pub engine: EngineKind,
    /// Queue depth.
    pub queue_depth: u32,
    /// Runs.
    pub runs: usize,
    /// Concurrent writers of the second write pass (each its own window, a share of the
    /// queue depth); 0 or 1: no such pass.
    pub writers: usize,
}

/// `cwm bench store`: write a window, reopen, read it back verified; raw disk in the same run.
#[expect(
    clippy::too_many_lines,
    reason = "one benchmark: raw-disk ceiling, store write, read and reopen, reported side by side"
)]
pub fn store(a: &StoreBenchArgs, p: &Progress) -> Result<StoreBench, StoreError> {
    let engine = io::build_engine(a.engine, a.queue_depth);
    let batch = a.queue_depth.max(1) as usize;
    let n = (a.bytes / a.block_bytes).max(1) as usize;
    let total = n as u64 * a.block_bytes;
    let rl = record_len(a.block_bytes) as usize;
    let po = payload_offset(a.block_bytes);
    let bl = a.block_bytes as usize;
    // Two sets of images: one is written while the other's checksums are computed.
    let mut sets: Vec<Vec<AlignedBuf>> = (0..2)
        .map(|s| {
            (0..batch)
                .map(|i| {
                    let mut b = AlignedBuf::zeroed(rl);
                    fill_random(&mut b[po..po + bl], (s * batch + i) as u64 + 1);
                    b
                })
                .collect()
        })
        .collect();
    let (mut ws, mut rs, mut rws, mut rrs, mut reopen) = (vec![], vec![], vec![], vec![], vec![]);
    let mut raw_passes = Vec::new();
    let (mut fws, mut frs) = (Vec::new(), Vec::new());
    let mut cws = Vec::new();
    for run in 0..a.runs.max(1) {
        p.update("store", run as u64, a.runs.max(1) as u64, "");
        let tmp = tempfile::Builder::new()
            .prefix("cwm-bench-")
            .tempdir_in(&a.dir)
            .map_err(|e| StoreError::Fs {
                context: "temporary directory".into(),
                source: e,
            })?;
        let (rw0, rr0) = raw_disk(engine.as_ref(), tmp.path(), total, bl, batch)?;
        let mut cfg = StoreConfig::new(tmp.path().join("store"));
        cfg.segment_size = (1u64 << 30).max(record_len(a.block_bytes) * 4);
        let (st, _) = Store::open_with_engine(cfg.clone(), engine.clone())?;
        let spec = bench_spec(format!("bench-{run}"), n, a.block_bytes, |i| {
            ((run as u128) << 64) | i as u128
        });
        let t = Instant::now();
        let mut w = st.begin_window(spec)?;
        let nb = n.div_ceil(batch);
        let mut sums: Vec<Vec<u64>> = vec![Vec::new(); 2];
        // Checksums of batch 0 up front; then batch i+1's while batch i is written.
        sums[0] = sets[0]
            .iter()
            .map(|b| payload_checksum(&b[po..po + bl]))
            .collect();
        for bi in 0..nb {
            let (cur, next) = if bi % 2 == 0 {
                let (a0, a1) = sets.split_at_mut(1);
                (&mut a0[0], &mut a1[0])
            } else {
                let (a0, a1) = sets.split_at_mut(1);
                (&mut a1[0], &mut a0[0])
            };
            let first = bi * batch;
            let k = batch.min(n - first);
            let cur_sums = std::mem::take(&mut sums[bi % 2]);
            let next_ref: &Vec<AlignedBuf> = next;
            let res = std::thread::scope(|s| {
                let h = s.spawn(|| {
                    next_ref
                        .iter()
                        .map(|b| payload_checksum(&b[po..po + bl]))
                        .collect::<Vec<u64>>()
                });
                let mut imgs: Vec<BlockImage<'_>> = cur[..k]
                    .iter_mut()
                    .enumerate()
                    .map(|(j, b)| BlockImage {
                        index: first + j,
                        image: &mut b[..],
                        checksum: Some(cur_sums[j]),
                    })
                    .collect();
                let r = w.write_blocks(&mut imgs);
                (r, h.join())
            });
            res.0?;
            sums[(bi + 1) % 2] = res
                .1
                .map_err(|_| StoreError::Validation("checksum thread panicked".into()))?;
        }
        w.commit()?;
        ws.push(gbps(total, t.elapsed().as_secs_f64()));
        drop(st);
        let t = Instant::now();
        let (st, _) = Store::open_with_engine(cfg, engine.clone())?;
        reopen.push(t.elapsed().as_secs_f64());
        let r = st.open_window(&format!("bench-{run}"))?;
        let t = Instant::now();
        // Two readers on alternating batches: one verifies while the other's reads are in flight.
        let sets_ref = &mut sets;
        let (s0, s1) = sets_ref.split_at_mut(1);
        let halves = [&mut s0[0], &mut s1[0]];
        let results: Result<(), StoreError> = std::thread::scope(|s| {
            let handles: Vec<_> = halves
                .into_iter()
                .enumerate()
                .map(|(h, bufs)| {
                    let st = &st;
                    let r = &r;
                    s.spawn(move || -> Result<(), StoreError> {
                        let mut bi = h;
                        while bi * batch < n {
                            let first = bi * batch;
                            let k = batch.min(n - first);
                            let mut imgs: Vec<&mut [u8]> =
                                bufs[..k].iter_mut().map(|b| &mut b[..]).collect();
                            st.read_blocks(r, first, &mut imgs)?;
                            bi += 2;
                        }
                        Ok(())
                    })
                })
                .collect();
            join_all(handles, "reader")
        });
        results?;
        rs.push(gbps(total, t.elapsed().as_secs_f64()));
        drop(r);
        if a.writers > 1 {
            cws.push(concurrent_writes(&st, run, n, a, batch)?);
        }
        drop(st);
        // The ceiling: the mean of a raw pass just before and one just after the store's, so
        // both see the disk in the state the measured operation saw.
        let (rw1, rr1) = raw_disk(engine.as_ref(), tmp.path(), total, bl, batch)?;
        raw_passes.push([rw0, rr0, rw1, rr1]);
        if let Some((fw, fr)) = fio(tmp.path(), total, a.block_bytes, a.queue_depth) {
            fws.push(fw);
            frs.push(fr);
        }
        rws.push((rw0 + rw1) / 2.0);
        rrs.push((rr0 + rr1) / 2.0);
    }
    let (w, r, rw, rr) = (median(ws), median(rs), median(rws), median(rrs));
    let (fw, fr) = if fws.is_empty() {
        (None, None)
    } else {
        (Some(median(fws)), Some(median(frs)))
    };
    Ok(StoreBench {
        fio_write_gbps: fw,
        fio_read_gbps: fr,
        fio_write_ratio: fw.filter(|x| *x > 0.0).map(|x| w / x),
        fio_read_ratio: fr.filter(|x| *x > 0.0).map(|x| r / x),
        engine: engine.name(),
        bytes: total,
        block_bytes: a.block_bytes,
        queue_depth: a.queue_depth,
        runs: a.runs.max(1),
        write_gbps: w,
        read_gbps: r,
        raw_write_gbps: rw,
        raw_read_gbps: rr,
        write_ratio: if rw > 0.0 { w / rw } else { 0.0 },
        read_ratio: if rr > 0.0 { r / rr } else { 0.0 },
        reopen_seconds: median(reopen),
        raw_passes,
        writers: if a.writers > 1 { a.writers } else { 0 },
        concurrent_write_gbps: median(cws.clone()),
        concurrent_write_ratio: if rw > 0.0 { median(cws) / rw } else { 0.0 },
    })
}

/// The concurrent write pass of `cwm bench store`: `a.writers` threads each write one window
/// of their share of the `n` blocks, in batches of their share of the queue depth (images and
/// checksums made up front). Returns the aggregate GB/s, from the first begin to the last
/// commit.
fn concurrent_writes(
    st: &Store,
    run: usize,
    n: usize,
    a: &StoreBenchArgs,
    batch: usize,
) -> Result<f64, StoreError> {
    let rl = record_len(a.block_bytes) as usize;
    let po = payload_offset(a.block_bytes);
    let bl = a.block_bytes as usize;
    let per = (n / a.writers).max(1);
    let depth = (batch / a.writers).max(1);
    let t = Instant::now();
    let results: Result<(), StoreError> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..a.writers)
            .map(|wi| {
                s.spawn(move || -> Result<(), StoreError> {
                    let mut imgs: Vec<AlignedBuf> = (0..depth)
                        .map(|i| {
                            let mut b = AlignedBuf::zeroed(rl);
                            fill_random(&mut b[po..po + bl], (wi * depth + i) as u64 + 101);
                            b
                        })
                        .collect();
                    let sums: Vec<u64> = imgs
                        .iter()
                        .map(|b| payload_checksum(&b[po..po + bl]))
                        .collect();
                    let spec = bench_spec(format!("bench-{run}-w{wi}"), per, a.block_bytes, |i| {
                        (((run as u128) << 64) | (1 << 48) | ((wi as u128) << 32)) + i as u128
                    });
                    let mut w = st.begin_window(spec)?;
                    let mut first = 0;
                    while first < per {
                        let k = depth.min(per - first);
                        let mut bi: Vec<BlockImage<'_>> = imgs[..k]
                            .iter_mut()
                            .zip(&sums)
                            .enumerate()
                            .map(|(j, (b, s))| BlockImage {
                                index: first + j,
                                image: &mut b[..],
                                checksum: Some(*s),
                            })
                            .collect();
                        w.write_blocks(&mut bi)?;
                        first += k;
                    }
                    w.commit().map(|_| ())
                })
            })
            .collect();
        join_all(hs, "writer")
    });
    results?;
    Ok(gbps(
        (per * a.writers) as u64 * a.block_bytes,
        t.elapsed().as_secs_f64(),
    ))
}

/// Result of `cwm bench recovery`.
#[derive(Debug, Serialize)]
pub struct RecoveryBench {
    /// Records in the log.
    pub records: u64,
    /// Windows recovered.
    pub windows: u64,
    /// Bytes of the log.
    pub log_bytes: u64,
    /// Seconds to open (recover) the store after a clean stop (every segment checkpointed).
    pub open_seconds: f64,
    /// Seconds to open it as after a kill -9: the active segment's checkpoint is missing (it
    /// is written at a clean stop only), the sealed segments' are there.
    pub open_after_kill_seconds: f64,
    /// Seconds to open it walking every record header (checkpoints not used: what an open
    /// cost before them, and what `cwm fsck` does).
    pub open_full_scan_seconds: f64,
    /// Segments read from their checkpoint in the clean open.
    pub checkpointed_segments: u64,
    /// Seconds the clean stop took (background checkpoints joined, the active segment's
    /// written).
    pub clean_stop_seconds: f64,
    /// Of `open_seconds`: loading the segments (checkpoints read, records gathered), and
    /// publishing the windows.
    pub open_phases: (f64, f64),
    /// Seconds it took to build the log (not part of the figure).
    pub build_seconds: f64,
}

/// `cwm bench recovery`: builds a log of `records` small records (windows of 99 blocks of
/// 4 KiB plus a manifest), then times a reopen. `keep`: build it there, or reuse the log a
/// run with the same `records` left there.
pub fn recovery(
    dir: &Path,
    keep: Option<&Path>,
    records: u64,
    engine: EngineKind,
    queue_depth: u32,
    p: &Progress,
) -> Result<RecoveryBench, StoreError> {
    let tmp = tempfile::Builder::new()
        .prefix("cwm-bench-recovery-")
        .tempdir_in(dir)
        .map_err(|e| StoreError::Fs {
            context: "temporary directory".into(),
            source: e,
        })?;
    let eng: Arc<dyn IoEngine> = io::build_engine(engine, queue_depth);
    let per = 100u64;
    let windows = records.div_ceil(per);
    let block = 4096u64;
    let cfg = StoreConfig::new(match keep {
        Some(k) => k.join(format!("store-{records}")),
        None => tmp.path().join("store"),
    });
    let marker = cfg.dir.with_extension("built");
    let built = keep.is_some() && marker.exists();
    let fs = |what: &str, e: std::io::Error| StoreError::Fs {
        context: format!("{what} {}", cfg.dir.display()),
        source: e,
    };
    let t = Instant::now();
    if !built {
        if cfg.dir.exists() {
            // A build that did not finish.
            std::fs::remove_dir_all(&cfg.dir).map_err(|e| fs("remove", e))?;
        }
        let (st, _) = Store::open_with_engine(cfg.clone(), eng.clone())?;
        let mut imgs: Vec<AlignedBuf> = (0..per - 1)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(record_len(block) as usize);
                let po = payload_offset(block);
                fill_random(&mut b[po..po + block as usize], i + 1);
                b
            })
            .collect();
        for wi in 0..windows {
            if wi % 64 == 0 {
                p.update("populating", wi * per, windows * per, "");
            }
            let spec = bench_spec(format!("w{wi}"), (per - 1) as usize, block, |i| {
                (u128::from(wi) << 64) | i as u128
            });
            write_window(&st, spec, &mut imgs)?;
        }
        drop(st);
        if keep.is_some() {
            std::fs::write(&marker, b"").map_err(|e| fs("mark as built", e))?;
        }
    }
    let build = t.elapsed().as_secs_f64();
    p.update("reopening", 1, 3, "");
    let t = Instant::now();
    let (st, report) = Store::open_with_engine(cfg.clone(), eng.clone())?;
    let open = t.elapsed().as_secs_f64();
    let stats = st.stats()?;
    let t = Instant::now();
    drop(st);
    let clean_stop = t.elapsed().as_secs_f64();
    // What a kill -9 leaves: no checkpoint of the active (newest) segment.
    if let Some(newest) = stats.segments.iter().map(|s| s.id).max() {
        let _ = std::fs::remove_file(cfg.dir.join(format!("segment-{newest:010}.ckpt")));
    }
    p.update("reopening", 2, 3, "");
    let t = Instant::now();
    let (st, killed) = Store::open_with_engine(cfg.clone(), eng.clone())?;
    let after_kill = t.elapsed().as_secs_f64();
    drop(st);
    p.update("reopening", 3, 3, "");
    let mut full = cfg;
    full.use_checkpoints = false;
    let t = Instant::now();
    let (st, scanned) = Store::open_with_engine(full, eng)?;
    let full_scan = t.elapsed().as_secs_f64();
    drop(st);
    if (killed.windows, scanned.windows) != (report.windows, report.windows) {
        return Err(StoreError::Recovery(format!(
            "reopens disagree: {} windows after a clean stop, {} after a kill, {} by a full scan",
            report.windows, killed.windows, scanned.windows
        )));
    }
    Ok(RecoveryBench {
        records: report.records,
        windows: report.windows,
        log_bytes: stats.used_bytes,
        open_seconds: open,
        open_after_kill_seconds: after_kill,
        open_full_scan_seconds: full_scan,
        checkpointed_segments: report.checkpointed_segments,
        clean_stop_seconds: clean_stop,
        open_phases: (report.load_seconds, report.publish_seconds),
        build_seconds: build,
    })
}

/// Result of `cwm bench pipeline`.
#[derive(Debug, Serialize)]
pub struct PipelineBench {
    /// Session tokens.
    pub tokens: u32,
    /// KV bytes frozen and thawed.
    pub bytes: u64,
    /// I/O engine.
    pub engine: &'static str,
    /// Freeze (gather, checksum, write, fdatasync, manifest), GB/s.
    pub freeze_gbps: f64,
    /// Thaw (read, verify, scatter), GB/s.
    pub thaw_gbps: f64,
    /// Raw O_DIRECT write + fdatasync of the same bytes, GB/s.
    pub raw_write_gbps: f64,
    /// Raw O_DIRECT read of the same bytes, GB/s.
    pub raw_read_gbps: f64,
    /// `freeze_gbps / raw_write_gbps`.
    pub freeze_ratio: f64,
    /// `thaw_gbps / raw_read_gbps`.
    pub thaw_ratio: f64,
    /// Thaw from the RAM tier (scatter while verifying), GB/s.
    pub tier_thaw_gbps: f64,
    /// The ceiling of a tier thaw: the bare scatter of the same payloads, unverified, GB/s.
    pub tier_scatter_gbps: f64,
    /// `tier_thaw_gbps / tier_scatter_gbps`.
    pub tier_ratio: f64,
    /// Verification alone of the same payloads on `verify_threads` threads, GB/s (verifying
    /// before scattering, as thaws did until 2026-11-27, costs the sum of both times).
    pub tier_verify_gbps: f64,
    /// Threads verifying the tier thaw.
    pub verify_threads: usize,
    /// A 512-token freeze started while the window's freeze streams to the log: its
    /// (captured, durable) seconds, and the big freeze's durable seconds. The small window is
    /// captured whole first, so its engine blocks are free long before the log is.
    pub behind: (f64, f64, f64),
    /// Runs (medians).
    pub runs: usize,
    /// Per run: where the time went.
    pub stages: Vec<RunStages>,
}

/// `cwm bench pipeline`: host-backend freeze and thaw of a Llama-3.1-8B-shaped session against
/// the raw disk (the ceiling here: memory copies are far faster than this disk).
pub fn pipeline(
    dir: &Path,
    tokens: u32,
    engine: EngineKind,
    runs: usize,
    p: &Progress,
) -> Result<PipelineBench, String> {
    use cwm::layout::{Dtype, Layout};
    use cwm::pipeline::synthetic::Synthetic;
    use cwm::pipeline::{
        freeze, thaw, FreezeOptions, FreezeRequest, PipelineConfig, ThawOptions, ThawRequest,
    };
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let nb = u64::from(tokens.max(1).div_ceil(16));
    let layout = Layout::flash_2nbhd(32, nb + 8, 16, 8, 128, Dtype::Bf16);
    let syn = Synthetic::new(layout.clone(), "bench", 3).map_err(|x| e(&x))?;
    let chunk = layout.block_bytes() as usize;
    let eng = io::build_engine(engine, 32);
    let toks: Vec<u32> = (0..tokens).collect();
    let bytes = layout.block_bytes() * nb;
    let (mut fs, mut ts, mut rws, mut rrs) = (vec![], vec![], vec![], vec![]);
    let (mut tts, mut tss, mut tvs) = (vec![], vec![], vec![]);
    let mut behind = (0.0, 0.0, 0.0);
    let cfg = PipelineConfig::default();
    let mut stages = Vec::new();
    for run in 0..runs.max(1) {
        p.update("pipeline", run as u64, runs.max(1) as u64, "");
        let tmp = tempfile::Builder::new()
            .prefix("cwm-bench-pipeline-")
            .tempdir_in(dir)
            .map_err(|x| e(&x))?;
        let raw = || raw_disk(eng.as_ref(), tmp.path(), bytes, chunk, 32).map_err(|x| e(&x));
        let (rw0, rr0) = raw()?;
        let (store, _) =
            Store::open_with_engine(StoreConfig::new(tmp.path().join("s")), eng.clone())
                .map_err(|x| e(&x))?;
        syn.engine
            .prepare_staging(&cfg, eng.as_ref())
            .map_err(|x| e(&x))?;
        let f = freeze(
            &store,
            &syn.engine,
            FreezeRequest {
                window: format!("b{run}"),
                session: "s".into(),
                tokens: toks.clone(),
                block_ids: (0..nb).collect(),
                ..Default::default()
            },
            &cfg,
            &FreezeOptions::default(),
        )
        .map_err(|x| e(&x))?;
        fs.push(gbps(bytes, f.durable_secs));
        let t = thaw(
            &store,
            &syn.engine,
            &ThawRequest {
                prefix: false,
                first_block: 0,
                window: format!("b{run}"),
                block_ids: (0..nb).map(|i| nb + 7 - i).collect(),
                expect_tokens: None,
                salt: None,
            },
            &cfg,
            &ThawOptions::default(),
        )
        .map_err(|x| e(&x))?;
        ts.push(gbps(t.bytes, t.loaded_secs));
        let (tt, tsc, tv) = tier_thaw(&store, &syn.engine, &format!("b{run}"), &cfg, bytes)?;
        if run == 0 {
            behind = freeze_behind(&store, &syn.engine, &cfg, tokens, nb)?;
        }
        tts.push(tt);
        tss.push(tsc);
        tvs.push(tv);
        drop(store);
        let (rw1, rr1) = raw()?;
        stages.push(RunStages {
            raw_before_gbps: (rw0, rr0),
            raw_after_gbps: (rw1, rr1),
            freeze_gather_secs: f.gather_secs,
            freeze_write_secs: f.write_secs,
            freeze_commit_secs: f.commit_secs,
            freeze_secs: f.durable_secs,
            thaw_read_secs: t.read_secs,
            thaw_verify_secs: t.verify_secs,
            thaw_scatter_secs: t.scatter_secs,
            thaw_secs: t.loaded_secs,
        });
        rws.push((rw0 + rw1) / 2.0);
        rrs.push((rr0 + rr1) / 2.0);
    }
    let (f, t, rw, rr) = (median(fs), median(ts), median(rws), median(rrs));
    let (tt, tsc, tv) = (median(tts), median(tss), median(tvs));
    Ok(PipelineBench {
        tokens,
        bytes,
        engine: eng.name(),
        freeze_gbps: f,
        thaw_gbps: t,
        raw_write_gbps: rw,
        raw_read_gbps: rr,
        freeze_ratio: if rw > 0.0 { f / rw } else { 0.0 },
        thaw_ratio: if rr > 0.0 { t / rr } else { 0.0 },
        tier_thaw_gbps: tt,
        tier_scatter_gbps: tsc,
        tier_ratio: if tsc > 0.0 { tt / tsc } else { 0.0 },
        tier_verify_gbps: tv,
        verify_threads: cfg.verify_threads,
        behind,
        runs: runs.max(1),
        stages,
    })
}

/// Freezes the whole session again under another name and, once that freeze has started, a
/// 512-token window from other blocks; returns (small captured, small durable, big durable)
/// seconds, all from the big freeze's start.
fn freeze_behind(
    store: &Store,
    eng: &cwm::pipeline::Engine,
    cfg: &cwm::pipeline::PipelineConfig,
    tokens: u32,
    nb: u64,
) -> Result<(f64, f64, f64), String> {
    use cwm::pipeline::{freeze, FreezeOptions, FreezeRequest};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let t0 = std::time::Instant::now();
    let small = 32.min(nb);
    let (small_rep, big_rep) = std::thread::scope(|s| {
        let big = s.spawn(|| {
            freeze(
                store,
                eng,
                FreezeRequest {
                    window: "behind-big".into(),
                    session: "b".into(),
                    tokens: (1_000_000..1_000_000 + tokens).collect(),
                    block_ids: (0..nb).collect(),
                    ..Default::default()
                },
                cfg,
                &FreezeOptions::default(),
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let small_rep = freeze(
            store,
            eng,
            FreezeRequest {
                window: "behind-small".into(),
                session: "s".into(),
                tokens: (2_000_000..2_000_000 + 16 * small as u32).collect(),
                block_ids: (nb..nb + small).map(|i| i % (nb + 8)).collect(),
                ..Default::default()
            },
            cfg,
            &FreezeOptions::default(),
        );
        (small_rep, big.join())
    });
    let small_rep = small_rep.map_err(|x| e(&x))?;
    let big_rep = big_rep
        .map_err(|_| "freeze thread panicked".to_string())?
        .map_err(|x| e(&x))?;
    let start = t0.elapsed().as_secs_f64() - small_rep.durable_secs;
    Ok((
        start + small_rep.captured_secs,
        start + small_rep.durable_secs,
        big_rep.durable_secs,
    ))
}

/// Fills a RAM tier from `window` (an untimed thaw), then returns (thaw from the tier, bare
/// scatter of the same payloads into the same blocks, verification alone) in GB/s, each the
/// best of 3.
fn tier_thaw(
    store: &Store,
    eng: &cwm::pipeline::Engine,
    window: &str,
    cfg: &cwm::pipeline::PipelineConfig,
    bytes: u64,
) -> Result<(f64, f64, f64), String> {
    use cwm::pipeline::{thaw, ThawOptions, ThawRequest};
    use cwm::tier::RamTier;
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let blocks = store
        .open_window(window)
        .map_err(|x| e(&x))?
        .manifest
        .blocks;
    let keys: Vec<u128> = blocks.iter().map(|b| b.key).collect();
    let sums: Vec<u64> = blocks.iter().map(|b| b.checksum).collect();
    let nb = keys.len() as u64;
    let tier = RamTier::new(bytes + (64 << 20));
    tier.prepare(eng.layout.block_bytes() as usize);
    let req = ThawRequest {
        prefix: false,
        first_block: 0,
        window: window.into(),
        block_ids: (0..nb).map(|i| nb + 7 - i).collect(),
        expect_tokens: None,
        salt: None,
    };
    thaw(
        store,
        eng,
        &req,
        cfg,
        &ThawOptions {
            tier: Some(&tier),
            ..Default::default()
        },
    )
    .map_err(|x| e(&x))?;
    let mut best_thaw = f64::MAX;
    for _ in 0..3 {
        let t = thaw(
            store,
            eng,
            &req,
            cfg,
            &ThawOptions {
                tier: Some(&tier),
                ..Default::default()
            },
        )
        .map_err(|x| e(&x))?;
        if t.blocks_from_tier != nb {
            return Err(format!(
                "tier thaw read the disk ({} of {nb} blocks from RAM)",
                t.blocks_from_tier
            ));
        }
        best_thaw = best_thaw.min(t.loaded_secs);
    }
    let hits = tier.all(&keys, &sums).ok_or("the tier lost blocks")?;
    let pls = hits.payloads();
    let mut best_scatter = f64::MAX;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        cwm::device::scatter(
            &eng.layout,
            &eng.layout,
            cwm::layout::Compat::Same,
            eng.mem.as_ref(),
            &req.block_ids,
            &pls,
            cfg.threads,
        )
        .map_err(|x| e(&x))?;
        best_scatter = best_scatter.min(t0.elapsed().as_secs_f64());
    }
    let blocks = store
        .open_window(window)
        .map_err(|x| e(&x))?
        .manifest
        .blocks;
    let mut best_verify = f64::MAX;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let per = pls.len().div_ceil(cfg.verify_threads.max(1)).max(1);
        let ok = std::thread::scope(|sc| {
            let hs: Vec<_> = pls
                .chunks(per)
                .zip(blocks.chunks(per))
                .map(|(p, b)| {
                    sc.spawn(move || {
                        p.iter()
                            .zip(b)
                            .all(|(p, b)| cwm::checksum::payload_checksum(p) == b.checksum)
                    })
                })
                .collect();
            hs.into_iter().all(|h| h.join().unwrap_or(false))
        });
        if !ok {
            return Err("a tier payload does not verify".into());
        }
        best_verify = best_verify.min(t0.elapsed().as_secs_f64());
    }
    Ok((
        gbps(bytes, best_thaw),
        gbps(bytes, best_scatter),
        gbps(bytes, best_verify),
    ))
}

/// Where one run's time went (busy seconds per stage; stages overlap, so they do not add up
/// to the total), with the raw passes around it as (write, read) GB/s.
#[derive(Debug, Serialize)]
pub struct RunStages {
    /// Raw pass just before the freeze.
    pub raw_before_gbps: (f64, f64),
    /// Raw pass just after the thaw.
    pub raw_after_gbps: (f64, f64),
    /// Gather + checksum.
    pub freeze_gather_secs: f64,
    /// Block writes.
    pub freeze_write_secs: f64,
    /// fdatasync + manifest.
    pub freeze_commit_secs: f64,
    /// Whole freeze.
    pub freeze_secs: f64,
    /// Reads (both readers together).
    pub thaw_read_secs: f64,
    /// Verification.
    pub thaw_verify_secs: f64,
    /// Scatter.
    pub thaw_scatter_secs: f64,
    /// Whole thaw.
    pub thaw_secs: f64,
}

/// Result of `cwm bench control`.
#[derive(Debug, Serialize)]
pub struct ControlBench {
    /// Windows in the store.
    pub windows: u64,
    /// `stat` latency percentiles, microseconds.
    pub stat_p50_us: f64,
    /// 99th percentile of `stat`.
    pub stat_p99_us: f64,
    /// `list` (100 per page) latency, microseconds.
    pub list_p50_us: f64,
    /// 99th percentile of `list`.
    pub list_p99_us: f64,
    /// Freeze + thaw round trips per second of a 4-block (64 KiB) window, through the socket.
    pub freeze_thaw_per_sec: f64,
    /// Seconds spent creating the windows (not part of the figures).
    pub populate_seconds: f64,
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// `cwm bench control`: latency of `stat` and `list` over the socket against `windows` windows,
/// and small freeze/thaw round trips per second.
pub fn control(dir: &Path, windows: u64, p: &Progress) -> Result<ControlBench, String> {
    use serde_json::json;
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let tmp = tempfile::Builder::new()
        .prefix("cwm-bench-control-")
        .tempdir_in(dir)
        .map_err(|x| e(&x))?;
    let (store, _) = Store::open(StoreConfig::new(tmp.path().join("data"))).map_err(|x| e(&x))?;
    let t = Instant::now();
    let payload = vec![7u8; 1024];
    for i in 0..windows {
        if i % 256 == 0 {
            p.update("populating", i, windows, "");
        }
        let spec = WindowSpec {
            name: format!("w{i}"),
            session: format!("s{}", i % 100),
            namespace: "bench".into(),
            layout: b"{}".to_vec(),
            tokens: (0..16).collect(),
            blocks: vec![BlockDesc {
                key: u128::from(i) << 1 | 1,
                len: 1024,
            }],
            ..Default::default()
        };
        store.put_window(spec, &[&payload]).map_err(|x| e(&x))?;
    }
    let populate = t.elapsed().as_secs_f64();
    let socket = tmp.path().join("cwm.sock");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).map_err(|x| e(&x))?;
    let server = bench_server(store, &socket, &shm, 16 << 20, no_compaction(), None);
    let s2 = server.clone();
    let th = std::thread::spawn(move || s2.serve());
    let mut c = connect_daemon(&socket)?;
    let mut x = 88172645463325252u64;
    let mut stat = Vec::new();
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = Instant::now();
        let r = c
            .call_final(json!({"op": "stat", "window": format!("w{}", x % windows.max(1))}))
            .map_err(|x| e(&x))?;
        stat.push(t.elapsed().as_secs_f64() * 1e6);
        if r["ok"] != true {
            return Err(format!("stat failed: {r}"));
        }
    }
    let mut list = Vec::new();
    for i in 0..200u64 {
        let t = Instant::now();
        c.call_final(json!({"op": "list", "offset": (i * 97) % windows.max(1), "limit": 100}))
            .map_err(|x| e(&x))?;
        list.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Small freeze/thaw round trips through a shared-memory engine.
    register_small_engine(&mut c, &shm)?;
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < 3.0 {
        let name = format!("rt{n}");
        let r = c
            .call_final(json!({"op": "freeze", "engine": "b", "window": name,
                "tokens": ((n * 64) as u32..(n * 64 + 64) as u32).collect::<Vec<u32>>(), "block_ids": [0, 1, 2, 3]}))
            .map_err(|x| e(&x))?;
        if r["ok"] != true {
            return Err(format!("freeze failed: {r}"));
        }
        c.call_final(
            json!({"op": "thaw", "engine": "b", "window": name, "block_ids": [8, 9, 10, 11]}),
        )
        .map_err(|x| e(&x))?;
        n += 1;
    }
    let rps = n as f64 / t.elapsed().as_secs_f64();
    server.stop();
    let _ = th.join();
    Ok(ControlBench {
        windows,
        stat_p50_us: pct(stat.clone(), 0.5),
        stat_p99_us: pct(stat, 0.99),
        list_p50_us: pct(list.clone(), 0.5),
        list_p99_us: pct(list, 0.99),
        freeze_thaw_per_sec: rps,
        populate_seconds: populate,
    })
}

/// Result of `cwm bench compaction`.
#[derive(Debug, Serialize)]
pub struct CompactionBench {
    /// I/O engine.
    pub engine: &'static str,
    /// Payload bytes populated.
    pub populated_bytes: u64,
    /// Raw O_DIRECT sequential read of as many bytes, GB/s (the ceiling for fsck).
    pub raw_read_gbps: f64,
    /// fsck (every block of every window read and both checksums verified), payload GB/s.
    pub fsck_gbps: f64,
    /// `fsck_gbps / raw_read_gbps`.
    pub fsck_vs_raw: f64,
    /// Compaction alone, unthrottled, half the windows deleted: bytes copied per second, GB/s.
    pub compaction_gbps: f64,
    /// Bytes that compaction copied and gave back.
    pub compaction_copied_bytes: u64,
    /// Bytes given back to the file system.
    pub compaction_reclaimed_bytes: u64,
    /// Foreground freeze throughput with nothing else running, GB/s.
    pub freeze_alone_gbps: f64,
    /// Foreground freeze throughput while a compaction (at `compaction_rate`) runs, GB/s.
    pub freeze_during_compaction_gbps: f64,
    /// `freeze_during_compaction_gbps / freeze_alone_gbps`.
    pub freeze_ratio: f64,
    /// Rate limit of the concurrent compaction, bytes/s (0: unlimited).
    pub compaction_rate: u64,
    /// Seconds the concurrent compaction ran (covers the freezes when ≥ their time).
    pub concurrent_compaction_seconds: f64,
    /// Seconds the freezes with compaction running took.
    pub concurrent_freeze_seconds: f64,
}

/// `cwm bench compaction`: fsck vs raw read, compaction throughput, and foreground freeze
/// throughput with and without a compaction running, all in one run on one directory.
pub fn compaction(
    dir: &Path,
    bytes: u64,
    engine_kind: cwm::io::EngineKind,
    rate: u64,
    p: &Progress,
) -> Result<CompactionBench, StoreError> {
    const BLOCK: u64 = 256 << 10;
    const PER_WINDOW: usize = 8;
    let engine = io::build_engine(engine_kind, 32);
    let tmp = tempfile::Builder::new()
        .prefix("cwm-bench-")
        .tempdir_in(dir)
        .map_err(|e| StoreError::Fs {
            context: "temporary directory".into(),
            source: e,
        })?;
    let (_, raw_read) = raw_disk(engine.as_ref(), tmp.path(), bytes, 4 << 20, 8)?;
    let mut cfg = StoreConfig::new(tmp.path().join("store"));
    cfg.segment_size = 64 << 20;
    let (st, _) = Store::open_with_engine(cfg, engine.clone())?;
    let rl = record_len(BLOCK) as usize;
    let po = payload_offset(BLOCK);
    let mut imgs: Vec<AlignedBuf> = (0..PER_WINDOW)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(rl);
            fill_random(&mut b[po..po + BLOCK as usize], i as u64 + 3);
            b
        })
        .collect();
    let mut next = 0u64;
    let mut freeze = |st: &Store, n: u64| -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for i in 0..n {
            if i % 16 == 0 {
                p.update("freezing", i, n, "");
            }
            let w = next;
            next += 1;
            let spec = bench_spec(format!("c{w}"), PER_WINDOW, BLOCK, |i| {
                ((w as u128) << 32) | i as u128
            });
            names.push(write_window(st, spec, &mut imgs)?.name);
        }
        p.finish();
        Ok(names)
    };
    let per_window = BLOCK * PER_WINDOW as u64;
    let n = (bytes / per_window).max(4);
    let names = freeze(&st, n)?;
    let t = Instant::now();
    let (_, verified) = cwm::fsck::verify_windows(&st, 0, &|_, _| {})?;
    let fsck = gbps(verified, t.elapsed().as_secs_f64());
    for name in names.iter().step_by(2) {
        st.delete_window(name, None)?;
    }
    let opts = cwm::store::CompactOptions {
        live_ratio: 1.0,
        ..Default::default()
    };
    let rep = st.compact(&opts, &mut |_| {})?;
    let compaction = gbps(rep.bytes_copied, rep.seconds);
    // Foreground freezes alone, then with a compaction of as much garbage running.
    let fg = (n / 4).max(2);
    let t = Instant::now();
    freeze(&st, fg)?;
    let alone = t.elapsed().as_secs_f64();
    for name in names.iter().skip(1).step_by(4) {
        st.delete_window(name, None)?;
    }
    st.seal_active()?;
    let copts = cwm::store::CompactOptions {
        live_ratio: 1.0,
        rate,
        ..Default::default()
    };
    let (during, csecs) = std::thread::scope(|s| -> Result<(f64, f64), StoreError> {
        let h = s.spawn(|| st.compact(&copts, &mut |_| {}));
        let t = Instant::now();
        let r = freeze(&st, fg);
        let during = t.elapsed().as_secs_f64();
        let c = h
            .join()
            .map_err(|_| StoreError::Validation("compaction thread panicked".into()))??;
        r?;
        Ok((during, c.seconds))
    })?;
    let fa = gbps(fg * per_window, alone);
    let fd = gbps(fg * per_window, during);
    Ok(CompactionBench {
        engine: engine.name(),
        populated_bytes: n * per_window,
        raw_read_gbps: raw_read,
        fsck_gbps: fsck,
        fsck_vs_raw: if raw_read > 0.0 { fsck / raw_read } else { 0.0 },
        compaction_gbps: compaction,
        compaction_copied_bytes: rep.bytes_copied,
        compaction_reclaimed_bytes: rep.bytes_reclaimed,
        freeze_alone_gbps: fa,
        freeze_during_compaction_gbps: fd,
        freeze_ratio: if fa > 0.0 { fd / fa } else { 0.0 },
        compaction_rate: rate,
        concurrent_compaction_seconds: csecs,
        concurrent_freeze_seconds: during,
    })
}

/// Maintenance with no background compaction (nothing moves under a measurement).
pub(crate) fn no_compaction() -> cwm::control::maint::Maintenance {
    cwm::control::maint::Maintenance {
        compact_interval_s: 0,
        ..Default::default()
    }
}

/// A client of the daemon at `socket`, waiting up to 10 s for it to listen.
pub(crate) fn connect_daemon(socket: &Path) -> Result<cwm::control::client::Client, String> {
    let t = Instant::now();
    loop {
        match cwm::control::client::Client::connect(socket) {
            Ok(c) => return Ok(c),
            Err(_) if t.elapsed().as_secs() < 10 => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(x) => return Err(x.to_string()),
        }
    }
}

/// Registers engine `b` of model `bench`: a small shared-memory engine (2 layers of 64
/// blocks of 16 tokens, 2 heads of 64, bf16) whose layer files are made in `shm`.
pub(crate) fn register_small_engine(
    c: &mut cwm::control::client::Client,
    shm: &Path,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut paths = Vec::new();
    for l in 0..2 {
        let p = shm.join(format!("layer{l}"));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(2 * 64 * 4096))
            .map_err(|x| e(&x))?;
        paths.push(p);
    }
    let r = c
        .call_final(
            serde_json::json!({"op": "register", "engine": "b", "model": "bench",
            "layout": {"kind": "flash_2nbhd", "layers": 2, "blocks": 64, "block_size": 16,
                "heads": 2, "head": 64, "dtype": "bf16"},
            "memory": {"shm": paths}}),
        )
        .map_err(|x| e(&x))?;
    if r["ok"] != true {
        return Err(format!("register failed: {r}"));
    }
    Ok(())
}

/// An in-process daemon for the control benchmarks: `store` served on `socket`, engines'
/// memory in `shm`, `staging` bytes of staging per engine.
pub(crate) fn bench_server(
    store: Store,
    socket: &Path,
    shm: &Path,
    staging: u64,
    maintenance: cwm::control::maint::Maintenance,
    remote: Option<cwm::remote::RemoteConfig>,
) -> Arc<cwm::control::Server> {
    cwm::control::Server::new(
        Arc::new(store),
        cwm::control::ServeConfig {
            socket: socket.to_path_buf(),
            allow_uids: vec![],
            shm_dir: shm.to_path_buf(),
            max_line: 16 << 20,
            pipeline: cwm::pipeline::PipelineConfig {
                staging_bytes: staging,
                ..Default::default()
            },
            tier_bytes: 0,
            max_sessions: 100_000,
            metrics_addr: None,
            max_ops: 64,
            max_connections: 1024,
            max_engines: 64,
            maintenance,
            remote,
        },
    )
}

/// Result of `cwm bench churn`.
#[derive(Debug, Serialize)]
pub struct ChurnBench {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds the clients ran.
    pub seconds: f64,
    /// The daemon's capacity (a budget the freezes outgrow: eviction runs).
    pub capacity: u64,
    /// The log's segment size.
    pub segment_size: u64,
    /// Freezes acknowledged (durable), all clients.
    pub freezes: u64,
    /// Freezes refused (QUOTA_EXCEEDED and the like) or failed.
    pub freeze_errors: u64,
    /// Those refusals and failures by error code (`io` for a lost connection).
    pub freeze_error_codes: std::collections::BTreeMap<String, u64>,
    /// Aggregate freeze throughput, GB/s (bytes of acknowledged freezes / seconds).
    pub freeze_gbps: f64,
    /// Raw O_DIRECT write ceiling measured in the same run (mean of before and after), GB/s.
    pub raw_write_gbps: f64,
    /// `freeze_gbps / raw_write_gbps`.
    pub freeze_ratio: f64,
    /// The ceiling of the same shape ([`freeze_shaped_writes`]: the same clients, each
    /// writing a freeze's block records, fdatasync, manifest, fdatasync, as bare O_DIRECT
    /// I/O), mean of a pass before and one after the churn, GB/s.
    pub shaped_write_gbps: f64,
    /// `freeze_gbps / shaped_write_gbps`.
    pub freeze_ratio_of_shaped: f64,
    /// Thaws that found their window (others were evicted: NOT_FOUND).
    pub thaws: u64,
    /// Thaws of evicted windows.
    pub thaws_evicted: u64,
    /// Lookup latency while freezes, eviction and compaction run, µs.
    pub lookup_p50_us: f64,
    /// Same, p99.
    pub lookup_p99_us: f64,
    /// Windows the daemon evicted.
    pub evictions: f64,
    /// The eviction policy the daemon ran.
    pub policy: cwm::store::EvictionPolicy,
    /// Bytes compaction copied (live blocks moved out of segments it emptied), and per byte
    /// frozen: the write amplification eviction leaves to compaction.
    pub compaction_bytes_copied: f64,
    /// `compaction_bytes_copied` / bytes frozen.
    pub copied_per_frozen: f64,
    /// Where an acknowledged freeze's time goes, medians in ms: the client's round trip, and
    /// the daemon's own report of it (durable, of which gather + checksum, block writes, and
    /// the commit: sync, manifest, sync).
    pub freeze_ms: FreezeTimes,
}

/// Medians of acknowledged freezes, ms.
#[derive(Debug, Default, Serialize)]
pub struct FreezeTimes {
    /// Request sent to answer received.
    pub round_trip: f64,
    /// The same, mean (a freeze that waited behind eviction or compaction shows here).
    pub round_trip_mean: f64,
    /// The same, 99th percentile.
    pub round_trip_p99: f64,
    /// The daemon's `durable_secs`.
    pub durable: f64,
    /// Its `gather_secs`.
    pub gather: f64,
    /// Its `write_secs`.
    pub write: f64,
    /// Its `commit_secs`.
    pub commit: f64,
}

/// The shape of a `cwm bench churn` run.
#[derive(Debug, Clone, Copy)]
pub struct ChurnShape {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds the clients run.
    pub seconds: f64,
    /// The log's budget.
    pub capacity: u64,
    /// Segment size.
    pub segment_size: u64,
}

/// `cwm bench churn`: `clients` clients freeze unnamed windows (2 MiB each) and thaw and look
/// up earlier ones for `seconds`, against a daemon whose budget they outgrow, so eviction and
/// compaction run the whole time; aggregate freeze throughput against the raw disk.
#[expect(
    clippy::too_many_lines,
    reason = "one benchmark: daemon and engine set-up, the clients, the ceiling, the report"
)]
pub fn churn(
    dir: &Path,
    shape: &ChurnShape,
    engine: EngineKind,
    policy: cwm::store::EvictionPolicy,
    p: &Progress,
) -> Result<ChurnBench, String> {
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    const BLOCKS: u64 = 256;
    const PER: u64 = 16; // blocks per freeze: 16 x 128 KiB = 2 MiB
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let ChurnShape {
        clients,
        seconds,
        capacity,
        segment_size,
    } = *shape;
    let clients = clients.clamp(1, (BLOCKS / PER) as usize);
    let tmp = tempfile::Builder::new()
        .prefix("cwm-bench-churn-")
        .tempdir_in(dir)
        .map_err(|x| e(&x))?;
    let eng = io::build_engine(engine, 32);
    let (rw0, _) = raw_disk(eng.as_ref(), tmp.path(), 512 << 20, 4 << 20, 32).map_err(|x| e(&x))?;
    let shape = (PER as usize, 128 << 10);
    let shaped_secs = seconds.clamp(1.0, 5.0);
    let sw0 = freeze_shaped_writes(eng.as_ref(), tmp.path(), clients, shape, shaped_secs)
        .map_err(|x| e(&x))?;
    let mut cfg = StoreConfig::new(tmp.path().join("data"));
    cfg.capacity = capacity;
    cfg.segment_size = segment_size;
    cfg.engine = engine;
    // Segment files kept for reuse, as the daemon's CWM_RECYCLE_SEGMENTS sets it (default 4).
    cfg.recycle_segments = std::env::var("CWM_RECYCLE_SEGMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let (store, _) = Store::open(cfg).map_err(|x| e(&x))?;
    let socket = tmp.path().join("cwm.sock");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).map_err(|x| e(&x))?;
    let mut paths = Vec::new();
    for l in 0..2 {
        let path = shm.join(format!("layer{l}"));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(2 * BLOCKS * 16 * 8 * 128 * 2))
            .map_err(|x| e(&x))?;
        paths.push(path);
    }
    let server = bench_server(
        store,
        &socket,
        &shm,
        64 << 20,
        cwm::control::maint::Maintenance {
            compact_interval_s: 1,
            eviction: cwm::control::maint::Eviction {
                interval_ms: 100,
                policy,
                ..Default::default()
            },
            ..Default::default()
        },
        None,
    );
    let s2 = server.clone();
    let th = std::thread::spawn(move || s2.serve());
    let connect = || connect_daemon(&socket);
    let mut c = connect()?;
    c.call_final(json!({"op": "register", "engine": "b", "model": "churn",
        "layout": {"kind": "flash_2nbhd", "layers": 2, "blocks": BLOCKS, "block_size": 16,
                   "heads": 8, "head": 128, "dtype": "bf16"},
        "memory": {"shm": paths}}))
        .map_err(|x| e(&x))?;
    let (freezes, errors, thaws, evicted) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let lookups = std::sync::Mutex::new(Vec::new());
    let codes = std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    // Per acknowledged freeze: round trip, durable, gather, write, commit (seconds).
    let times = std::sync::Mutex::new(Vec::<[f64; 5]>::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for ci in 0..clients as u64 {
            let (freezes, errors, thaws, evicted, lookups, times) =
                (&freezes, &errors, &thaws, &evicted, &lookups, &times);
            let connect = &connect;
            let codes = &codes;
            s.spawn(move || {
                let Ok(mut c) = connect() else { return };
                let ids: Vec<u64> = (ci * PER..ci * PER + PER).collect();
                let mut rng = cwm::prng::Rng(ci * 7919 + 13);
                let mut mine: Vec<(String, Vec<u32>)> = Vec::new();
                let mut lat = Vec::new();
                let mut mine_times = Vec::new();
                let mut n = 0u64;
                while t0.elapsed().as_secs_f64() < seconds {
                    let tokens: Vec<u32> = (0..PER * 16).map(|_| rng.below(32000) as u32).collect();
                    let name = format!("c{ci}-{n}");
                    n += 1;
                    let tf = Instant::now();
                    let r = c.call_final(json!({"op": "freeze", "engine": "b", "window": name,
                        "tokens": tokens, "block_ids": ids, "class": "unnamed"}));
                    let rt = tf.elapsed().as_secs_f64();
                    match r {
                        Ok(v) if v["ok"] == true => {
                            freezes.fetch_add(1, Ordering::Relaxed);
                            let f = |k: &str| v["report"][k].as_f64().unwrap_or(0.0);
                            mine_times.push([
                                rt,
                                f("durable_secs"),
                                f("gather_secs"),
                                f("write_secs"),
                                f("commit_secs"),
                            ]);
                            mine.push((name, tokens));
                        }
                        other => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let code = match &other {
                                Ok(v) => v["error"]["code"].as_str().unwrap_or("?").to_string(),
                                Err(_) => "io".to_string(),
                            };
                            if let Ok(mut m) = codes.lock() {
                                *m.entry(code).or_insert(0) += 1;
                            }
                        }
                    }
                    if mine.is_empty() {
                        continue;
                    }
                    let (w, toks) = &mine[rng.below(mine.len() as u64) as usize];
                    let t = Instant::now();
                    let _ = c.call_final(json!({"op": "lookup", "engine": "b", "tokens": toks}));
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                    if rng.below(4) == 0 {
                        match c.call_final(
                            json!({"op": "thaw", "engine": "b", "window": w, "block_ids": ids}),
                        ) {
                            Ok(v) if v["ok"] == true => thaws.fetch_add(1, Ordering::Relaxed),
                            _ => evicted.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
                if let Ok(mut l) = lookups.lock() {
                    l.extend(lat);
                }
                if let Ok(mut t) = times.lock() {
                    t.extend(mine_times);
                }
            });
        }
        while t0.elapsed().as_secs_f64() < seconds {
            p.update("churning", t0.elapsed().as_secs(), seconds as u64, "");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    p.finish();
    let metrics = c.call_final(json!({"op": "metrics"})).map_err(|x| e(&x))?;
    let counter = |prefix: &str| -> f64 {
        metrics["text"]
            .as_str()
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0)
    };
    let evictions = counter("cwm_evictions_total{");
    let copied = counter("cwm_compaction_bytes_total ");
    server.stop();
    let _ = th.join();
    let (rw1, _) = raw_disk(eng.as_ref(), tmp.path(), 512 << 20, 4 << 20, 32).map_err(|x| e(&x))?;
    let sw1 = freeze_shaped_writes(eng.as_ref(), tmp.path(), clients, shape, shaped_secs)
        .map_err(|x| e(&x))?;
    let raw = (rw0 + rw1) / 2.0;
    let shaped = (sw0 + sw1) / 2.0;
    let n = freezes.load(Ordering::Relaxed);
    let fg = gbps(n * PER * 128 * 1024, secs);
    let mut lat = lookups.into_inner().unwrap_or_default();
    Ok(ChurnBench {
        clients,
        seconds: secs,
        capacity,
        segment_size,
        freezes: n,
        freeze_errors: errors.load(Ordering::Relaxed),
        freeze_error_codes: codes.into_inner().unwrap_or_default(),
        freeze_gbps: fg,
        raw_write_gbps: raw,
        freeze_ratio: if raw > 0.0 { fg / raw } else { 0.0 },
        shaped_write_gbps: shaped,
        freeze_ratio_of_shaped: if shaped > 0.0 { fg / shaped } else { 0.0 },
        thaws: thaws.load(Ordering::Relaxed),
        thaws_evicted: evicted.load(Ordering::Relaxed),
        lookup_p50_us: quantile(&mut lat, 0.5),
        lookup_p99_us: quantile(&mut lat, 0.99),
        evictions,
        policy,
        compaction_bytes_copied: copied,
        copied_per_frozen: copied / (n * PER * 128 * 1024).max(1) as f64,
        freeze_ms: {
            let t = times.into_inner().unwrap_or_default();
            let m = |k: usize| median(t.iter().map(|x| x[k] * 1e3).collect());
            let mut rts: Vec<f64> = t.iter().map(|x| x[0] * 1e3).collect();
            FreezeTimes {
                round_trip: m(0),
                round_trip_mean: rts.iter().sum::<f64>() / rts.len().max(1) as f64,
                round_trip_p99: quantile(&mut rts, 0.99),
                durable: m(1),
                gather: m(2),
                write: m(3),
                commit: m(4),
            }
        },
    })
}
