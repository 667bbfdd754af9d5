//! The shared tier as the daemon uses it: a connection made on first use (and again after an
//! outage), so a cluster that is down at start-up never stops local service; `push` and
//! `pull`; and the tier's state for `health`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::ApiError;
use super::Server;
use crate::error::ErrorCode;
use crate::tier::RamTier;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::remote::{
    fill_prefix, pull_window_since, push_window, BlockSink, Expect, FillReport, Publish,
    PullReport, PushReport, Remote, RemoteConfig, RemoteError,
};
use crate::store::{Class, Replace, Store, WindowSpec};

/// A window waiting for the background publisher, and what its publish expects (`None`:
/// blocks only).
type Queued = (String, Option<Expect>);

/// Windows waiting for a background publish, at most; more are dropped (and logged): a
/// later freeze or `push` publishes them.
const PUBLISH_QUEUE: usize = 1024;

impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// The daemon's link to the shared tier.
#[derive(Default)]
pub(super) struct RemoteLink {
    cfg: Option<RemoteConfig>,
    conn: Mutex<Option<Arc<Remote>>>,
    /// The last outage seen (cleared by the next success): what `health` reports.
    last_error: Mutex<Option<String>>,
    /// The background publisher's queue (started on first use).
    queue: Mutex<Option<crossbeam_channel::Sender<Queued>>>,
    /// `cwm_remote_operations_total` and `cwm_remote_bytes_total`.
    counters: Option<(Family<Labels, Counter>, Family<Labels, Counter>)>,
    /// `cwm_remote_operation_seconds`.
    latency: Option<super::metrics::SecondsFamily>,
    /// `cwm_remote_degraded`.
    degraded: Option<prometheus_client::metrics::gauge::Gauge>,
    /// `cwm_storage_utilization_ratio{tier="redis"}` (the fullest master).
    utilization: Option<super::metrics::RatioFamily>,
    /// When the last outage was seen (cleared by the next success): lookups skip the tier
    /// for [`OUTAGE_BACKOFF`] after it.
    down_at: Mutex<Option<Instant>>,
    /// Definite lookup misses.
    negative: Mutex<NegativeCache>,
    /// Lookup probes running or queued (at most [`PROBES`]: a slow tier never piles work up).
    probing: AtomicUsize,
    /// The threads that run probes, started as needed up to [`PROBES`] and kept (a probe
    /// does not pay for a thread's start).
    probe_pool: ProbePool,
    /// Measured read rate from the tier, GB/s (f64 bits; EWMA of fills).
    read_rate: AtomicU64,
    /// The highest generation seen per name (own publishes, pulls): an older head is stale.
    seen: Mutex<Recent<String, u64>>,
    /// The memory watcher and the announcement listener have been started.
    watching: AtomicBool,
    /// Announcements received: a probe's miss is remembered only if none arrived while it
    /// ran (the blocks may have landed after it looked).
    announced: AtomicU64,
}

/// A probe's work, run on a pool thread.
type Job = Box<dyn FnOnce() + Send>;

/// The probe threads: a job queue and how many threads take from it.
struct ProbePool {
    tx: crossbeam_channel::Sender<Job>,
    rx: crossbeam_channel::Receiver<Job>,
    threads: AtomicUsize,
}

impl Default for ProbePool {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            tx,
            rx,
            threads: AtomicUsize::new(0),
        }
    }
}

impl ProbePool {
    /// Runs `job` on a pool thread, starting one when fewer than `running` exist (the caller
    /// bounds `running` by [`PROBES`]). False when no thread could be started.
    fn run(&self, running: usize, job: Job) -> bool {
        if self.threads.load(Ordering::SeqCst) < running {
            let rx = self.rx.clone();
            let spawned = std::thread::Builder::new()
                .name("cwm-remote-probe".into())
                .spawn(move || {
                    // Ends when the link (and with it the sender) is gone.
                    for job in rx.iter() {
                        job();
                    }
                });
            if spawned.is_ok() {
                self.threads.fetch_add(1, Ordering::SeqCst);
            } else if self.threads.load(Ordering::SeqCst) == 0 {
                return false;
            }
        }
        self.tx.send(job).is_ok()
    }
}

/// Names whose highest generation seen is remembered, at most.
const SEEN_NAMES: usize = 65_536;

/// Lookup probes running at once, at most; a lookup past it answers from the local store.
const PROBES: usize = 4;

/// How long lookups leave the tier alone after an outage (one probe then tries again).
const OUTAGE_BACKOFF: Duration = Duration::from_secs(1);

/// Read rate assumed from the tier before one is measured, GB/s.
const DEFAULT_READ_RATE: f64 = 0.4;

/// How often the memory watcher reads `INFO memory`.
const MEMORY_EVERY: Duration = Duration::from_secs(15);

/// A map bounded to `cap` entries that drops the least recently used one first. The use order
/// is a queue of (key, stamp) with lazy deletion: an entry used again gets a new stamp, and a
/// queued stamp that is no longer the entry's is skipped (the queue is rebuilt when it holds
/// twice as many stamps as entries, so it stays O(cap)).
struct Recent<K, V> {
    map: HashMap<K, (V, u64)>,
    order: VecDeque<(K, u64)>,
    stamp: u64,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            cap: cap.max(1),
        }
    }

    /// The value of `key`, marked as used.
    fn get(&mut self, key: &K) -> Option<&mut V> {
        self.stamp += 1;
        let stamp = self.stamp;
        let (_, s) = self.map.get_mut(key)?;
        *s = stamp;
        self.order.push_back((key.clone(), stamp));
        self.tidy();
        self.map.get_mut(key).map(|(v, _)| v)
    }

    /// The value of `key` without marking it used.
    fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Sets `key` (marked as used), dropping the least recently used entry past the bound.
    fn insert(&mut self, key: K, value: V) {
        self.stamp += 1;
        self.map.insert(key.clone(), (value, self.stamp));
        self.order.push_back((key, self.stamp));
        while self.map.len() > self.cap {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|(_, cur)| *cur == s) {
                self.map.remove(&k);
            }
        }
        self.tidy();
    }

    fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    /// Drops queued stamps that no longer belong to their entry once they outnumber the
    /// entries.
    fn tidy(&mut self) {
        if self.order.len() > 2 * self.cap.max(self.map.len()) {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Default for Recent<K, V> {
    fn default() -> Self {
        Self::new(SEEN_NAMES)
    }
}

/// Definite lookup misses, bounded (least recently used dropped first): the key where a
/// prompt's continuation is known absent from the tier, and since when. Only answers of the
/// tier go in, never timeouts or outages.
struct NegativeCache {
    since: Recent<u128, Instant>,
}

impl Default for NegativeCache {
    fn default() -> Self {
        Self {
            since: Recent::new(NEGATIVE_ENTRIES),
        }
    }
}

/// Entries the negative cache holds at most.
const NEGATIVE_ENTRIES: usize = 65_536;

impl NegativeCache {
    fn contains(&mut self, key: u128, ttl: Duration) -> bool {
        match self.since.get(&key).map(|t| t.elapsed() < ttl) {
            Some(true) => true,
            Some(false) => {
                self.since.remove(&key);
                false
            }
            None => false,
        }
    }

    fn insert(&mut self, key: u128) {
        // A miss seen again keeps its first time: its TTL runs from when it was first seen.
        if self.since.peek(&key).is_none() {
            self.since.insert(key, Instant::now());
        }
    }

    fn clear(&mut self) {
        self.since.clear();
    }

    fn forget(&mut self, keys: &[u128]) {
        for k in keys {
            self.since.remove(k);
        }
    }
}

/// What a lookup's probe of the tier found (`outcome` label of
/// `cwm_remote_operations_total{op="lookup"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// No tier configured, or nothing to ask.
    Off,
    /// The tier holds this many further blocks of the prompt.
    Hit(usize),
    /// It holds none (remembered for the negative TTL).
    Miss,
    /// A miss remembered from an earlier lookup (no request made).
    CachedMiss,
    /// The probe did not answer within the lookup timeout (not remembered).
    Timeout,
    /// Too many lookups' probes are still running.
    Busy,
    /// The tier is down or failing (not asked again for a second).
    Degraded,
}

impl Probe {
    /// The metrics label and the lookup answer's `remote.outcome`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Hit(_) => "hit",
            Self::Miss => "miss",
            Self::CachedMiss => "cached_miss",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
            Self::Degraded => "degraded",
        }
    }
}

type Labels = Vec<(String, String)>;

impl RemoteLink {
    pub(super) fn new(cfg: Option<RemoteConfig>, metrics: &super::metrics::Metrics) -> Self {
        Self {
            cfg,
            counters: Some((metrics.remote_ops.clone(), metrics.remote_bytes.clone())),
            latency: Some(metrics.remote_secs.clone()),
            degraded: Some(metrics.remote_degraded.clone()),
            utilization: Some(metrics.utilization.clone()),
            read_rate: AtomicU64::new(DEFAULT_READ_RATE.to_bits()),
            ..Default::default()
        }
    }

    /// Whether a tier is configured.
    pub(super) fn configured(&self) -> bool {
        self.cfg.is_some()
    }

    /// Counts one operation's outcome and how long it took.
    fn observe(&self, op: &str, outcome: &str, secs: f64) {
        if let Some((ops, _)) = &self.counters {
            ops.get_or_create(&vec![
                ("op".into(), op.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
        }
        if let Some(l) = &self.latency {
            l.get_or_create(&vec![("op".into(), op.into())])
                .observe(secs);
        }
    }

    /// How many of `keys[from..]` (a prompt's chained block keys after the `from` the local
    /// store holds) the tier holds in a row, asked in one pipelined probe that the caller
    /// waits for at most the lookup timeout. A definite miss is remembered for the negative
    /// TTL; timeouts and outages never are, and after an outage lookups leave the tier alone
    /// for a second.
    pub(super) fn probe_prefix(self: &Arc<Self>, keys: &[u128], from: usize) -> Probe {
        let Some(cfg) = &self.cfg else {
            return Probe::Off;
        };
        let Some(&first) = keys.get(from) else {
            return Probe::Off;
        };
        let t0 = Instant::now();
        let out = self.probe_inner(cfg, keys, from, first);
        self.observe("lookup", out.label(), t0.elapsed().as_secs_f64());
        out
    }

    fn probe_inner(
        self: &Arc<Self>,
        cfg: &RemoteConfig,
        keys: &[u128],
        from: usize,
        first: u128,
    ) -> Probe {
        if self
            .negative
            .lock()
            .is_ok_and(|mut n| n.contains(first, cfg.negative_ttl))
        {
            return Probe::CachedMiss;
        }
        if self
            .down_at
            .lock()
            .is_ok_and(|d| d.is_some_and(|t| t.elapsed() < OUTAGE_BACKOFF))
        {
            return Probe::Degraded;
        }
        let rest = keys[from..].to_vec();
        let epoch = self.announced.load(Ordering::SeqCst);
        match self.bounded(cfg.lookup_timeout, move |r| r.probe(&rest)) {
            Ok(found) => match found.iter().take_while(|h| **h).count() {
                0 => {
                    if let Ok(mut n) = self.negative.lock() {
                        if self.announced.load(Ordering::SeqCst) == epoch {
                            n.insert(first);
                        }
                    }
                    Probe::Miss
                }
                n => Probe::Hit(n),
            },
            Err(p) => p,
        }
    }

    /// Runs `f` on the connection on a thread of its own, waiting for it at most `limit`
    /// (it goes on alone past that; at most [`PROBES`] run at once, else `Busy`).
    fn bounded<T: Send + 'static>(
        self: &Arc<Self>,
        limit: Duration,
        f: impl FnOnce(&Remote) -> Result<T, RemoteError> + Send + 'static,
    ) -> Result<T, Probe> {
        let running = self.probing.fetch_add(1, Ordering::SeqCst) + 1;
        if running > PROBES {
            self.probing.fetch_sub(1, Ordering::SeqCst);
            return Err(Probe::Busy);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let link = self.clone();
        let job: Job = Box::new(move || {
            let r = link.with(f);
            link.probing.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
        if !self.probe_pool.run(running, job) {
            self.probing.fetch_sub(1, Ordering::SeqCst);
            return Err(Probe::Busy);
        }
        match rx.recv_timeout(limit) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == ErrorCode::NotFound => Err(Probe::Miss),
            Ok(Err(_)) => Err(Probe::Degraded),
            Err(_) => Err(Probe::Timeout),
        }
    }

    /// How many leading blocks of `keys` window `name`, published in the tier and not held
    /// here, holds (its manifest read within the lookup timeout; never waits for visibility).
    pub(super) fn probe_window(self: &Arc<Self>, name: &str, keys: &[u128]) -> Probe {
        let Some(cfg) = &self.cfg else {
            return Probe::Off;
        };
        let t0 = Instant::now();
        let (name, keys) = (name.to_string(), keys.to_vec());
        let out = match self.bounded(cfg.lookup_timeout, move |r| {
            let (_, m) = r.published_live(&name)?;
            Ok(m.blocks
                .iter()
                .zip(&keys)
                .take_while(|(b, k)| b.key == **k)
                .count())
        }) {
            Ok(0) => Probe::Miss,
            Ok(n) => Probe::Hit(n),
            Err(p) => p,
        };
        self.observe("lookup", out.label(), t0.elapsed().as_secs_f64());
        out
    }

    /// Stores `spec`'s blocks, found in the tier by their keys, as a local unnamed window
    /// (counted; its speed feeds the read-rate estimate); they also go to `ram` and `sink`.
    pub(super) fn fill(
        &self,
        store: &Store,
        spec: WindowSpec,
        block_size: usize,
        ram: Option<&RamTier>,
        sink: Option<&mut (dyn BlockSink + '_)>,
    ) -> Result<FillReport, RemoteError> {
        let t0 = Instant::now();
        let r = self.with(|r| fill_prefix(store, r, spec, block_size, None, ram, sink));
        self.count("fill", &r, "received", |f| f.bytes);
        if let Some(l) = &self.latency {
            l.get_or_create(&vec![("op".into(), "fill".into())])
                .observe(t0.elapsed().as_secs_f64());
        }
        if let Ok(f) = &r {
            if f.bytes >= 16 << 20 && f.secs > 0.0 {
                super::ewma(&self.read_rate, f.bytes as f64 / f.secs / 1e9);
            }
        }
        r
    }

    /// The valid prefix of published window `name`, whose pull failed on a block, stored as
    /// an unnamed fill window (counted as a fill).
    fn fill_published(
        &self,
        store: &Store,
        name: &str,
        ram: Option<&RamTier>,
    ) -> Result<FillReport, RemoteError> {
        let r = self.with(|r| crate::remote::fill_published_prefix(store, r, name, fill_name, ram));
        self.count("fill", &r, "received", |f| f.bytes);
        r
    }

    /// The measured read rate from the tier, GB/s.
    pub(super) fn read_rate(&self) -> f64 {
        f64::from_bits(self.read_rate.load(Ordering::Relaxed))
    }

    /// Remembers generation `generation` of `name` (the highest wins; bounded: past
    /// [`SEEN_NAMES`] names the least recently used is forgotten).
    fn saw(&self, name: &str, generation: u64) {
        if generation == 0 {
            return;
        }
        if let Ok(mut s) = self.seen.lock() {
            let name = name.to_string();
            let g = s.get(&name).map_or(0, |g| *g);
            s.insert(name, g.max(generation));
        }
    }

    /// Ends remembered misses of `keys` (all of them when empty): an announcement.
    fn forget_misses(&self, keys: &[u128]) {
        self.announced.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut n) = self.negative.lock() {
            if keys.is_empty() {
                n.clear();
            } else {
                n.forget(keys);
            }
        }
    }

    /// Starts (once) the background threads of a configured tier: the memory watcher and the
    /// announcement listener.
    pub(super) fn start(self: &Arc<Self>) {
        if self.cfg.is_none() || self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        self.watch_memory();
        let link = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("cwm-remote-listen".into())
            .spawn(move || listen(&link));
    }

    /// Starts the thread that reads every master's memory use for
    /// `cwm_storage_utilization_ratio{tier="redis"}`.
    fn watch_memory(self: &Arc<Self>) {
        if self.utilization.is_none() {
            return;
        }
        let link = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("cwm-remote-memory".into())
            .spawn(move || loop {
                let Some(l) = link.upgrade() else { return };
                if let (Ok(m), Some(u)) = (l.with(Remote::memory), &l.utilization) {
                    let ratio = m
                        .iter()
                        .filter(|(_, max)| *max > 0)
                        .map(|(used, max)| *used as f64 / *max as f64)
                        .fold(0.0, f64::max);
                    u.get_or_create(&vec![("tier".into(), "redis".into())])
                        .set(ratio);
                }
                drop(l);
                std::thread::sleep(MEMORY_EVERY);
            });
    }

    /// Counts one operation and the bytes it moved.
    fn count<T>(
        &self,
        op: &str,
        r: &Result<T, RemoteError>,
        direction: &str,
        bytes: impl Fn(&T) -> u64,
    ) {
        let Some((ops, moved)) = &self.counters else {
            return;
        };
        let outcome = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code().as_str().to_string(),
        };
        ops.get_or_create(&vec![("op".into(), op.into()), ("outcome".into(), outcome)])
            .inc();
        if let Ok(v) = r {
            moved
                .get_or_create(&vec![("direction".into(), direction.into())])
                .inc_by(bytes(v));
        }
    }

    /// Publishes window `name` of `store` (counted).
    fn push(
        &self,
        store: &Store,
        name: &str,
        expect: Option<Expect>,
    ) -> Result<PushReport, RemoteError> {
        let r = self.with(|r| push_window(store, r, name, expect));
        self.count("push", &r, "sent", |p| p.written_bytes);
        if let Ok(p) = &r {
            self.saw(name, p.generation);
        }
        if r.is_ok() {
            // Own publishes end remembered misses at once (others' wait for the TTL).
            if let Ok(mut n) = self.negative.lock() {
                n.clear();
            }
        }
        r
    }

    /// Stores window `name` of the tier in `store` (counted); its blocks also go to `ram`
    /// and `sink`.
    fn pull(
        &self,
        store: &Store,
        name: &str,
        replace: Replace,
        ram: Option<&RamTier>,
        sink: Option<&mut (dyn BlockSink + '_)>,
    ) -> Result<PullReport, RemoteError> {
        let seen = self
            .seen
            .lock()
            .ok()
            .and_then(|mut s| s.get(&name.to_string()).copied())
            .unwrap_or(0);
        let r = self.with(|r| pull_window_since(store, r, name, replace, seen, ram, sink));
        if let Ok(p) = &r {
            self.saw(name, p.generation);
        }
        self.count("pull", &r, "received", |p| p.bytes);
        r
    }

    /// The connection, made now if there is none.
    fn get(&self) -> Result<Arc<Remote>, RemoteError> {
        let cfg = self.cfg.as_ref().ok_or_else(|| {
            RemoteError::Unavailable("no remote tier configured (serve --remote)".into())
        })?;
        if let Some(r) = self.conn.lock().ok().and_then(|c| c.clone()) {
            return Ok(r);
        }
        let r = Arc::new(Remote::connect(cfg.clone())?);
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(r.clone());
        }
        Ok(r)
    }

    /// Runs `f` on the connection; an outage is noted for `health` (one log line per new
    /// cause) and a success clears it.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&Remote) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let r = self.get().and_then(|r| f(&r));
        if let Ok(mut last) = self.last_error.lock() {
            match &r {
                Err(e) if e.is_outage() => {
                    if let Ok(mut d) = self.down_at.lock() {
                        *d = Some(Instant::now());
                    }
                    if let Some(g) = &self.degraded {
                        g.set(1);
                    }
                    let msg = e.to_string();
                    if last.as_deref() != Some(msg.as_str()) {
                        crate::log::warn(&format!("remote tier degraded: {msg}"));
                    }
                    *last = Some(msg);
                }
                Ok(_) => {
                    *last = None;
                    if let Some(g) = &self.degraded {
                        g.set(0);
                    }
                    if let Ok(mut d) = self.down_at.lock() {
                        *d = None;
                    }
                }
                Err(_) => {}
            }
        }
        r
    }

    /// After a durable freeze of `name`: publishes it as the configuration says. `Sync`:
    /// now, returning what to add to the answer; `Async`: queued for the background publisher.
    /// An unnamed window's blocks only are published (lookups find them by their keys).
    pub(super) fn after_freeze(
        self: &Arc<Self>,
        store: &Arc<Store>,
        name: &str,
        class: Class,
    ) -> Option<Value> {
        let expect = (class == Class::Pinned).then_some(Expect::Any);
        match self.cfg.as_ref()?.publish {
            Publish::Off => None,
            Publish::Sync => Some(match self.push(store, name, expect) {
                Ok(p) => {
                    json!({"generation": p.generation, "written": p.written, "replicated": p.replicated})
                }
                Err(e) => {
                    json!({"error": {"code": e.code().as_str(), "message": e.to_string()}})
                }
            }),
            Publish::Async => {
                self.enqueue(store, name, expect);
                Some(json!({"status": "pending"}))
            }
        }
    }

    /// Queues `name` for the background publisher, starting it if needed.
    fn enqueue(self: &Arc<Self>, store: &Arc<Store>, name: &str, expect: Option<Expect>) {
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let tx = q.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Queued>(PUBLISH_QUEUE);
            let (link, store): (Weak<Self>, Weak<Store>) =
                (Arc::downgrade(self), Arc::downgrade(store));
            std::thread::spawn(move || {
                for (name, expect) in rx {
                    if !publish_until_done(&link, &store, &name, expect) {
                        return;
                    }
                }
            });
            tx
        });
        if tx.try_send((name.to_string(), expect)).is_err() {
            crate::log::warn(&format!(
                "remote publish queue full: {name:?} not published (a later push does)"
            ));
        }
    }

    /// Before a thaw of `name`, which the local store does not hold: pulls it from the tier
    /// (its blocks also going to `ram` and `sink`). `None`: no tier configured.
    pub(super) fn pull_missing(
        &self,
        store: &Store,
        name: &str,
        ram: Option<&RamTier>,
        mut sink: Option<&mut (dyn BlockSink + '_)>,
    ) -> Option<Result<PullReport, RemoteError>> {
        let cfg = self.cfg.as_ref()?;
        // A window published elsewhere may not be visible here yet: retried with backoff
        // until the visibility timeout (0: one try).
        let until = Instant::now() + cfg.visibility_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let r = self.pull(store, name, Replace::No, ram, sink.as_deref_mut());
            // (Retried only while the name itself is missing, not one of its blocks.)
            // (No time left: no further request to ask why.)
            let missing = Instant::now() + pause <= until
                && matches!(&r, Err(e) if e.code() == ErrorCode::NotFound)
                && matches!(self.with(|x| x.head(name)), Ok(None));
            if !missing {
                return Some(r);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// `health.remote`.
    pub(super) fn health(&self) -> Value {
        let Some(cfg) = &self.cfg else {
            return json!({"configured": false});
        };
        let last = self.last_error.lock().ok().and_then(|l| l.clone());
        json!({
            "configured": true,
            "nodes": cfg.nodes,
            "prefix": cfg.prefix,
            "publish": format!("{:?}", cfg.publish).to_lowercase(),
            "queued": self.queue.lock().ok().and_then(|q| q.as_ref().map(crossbeam_channel::Sender::len)).unwrap_or(0),
            "status": if last.is_some() { "degraded" } else { "ok" },
            "error": last,
        })
    }
}

impl Server {
    /// `push`: publishes a stored window to the shared tier.
    pub(super) fn op_push(&self, a: &Value) -> Result<Value, ApiError> {
        let name = super::args::name(a, "window")?;
        let expect = match (replace_flag(a)?, a.get("expected_generation")) {
            (_, Some(g)) => Expect::Generation(g.as_u64().ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Validation,
                    "expected_generation must be an integer",
                )
            })?),
            (true, None) => Expect::Any,
            (false, None) => Expect::New,
        };
        let r = self.remote.push(&self.store, &name, Some(expect))?;
        Ok(json!({"push": r}))
    }

    /// `remote.list`: every window published in the shared tier.
    pub(super) fn op_remote_list(&self) -> Result<Value, ApiError> {
        let w = self.remote.with(Remote::list_windows)?;
        Ok(json!({"windows": w}))
    }

    /// `remote.scrub`: which published windows' blocks the shared tier no longer holds.
    pub(super) fn op_remote_scrub(&self) -> Result<Value, ApiError> {
        let w = self.remote.with(Remote::scrub_windows)?;
        let problems = w.iter().filter(|s| s.status != "ok").count();
        Ok(json!({"windows": w, "problems": problems}))
    }

    /// `pull`: stores a window of the shared tier locally.
    pub(super) fn op_pull(&self, a: &Value) -> Result<Value, ApiError> {
        let name = super::args::name(a, "window")?;
        let replace = if replace_flag(a)? {
            Replace::Any
        } else {
            Replace::No
        };
        let r = self
            .remote
            .pull(&self.store, &name, replace, Some(&self.tier), None)?;
        Ok(json!({"pull": r}))
    }
}

/// The optional boolean `replace` of `push` and `pull`.
fn replace_flag(a: &Value) -> Result<bool, ApiError> {
    match a.get("replace") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::new(
            ErrorCode::Validation,
            "replace must be a boolean",
        )),
    }
}

/// Listens to publish announcements (any seed node relays them all; the next one after a
/// failure) and ends the remembered misses they name, until the daemon goes away. An
/// announcement missed while disconnected is covered by the misses' TTL.
fn listen(link: &Weak<RemoteLink>) {
    let mut node = 0usize;
    while let Some(l) = link.upgrade() {
        let remote = l.get();
        drop(l);
        let listened = remote.and_then(|r| {
            r.listen(node, Duration::from_secs(1), |got| {
                match (got, link.upgrade()) {
                    (_, None) => false,
                    (Some(keys), Some(l)) => {
                        l.forget_misses(&keys);
                        true
                    }
                    (None, Some(_)) => true,
                }
            })
        });
        if listened.is_ok() {
            return;
        }
        node += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Longest pause between retries of a background publish that met an outage.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Publishes `name` for the background publisher: an outage or BUSY is retried (backing off from
/// 250 ms to [`RETRY_MAX`]) until the tier answers — the queue behind it waits, and fills
/// past [`PUBLISH_QUEUE`] are dropped with a warning —; any other failure (the window deleted
/// meanwhile, a newer writer's fence) is logged and given up. False once the daemon is gone.
fn publish_until_done(
    link: &Weak<RemoteLink>,
    store: &Weak<Store>,
    name: &str,
    expect: Option<Expect>,
) -> bool {
    let mut pause = Duration::from_millis(250);
    loop {
        let (Some(l), Some(st)) = (link.upgrade(), store.upgrade()) else {
            return false;
        };
        match l.push(&st, name, expect) {
            Ok(_) => return true,
            // An outage, or another instance publishing the name now (its lease).
            Err(e) if e.is_outage() || e.code() == ErrorCode::Busy => {
                if pause == Duration::from_millis(250) {
                    crate::log::warn(&format!(
                        "publishing {name:?} to the remote tier: {e}; retrying until it answers"
                    ));
                }
            }
            Err(e) => {
                crate::log::warn(&format!("publishing {name:?} to the remote tier: {e}"));
                return true;
            }
        }
        drop((l, st));
        std::thread::sleep(pause);
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// The local window a lookup names for a prefix the shared tier holds past what the local
/// store holds: `fill-<blocks>-<key of the last block, hex>` (a rank's own slice adds
/// `--r<k>`, as the connector names it). A thaw of that name, given the prompt's tokens,
/// fetches the blocks by their keys and stores them as an unnamed (evictable) window first.
pub(super) fn fill_name(blocks: usize, last_key: u128) -> String {
    format!("fill-{blocks}-{last_key:032x}")
}

/// The (blocks, last key, whether a rank suffix follows) a fill name encodes.
fn parse_fill_name(name: &str) -> Option<(usize, u128, bool)> {
    let rest = name.strip_prefix("fill-")?;
    let (n, rest) = rest.split_once('-')?;
    let (hex, rank) = match rest.split_once("--r") {
        Some((h, r)) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) => (h, true),
        Some(_) => return None,
        None => (rest, false),
    };
    if hex.len() != 32 {
        return None;
    }
    Some((n.parse().ok()?, u128::from_str_radix(hex, 16).ok()?, rank))
}

impl Server {
    /// Pulls `window` from the tier (its blocks also going to `sink`); when a block of it is
    /// gone or bad, stores its valid prefix as a fill window and names that.
    fn pull_or_prefix(
        &self,
        window: &str,
        sink: Option<&mut (dyn BlockSink + '_)>,
    ) -> Result<(Option<Value>, Option<String>), ApiError> {
        let not_found = || {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no window {window:?} here or in the remote tier"),
            )
        };
        match self
            .remote
            .pull_missing(&self.store, window, Some(&self.tier), sink)
        {
            None => Ok((None, None)),
            Some(Ok(p)) => Ok((Some(json!({"pulled": p})), None)),
            // Stored meanwhile (a `pull` or a freeze of the name committed first): that
            // window is the one to thaw.
            Some(Err(e)) if e.code() == ErrorCode::AlreadyExists => Ok((None, None)),
            Some(Err(e)) if matches!(e.code(), ErrorCode::NotFound | ErrorCode::Corruption) => {
                match self
                    .remote
                    .fill_published(&self.store, window, Some(&self.tier))
                {
                    Ok(f) => {
                        let name = f.name.clone();
                        Ok((Some(json!({"filled": f, "partial_of": window})), Some(name)))
                    }
                    Err(f)
                        if f.code() == ErrorCode::NotFound && e.code() == ErrorCode::NotFound =>
                    {
                        Err(not_found())
                    }
                    Err(_) => Err(e.into()),
                }
            }
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Before a thaw of `window`, which this instance does not hold: a fill name (from a
    /// lookup that found the prompt in the shared tier) is fetched by the keys of `tokens`
    /// and stored as an unnamed window; any other name is pulled from the tier, and when a
    /// block of it is gone or bad, its valid prefix is stored as a fill window instead — the
    /// window to thaw then, as a prefix (the second value). What to add to the answer first.
    /// Nothing: no tier, or the window was stored meanwhile — by another thaw's fetch this one
    /// waited for (EC-002: one fetch however many thaws want the window; `until` ends the
    /// wait), by a `pull` or a freeze of the name. The blocks fetched also
    /// go to `sink` (a thaw as they arrive); when nothing is fetched, what the sink got is not
    /// what the stored window holds.
    pub(super) fn fetch_missing(
        &self,
        eng: &crate::pipeline::Engine,
        window: &str,
        tokens: Option<&[u32]>,
        salt: Option<&str>,
        sink: Option<&mut (dyn BlockSink + '_)>,
        until: super::coalesce::Until<'_>,
    ) -> Result<(Option<Value>, Option<String>), ApiError> {
        if !self.remote.configured() {
            return Ok((None, None));
        }
        loop {
            let fetching = self.fetches.start(window, until)?;
            // Another thaw's fetch ended (or one ended between the caller's look and this
            // one's start): the window is stored now, or it failed (and this thaw tries in
            // turn).
            if self.store.get(window).is_ok() {
                if fetching.is_none() {
                    self.edge_case("EC-002", "fetch_shared");
                }
                return Ok((None, None));
            }
            if fetching.is_some() {
                return self.fetch_once(eng, window, tokens, salt, sink);
            }
        }
    }

    /// [`Server::fetch_missing`], this thread fetching.
    fn fetch_once(
        &self,
        eng: &crate::pipeline::Engine,
        window: &str,
        tokens: Option<&[u32]>,
        salt: Option<&str>,
        sink: Option<&mut (dyn BlockSink + '_)>,
    ) -> Result<(Option<Value>, Option<String>), ApiError> {
        let Some((n, last, rank)) = parse_fill_name(window) else {
            return self.pull_or_prefix(window, sink);
        };
        let bs = eng.layout.block_size as usize;
        let tokens = tokens
            .filter(|t| n > 0 && n.checked_mul(bs).is_some_and(|need| t.len() >= need))
            .ok_or_else(|| {
                ApiError::validation(format!(
                    "a thaw of {window:?} (a prefix found in the remote tier) needs the \
                     prompt's tokens, at least {n} blocks of {bs}"
                ))
            })?;
        let tokens = &tokens[..n * bs];
        let keys = eng.keys_with(tokens, salt);
        if !rank && keys.last() != Some(&last) {
            return Err(ApiError::new(
                ErrorCode::TokenMismatch,
                format!("{window:?} names a prefix other than these tokens"),
            ));
        }
        let bb = eng.layout.block_bytes();
        let spec = WindowSpec {
            name: window.to_string(),
            session: window.to_string(),
            namespace: eng.namespace_with(salt, &eng.layout).label(),
            layout: eng.layout.to_json(),
            tokens: tokens.to_vec(),
            blocks: keys
                .iter()
                .map(|&key| crate::store::BlockDesc { key, len: bb })
                .collect(),
            replace: Replace::No,
            retention: crate::store::Retention {
                class: crate::store::Class::Unnamed,
                expires_unix_ms: None,
            },
            origin: None,
        };
        match self
            .remote
            .fill(&self.store, spec, bs, Some(&self.tier), sink)
        {
            Ok(f) => Ok((Some(json!({"filled": f})), None)),
            Err(e) if e.code() == ErrorCode::NotFound => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("the remote tier no longer holds the prefix {window:?} named: {e}"),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_names_round_trip_and_foreign_names_are_not_fills() {
        let k = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        assert_eq!(parse_fill_name(&fill_name(7, k)), Some((7, k, false)));
        assert_eq!(
            parse_fill_name(&format!("{}--r3", fill_name(7, k))),
            Some((7, k, true))
        );
        for bad in [
            "fill-7",
            "fill-x-0123456789abcdef0011223344556677",
            "fill-7-0123",
            "fill-7-0123456789abcdef0011223344556677--r",
            "fill-7-0123456789abcdef0011223344556677--rx",
            "chat-1",
        ] {
            assert_eq!(parse_fill_name(bad), None, "{bad}");
        }
        // A block count no prompt can have is parsed, and refused by the thaw's length check
        // (checked multiplication: no overflow).
        let (n, _, _) = parse_fill_name(&fill_name(usize::MAX, k)).unwrap_or_default();
        assert!(n.checked_mul(16).is_none());
    }

    #[test]
    fn remembered_misses_expire_are_forgotten_and_stay_bounded() {
        let mut n = NegativeCache::default();
        n.insert(1);
        n.insert(2);
        assert!(n.contains(1, Duration::from_secs(60)));
        assert!(!n.contains(1, Duration::ZERO), "past its TTL");
        assert!(
            !n.contains(1, Duration::from_secs(60)),
            "expired entries are dropped"
        );
        n.forget(&[2]);
        assert!(!n.contains(2, Duration::from_secs(60)));
        // A miss asked about all along stays while the ones nobody asks about again go.
        n.insert(7);
        for k in 0..(NEGATIVE_ENTRIES as u128 + 10) {
            n.insert(k + 100);
            if k % 1000 == 0 {
                assert!(n.contains(7, Duration::from_secs(60)));
            }
        }
        assert!(n.since.map.len() <= NEGATIVE_ENTRIES);
        assert!(n.since.order.len() <= 2 * NEGATIVE_ENTRIES + 1);
        assert!(
            !n.contains(100, Duration::from_secs(60)),
            "the least recently used went first"
        );
        assert!(
            n.contains(7, Duration::from_secs(60)),
            "the hot miss stayed"
        );
        assert!(n.contains(NEGATIVE_ENTRIES as u128 + 109, Duration::from_secs(60)));
    }

    #[test]
    fn probes_reuse_their_threads() {
        let pool = ProbePool::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..20 {
            let tx = tx.clone();
            assert!(pool.run(
                1,
                Box::new(move || {
                    let _ = tx.send((i, std::thread::current().id()));
                })
            ));
            rx.recv_timeout(Duration::from_secs(10)).expect("job ran");
        }
        assert_eq!(
            pool.threads.load(Ordering::SeqCst),
            1,
            "one thread ran all 20"
        );
        // Two at once: a second thread starts, no more.
        let gate = Arc::new(std::sync::Barrier::new(3));
        for _ in 0..2 {
            let g = gate.clone();
            assert!(pool.run(
                2,
                Box::new(move || {
                    g.wait();
                })
            ));
        }
        gate.wait();
        assert_eq!(pool.threads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_name_in_use_keeps_its_generation_past_the_bound() {
        let mut s: Recent<String, u64> = Recent::new(100);
        s.insert("hot".into(), 9);
        for i in 0..1_000u64 {
            s.insert(format!("n{i}"), i);
            // Re-inserting a name keeps one entry for it.
            s.insert(format!("n{i}"), i + 1);
            assert_eq!(s.get(&"hot".to_string()).copied(), Some(9));
            assert!(s.map.len() <= 100);
            assert!(s.order.len() <= 201, "{}", s.order.len());
        }
        assert_eq!(s.peek(&"n999".to_string()), Some(&1000));
        assert_eq!(s.peek(&"n0".to_string()), None, "the coldest went");
        s.remove(&"hot".to_string());
        assert_eq!(s.peek(&"hot".to_string()), None);
    }
}
