//! The control server: newline-delimited JSON over a Unix stream socket (docs/PROTOCOL.md).
//! One thread per connection; every request line gets one or more response lines with the same
//! `id`, the last one marked `"final": true`. Bad input of any kind gets an error response and
//! the connection keeps serving.
//!
//! A request's way through: `listener` (accept, uid check) → `conn` (read a line) →
//! `protocol` (parse) → `handler` (idempotency, limits, metrics, dispatch) → `args` (typed
//! arguments) → one method per op in `ops`, `session_ops`, `register` or `maint` →
//! `coalesce` (identical thaws; one fetch of a window from the shared tier) → the pipeline and
//! the store. `persist` keeps sessions and idempotent outcomes in the store's catalog;
//! `metrics` and `integrity` are what `health` and `/metrics` report; `client` is the Rust
//! client.
//!
//! ```
//! use std::sync::Arc;
//! use cwm::control::client::Client;
//! use cwm::control::{maint::Maintenance, ServeConfig, Server};
//! use cwm::{PipelineConfig, Store, StoreConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let (store, _) = Store::open(StoreConfig::new(dir.path().join("data")))?;
//! let socket = dir.path().join("cwm.sock");
//! let server = Server::new(Arc::new(store), ServeConfig {
//!     socket: socket.clone(),
//!     allow_uids: vec![],
//!     shm_dir: dir.path().to_path_buf(),
//!     max_line: 16 << 20,
//!     pipeline: PipelineConfig::default(),
//!     tier_bytes: 0,
//!     max_sessions: 1000,
//!     metrics_addr: None,
//!     max_ops: 64,
//!     max_connections: 1024,
//!     max_engines: 64,
//!     maintenance: Maintenance::default(),
//!     remote: None,
//! });
//! let s = server.clone();
//! let serving = std::thread::spawn(move || s.serve());
//! let mut client = (0..500)
//!     .find_map(|_| Client::connect(&socket).map_err(|_| std::thread::sleep(std::time::Duration::from_millis(10))).ok())
//!     .expect("the server binds its socket");
//! let health = client.call_final(serde_json::json!({"op": "health"}))?;
//! assert_eq!(health["ok"], true, "{health}");
//! drop(client);
//! server.stop();
//! serving.join().expect("server thread")?;
//! # Ok(())
//! # }
//! ```

mod args;
pub mod client;
mod coalesce;
mod conn;
mod handler;
pub mod integrity;
mod listener;
pub mod maint;
pub mod metrics;
mod notify;
mod ops;
mod persist;
pub mod protocol;
mod register;
mod remote_ops;
mod session_ops;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use crate::error::ErrorCode;
use crate::pipeline::{Engine, PipelineConfig};
use crate::store::Store;
use crate::tier::RamTier;
use coalesce::Inflight;
use listener::eventfd;
use protocol::ApiError;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Uids allowed to connect (empty: only the server's own uid).
    pub allow_uids: Vec<u32>,
    /// Directory shared-memory KV files must live in.
    pub shm_dir: PathBuf,
    /// Longest accepted request line.
    pub max_line: usize,
    /// Pipeline settings.
    pub pipeline: PipelineConfig,
    /// RAM tier bytes (0: off).
    pub tier_bytes: u64,
    /// Most sessions in ACTIVE at once (EC-021).
    pub max_sessions: usize,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`); off when `None`.
    pub metrics_addr: Option<String>,
    /// Most freezes and thaws running at once; more are refused with BUSY.
    pub max_ops: usize,
    /// Most client connections at once (a thread each); more are answered BUSY and closed.
    pub max_connections: usize,
    /// Most engines registered at once (each keeps a staging pool); more are refused BUSY.
    pub max_engines: usize,
    /// Background compaction and scrub.
    pub maintenance: maint::Maintenance,
    /// The shared tier (`None`: this instance uses none).
    pub remote: Option<crate::remote::RemoteConfig>,
}

/// The running server's state.
pub struct Server {
    store: Arc<Store>,
    cfg: ServeConfig,
    engines: Mutex<HashMap<String, register::Registration>>,
    idem: Mutex<persist::Outcomes>,
    /// Catalog records of outcomes forgotten for room, deleted by the next retention pass.
    idem_forget: Mutex<Vec<(u128, i64)>>,
    /// When inert retention records were last looked for (ms since the epoch): once a
    /// minute, not every retention pass (a scan of the whole catalog).
    inert_swept: AtomicU64,
    tier: RamTier,
    sessions: crate::session::Registry,
    metrics: metrics::Metrics,
    stopping: AtomicBool,
    /// An eventfd [`Server::stop`] writes to, waking the accept loop (`None` if it could not be
    /// made: the loop then looks at `stopping` every second).
    wake: Option<std::fs::File>,
    /// Estimated thaw GB/s (f64 bits), for EC-041 deadlines.
    thaw_rate: AtomicU64,
    /// EWMA of thaws served wholly from the RAM tier (GB/s, f64 bits): lookup's estimate.
    tier_rate: AtomicU64,
    heavy_ops: std::sync::atomic::AtomicUsize,
    inflight: Mutex<HashMap<String, Arc<Inflight>>>,
    /// Windows being fetched from the shared tier for a thaw (fetched once, however many
    /// thaws want them).
    fetches: coalesce::Fetches,
    /// Damage known in the log (EC-051), reported by `health`.
    integrity: integrity::Integrity,
    /// Idempotency keys with a request running (see `handle`).
    idem_running: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Every staging pool made for an engine. A pool only this list holds belongs to an engine
    /// that went away (a vLLM restart): the next engine with that block size takes it, since
    /// its memory stays pinned and registered with the I/O engine anyway.
    staging_pools: Mutex<Vec<Arc<crate::staging::StagingPool>>>,
    /// The shared tier.
    remote: Arc<remote_ops::RemoteLink>,
    /// Wakes the expiry and eviction thread early (a freeze crossed the high watermark or was
    /// refused for room).
    retention_kick: maint::Kick,
}

impl Server {
    /// A server over an open store.
    #[must_use]
    pub fn new(store: Arc<Store>, cfg: ServeConfig) -> Arc<Self> {
        let ttl = i64::try_from(cfg.maintenance.idempotency_ttl_s)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        let (sessions, idem) = persist::restore(
            &store,
            cfg.max_sessions,
            ttl,
            cfg.maintenance.idempotency_max,
        );
        let tier = RamTier::new(cfg.tier_bytes);
        let metrics = metrics::Metrics::default();
        metrics.max_operations.set(cfg.max_ops.max(1) as i64);
        let remote = Arc::new(remote_ops::RemoteLink::new(cfg.remote.clone(), &metrics));
        remote.start();
        Arc::new(Self {
            remote,
            tier,
            sessions,
            store,
            cfg,
            engines: Mutex::new(HashMap::new()),
            idem: Mutex::new(idem),
            idem_forget: Mutex::new(Vec::new()),
            inert_swept: AtomicU64::new(0),
            metrics,
            stopping: AtomicBool::new(false),
            wake: eventfd(),
            thaw_rate: AtomicU64::new(0.5f64.to_bits()),
            tier_rate: AtomicU64::new(2.0f64.to_bits()),
            heavy_ops: std::sync::atomic::AtomicUsize::new(0),
            inflight: Mutex::new(HashMap::new()),
            fetches: coalesce::Fetches::default(),
            integrity: integrity::Integrity::default(),
            staging_pools: Mutex::new(Vec::new()),
            idem_running: Mutex::new(HashMap::new()),
            retention_kick: maint::Kick::default(),
        })
    }

    /// The store the daemon serves.
    #[must_use]
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Records the damage opening the store found (its recovery report), for `health`; when
    /// the open took records from checkpoints, walks their record headers in the background
    /// ([`crate::store::Store::verify_checkpoints`]) and records what that finds the same way.
    pub fn opened(self: &Arc<Self>, report: &crate::store::RecoveryReport) {
        self.integrity.opened(report);
        if report.checkpointed_segments == 0 {
            return;
        }
        self.integrity.set_verifying(true);
        let me = self.clone();
        let job = move || match me.store.verify_checkpoints() {
            Ok(r) => {
                let n = r.damaged_regions.len();
                if n > 0 {
                    crate::log::warn(&format!(
                        "verifying the checkpointed segments found {n} damaged regions (see \
                         `cwm health`)"
                    ));
                }
                me.integrity.opened(&r);
                me.integrity.set_verifying(false);
                crate::log::info(&format!(
                    "checkpointed segments verified: {} segments, {} records",
                    r.segments, r.records
                ));
            }
            Err(e) => {
                me.integrity.record(
                    "open",
                    format!("verifying the checkpointed segments failed: {e}"),
                );
                me.integrity.set_verifying(false);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("cwm-verify-open".into())
            .spawn(job)
        {
            self.integrity.set_verifying(false);
            crate::log::warn(&format!("checkpoint verification not started: {e}"));
        }
    }

    /// The engine registered under `name`, for anyone (a lookup reads only its key namespace).
    fn engine(&self, name: &str) -> Result<Arc<Engine>, ApiError> {
        Ok(self.registration(name)?.engine)
    }

    /// The engine registered under `name`, for a request of `uid` that reads or writes its
    /// memory: refused unless `uid` registered it or is the daemon's own (the operator's).
    fn engine_for(&self, name: &str, uid: Option<u32>) -> Result<Arc<Engine>, ApiError> {
        let r = self.registration(name)?;
        register::may_use(r.owner, uid, name)?;
        Ok(r.engine)
    }

    fn registration(&self, name: &str) -> Result<register::Registration, ApiError> {
        self.engines
            .lock()
            .map_err(|_| ApiError::internal("engine table poisoned"))?
            .get(name)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("no engine {name:?} is registered; send register first"),
                )
            })
    }

    fn edge_case(&self, id: &'static str, outcome: &'static str) {
        self.metrics.edge_case(id, outcome);
    }

    fn concurrency(&self, op: &str, delta: i64) {
        self.metrics.concurrency(op, delta);
    }

    fn metrics_text(&self) -> String {
        self.metrics
            .integrity_problems
            .set(self.integrity.problems() as i64);
        self.metrics.render(
            self.store.stats().ok().as_ref(),
            metrics::FsUsage::of(self.store.dir()),
            (self.tier.bytes(), self.tier.capacity()),
            self.store.class_bytes().ok(),
        )
    }
}

/// Folds a measured rate `seen` into the running estimate `rate` (f64 bits): 0.7 old, 0.3 new.
fn ewma(rate: &std::sync::atomic::AtomicU64, seen: f64) {
    use std::sync::atomic::Ordering;
    let old = f64::from_bits(rate.load(Ordering::Relaxed));
    rate.store((0.7 * old + 0.3 * seen).to_bits(), Ordering::Relaxed);
}
