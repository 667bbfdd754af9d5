//! `cwm bench …` and `cwm gpu-check`: measurements against ceilings taken in the same run.

use std::path::PathBuf;

use clap::Subcommand;
use cwm::io::EngineKind;

use crate::progress::{Mode, Progress};
use crate::{parse_size, print_json, tools};

/// Where a benchmark works and what it prints: flags every `cwm bench` takes.
#[derive(clap::Args)]
pub(crate) struct Output {
    /// Directory for the benchmark files (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also draw the figures, each beside its ceiling, into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

impl Output {
    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Store write/read throughput vs raw O_DIRECT write/read of the same bytes.
    Store {
        /// Bytes per run (e.g. 2GiB).
        #[arg(long, default_value = "2GiB", value_parser = parse_size)]
        bytes: u64,
        /// Block payload bytes (2MiB = one 16-token block of a Llama-3.1-8B KV cache).
        #[arg(long, default_value = "2MiB", value_parser = parse_size)]
        block_bytes: u64,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Queue depth.
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        /// Runs (figures are medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the same bytes as this many windows at once (one thread each, each a
        /// share of the queue depth); 1: skip that pass.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[command(flatten)]
        out: Output,
    },
    /// Host-backend freeze/thaw throughput vs raw O_DIRECT write/read of the same bytes.
    Pipeline {
        /// Session length in tokens (Llama-3.1-8B shape, 2 MiB per 16-token block).
        #[arg(long, default_value_t = 16_384)]
        tokens: u32,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Runs (figures are medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        out: Output,
    },
    /// Control-socket latency (stat, list) against many windows, and freeze/thaw round trips.
    Control {
        /// Windows in the store.
        #[arg(long, default_value_t = 10_000)]
        windows: u64,
        #[command(flatten)]
        out: Output,
    },
    /// fsck vs raw read, compaction throughput, freeze throughput with vs without compaction.
    Compaction {
        /// Bytes populated (windows of 8 x 256 KiB blocks).
        #[arg(long, default_value = "512MiB", value_parser = parse_size)]
        bytes: u64,
        /// Rate limit of the compaction that runs beside the foreground freezes (0: unlimited).
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        compact_rate: u64,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        #[command(flatten)]
        out: Output,
    },
    /// Prefix hit ratio of a request trace under eviction: the store's policies (simulated with
    /// the store's own ordering, and one replayed against the real store) beside plain LRU and
    /// Belady's offline bound.
    Trace(TraceArgs),
    /// Concurrent clients freezing (unnamed) and thawing under a budget that forces eviction:
    /// aggregate freeze throughput vs the raw disk, lookup latency while eviction and
    /// compaction run.
    Churn {
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds the clients run.
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Eviction policy of the daemon: lru, s3fifo or fifo (default: the daemon's).
        #[arg(long, default_value_t = cwm::store::EvictionPolicy::default())]
        policy: cwm::store::EvictionPolicy,
        /// The log's budget (`serve --capacity`).
        #[arg(long, default_value = "256MiB", value_parser = crate::parse_size)]
        capacity: u64,
        /// Segment size (`serve --segment-size`); each rotation creates a segment under the
        /// appender lock (its seal runs in the background), so small segments cost more per
        /// byte.
        #[arg(long, default_value = "16MiB", value_parser = crate::parse_size)]
        segment_size: u64,
        #[command(flatten)]
        out: Output,
    },
    /// A window pushed to and pulled from a Redis Cluster through cwm, against the raw client
    /// moving the same bytes (a local 3-master cluster is started unless --remote is given).
    Remote {
        /// Window bytes.
        #[arg(long, default_value = "512MiB", value_parser = crate::parse_size)]
        bytes: u64,
        /// Bytes per block (2 MiB: a 16-token block of an 8B model in bf16).
        #[arg(long, default_value = "2MiB", value_parser = crate::parse_size)]
        block: u64,
        /// Largest value written.
        #[arg(long, default_value = "4MiB", value_parser = crate::parse_size)]
        max_value: u64,
        /// Cluster seed nodes, comma-separated (default: start a local one).
        #[arg(long)]
        remote: Option<String>,
        /// Prompts stored in the tier before lookups are timed.
        #[arg(long, default_value_t = 10_000)]
        lookup_windows: u64,
        #[command(flatten)]
        out: Output,
    },
    /// Reopen time of a log of many small records.
    Recovery {
        /// Records in the log.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Keep the log in this directory and reuse it on later runs with the same
        /// `--records` (building 1,000,000 records takes minutes; profiling the open needs
        /// many).
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        #[command(flatten)]
        out: Output,
    },
}

/// `cwm bench trace`.
#[derive(clap::Args)]
pub(crate) struct TraceArgs {
    /// A Mooncake-format JSONL trace (timestamp, input_length, output_length, hash_ids).
    #[arg(long, conflicts_with = "synthetic")]
    trace: Option<PathBuf>,
    /// Or a generated one: agents (long shared tool prompts, growing loops) or chats (many
    /// short chats behind a short system prompt).
    #[arg(long)]
    synthetic: Option<String>,
    /// Requests of a synthetic trace.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// Capacities, as fractions of the trace's unique blocks.
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.1,0.25,0.5")]
    capacity_fraction: Vec<f64>,
    /// The policy replayed against the real store.
    #[arg(long, default_value = "lru")]
    policy: cwm::store::EvictionPolicy,
    /// Capacities (of those above) at which the policy is also replayed against the real
    /// store (none: simulation only).
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    replay_at: Vec<f64>,
    /// High and low watermarks, as `cwm serve`'s --high-watermark and --low-watermark.
    #[arg(long, value_delimiter = ',', default_value = "0.95,0.9")]
    watermarks: Vec<f64>,
    #[command(flatten)]
    out: Output,
}

/// Runs one benchmark: prints its figures (or JSON), and draws them when asked.
pub(crate) fn run(cmd: BenchCmd) -> Result<(), String> {
    let (report, text, Output { json, plot, .. }) = measure(cmd)?;
    if json {
        print_json(&report);
    } else {
        println!("{text}");
    }
    if let Some(path) = plot {
        let (title, figs) = tools::plot::figures(&report)?;
        tools::plot::draw(&path, &title, &figs)?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

type Measured = (serde_json::Value, String, Output);

fn value<T: serde::Serialize>(r: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(r).map_err(|e| e.to_string())
}

fn measure(cmd: BenchCmd) -> Result<Measured, String> {
    let bar = |json: bool| Progress::new(Mode::detect(json), "");
    Ok(match cmd {
        BenchCmd::Store {
            bytes,
            block_bytes,
            engine,
            queue_depth,
            runs,
            writers,
            out,
        } => {
            let args = tools::bench::StoreBenchArgs {
                dir: out.dir(),
                bytes,
                block_bytes,
                engine,
                queue_depth,
                runs,
                writers,
            };
            let r = tools::bench::store(&args, &bar(out.json)).map_err(|e| e.to_string())?;
            let mut text = format!(
                "store ({} QD{}, {} MiB in {} KiB blocks, median of {}):\n  write {:.2} GB/s vs raw {:.2} GB/s  ratio {:.3}\n  read  {:.2} GB/s vs raw {:.2} GB/s  ratio {:.3}\n  reopen {:.3} s",
                r.engine, r.queue_depth, r.bytes >> 20, r.block_bytes >> 10, r.runs,
                r.write_gbps, r.raw_write_gbps, r.write_ratio,
                r.read_gbps, r.raw_read_gbps, r.read_ratio, r.reopen_seconds
            );
            if r.writers > 1 {
                text.push_str(&format!(
                    "\n  {} concurrent writers: {:.2} GB/s vs raw {:.2} GB/s  ratio {:.3} (one writer {:.3})",
                    r.writers, r.concurrent_write_gbps, r.raw_write_gbps, r.concurrent_write_ratio,
                    r.write_ratio
                ));
            }
            if let (Some(fw), Some(fr)) = (r.fio_write_gbps, r.fio_read_gbps) {
                text.push_str(&format!(
                    "\n  fio (O_DIRECT, io_uring, same bytes, two jobs at the same depth): write {fw:.2} GB/s (store {:.3}x), read {fr:.2} GB/s (store {:.3}x)",
                    r.write_gbps / fw, r.read_gbps / fr
                ));
            }
            (value(&r)?, text, out)
        }
        BenchCmd::Pipeline {
            tokens,
            engine,
            runs,
            out,
        } => {
            let dir = out.dir();
            let r = tools::bench::pipeline(&dir, tokens, engine, runs, &bar(out.json))?;
            let text = format!(
                "pipeline ({} tokens, {} MiB, {}):\n  freeze {:.2} GB/s vs raw write {:.2} GB/s  ratio {:.3}\n  thaw   {:.2} GB/s vs raw read  {:.2} GB/s  ratio {:.3}\n  thaw from the RAM tier {:.2} GB/s vs bare scatter {:.2} GB/s  ratio {:.3} (verification alone {:.2} GB/s on {} threads)\n  a 512-token freeze started during a freeze of the window: captured at {:.3} s, durable at {:.3} s (the window: durable at {:.3} s)",
                r.tokens, r.bytes >> 20, r.engine, r.freeze_gbps, r.raw_write_gbps, r.freeze_ratio,
                r.thaw_gbps, r.raw_read_gbps, r.thaw_ratio,
                r.tier_thaw_gbps, r.tier_scatter_gbps, r.tier_ratio, r.tier_verify_gbps, r.verify_threads,
                r.behind.0, r.behind.1, r.behind.2
            );
            (value(&r)?, text, out)
        }
        BenchCmd::Control { windows, out } => {
            let dir = out.dir();
            let r = tools::bench::control(&dir, windows, &bar(out.json))?;
            let text = format!(
                "control ({} windows): stat p50 {:.0} us p99 {:.0} us; list p50 {:.0} us p99 {:.0} us; {:.0} freeze+thaw round trips/s",
                r.windows, r.stat_p50_us, r.stat_p99_us, r.list_p50_us, r.list_p99_us, r.freeze_thaw_per_sec
            );
            (value(&r)?, text, out)
        }
        BenchCmd::Compaction {
            bytes,
            compact_rate,
            engine,
            out,
        } => {
            let dir = out.dir();
            let r = tools::bench::compaction(&dir, bytes, engine, compact_rate, &bar(out.json))
                .map_err(|e| e.to_string())?;
            let text = format!(
                "fsck {:.2} GB/s vs raw read {:.2} GB/s ({:.0}%); compaction {:.2} GB/s ({} MiB copied, {} MiB given back)\nfreeze alone {:.2} GB/s, during compaction at {} MiB/s {:.2} GB/s (ratio {:.2}; compaction ran {:.2} s of the freezes' {:.2} s)",
                r.fsck_gbps,
                r.raw_read_gbps,
                r.fsck_vs_raw * 100.0,
                r.compaction_gbps,
                r.compaction_copied_bytes >> 20,
                r.compaction_reclaimed_bytes >> 20,
                r.freeze_alone_gbps,
                r.compaction_rate >> 20,
                r.freeze_during_compaction_gbps,
                r.freeze_ratio,
                r.concurrent_compaction_seconds,
                r.concurrent_freeze_seconds
            );
            (value(&r)?, text, out)
        }
        BenchCmd::Trace(a) => measure_trace(a)?,
        BenchCmd::Churn {
            clients,
            seconds,
            engine,
            policy,
            capacity,
            segment_size,
            out,
        } => {
            let dir = out.dir();
            let shape = tools::bench::ChurnShape {
                clients,
                seconds,
                capacity,
                segment_size,
            };
            let r = tools::bench::churn(&dir, &shape, engine, policy, &bar(out.json))?;
            let text = format!(
                "churn ({} clients, {:.1} s, capacity {} MiB, {:?}; compaction copied {:.2} bytes per byte frozen): {} freezes ({} refused), {:.2} GB/s vs raw write {:.2} GB/s  ratio {:.3}, vs the same writes and syncs bare {:.2} GB/s  ratio {:.3}; {} thaws, {} of evicted windows; {:.0} evictions; lookup p50 {:.0} us p99 {:.0} us; freeze round trip median {:.2} ms (mean {:.2}, p99 {:.2}), durable {:.2} (gather {:.2}, write {:.2}, commit {:.2})",
                r.clients, r.seconds, r.capacity >> 20, r.policy, r.copied_per_frozen, r.freezes, r.freeze_errors, r.freeze_gbps,
                r.raw_write_gbps, r.freeze_ratio, r.shaped_write_gbps, r.freeze_ratio_of_shaped, r.thaws, r.thaws_evicted, r.evictions,
                r.lookup_p50_us, r.lookup_p99_us, r.freeze_ms.round_trip, r.freeze_ms.round_trip_mean,
                r.freeze_ms.round_trip_p99, r.freeze_ms.durable,
                r.freeze_ms.gather, r.freeze_ms.write, r.freeze_ms.commit
            );
            (value(&r)?, text, out)
        }
        c @ BenchCmd::Remote { .. } => return measure_remote(c),
        BenchCmd::Recovery {
            records,
            engine,
            keep,
            out,
        } => {
            let dir = out.dir();
            let r =
                tools::bench::recovery(&dir, keep.as_deref(), records, engine, 32, &bar(out.json))
                    .map_err(|e| e.to_string())?;
            let text = format!(
                "recovery: {} records ({} windows, {} MiB) reopened in {:.3} s after a clean stop \
                 ({} segments checkpointed), {:.3} s after a kill, {:.3} s by a full scan",
                r.records,
                r.windows,
                r.log_bytes >> 20,
                r.open_seconds,
                r.checkpointed_segments,
                r.open_after_kill_seconds,
                r.open_full_scan_seconds
            );
            (value(&r)?, text, out)
        }
    })
}

/// The one-line summary of `cwm bench remote`.
/// `cwm bench remote`.
fn measure_remote(cmd: BenchCmd) -> Result<Measured, String> {
    let BenchCmd::Remote {
        bytes,
        block,
        max_value,
        remote,
        lookup_windows,
        out,
    } = cmd
    else {
        return Err("not a remote bench".into());
    };
    let r = tools::remote_bench::remote(
        &out.dir(),
        remote,
        (bytes, block, max_value),
        lookup_windows,
        &Progress::new(Mode::detect(out.json), ""),
    )?;
    Ok((value(&r)?, remote_text(&r), out))
}

fn remote_text(r: &tools::remote_bench::RemoteBench) -> String {
    format!(
        "remote ({} cluster): {} MiB in {} KiB blocks — push {:.2} GB/s vs raw SET {:.2} GB/s \
         (ratio {:.2}); pull {:.2} GB/s vs raw GET {:.2} GB/s (ratio {:.2}) and raw disk write \
         {:.2} GB/s (ratio to the slower {:.2}); fill {:.2} GB/s (ratio {:.2}); pull into the \
         engine as it arrives {} (pull, then thaw from the RAM tier: {}; from the disk: {}); \
         lookups over {} \
         stored prompts: hit p50 {:.3} / p99 {:.3} ms, first miss p99 {:.3} ms, remembered miss \
         p99 {:.3} ms, no tier p99 {:.3} ms",
        r.cluster,
        r.bytes >> 20,
        r.block_bytes >> 10,
        r.push_gbps,
        r.raw_set_gbps,
        r.push_ratio,
        r.pull_gbps,
        r.raw_get_gbps,
        r.pull_ratio,
        r.raw_disk_write_gbps,
        r.pull_ratio_of_slower,
        r.fill_gbps,
        r.fill_ratio,
        match (r.engine_pull_gbps, r.engine_pull_ratio) {
            (Some(g), Some(x)) => format!("{g:.2} GB/s (ratio {x:.2})"),
            _ => "not measured (block size)".into(),
        },
        r.engine_pull_via_ram_gbps
            .map_or("-".into(), |g| format!("{g:.2} GB/s")),
        r.engine_pull_from_disk_gbps
            .map_or("-".into(), |g| format!("{g:.2} GB/s")),
        r.lookup.windows,
        r.lookup.hit_p50_ms,
        r.lookup.hit_p99_ms,
        r.lookup.miss_p99_ms,
        r.lookup.cached_miss_p99_ms,
        r.lookup.local_only_p99_ms
    )
}

/// `cwm bench trace`: simulations at each capacity, the real store at some.
fn measure_trace(a: TraceArgs) -> Result<Measured, String> {
    let TraceArgs {
        trace,
        synthetic,
        requests,
        capacity_fraction,
        policy,
        replay_at,
        watermarks,
        out,
    } = a;
    let bar = |json: bool| Progress::new(Mode::detect(json), "");
    let marks = match watermarks[..] {
        [h, l] if 0.0 < l && l <= h && h <= 1.0 => (h, l),
        _ => return Err("--watermarks HIGH,LOW with 0 < LOW <= HIGH <= 1".into()),
    };
    let (name, reqs) = match (&trace, &synthetic) {
        (Some(p), _) => (p.display().to_string(), tools::trace::load(p)?),
        (None, Some(k)) => (
            format!("synthetic {k} ({requests} requests)"),
            tools::trace::synthetic(k, requests, 7)?,
        ),
        (None, None) => return Err("give --trace FILE or --synthetic KIND".into()),
    };
    let dir = out.dir();
    let plan = tools::trace::Plan {
        fractions: capacity_fraction,
        policy,
        replay_at,
        marks,
    };
    let r = tools::trace::bench(&name, &reqs, &plan, &dir, &bar(out.json))?;
    let mut text = format!(
        "trace {} ({} requests, {} unique blocks, {} prompt blocks); prefix hit ratio (blocks):\n  capacity   lru(window) s3fifo(window) fifo(window) lru(block) belady",
        r.trace, r.requests, r.unique_blocks, r.prompt_blocks
    );
    for p in &r.points {
        text.push_str(&format!(
            "\n  {:>7.1}%   {:>11.3} {:>14.3} {:>12.3} {:>10.3} {:>6.3}",
            p.capacity_fraction * 100.0,
            p.lru.block_ratio,
            p.s3fifo.block_ratio,
            p.fifo.block_ratio,
            p.block_lru.block_ratio,
            p.belady.block_ratio
        ));
        if let Some(s) = &p.store {
            text.push_str(&format!(
                "  | store ({:?}): {:.3}, {} evicted, {:.0} saves/s, lookup p50 {:.0} us p99 {:.0} us",
                r.policy, s.hits.block_ratio, s.evicted, s.saves_per_sec, s.lookup_p50_us, s.lookup_p99_us
            ));
        }
    }
    Ok((value(&r)?, text, out))
}

/// `cwm plot REPORT.json… --out FILE.svg`: draws saved reports (`cwm bench … --json`,
/// `cwm gpu-check`, `scripts/gpu-check.sh`'s JSON); several reports go into one file, their
/// figures side by side.
pub(crate) fn plot(reports: &[PathBuf], out: &std::path::Path) -> Result<(), String> {
    let mut titles = Vec::new();
    let mut figs = Vec::new();
    for p in reports {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let (t, f) = tools::plot::figures(&v).map_err(|e| format!("{}: {e}", p.display()))?;
        titles.push(t);
        figs.extend(f);
    }
    tools::plot::draw(out, &titles.join("; "), &figs)
}

/// `cwm gpu-check MODE --spec FILE`.
pub(crate) fn gpu_check(
    mode: &str,
    spec: &std::path::Path,
    dir: Option<PathBuf>,
) -> Result<(), String> {
    let text = std::fs::read_to_string(spec).map_err(|e| format!("{}: {e}", spec.display()))?;
    let spec: tools::gpucheck::Spec =
        serde_json::from_str(&text).map_err(|e| format!("spec: {e}"))?;
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let out = match mode {
        "run" => tools::gpucheck::run(&spec, &dir)?,
        "bench" => tools::gpucheck::bench(&spec, &dir)?,
        m => return Err(format!("unknown mode {m:?}: use run or bench")),
    };
    print_json(&out);
    Ok(())
}
