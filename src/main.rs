//! The `cwm` command line: demo, benchmarks (and later the daemon and its client).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cwm::io::EngineKind;

mod demo;

/// cwm — Context Window Manager: durable, verifiable KV-cache windows for vLLM.
#[derive(Parser)]
#[command(name = "cwm", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a synthetic window into a temporary data dir, reopen, thaw and verify it.
    Demo(demo::DemoArgs),
    /// Benchmarks against ceilings measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run the sidecar daemon on a Unix socket (foreground; SIGTERM/SIGINT stop it cleanly).
    Serve(ServeArgs),
    /// List windows.
    Ls(ClientArgs),
    /// Show one window.
    Stat {
        /// Window name.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Delete a window.
    Rm {
        /// Window name (with --cascade: a session name).
        name: String,
        /// NAME is a session: delete it and every window frozen from it.
        #[arg(long)]
        cascade: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Freeze what a session holds (as its engine last reported) into a window.
    Freeze {
        /// Session.
        #[arg(long)]
        session: String,
        /// Window name.
        #[arg(long)]
        window: String,
        /// Replace an existing window of that name.
        #[arg(long)]
        replace: bool,
        /// The request's namespace salt (a LoRA adapter, a tenant: docs/PROTOCOL.md).
        #[arg(long)]
        salt: Option<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Thaw a window into the blocks a session's engine allocated (or into --block-ids).
    Thaw {
        /// Window name.
        window: String,
        /// Session to thaw into.
        #[arg(long)]
        session: Option<String>,
        /// Engine (default: the session's).
        #[arg(long)]
        engine: Option<String>,
        /// Destination block ids, comma-separated (default: the session's).
        #[arg(long, value_delimiter = ',')]
        block_ids: Option<Vec<u64>>,
        /// The namespace salt the window was frozen with.
        #[arg(long)]
        salt: Option<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Verify a data directory offline (the daemon must not be running on it).
    Fsck {
        /// Data directory.
        #[arg(long, env = "CWM_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Repair: set aside segments that cannot be opened, delete windows that cannot be
        /// read (tombstones), rewrite segments holding damage, and print exactly what changed.
        #[arg(long)]
        repair: bool,
        /// Size of the segments repair writes (the daemon's --segment-size).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        segment_size: u64,
    },
    /// Reclaim space: copy live records out of sparse segments and delete them. Offline with
    /// --data-dir, else through the daemon's socket.
    Compact {
        /// Data directory (offline; the daemon must not be running on it).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Compact segments whose live fraction is below this (1.0: any garbage).
        #[arg(long, default_value_t = 0.5)]
        live_ratio: f64,
        /// Most bytes copied per second (0: unlimited), e.g. 200MiB.
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Ask the daemon to read and verify every window now (one scrub pass).
    Scrub {
        /// Most bytes read per second (0: unlimited).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Crash torture: run `cwm serve`, drive random freezes/thaws/deletes/compactions, SIGKILL
    /// it at random moments, restart, and verify everything acknowledged.
    Torture {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop after this many restart cycles (0: only --seconds bounds the run).
        #[arg(long, default_value_t = 0)]
        cycles: u64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Data directory (default: a fresh temporary one).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Kills land at most this many ms after an op phase starts.
        #[arg(long, default_value_t = 150)]
        kill_max_ms: u64,
        /// Instead of kills: the damage sweep. Builds a directory of --windows windows, then
        /// zeroes, randomises and bit-flips every 4 KiB page of every file in turn, reopening
        /// and checking that nothing is lost, resurrected or reverted and the damage reported.
        #[arg(long)]
        damage: bool,
        /// Windows of the damage sweep.
        #[arg(long, default_value_t = 56)]
        windows: usize,
        /// Damage every n-th page only (damage sweep).
        #[arg(long, default_value_t = 1)]
        stride: usize,
    },
    /// Ask the daemon whether it is healthy.
    Health(ClientArgs),
    /// Print the daemon's Prometheus metrics.
    Metrics(ClientArgs),
    /// The Rust half of scripts/gpu-check.sh (CUDA IPC import, freeze/thaw, measurements).
    GpuCheck {
        /// `run` (freeze + thaw for a bit-exact check) or `bench` (measurements).
        mode: String,
        /// Spec file written by scripts/gpu_check.py.
        #[arg(long)]
        spec: PathBuf,
        /// Directory for the store and raw-disk files.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("cwm.sock"),
        None => PathBuf::from("/run/cwm/cwm.sock"),
    }
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Socket of the daemon.
    #[arg(long, env = "CWM_SOCKET", default_value_os_t = default_socket())]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (flags win over environment variables, which win over it).
    #[arg(long, env = "CWM_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (the block log).
    #[arg(long, env = "CWM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Socket path.
    #[arg(long, env = "CWM_SOCKET", default_value_os_t = default_socket())]
    socket: PathBuf,
    /// Capacity of the log (e.g. 500GiB).
    #[arg(long, env = "CWM_CAPACITY", value_parser = parse_size)]
    capacity: Option<u64>,
    /// Segment size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    segment_size: u64,
    /// I/O engine: uring or psync.
    #[arg(long, env = "CWM_IO_ENGINE", default_value = "uring")]
    io_engine: EngineKind,
    /// io_uring queue depth.
    #[arg(long, default_value_t = 32)]
    queue_depth: u32,
    /// Staging pool per registered engine.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    staging: u64,
    /// RAM tier size (0: off).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    tier: u64,
    /// Threads verifying a thaw from the RAM tier while it is copied (0: one per core, at
    /// most 8).
    #[arg(long, env = "CWM_VERIFY_THREADS", default_value_t = 0)]
    verify_threads: usize,
    /// Directory shared-memory KV files must live in.
    #[arg(long, env = "CWM_SHM_DIR", default_value = "/dev/shm")]
    shm_dir: PathBuf,
    /// Longest accepted request line.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    max_line: u64,
    /// Extra uids allowed to connect (the server's own uid always is).
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Most sessions in ACTIVE at once.
    #[arg(long, env = "CWM_MAX_SESSIONS", default_value_t = 100)]
    max_sessions: usize,
    /// Serve Prometheus metrics over HTTP at this address (e.g. 127.0.0.1:9464); off by default.
    #[arg(long, env = "CWM_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Most freezes and thaws running at once (more get BUSY).
    #[arg(long, env = "CWM_MAX_OPS", default_value_t = 64)]
    max_ops: usize,
    /// Log format on stderr: text or json (level from CWM_LOG).
    #[arg(long, env = "CWM_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Background compaction: segments whose live fraction is below this are compacted.
    #[arg(long, env = "CWM_COMPACT_LIVE_RATIO", default_value_t = 0.5)]
    compact_live_ratio: f64,
    /// Background compaction: most bytes copied per second (0: unlimited).
    #[arg(long, env = "CWM_COMPACT_RATE", default_value = "256MiB", value_parser = parse_size)]
    compact_rate: u64,
    /// Seconds between background compaction passes (0: off).
    #[arg(long, env = "CWM_COMPACT_INTERVAL", default_value_t = 10)]
    compact_interval: u64,
    /// Seconds between background scrub passes (0: off, the default).
    #[arg(long, env = "CWM_SCRUB_INTERVAL", default_value_t = 0)]
    scrub_interval: u64,
    /// Most bytes per second a scrub reads (0: unlimited).
    #[arg(long, env = "CWM_SCRUB_RATE", default_value = "64MiB", value_parser = parse_size)]
    scrub_rate: u64,
}

/// A size in a TOML file: an integer of bytes or a string such as "500GiB".
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SizeVal {
    N(u64),
    S(String),
}

impl SizeVal {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeVal::N(n) => Ok(*n),
            SizeVal::S(s) => parse_size(s),
        }
    }
}

/// `cwm serve`'s TOML file: the same names as the flags, with `_` for `-`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    capacity: Option<SizeVal>,
    segment_size: Option<SizeVal>,
    io_engine: Option<String>,
    queue_depth: Option<u32>,
    staging: Option<SizeVal>,
    tier: Option<SizeVal>,
    verify_threads: Option<usize>,
    shm_dir: Option<PathBuf>,
    max_line: Option<SizeVal>,
    allow_uids: Option<Vec<u32>>,
    max_sessions: Option<usize>,
    metrics_addr: Option<String>,
    max_ops: Option<usize>,
    compact_live_ratio: Option<f64>,
    compact_rate: Option<SizeVal>,
    compact_interval: Option<u64>,
    scrub_interval: Option<u64>,
    scrub_rate: Option<SizeVal>,
}

/// Fills every setting that came neither from a flag nor from the environment from the TOML
/// file.
fn apply_config_file(a: &mut ServeArgs, m: &clap::ArgMatches) -> Result<(), String> {
    let Some(path) = a.config.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: FileConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let from_file = |id: &str| {
        !matches!(
            m.value_source(id),
            Some(clap::parser::ValueSource::CommandLine)
                | Some(clap::parser::ValueSource::EnvVariable)
        )
    };
    let size = |v: &Option<SizeVal>| v.as_ref().map(SizeVal::bytes).transpose();
    // A key of the file applies unless its flag or environment variable was given:
    // `take!(key)` for plain values, `take!(key, size)` for sizes; `|v| expr` maps the value.
    macro_rules! take {
        ($k:ident) => {
            take!($k, |v| v)
        };
        ($k:ident, size) => {
            take!($k, size, |v| v)
        };
        ($k:ident, |$v:ident| $e:expr) => {
            if from_file(stringify!($k)) {
                if let Some($v) = f.$k {
                    a.$k = $e;
                }
            }
        };
        ($k:ident, size, |$v:ident| $e:expr) => {
            if from_file(stringify!($k)) {
                if let Some($v) = size(&f.$k)? {
                    a.$k = $e;
                }
            }
        };
    }
    take!(data_dir, |v| Some(v));
    take!(socket);
    take!(capacity, size, |v| Some(v));
    take!(segment_size, size);
    take!(io_engine, |v| v.parse()?);
    take!(queue_depth);
    take!(staging, size);
    take!(tier, size);
    take!(verify_threads);
    take!(shm_dir);
    take!(max_line, size);
    take!(allow_uids);
    take!(max_sessions);
    take!(max_ops);
    take!(metrics_addr, |v| Some(v));
    take!(compact_live_ratio);
    take!(compact_rate, size);
    take!(compact_interval);
    take!(scrub_interval);
    take!(scrub_rate, size);
    Ok(())
}

fn serve(mut a: ServeArgs, m: &clap::ArgMatches) -> Result<(), String> {
    apply_config_file(&mut a, m)?;
    cwm::log::init(a.log_format == "json");
    let data_dir = a.data_dir.clone().ok_or(
        "no data directory: pass --data-dir, set CWM_DATA_DIR or data_dir in the config file",
    )?;
    // Block SIGINT/SIGTERM in every thread; one thread waits for them.
    // SAFETY: plain signal-mask manipulation before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut cfg = cwm::store::StoreConfig::new(&data_dir);
    cfg.segment_size = a.segment_size;
    cfg.capacity = a.capacity.unwrap_or(u64::MAX);
    cfg.engine = a.io_engine;
    cfg.queue_depth = a.queue_depth;
    let (store, report) = cwm::store::Store::open(cfg).map_err(|e| e.to_string())?;
    cwm::log::info(&format!(
        "store open: {} windows, {} records, {} torn tails cut",
        report.windows,
        report.records,
        report.torn_tails.len()
    ));
    let damage = report.damaged_records.len()
        + report.damaged_regions.len()
        + report.incomplete_windows.len();
    if damage > 0 {
        cwm::log::warn(&format!(
            "store open: {damage} damaged records, regions or lost windows (see `cwm health`; \
             `cwm fsck --repair` with the daemon stopped removes them)"
        ));
    }
    let server = cwm::control::Server::new(
        std::sync::Arc::new(store),
        cwm::control::ServeConfig {
            socket: a.socket,
            allow_uids: a.allow_uids,
            shm_dir: a.shm_dir,
            max_line: a.max_line as usize,
            pipeline: cwm::pipeline::PipelineConfig {
                staging_bytes: a.staging,
                verify_threads: match a.verify_threads {
                    0 => cwm::pipeline::default_verify_threads(),
                    n => n,
                },
                ..Default::default()
            },
            tier_bytes: a.tier,
            max_sessions: a.max_sessions,
            metrics_addr: a.metrics_addr,
            max_ops: a.max_ops,
            maintenance: cwm::control::maint::Maintenance {
                compact: cwm::store::CompactOptions {
                    live_ratio: a.compact_live_ratio,
                    rate: a.compact_rate,
                    ..Default::default()
                },
                compact_interval_s: a.compact_interval,
                scrub_interval_s: a.scrub_interval,
                scrub_rate: a.scrub_rate,
            },
        },
    );
    server.opened(&report);
    let s2 = server.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waiting on the blocked set.
        unsafe { libc::sigwait(&set, &mut sig) };
        cwm::log::info(&format!("signal {sig}: stopping"));
        s2.stop();
    });
    server.serve().map_err(|e| format!("serve: {e}"))?;
    // Freezes and thaws still running finish (a captured freeze holds the only copy of its
    // blocks: the engine has reused them).
    let left = server.drain(std::time::Duration::from_secs(30));
    if left > 0 {
        cwm::log::warn(&format!(
            "stopping with {left} freezes or thaws still running"
        ));
    }
    cwm::log::info("stopped");
    Ok(())
}

fn fsck_repair(data_dir: &std::path::Path, json: bool, segment_size: u64) -> ExitCode {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal() && !json;
    let progress = |stage: &str, done: usize, total: usize| {
        if tty {
            eprint!("\r\x1b[K  {stage} {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    };
    let mut cfg = cwm::store::StoreConfig::new(data_dir);
    cfg.segment_size = segment_size;
    match cwm::fsck::repair(cfg, &progress) {
        Ok(r) => {
            if json {
                print_json(&r);
            } else {
                if r.changes.is_empty() {
                    println!("nothing to repair");
                }
                for c in &r.changes {
                    println!("{c}");
                }
                println!(
                    "after repair: {} windows ok, {}",
                    r.after.windows.iter().filter(|w| w.status == "ok").count(),
                    if r.after.clean() {
                        "clean"
                    } else {
                        "STILL NOT CLEAN"
                    }
                );
            }
            if r.after.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(5)
            }
        }
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::from(if e.code() == "BUSY" { 4 } else { 1 })
        }
    }
}

fn compact_cmd(data_dir: Option<PathBuf>, live_ratio: f64, rate: u64, c: &ClientArgs) -> ExitCode {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal() && !c.json;
    let bar = |done: u64, total: u64, bytes: u64| {
        if tty {
            eprint!(
                "\r\x1b[K  compacting: {done}/{total} segments, {:.1} MiB copied",
                bytes as f64 / 1048576.0
            );
        }
    };
    let opts = cwm::store::CompactOptions {
        live_ratio,
        rate,
        ..Default::default()
    };
    let report = if let Some(dir) = data_dir {
        let (store, _) = match cwm::store::Store::open(cwm::store::StoreConfig::new(&dir)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cwm: {e}");
                return ExitCode::from(if e.code() == "BUSY" { 4 } else { 1 });
            }
        };
        match store.compact(&opts, &mut |p| {
            bar(
                p.segments_done as u64,
                p.segments_total as u64,
                p.bytes_copied,
            )
        }) {
            Ok(r) => serde_json::json!({"ok": true, "report": r}),
            Err(e) => {
                eprintln!("cwm: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let mut cl = match cwm::control::client::Client::connect(&c.socket) {
            Ok(cl) => cl,
            Err(e) => {
                eprintln!(
                    "cwm: cannot reach cwm at {}: {e} (is `cwm serve` running?)",
                    c.socket.display()
                );
                return ExitCode::from(1);
            }
        };
        let req =
            serde_json::json!({"op": "compact", "id": 1, "live_ratio": live_ratio, "rate": rate});
        if let Err(e) = cl.send_raw(req.to_string().as_bytes()) {
            eprintln!("cwm: {e}");
            return ExitCode::from(1);
        }
        loop {
            match cl.read_line() {
                Ok(v) if v["final"].as_bool() == Some(true) => break v,
                Ok(v) => bar(
                    v.pointer("/progress/segments_done")
                        .and_then(|x| x.as_u64())
                        .unwrap_or(0),
                    v.pointer("/progress/segments_total")
                        .and_then(|x| x.as_u64())
                        .unwrap_or(0),
                    v.pointer("/progress/bytes_copied")
                        .and_then(|x| x.as_u64())
                        .unwrap_or(0),
                ),
                Err(e) => {
                    eprintln!("cwm: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    if tty {
        eprintln!();
    }
    let code = cwm::control::client::exit_code(&report);
    if c.json {
        println!("{report}");
    } else if code == 0 {
        let r = &report["report"];
        println!(
            "compacted: segments {} deleted, {:.1} MiB copied, {:.1} MiB given back in {:.2} s",
            r["segments_removed"],
            r["bytes_copied"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["bytes_reclaimed"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["seconds"].as_f64().unwrap_or(0.0)
        );
    } else {
        eprintln!(
            "cwm: {}",
            report["error"]["message"]
                .as_str()
                .unwrap_or("compaction failed")
        );
    }
    ExitCode::from(code as u8)
}

fn client_call(c: &ClientArgs, req: serde_json::Value) -> Result<serde_json::Value, String> {
    let mut cl = cwm::control::client::Client::connect(&c.socket).map_err(|e| {
        format!(
            "cannot reach cwm at {}: {e} (is `cwm serve` running?)",
            c.socket.display()
        )
    })?;
    cl.call_final(req).map_err(|e| e.to_string())
}

fn client(c: &ClientArgs, req: serde_json::Value, table: impl Fn(&serde_json::Value)) -> ExitCode {
    match client_call(c, req) {
        Ok(v) => {
            let code = cwm::control::client::exit_code(&v);
            if c.json {
                println!("{v}");
            } else if code == 0 {
                table(&v);
            } else {
                eprintln!(
                    "cwm: {}: {}",
                    v.pointer("/error/code")
                        .and_then(|x| x.as_str())
                        .unwrap_or("ERROR"),
                    v.pointer("/error/message")
                        .and_then(|x| x.as_str())
                        .unwrap_or("")
                );
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::from(1)
        }
    }
}

fn window_row(w: &serde_json::Value) -> String {
    format!(
        "{:<32} {:>4} {:>9} {:>7} {:>10.1} {}",
        w["name"].as_str().unwrap_or(""),
        // Value's Display ignores widths: format the numbers themselves.
        w["version"].as_u64().unwrap_or(0),
        w["num_tokens"].as_u64().unwrap_or(0),
        w["num_blocks"].as_u64().unwrap_or(0),
        w["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        w["session"].as_str().unwrap_or("")
    )
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Store write/read throughput vs raw O_DIRECT write/read of the same bytes.
    Store {
        /// Bytes per run (e.g. 2GiB).
        #[arg(long, default_value = "2GiB", value_parser = parse_size)]
        bytes: u64,
        /// Block payload bytes (2MiB = one 16-token block of a Llama-3.1-8B KV cache).
        #[arg(long, default_value = "2MiB", value_parser = parse_size)]
        block_bytes: u64,
        /// Directory for the benchmark files (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Queue depth.
        #[arg(long, default_value_t = 32)]
        queue_depth: u32,
        /// Runs (figures are medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Host-backend freeze/thaw throughput vs raw O_DIRECT write/read of the same bytes.
    Pipeline {
        /// Session length in tokens (Llama-3.1-8B shape, 2 MiB per 16-token block).
        #[arg(long, default_value_t = 16_384)]
        tokens: u32,
        /// Directory for the benchmark files (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Runs (figures are medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Control-socket latency (stat, list) against many windows, and freeze/thaw round trips.
    Control {
        /// Windows in the store.
        #[arg(long, default_value_t = 10_000)]
        windows: u64,
        /// Directory for the benchmark files (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// fsck vs raw read, compaction throughput, freeze throughput with vs without compaction.
    Compaction {
        /// Bytes populated (windows of 8 x 256 KiB blocks).
        #[arg(long, default_value = "512MiB", value_parser = parse_size)]
        bytes: u64,
        /// Rate limit of the compaction that runs beside the foreground freezes (0: unlimited).
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        compact_rate: u64,
        /// Directory for the benchmark files (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Reopen time of a log of many small records.
    Recovery {
        /// Records in the log.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// Directory for the benchmark files (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// I/O engine: uring or psync.
        #[arg(long, default_value = "uring")]
        engine: EngineKind,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `123`, `4KiB`, `2MiB`, `2GiB`, `1G`, `512M` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cwm: cannot encode JSON: {e}"),
    }
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let header = format!(
        "{:<32} {:>4} {:>9} {:>7} {:>10} SESSION",
        "WINDOW", "VER", "TOKENS", "BLOCKS", "MIB"
    );
    let res: Result<(), String> = match cli.cmd {
        Cmd::Serve(a) => {
            let empty = clap::ArgMatches::default();
            serve(a, matches.subcommand_matches("serve").unwrap_or(&empty))
        }
        Cmd::Ls(c) => {
            return client(&c, serde_json::json!({"op": "list"}), |v| {
                println!("{header}");
                for w in v["windows"].as_array().into_iter().flatten() {
                    println!("{}", window_row(w));
                }
            })
        }
        Cmd::Stat { name, c } => {
            return client(&c, serde_json::json!({"op": "stat", "window": name}), |v| {
                println!("{header}\n{}", window_row(&v["window"]));
            })
        }
        Cmd::Rm {
            name,
            cascade: true,
            c,
        } => {
            return client(
                &c,
                serde_json::json!({"op": "session.delete", "session": name, "cascade": true}),
                |v| {
                    println!(
                        "deleted session {} and windows {}",
                        v["session"].as_str().unwrap_or(""),
                        v["windows_deleted"]
                    );
                },
            )
        }
        Cmd::Rm {
            name,
            cascade: false,
            c,
        } => {
            return client(
                &c,
                serde_json::json!({"op": "delete", "window": name}),
                |v| {
                    println!(
                        "deleted {} v{}",
                        v["deleted"]["name"].as_str().unwrap_or(""),
                        v["deleted"]["version"]
                    );
                },
            )
        }
        Cmd::Freeze {
            session,
            window,
            replace,
            salt,
            c,
        } => {
            return client(
                &c,
                serde_json::json!({"op": "freeze", "session": session, "window": window, "replace": replace, "salt": salt}),
                |v| {
                    println!(
                        "froze {} v{}: {} tokens, {} blocks, {:.1} MiB",
                        v["window"]["name"].as_str().unwrap_or(""),
                        v["window"]["version"],
                        v["window"]["num_tokens"],
                        v["window"]["num_blocks"],
                        v["window"]["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                    );
                },
            )
        }
        Cmd::Thaw {
            window,
            session,
            engine,
            block_ids,
            salt,
            c,
        } => {
            let mut req = serde_json::json!({"op": "thaw", "window": window, "salt": salt});
            if let Some(s) = session {
                req["session"] = s.into();
            }
            if let Some(e) = engine {
                req["engine"] = e.into();
            }
            if let Some(b) = block_ids {
                req["block_ids"] = b.into();
            }
            return client(&c, req, |v| {
                let r = &v["report"];
                println!(
                    "thawed {}: {} of {} blocks, {} tokens restored, {} to recompute{}",
                    r["window"].as_str().unwrap_or(""),
                    r["blocks_restored"],
                    r["num_blocks"],
                    r["tokens_restored"],
                    r["tokens_to_recompute"],
                    r["corruption"]
                        .as_str()
                        .map(|c| format!(" (corruption: {c})"))
                        .unwrap_or_default()
                );
            });
        }
        Cmd::Fsck {
            data_dir,
            json,
            repair: true,
            segment_size,
        } => return fsck_repair(&data_dir, json, segment_size),
        Cmd::Compact {
            data_dir,
            live_ratio,
            rate,
            c,
        } => return compact_cmd(data_dir, live_ratio, rate, &c),
        Cmd::Scrub { rate, c } => {
            return client(&c, serde_json::json!({"op": "scrub", "rate": rate}), |v| {
                for w in v["windows"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<8} {}",
                        w["name"].as_str().unwrap_or(""),
                        w["status"].as_str().unwrap_or(""),
                        w["detail"].as_str().unwrap_or("")
                    );
                }
                println!(
                    "{} problems; {:.1} MiB verified",
                    v["problems"],
                    v["bytes_verified"].as_f64().unwrap_or(0.0) / 1048576.0
                );
            })
        }
        Cmd::Torture {
            damage: true,
            seed,
            data_dir,
            windows,
            stride,
            ..
        } => {
            let cfg = cwm::damage::DamageConfig {
                windows,
                seed,
                stride,
                dir: data_dir,
                ..Default::default()
            };
            return match cwm::damage::run(&cfg) {
                Ok(s) => {
                    println!(
                        "damage sweep: files={} pages={} cases={} windows_checked={} partial={} lost={} resurrected={} reverted={} wrong_bytes={} unreported={} refused_opens={}",
                        s.files, s.pages, s.cases, s.windows_checked, s.partial_windows, s.lost,
                        s.resurrected, s.reverted, s.wrong_bytes, s.unreported, s.refused_opens
                    );
                    for f in &s.failures {
                        eprintln!("  {f}");
                    }
                    if s.clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("cwm: torture --damage: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Cmd::Torture {
            seconds,
            cycles,
            seed,
            data_dir,
            kill_max_ms,
            ..
        } => {
            let cfg = cwm::torture::TortureConfig {
                seconds,
                max_cycles: cycles,
                seed,
                data_dir,
                kill_max_ms,
            };
            return match cwm::torture::run(&cfg) {
                Ok(s) => {
                    println!(
                        "torture: cycles={} kills={} windows_verified={} violations={}",
                        s.cycles, s.kills, s.windows_verified, s.violations
                    );
                    eprintln!(
                        "torture: kills during recovery={} freezes acknowledged={} deletes acknowledged={} compactions={}",
                        s.kills_in_recovery, s.freezes_acked, s.deletes_acked, s.compactions
                    );
                    if s.violations == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("cwm: torture: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Cmd::Fsck {
            data_dir,
            json,
            repair: false,
            ..
        } => {
            use std::io::IsTerminal;
            let tty = std::io::stderr().is_terminal() && !json;
            let progress = |done: usize, total: usize| {
                if tty {
                    eprint!("\r  verifying {done}/{total} windows");
                    if done == total {
                        eprintln!();
                    }
                }
            };
            return match cwm::fsck::check(cwm::store::StoreConfig::new(&data_dir), &progress) {
                Ok(r) => {
                    if json {
                        print_json(&r);
                    } else {
                        println!("{:<32} {:>8} {:>8}  STATUS", "WINDOW", "BLOCKS", "INTACT");
                        for w in &r.windows {
                            println!(
                                "{:<32} {:>8} {:>8}  {}{}",
                                w.name,
                                w.blocks,
                                w.intact_blocks,
                                w.status,
                                w.detail
                                    .as_deref()
                                    .map(|d| format!(" ({d})"))
                                    .unwrap_or_default()
                            );
                        }
                        for l in &r.lost {
                            println!(
                                "{l:<32} {:>8} {:>8}  a block record was lost to damage (thaws up to it)",
                                "-", "-"
                            );
                        }
                        for (seg, from, to, why) in &r.recovery.damaged_regions {
                            println!("damaged: segment {seg} bytes {from}..{to}: {why}");
                        }
                        for p in &r.log_problems {
                            println!(
                                "damaged: segment {} offset {}: {}",
                                p.segment, p.offset, p.what
                            );
                        }
                        println!(
                            "{} windows, {:.1} MiB verified in {:.2} s; torn tails cut: {}, damaged regions: {}, log problems: {}",
                            r.windows.len(),
                            r.bytes_verified as f64 / 1048576.0,
                            r.seconds,
                            r.recovery.torn_tails.len(),
                            r.recovery.damaged_regions.len(),
                            r.log_problems.len()
                        );
                    }
                    if r.clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(5)
                    }
                }
                Err(e) => {
                    eprintln!("cwm: {e}");
                    ExitCode::from(if e.code() == "BUSY" { 4 } else { 1 })
                }
            };
        }
        Cmd::Health(c) => {
            return client(&c, serde_json::json!({"op": "health"}), |v| {
                println!(
                    "{}: {} windows, {} bytes used, io engine {}",
                    v["status"].as_str().unwrap_or("ok"),
                    v["windows"],
                    v["used_bytes"],
                    v["io_engine"].as_str().unwrap_or("")
                );
                // EC-051: what is known to be damaged, and what to do (the daemon is up and
                // serving, so the exit status stays 0).
                let problems = v["integrity"]["problems"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for p in &problems {
                    println!(
                        "  damaged ({}): {}",
                        p["source"].as_str().unwrap_or(""),
                        p["what"].as_str().unwrap_or("")
                    );
                }
                if let Some(r) = v["integrity"]["recovery"].as_str() {
                    println!("  what to do: {r}");
                }
            });
        }
        Cmd::Metrics(c) => {
            return client(&c, serde_json::json!({"op": "metrics"}), |v| {
                print!("{}", v["text"].as_str().unwrap_or(""));
            })
        }
        Cmd::Demo(a) => demo::run(&a),
        Cmd::GpuCheck { mode, spec, dir } => (|| {
            let text =
                std::fs::read_to_string(&spec).map_err(|e| format!("{}: {e}", spec.display()))?;
            let spec: cwm::gpucheck::Spec =
                serde_json::from_str(&text).map_err(|e| format!("spec: {e}"))?;
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            let out = match mode.as_str() {
                "run" => cwm::gpucheck::run(&spec, &dir)?,
                "bench" => cwm::gpucheck::bench(&spec, &dir)?,
                m => return Err(format!("unknown mode {m:?}: use run or bench")),
            };
            print_json(&out);
            Ok(())
        })(),
        Cmd::Bench(BenchCmd::Store {
            bytes,
            block_bytes,
            dir,
            engine,
            queue_depth,
            runs,
            json,
        }) => {
            let args = cwm::bench::StoreBenchArgs {
                dir: dir.unwrap_or_else(std::env::temp_dir),
                bytes,
                block_bytes,
                engine,
                queue_depth,
                runs,
            };
            cwm::bench::store(&args).map_err(|e| e.to_string()).map(|r| {
                if json {
                    print_json(&r);
                } else {
                    println!(
                        "store ({} QD{}, {} MiB in {} KiB blocks, median of {}):\n  write {:.2} GB/s vs raw {:.2} GB/s  ratio {:.3}\n  read  {:.2} GB/s vs raw {:.2} GB/s  ratio {:.3}\n  reopen {:.3} s",
                        r.engine, r.queue_depth, r.bytes >> 20, r.block_bytes >> 10, r.runs,
                        r.write_gbps, r.raw_write_gbps, r.write_ratio,
                        r.read_gbps, r.raw_read_gbps, r.read_ratio, r.reopen_seconds
                    );
                }
            })
        }
        Cmd::Bench(BenchCmd::Pipeline {
            tokens,
            dir,
            engine,
            runs,
            json,
        }) => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            cwm::bench::pipeline(&dir, tokens, engine, runs).map(|r| {
                if json {
                    print_json(&r);
                } else {
                    println!(
                        "pipeline ({} tokens, {} MiB, {}):\n  freeze {:.2} GB/s vs raw write {:.2} GB/s  ratio {:.3}\n  thaw   {:.2} GB/s vs raw read  {:.2} GB/s  ratio {:.3}\n  thaw from the RAM tier {:.2} GB/s vs bare scatter {:.2} GB/s  ratio {:.3} (verification alone {:.2} GB/s on {} threads)\n  a 512-token freeze started during a freeze of the window: captured at {:.3} s, durable at {:.3} s (the window: durable at {:.3} s)",
                        r.tokens, r.bytes >> 20, r.engine, r.freeze_gbps, r.raw_write_gbps, r.freeze_ratio,
                        r.thaw_gbps, r.raw_read_gbps, r.thaw_ratio,
                        r.tier_thaw_gbps, r.tier_scatter_gbps, r.tier_ratio, r.tier_verify_gbps, r.verify_threads,
                        r.behind.0, r.behind.1, r.behind.2
                    );
                }
            })
        }
        Cmd::Bench(BenchCmd::Control { windows, dir, json }) => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            cwm::bench::control(&dir, windows).map(|r| {
                if json {
                    print_json(&r);
                } else {
                    println!(
                        "control ({} windows): stat p50 {:.0} us p99 {:.0} us; list p50 {:.0} us p99 {:.0} us; {:.0} freeze+thaw round trips/s",
                        r.windows, r.stat_p50_us, r.stat_p99_us, r.list_p50_us, r.list_p99_us, r.freeze_thaw_per_sec
                    );
                }
            })
        }
        Cmd::Bench(BenchCmd::Compaction {
            bytes,
            compact_rate,
            dir,
            engine,
            json,
        }) => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            cwm::bench::compaction(&dir, bytes, engine, compact_rate)
                .map_err(|e| e.to_string())
                .map(|r| {
                    if json {
                        print_json(&r);
                    } else {
                        println!(
                            "fsck {:.2} GB/s vs raw read {:.2} GB/s ({:.0}%); compaction {:.2} GB/s ({} MiB copied, {} MiB given back)",
                            r.fsck_gbps,
                            r.raw_read_gbps,
                            r.fsck_vs_raw * 100.0,
                            r.compaction_gbps,
                            r.compaction_copied_bytes >> 20,
                            r.compaction_reclaimed_bytes >> 20
                        );
                        println!(
                            "freeze alone {:.2} GB/s, during compaction at {} MiB/s {:.2} GB/s (ratio {:.2}; compaction ran {:.2} s of the freezes' {:.2} s)",
                            r.freeze_alone_gbps,
                            r.compaction_rate >> 20,
                            r.freeze_during_compaction_gbps,
                            r.freeze_ratio,
                            r.concurrent_compaction_seconds,
                            r.concurrent_freeze_seconds
                        );
                    }
                })
        }
        Cmd::Bench(BenchCmd::Recovery {
            records,
            dir,
            engine,
            json,
        }) => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            cwm::bench::recovery(&dir, records, engine, 32)
                .map_err(|e| e.to_string())
                .map(|r| {
                    if json {
                        print_json(&r);
                    } else {
                        println!(
                            "recovery: {} records ({} windows, {} MiB) reopened in {:.3} s",
                            r.records,
                            r.windows,
                            r.log_bytes >> 20,
                            r.open_seconds
                        );
                    }
                })
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("").is_err());
    }
}
