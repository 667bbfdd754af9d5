//! The daemon's metrics, kept and encoded (Prometheus / OpenMetrics text) by the
//! `prometheus-client` crate.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::{ClassBytes, StoreStats};

type Labels = Vec<(String, String)>;

/// The (edge case, outcome) pairs the daemon counts (`protocol::edge_case_of`, the handler and
/// `coalesce`), created at zero so their series exist before the first event.
const EDGE_CASES: &[(&str, &str)] = &[
    ("EC-001", "refused"),
    ("EC-002", "coalesced"),
    ("EC-002", "fetch_shared"),
    ("EC-003", "refused"),
    ("EC-004", "refused"),
    ("EC-005", "refused"),
    ("EC-010", "refused"),
    ("EC-012", "refused"),
    ("EC-013", "refused"),
    ("EC-014", "refused"),
    ("EC-020", "refused"),
    ("EC-021", "refused"),
    ("EC-022", "refused"),
    ("EC-030", "refused"),
    ("EC-031", "refused"),
    ("EC-040", "refused"),
    ("EC-041", "refused"),
    ("EC-050", "refused"),
    ("EC-050", "recovered"),
    ("EC-052", "refused"),
];

const BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    /// Requests received.
    pub requests: Counter,
    /// Requests answered with an error.
    pub errors: Counter,
    /// Freezes made durable.
    pub freezes: Counter,
    /// Thaws loaded.
    pub thaws: Counter,
    /// KV bytes frozen.
    pub freeze_bytes: Counter,
    /// KV bytes thawed.
    pub thaw_bytes: Counter,
    /// Thaws stopped early by a corrupt block.
    pub corruption: Counter,
    /// Scrub passes finished.
    pub scrub_passes: Counter,
    /// Windows a scrub found damaged or lost (counted per pass).
    pub scrub_problems: Counter,
    /// Bytes compaction copied.
    pub compaction_bytes: Counter,
    /// Segments compaction deleted.
    pub compaction_segments: Counter,
    /// Lookups answered.
    pub lookups: Counter,
    /// Lookups that found a stored prefix (at least one block).
    pub lookup_hits: Counter,
    /// The configured limit of freezes and thaws running at once (`--max-ops`).
    pub max_operations: Gauge,
    /// Client connections open now.
    pub connections: Gauge,
    /// Connections refused because `--max-connections` were open.
    pub connections_refused: Counter,
    edge_cases: Family<Labels, Counter>,
    concurrent: Family<Labels, Gauge>,
    freeze_secs: Histogram,
    thaw_secs: Histogram,
    /// `cwm_storage_utilization_ratio` by tier.
    pub utilization: RatioFamily,
    windows: Gauge,
    build_info: Family<Labels, Gauge>,
    /// Problems known in the log (EC-051; 0 when `health` says ok).
    pub integrity_problems: Gauge,
    /// Windows evicted, by reason (`capacity`).
    pub evictions: Family<Labels, Counter>,
    /// Live bytes given up by evictions, by reason.
    pub evicted_bytes: Family<Labels, Counter>,
    /// Windows whose TTL passed (tombstoned).
    pub expiries: Counter,
    lookup_blocks: Family<Labels, Counter>,
    lookup_tokens: Family<Labels, Counter>,
    class_bytes: Family<Labels, Gauge>,
    /// Shared-tier operations (push, pull), by outcome (`ok` or the error code).
    pub remote_ops: Family<Labels, Counter>,
    /// Payload bytes moved to and from the shared tier, by direction (`sent`, `received`).
    pub remote_bytes: Family<Labels, Counter>,
    /// Seconds shared-tier operations took, by op.
    pub remote_secs: SecondsFamily,
    /// 1 while the shared tier is degraded (its last request met an outage), else 0.
    pub remote_degraded: Gauge,
}

/// Histograms of seconds by label set.
pub type SecondsFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Ratio gauges by label set.
pub type RatioFamily = Family<Labels, Gauge<f64, AtomicU64>>;

/// Buckets of shared-tier latencies: 100 µs to about 13 s.
fn remote_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-4, 2.0, 18,
    ))
}

impl Metrics {
    /// Counts a lookup's blocks and tokens found stored and not.
    pub fn lookup_volume(
        &self,
        hit_blocks: u64,
        miss_blocks: u64,
        hit_tokens: u64,
        miss_tokens: u64,
    ) {
        for (fam, hit, miss) in [
            (&self.lookup_blocks, hit_blocks, miss_blocks),
            (&self.lookup_tokens, hit_tokens, miss_tokens),
        ] {
            fam.get_or_create(&vec![("result".into(), "hit".into())])
                .inc_by(hit);
            fam.get_or_create(&vec![("result".into(), "miss".into())])
                .inc_by(miss);
        }
    }

    /// Registers the shared tier's series (created at zero for the ok outcomes).
    fn register_remote(&self, registry: &mut Registry) {
        registry.register(
            "cwm_remote_operations",
            "Shared-tier pushes and pulls, by outcome (ok or the error code)",
            self.remote_ops.clone(),
        );
        registry.register(
            "cwm_remote_bytes",
            "Payload bytes moved to (sent) and from (received) the shared tier",
            self.remote_bytes.clone(),
        );
        registry.register(
            "cwm_remote_operation_seconds",
            "Seconds shared-tier operations took (lookup: the probe as the lookup waited for it)",
            self.remote_secs.clone(),
        );
        registry.register(
            "cwm_remote_degraded",
            "1 while the shared tier is degraded (its last request met an outage: unreachable, \
             cluster down, timeout, out of memory), else 0",
            self.remote_degraded.clone(),
        );
        for op in ["push", "pull", "fill", "lookup"] {
            let _ = self
                .remote_secs
                .get_or_create(&vec![("op".into(), op.into())]);
        }
        for op in ["push", "pull"] {
            let _ = self.remote_ops.get_or_create(&vec![
                ("op".into(), op.into()),
                ("outcome".into(), "ok".into()),
            ]);
        }
        for d in ["sent", "received"] {
            let _ = self
                .remote_bytes
                .get_or_create(&vec![("direction".into(), d.into())]);
        }
    }

    /// The limits on clients: operations and connections.
    fn register_limits(&self, registry: &mut Registry) {
        registry.register(
            "cwm_max_operations",
            "Freezes and thaws allowed at once (--max-ops)",
            self.max_operations.clone(),
        );
        registry.register(
            "cwm_connections",
            "Client connections open now",
            self.connections.clone(),
        );
        registry.register(
            "cwm_connections_refused",
            "Connections refused: --max-connections were open",
            self.connections_refused.clone(),
        );
    }

    /// Registers the capacity series: evictions, evicted bytes, expiries, bytes by class.
    fn register_capacity(&self, registry: &mut Registry) {
        registry.register(
            "cwm_evictions",
            "Unnamed windows evicted, by reason",
            self.evictions.clone(),
        );
        registry.register(
            "cwm_evicted_bytes",
            "Live bytes given up by evictions, by reason (compaction reclaims them)",
            self.evicted_bytes.clone(),
        );
        registry.register(
            "cwm_expiries",
            "Windows whose TTL passed",
            self.expiries.clone(),
        );
        registry.register(
            "cwm_class_bytes",
            "Block bytes by class: pinned (held by a pinned window), unnamed (evictable)",
            self.class_bytes.clone(),
        );
        registry.register(
            "cwm_lookup_blocks",
            "Blocks of looked-up prompts found stored (hit) or not (miss)",
            self.lookup_blocks.clone(),
        );
        registry.register(
            "cwm_lookup_tokens",
            "Tokens of looked-up prompts found stored (hit) or not (miss)",
            self.lookup_tokens.clone(),
        );
        for result in ["hit", "miss"] {
            let l = vec![("result".into(), result.into())];
            let _ = self.lookup_blocks.get_or_create(&l);
            let _ = self.lookup_tokens.get_or_create(&l);
        }
        let l = vec![("reason".into(), "capacity".into())];
        let _ = self.evictions.get_or_create(&l);
        let _ = self.evicted_bytes.get_or_create(&l);
        for class in ["pinned", "unnamed"] {
            let _ = self
                .class_bytes
                .get_or_create(&vec![("class".into(), class.into())]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Counter::default(),
            errors: Counter::default(),
            freezes: Counter::default(),
            thaws: Counter::default(),
            freeze_bytes: Counter::default(),
            thaw_bytes: Counter::default(),
            corruption: Counter::default(),
            scrub_passes: Counter::default(),
            scrub_problems: Counter::default(),
            compaction_bytes: Counter::default(),
            compaction_segments: Counter::default(),
            lookups: Counter::default(),
            lookup_hits: Counter::default(),
            max_operations: Gauge::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            edge_cases: Family::default(),
            concurrent: Family::default(),
            freeze_secs: Histogram::new(BUCKETS),
            thaw_secs: Histogram::new(BUCKETS),
            utilization: Family::default(),
            windows: Gauge::default(),
            build_info: Family::default(),
            integrity_problems: Gauge::default(),
            evictions: Family::default(),
            evicted_bytes: Family::default(),
            expiries: Counter::default(),
            lookup_blocks: Family::default(),
            lookup_tokens: Family::default(),
            class_bytes: Family::default(),
            remote_ops: Family::default(),
            remote_bytes: Family::default(),
            remote_secs: Family::new_with_constructor(remote_histogram),
            remote_degraded: Gauge::default(),
            registry: Registry::default(),
        };
        m.register_capacity(&mut registry);
        m.register_remote(&mut registry);
        m.register_limits(&mut registry);
        registry.register("cwm_lookups", "Lookups answered", m.lookups.clone());
        registry.register(
            "cwm_lookup_hits",
            "Lookups that found a stored prefix",
            m.lookup_hits.clone(),
        );
        registry.register(
            "cwm_build_info",
            "The running build (value 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        // Every series an alert or a rate() reads exists from the start, at zero.
        for (id, outcome) in EDGE_CASES {
            let _ = m.edge_cases.get_or_create(&vec![
                ("edge_case_id".into(), (*id).into()),
                ("outcome".into(), (*outcome).into()),
            ]);
        }
        for op in ["freeze", "thaw", "lookup", "delete"] {
            let _ = m
                .concurrent
                .get_or_create(&vec![("operation_type".into(), op.into())]);
        }
        for tier in ["cpu", "disk"] {
            let _ = m
                .utilization
                .get_or_create(&vec![("tier".into(), tier.into())]);
        }
        registry.register("cwm_requests", "Requests received", m.requests.clone());
        registry.register(
            "cwm_scrub_passes",
            "Scrub passes finished",
            m.scrub_passes.clone(),
        );
        registry.register(
            "cwm_scrub_problems",
            "Windows found damaged or lost by scrub passes",
            m.scrub_problems.clone(),
        );
        registry.register(
            "cwm_compaction_bytes",
            "Bytes copied by compaction",
            m.compaction_bytes.clone(),
        );
        registry.register(
            "cwm_compaction_segments",
            "Segments deleted by compaction",
            m.compaction_segments.clone(),
        );
        registry.register(
            "cwm_request_errors",
            "Requests answered with an error",
            m.errors.clone(),
        );
        registry.register("cwm_freezes", "Freezes made durable", m.freezes.clone());
        registry.register("cwm_thaws", "Thaws loaded", m.thaws.clone());
        registry.register(
            "cwm_freeze_bytes",
            "KV bytes frozen",
            m.freeze_bytes.clone(),
        );
        registry.register("cwm_thaw_bytes", "KV bytes thawed", m.thaw_bytes.clone());
        registry.register(
            "cwm_corruption_events",
            "Thaws stopped early by a corrupt block",
            m.corruption.clone(),
        );
        registry.register(
            "cwm_edge_case",
            "Seed edge cases met, by id and outcome",
            m.edge_cases.clone(),
        );
        registry.register(
            "cwm_concurrent_operations",
            "Operations in progress, by type",
            m.concurrent.clone(),
        );
        registry.register(
            "cwm_freeze_duration_seconds",
            "Freeze durations, request to durable",
            m.freeze_secs.clone(),
        );
        registry.register(
            "cwm_thaw_duration_seconds",
            "Thaw durations, request to loaded",
            m.thaw_secs.clone(),
        );
        registry.register(
            "cwm_storage_utilization_ratio",
            "Used bytes over capacity, by tier",
            m.utilization.clone(),
        );
        registry.register("cwm_windows", "Visible windows", m.windows.clone());
        registry.register(
            "cwm_integrity_problems",
            "Damage known in the log (health says degraded when above 0)",
            m.integrity_problems.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts an edge case met.
    pub fn edge_case(&self, id: &str, outcome: &str) {
        self.edge_cases
            .get_or_create(&vec![
                ("edge_case_id".into(), id.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
    }

    /// Moves the in-progress gauge of `op` by `delta`.
    pub fn concurrency(&self, op: &str, delta: i64) {
        self.concurrent
            .get_or_create(&vec![("operation_type".into(), op.into())])
            .inc_by(delta);
    }

    /// Records a successful freeze's or thaw's duration.
    pub fn observe(&self, op: &str, secs: f64) {
        match op {
            "freeze" => self.freeze_secs.observe(secs),
            _ => self.thaw_secs.observe(secs),
        }
    }

    /// The text exposition, with storage gauges taken from `stats` (the disk tier: used over
    /// `--capacity`, or over the file system's size when no capacity is set, so utilization
    /// alerts work either way) and `cpu_tier` (the RAM tier's bytes and capacity).
    #[must_use]
    pub fn render(
        &self,
        stats: Option<&StoreStats>,
        fs: Option<FsUsage>,
        cpu_tier: (u64, u64),
        class: Option<ClassBytes>,
    ) -> String {
        if let Some(st) = stats {
            let ratio = if st.capacity != 0 && st.capacity != u64::MAX {
                st.used_bytes as f64 / st.capacity as f64
            } else {
                fs.filter(|f| f.total > 0)
                    .map_or(0.0, |f| f.used as f64 / f.total as f64)
            };
            self.utilization
                .get_or_create(&vec![("tier".into(), "disk".into())])
                .set(ratio);
            self.windows.set(st.windows as i64);
        }
        if let Some(c) = class {
            for (k, v) in [("pinned", c.pinned), ("unnamed", c.unnamed)] {
                self.class_bytes
                    .get_or_create(&vec![("class".into(), k.into())])
                    .set(v as i64);
            }
        }
        let (bytes, capacity) = cpu_tier;
        self.utilization
            .get_or_create(&vec![("tier".into(), "cpu".into())])
            .set(if capacity == 0 {
                0.0
            } else {
                bytes as f64 / capacity as f64
            });
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# metrics encoding failed\n");
        }
        out
    }
}

/// How full the file system holding the data directory is.
#[derive(Debug, Clone, Copy)]
pub struct FsUsage {
    /// Bytes in the file system.
    pub total: u64,
    /// Bytes in use (by anyone).
    pub used: u64,
}

impl FsUsage {
    /// `statvfs` of `dir`.
    #[must_use]
    pub fn of(dir: &std::path::Path) -> Option<Self> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs is plain old data; the call fills it from a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        let frsize = st.f_frsize as u64;
        let total = st.f_blocks as u64 * frsize;
        let free = st.f_bfree as u64 * frsize;
        Some(Self {
            total,
            used: total.saturating_sub(free),
        })
    }
}
