//! `cwm serve`: the daemon's configuration (file, environment, flags) and its start.

use std::path::PathBuf;

use cwm::io::EngineKind;

use crate::{default_socket, parse_size};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
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
    /// Files of compacted segments kept for new segments to be written into (an overwrite is
    /// cheaper than filling a fresh preallocated file); disk space outside --capacity. 0: off.
    #[arg(long, env = "CWM_RECYCLE_SEGMENTS", default_value_t = 4)]
    recycle_segments: usize,
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
    /// Most client connections at once (more are answered BUSY and closed).
    #[arg(long, env = "CWM_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Most engines registered at once (each keeps a staging pool; more get BUSY).
    #[arg(long, env = "CWM_MAX_ENGINES", default_value_t = 64)]
    max_engines: usize,
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
    /// Order in which unnamed windows are evicted: lru, s3fifo or fifo.
    #[arg(long, env = "CWM_EVICTION_POLICY", default_value = "lru")]
    eviction_policy: cwm::store::EvictionPolicy,
    /// Eviction starts when live bytes pass this fraction of the budget (--capacity, or
    /// --fs-fraction of the file system)…
    #[arg(long, env = "CWM_HIGH_WATERMARK", default_value_t = 0.95)]
    high_watermark: f64,
    /// …and evicts unnamed windows down to this fraction.
    #[arg(long, env = "CWM_LOW_WATERMARK", default_value_t = 0.90)]
    low_watermark: f64,
    /// Without --capacity, the budget is this fraction of the data directory's file system.
    #[arg(long, env = "CWM_FS_FRACTION", default_value_t = 0.90)]
    fs_fraction: f64,
    /// Milliseconds between expiry and eviction passes (0: off).
    #[arg(long, env = "CWM_EVICTION_INTERVAL_MS", default_value_t = 1000)]
    eviction_interval_ms: u64,
    /// Seconds an idempotency key's outcome is replayed, and a DELETED session stays listed;
    /// then either is forgotten (memory and log).
    #[arg(long, env = "CWM_IDEMPOTENCY_TTL", default_value_t = 86_400)]
    idempotency_ttl: u64,
    /// Most idempotent outcomes kept; past it the oldest are forgotten (memory and log).
    #[arg(long, env = "CWM_IDEMPOTENCY_MAX", default_value_t = 100_000)]
    idempotency_max: usize,
    /// Shared tier: Redis Cluster seed nodes, comma-separated (redis://host:port, or
    /// rediss://host:port for TLS); off when not given.
    #[arg(long, env = "CWM_REMOTE")]
    remote: Option<String>,
    /// Shared tier: ACL user.
    #[arg(long, env = "CWM_REMOTE_USER")]
    remote_user: Option<String>,
    /// Shared tier: a file holding the ACL password (or set CWM_REMOTE_PASSWORD; never a flag,
    /// which `ps` would show).
    #[arg(long, env = "CWM_REMOTE_PASSWORD_FILE")]
    remote_password_file: Option<PathBuf>,
    /// Shared tier: PEM file of the CA certificates that vouch for rediss:// nodes (default:
    /// the system's trust store).
    #[arg(long, env = "CWM_REMOTE_TLS_CA_FILE")]
    remote_tls_ca_file: Option<PathBuf>,
    /// Shared tier: PEM client certificate (chain) for nodes that authenticate clients.
    #[arg(
        long,
        env = "CWM_REMOTE_TLS_CERT_FILE",
        requires = "remote_tls_key_file"
    )]
    remote_tls_cert_file: Option<PathBuf>,
    /// Shared tier: PEM private key of the client certificate.
    #[arg(
        long,
        env = "CWM_REMOTE_TLS_KEY_FILE",
        requires = "remote_tls_cert_file"
    )]
    remote_tls_key_file: Option<PathBuf>,
    /// Shared tier: key prefix.
    #[arg(long, env = "CWM_REMOTE_PREFIX", default_value = "cwm:v1")]
    remote_prefix: String,
    /// Shared tier: seconds a block lives without a hit.
    #[arg(long, env = "CWM_REMOTE_TTL", default_value_t = 7 * 86_400)]
    remote_ttl: u64,
    /// Shared tier: largest value written (larger blocks are split).
    #[arg(long, env = "CWM_REMOTE_MAX_VALUE", default_value = "4MiB", value_parser = parse_size)]
    remote_max_value: u64,
    /// Shared tier: milliseconds one request may take.
    #[arg(long, env = "CWM_REMOTE_TIMEOUT_MS", default_value_t = 2000)]
    remote_timeout_ms: u64,
    /// Shared tier: publish every freeze in the background once durable (async), before
    /// answering it (sync), or only on `cwm push` (off).
    #[arg(long, env = "CWM_REMOTE_WRITE", default_value = "async")]
    remote_write: cwm::remote::Publish,
    /// Shared tier: milliseconds an automatic lookup waits for the tier (then it answers from
    /// the local store alone).
    #[arg(long, env = "CWM_REMOTE_LOOKUP_TIMEOUT_MS", default_value_t = 100)]
    remote_lookup_timeout_ms: u64,
    /// Shared tier: seconds a definite lookup miss is remembered (at most 60).
    #[arg(long, env = "CWM_REMOTE_NEGATIVE_TTL", default_value_t = 10)]
    remote_negative_ttl: u64,
    /// Shared tier: seconds a thaw naming a window not yet visible in the tier retries.
    #[arg(long, env = "CWM_REMOTE_VISIBILITY_TIMEOUT", default_value_t = 0)]
    remote_visibility_timeout: u64,
    /// Shared tier: seconds of the per-name lease a named publish holds (0: none).
    #[arg(long, env = "CWM_REMOTE_LOCK_LEASE", default_value_t = 30)]
    remote_lock_lease: u64,
    /// Shared tier: replicas of every master a publish waits for (reported as `replicated`;
    /// 0: none).
    #[arg(long, env = "CWM_REMOTE_WAIT_REPLICAS", default_value_t = 0)]
    remote_wait_replicas: usize,
}

impl ServeArgs {
    /// The shared tier's settings, if one is configured.
    fn remote(&self) -> Result<Option<cwm::remote::RemoteConfig>, String> {
        let Some(nodes) = &self.remote else {
            return Ok(None);
        };
        let password = match (
            &self.remote_password_file,
            std::env::var("CWM_REMOTE_PASSWORD"),
        ) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            (None, Ok(p)) => Some(p),
            (None, Err(_)) => None,
        };
        let read = |f: &PathBuf| std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()));
        let client = match (&self.remote_tls_cert_file, &self.remote_tls_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(
                    "remote_tls_cert_file and remote_tls_key_file go together: give both".into(),
                )
            }
        };
        let tls = cwm::remote::RemoteTls {
            ca: self.remote_tls_ca_file.as_ref().map(read).transpose()?,
            client,
        };
        Ok(Some(cwm::remote::RemoteConfig {
            tls,
            nodes: nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect(),
            user: self.remote_user.clone(),
            password,
            prefix: self.remote_prefix.clone(),
            block_ttl: std::time::Duration::from_secs(self.remote_ttl.max(1)),
            max_value: self.remote_max_value as usize,
            timeout: std::time::Duration::from_millis(self.remote_timeout_ms.max(1)),
            publish: self.remote_write,
            lookup_timeout: std::time::Duration::from_millis(self.remote_lookup_timeout_ms.max(1)),
            negative_ttl: std::time::Duration::from_secs(self.remote_negative_ttl.min(60)),
            visibility_timeout: std::time::Duration::from_secs(self.remote_visibility_timeout),
            lock_lease: std::time::Duration::from_secs(self.remote_lock_lease),
            wait_replicas: self.remote_wait_replicas,
            memory_available: None,
        }))
    }
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
    recycle_segments: Option<usize>,
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
    max_connections: Option<usize>,
    max_engines: Option<usize>,
    compact_live_ratio: Option<f64>,
    compact_rate: Option<SizeVal>,
    compact_interval: Option<u64>,
    scrub_interval: Option<u64>,
    scrub_rate: Option<SizeVal>,
    eviction_policy: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    fs_fraction: Option<f64>,
    eviction_interval_ms: Option<u64>,
    idempotency_ttl: Option<u64>,
    idempotency_max: Option<usize>,
    remote: Option<String>,
    remote_user: Option<String>,
    remote_password_file: Option<PathBuf>,
    remote_tls_ca_file: Option<PathBuf>,
    remote_tls_cert_file: Option<PathBuf>,
    remote_tls_key_file: Option<PathBuf>,
    remote_prefix: Option<String>,
    remote_ttl: Option<u64>,
    remote_max_value: Option<SizeVal>,
    remote_timeout_ms: Option<u64>,
    remote_write: Option<String>,
    remote_lookup_timeout_ms: Option<u64>,
    remote_negative_ttl: Option<u64>,
    remote_visibility_timeout: Option<u64>,
    remote_lock_lease: Option<u64>,
    remote_wait_replicas: Option<usize>,
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
    take!(recycle_segments);
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
    take!(max_connections);
    take!(max_engines);
    take!(metrics_addr, |v| Some(v));
    take!(compact_live_ratio);
    take!(compact_rate, size);
    take!(compact_interval);
    take!(scrub_interval);
    take!(scrub_rate, size);
    take!(eviction_policy, |v| v.parse()?);
    take!(high_watermark);
    take!(low_watermark);
    take!(fs_fraction);
    take!(eviction_interval_ms);
    take!(idempotency_ttl);
    take!(idempotency_max);
    take!(remote, |v| Some(v));
    take!(remote_user, |v| Some(v));
    take!(remote_password_file, |v| Some(v));
    take!(remote_tls_ca_file, |v| Some(v));
    take!(remote_tls_cert_file, |v| Some(v));
    take!(remote_tls_key_file, |v| Some(v));
    take!(remote_prefix);
    take!(remote_ttl);
    take!(remote_max_value, size);
    take!(remote_timeout_ms);
    take!(remote_write, |v| v.parse()?);
    take!(remote_lookup_timeout_ms);
    take!(remote_negative_ttl);
    take!(remote_visibility_timeout);
    take!(remote_lock_lease);
    take!(remote_wait_replicas);
    Ok(())
}

pub(crate) fn serve(mut a: ServeArgs, m: &clap::ArgMatches) -> Result<(), String> {
    apply_config_file(&mut a, m)?;
    let frac = |x: f64| x.is_finite() && x > 0.0 && x <= 1.0;
    let ok = frac(a.low_watermark)
        && frac(a.high_watermark)
        && a.low_watermark <= a.high_watermark
        && frac(a.fs_fraction);
    if !ok {
        return Err(format!(
            "watermarks must satisfy 0 < low ({}) <= high ({}) <= 1, and 0 < fs-fraction ({}) <= 1",
            a.low_watermark, a.high_watermark, a.fs_fraction
        ));
    }
    let remote = a.remote()?;
    cwm::log::init(a.log_format == "json");
    let data_dir = a.data_dir.clone().ok_or(
        "no data directory: pass --data-dir, set CWM_DATA_DIR or data_dir in the config file",
    )?;
    // A socket another daemon answers on: refused before the store is opened, so a new data
    // directory is not created (nor an existing one locked) for nothing.
    if std::os::unix::net::UnixStream::connect(&a.socket).is_ok() {
        return Err(format!(
            "{} is in use by another running process (another cwm?); stop it or pass --socket",
            a.socket.display()
        ));
    }
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
    cfg.recycle_segments = a.recycle_segments;
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
            max_connections: a.max_connections,
            max_engines: a.max_engines,
            maintenance: cwm::control::maint::Maintenance {
                compact: cwm::store::CompactOptions {
                    live_ratio: a.compact_live_ratio,
                    rate: a.compact_rate,
                    ..Default::default()
                },
                compact_interval_s: a.compact_interval,
                scrub_interval_s: a.scrub_interval,
                scrub_rate: a.scrub_rate,
                eviction: cwm::control::maint::Eviction {
                    policy: a.eviction_policy,
                    high: a.high_watermark,
                    low: a.low_watermark,
                    fs_fraction: a.fs_fraction,
                    interval_ms: a.eviction_interval_ms,
                },
                idempotency_ttl_s: a.idempotency_ttl,
                idempotency_max: a.idempotency_max,
            },
            remote,
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
    // A clean stop: checkpoint the active segment, so the next start scans no record header.
    server.store().checkpoint();
    cwm::log::info("stopped");
    Ok(())
}
