//! Maintenance in the daemon: the background compactor and scrubber, and the `compact`,
//! `scrub` and `check` ops (docs/PROTOCOL.md).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::ApiError;
use super::Server;
use crate::store::{CompactOptions, EvictionPolicy};

/// Background maintenance settings of `cwm serve`.
#[derive(Debug, Clone)]
pub struct Maintenance {
    /// Compaction options (live-ratio threshold, rate, batch size).
    pub compact: CompactOptions,
    /// Seconds between background compaction passes (0: no background compactor).
    pub compact_interval_s: u64,
    /// Seconds between background scrub passes (0: off, the default).
    pub scrub_interval_s: u64,
    /// Most bytes/s a scrub reads (0: unlimited).
    pub scrub_rate: u64,
    /// Expiry and eviction.
    pub eviction: Eviction,
    /// Seconds an idempotent outcome is replayed; then it is forgotten, in memory and in the
    /// log (default a day).
    pub idempotency_ttl_s: u64,
    /// Most idempotent outcomes kept (default 100,000); past it the oldest are forgotten.
    pub idempotency_max: usize,
}

/// Expiry of windows whose TTL passed and eviction of unnamed windows under a byte budget.
#[derive(Debug, Clone)]
pub struct Eviction {
    /// The order unnamed windows go in.
    pub policy: EvictionPolicy,
    /// Above this fraction of the budget in block bytes, eviction starts…
    pub high: f64,
    /// …and goes down to this fraction.
    pub low: f64,
    /// The budget when the store has no capacity: this fraction of the file system's size.
    pub fs_fraction: f64,
    /// Milliseconds between passes (0: no background expiry or eviction).
    pub interval_ms: u64,
}

impl Default for Eviction {
    fn default() -> Self {
        Self {
            policy: EvictionPolicy::default(),
            high: 0.95,
            low: 0.90,
            fs_fraction: 0.90,
            interval_ms: 1000,
        }
    }
}

impl Default for Maintenance {
    fn default() -> Self {
        Self {
            compact: CompactOptions::default(),
            compact_interval_s: 10,
            scrub_interval_s: 0,
            scrub_rate: 64 << 20,
            eviction: Eviction::default(),
            idempotency_ttl_s: 86_400,
            idempotency_max: 100_000,
        }
    }
}

fn f64_field(a: &Value, k: &str) -> Result<Option<f64>, ApiError> {
    match a.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(Some)
            .ok_or_else(|| ApiError::validation(format!("{k} must be a non-negative number"))),
    }
}

/// The slowest `rate` a `compact` or `scrub` request may ask for (bytes a second; 0:
/// unthrottled). A compaction holds the store's compaction lock while it throttles: one asked
/// to copy at a few bytes a second would keep every other compaction out for months.
pub const MIN_RATE: u64 = 1 << 20;

/// The optional `rate` of `compact` and `scrub`: 0 or at least [`MIN_RATE`].
fn rate_field(a: &Value) -> Result<Option<u64>, ApiError> {
    match u64_field(a, "rate")? {
        Some(r) if r > 0 && r < MIN_RATE => Err(ApiError::validation(format!(
            "rate {r} bytes/s: 0 (unthrottled) or at least {MIN_RATE}"
        ))),
        r => Ok(r),
    }
}

fn u64_field(a: &Value, k: &str) -> Result<Option<u64>, ApiError> {
    match a.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::validation(format!("{k} must be a non-negative integer"))),
    }
}

/// The expiry and eviction thread's schedule: a pass every interval, one sooner when a freeze
/// passes the high watermark, and one on behalf of freezes refused for room — they add what
/// they need and wait for the next pass, which evicts for all of them at once (evicting each
/// on its own thread, many refused together would each evict as much again).
#[derive(Default)]
pub(super) struct Kick {
    st: std::sync::Mutex<KickState>,
    wake: std::sync::Condvar,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct KickState {
    /// A pass is asked for.
    due: bool,
    /// Log bytes refused freezes need beyond the watermarks.
    wanted: u64,
    /// Passes started and finished.
    started: u64,
    finished: u64,
    /// The thread is running (else a refused freeze evicts on its own thread).
    running: bool,
}

impl Kick {
    /// Asks for a pass now.
    pub(super) fn kick(&self) {
        if let Ok(mut st) = self.st.lock() {
            st.due = true;
            self.wake.notify_one();
        }
    }

    /// The thread: waits up to `d` for a kick; true when one came.
    fn wait(&self, d: Duration) -> bool {
        let Ok(g) = self.st.lock() else {
            std::thread::sleep(d);
            return false;
        };
        self.wake
            .wait_timeout_while(g, d, |st| !st.due)
            .is_ok_and(|(st, _)| st.due)
    }

    /// The thread: a pass begins; returns the bytes refused freezes asked for.
    fn begin(&self) -> u64 {
        self.st.lock().map_or(0, |mut st| {
            st.due = false;
            st.started += 1;
            std::mem::take(&mut st.wanted)
        })
    }

    /// The thread: the pass made the room it could make quickly; freezes waiting for it go on
    /// (the pass itself goes on compacting).
    fn served(&self) {
        if let Ok(mut st) = self.st.lock() {
            st.finished = st.started;
            self.done.notify_all();
        }
    }

    /// The thread: a pass ended (`running`: whether more will come).
    fn end(&self, running: bool) {
        if let Ok(mut st) = self.st.lock() {
            st.finished = st.started;
            st.running = running;
            self.done.notify_all();
        }
    }

    /// A freeze refused for room: asks the next pass for `need` more bytes and waits (at most
    /// `timeout`) until a pass that began after the request finished. `None` when no thread
    /// runs passes; else whether one finished in time.
    fn ask(&self, need: u64, timeout: Duration) -> Option<bool> {
        let mut st = self.st.lock().ok()?;
        if !st.running {
            return None;
        }
        st.wanted = st.wanted.saturating_add(need);
        st.due = true;
        let ticket = st.started;
        self.wake.notify_one();
        let (st, _) = self
            .done
            .wait_timeout_while(st, timeout, |st| st.running && st.finished <= ticket)
            .ok()?;
        Some(st.finished > ticket)
    }
}

/// How often the daemon saves window usage when it changed (`Store::save_usage`).
pub const USAGE_SAVE_INTERVAL: Duration = Duration::from_secs(60);

impl Server {
    /// Starts the background compactor and scrubber threads the config asks for, and the
    /// saver of window usage.
    pub(super) fn start_maintenance(self: &Arc<Self>) {
        let m = &self.cfg.maintenance;
        if m.compact_interval_s > 0 {
            let me = self.clone();
            std::thread::spawn(move || {
                let every = Duration::from_secs(me.cfg.maintenance.compact_interval_s);
                while me.sleep_unless_stopping(every) {
                    // Segments the next eviction pass empties are left to it.
                    let pass = me
                        .next_victims(me.budget(), None)
                        .and_then(|skip| me.compact_except(&me.cfg.maintenance.compact, &skip));
                    if let Err(e) = pass {
                        crate::log::warn(&format!("background compaction: {}", e.message));
                    }
                }
            });
        }
        if m.eviction.interval_ms > 0 {
            let me = self.clone();
            std::thread::spawn(move || {
                let every = Duration::from_millis(me.cfg.maintenance.eviction.interval_ms);
                let mut last = Instant::now();
                me.retention_kick.end(true);
                while !me.stopping.load(Ordering::SeqCst) {
                    // A freeze past the high watermark or refused for room asks for a pass
                    // early; otherwise one runs every interval.
                    let kicked = me
                        .retention_kick
                        .wait(every.min(Duration::from_millis(100)));
                    if !kicked && last.elapsed() < every {
                        continue;
                    }
                    last = Instant::now();
                    let wanted = me.retention_kick.begin();
                    if let Err(e) = me.retention_pass(wanted) {
                        crate::log::warn(&format!("expiry/eviction: {}", e.message));
                    }
                    me.retention_kick.end(true);
                }
                me.retention_kick.end(false);
            });
        }
        // Window usage (last use, hits: the eviction order) is saved at a clean stop; saving it
        // every minute as well bounds what a kill -9 forgets.
        {
            let me = self.clone();
            std::thread::spawn(move || {
                let mut saved = me.store.usage_epoch();
                while me.sleep_unless_stopping(USAGE_SAVE_INTERVAL) {
                    let now = me.store.usage_epoch();
                    if now != saved {
                        match me.store.save_usage() {
                            Ok(_) => saved = now,
                            Err(e) => crate::log::warn(&format!("saving window usage: {e}")),
                        }
                    }
                }
            });
        }
        if m.scrub_interval_s > 0 {
            let me = self.clone();
            std::thread::spawn(move || {
                let every = Duration::from_secs(me.cfg.maintenance.scrub_interval_s);
                while me.sleep_unless_stopping(every) {
                    if let Err(e) = me.scrub_pass(me.cfg.maintenance.scrub_rate, &|_, _| {}) {
                        crate::log::warn(&format!("background scrub: {}", e.message));
                    }
                }
            });
        }
    }

    /// The byte budget eviction keeps live data under: the store's capacity, or a fraction of
    /// the file system when it has none.
    pub(super) fn budget(&self) -> u64 {
        self.store.capacity().unwrap_or_else(|| {
            super::metrics::FsUsage::of(self.store.dir()).map_or(u64::MAX, |f| {
                (f.total as f64 * self.cfg.maintenance.eviction.fs_fraction) as u64
            })
        })
    }

    /// One expiry and eviction pass: tombstones windows whose TTL passed; above the high
    /// watermark, evicts unnamed windows down to the low one (and `wanted` bytes further:
    /// freezes refused for room wait for them), then compacts so the space comes back.
    pub(super) fn retention_pass(&self, wanted: u64) -> Result<Value, ApiError> {
        let forgotten = self.expire_outcomes();
        if forgotten > 0 {
            crate::log::info(&format!(
                "forgot {forgotten} idempotent outcomes past their TTL"
            ));
        }
        let sessions = self.expire_deleted_sessions();
        if sessions > 0 {
            crate::log::info(&format!(
                "forgot {sessions} sessions deleted longer than the idempotency TTL ago"
            ));
        }
        let expired = self.store.expire_due()?;
        self.metrics.expiries.inc_by(expired.len() as u64);
        for w in &expired {
            crate::log::info(&format!("expired: window {:?} v{}", w.name, w.version));
        }
        // (Housekeeping, once a minute: a failure is logged, and eviction goes on.)
        let now = crate::clock::now_unix_ms() as u64;
        let swept = self.inert_swept.load(std::sync::atomic::Ordering::Relaxed);
        let sweep = if now.saturating_sub(swept) >= 60_000 {
            self.inert_swept
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.store.forget_inert_retention()
        } else {
            Ok(0)
        };
        match sweep {
            Ok(0) => {}
            Ok(n) => crate::log::info(&format!(
                "deleted {n} retention records of windows deleted or replaced since"
            )),
            Err(e) => crate::log::warn(&format!("retention records not deleted: {e}")),
        }
        let ev = &self.cfg.maintenance.eviction;
        let budget = self.budget();
        let live = self.store.block_bytes()?;
        let mut out = json!({"expired": expired.len(), "block_bytes": live, "budget": budget});
        let Some(target) = self.eviction_target(budget, wanted)? else {
            return Ok(out);
        };
        let rep = self.store.evict(ev.policy, target, budget)?;
        self.count_evictions(&rep);
        if rep.evicted.is_empty() {
            // Only pinned data above the watermark: nothing to evict (freezes of named windows
            // meet QUOTA_EXCEEDED when it is full).
            out["evicted"] = json!(rep);
            return Ok(out);
        }
        crate::log::info(&format!(
            "eviction ({:?}): {} unnamed windows, {} block bytes given up; {} of budget {} left{}",
            ev.policy,
            rep.evicted.len(),
            rep.bytes,
            rep.live_after,
            budget,
            if rep.reached {
                ""
            } else {
                " (pinned data alone is above the low watermark)"
            }
        ));
        // The next pass will likely evict as much as this one did.
        let gap = ((ev.high - ev.low).max(0.0) * budget as f64) as u64;
        let skip = self.next_victims(budget, Some(3 * rep.bytes.max(gap)))?;
        // The segments eviction left (nearly) empty first: deleting them gives the room back
        // at once, so freezes waiting for room go on before the copying part.
        let empty = CompactOptions {
            live_ratio: 0.05,
            ..self.cfg.maintenance.compact.clone()
        };
        self.compact_except(&empty, &skip)?;
        if self.store.has_room(wanted) {
            // (Else they wait for the copying part: retried now, they would be refused.)
            self.retention_kick.served();
        }
        self.compact_evicted(&skip)?;
        out["evicted"] = json!(rep);
        Ok(out)
    }

    /// How far eviction must go (in block bytes), if at all: below the low watermark of the
    /// budget once the block records pass the high one; and when the log itself (blocks,
    /// manifests, tombstones, garbage) passes the high watermark of `--capacity` even after a
    /// compaction, by as many block bytes as it is over the low one — so a log full of small
    /// windows' metadata still makes room, not only one full of blocks.
    fn eviction_target(&self, budget: u64, wanted: u64) -> Result<Option<u64>, ApiError> {
        let ev = &self.cfg.maintenance.eviction;
        let blocks = self.store.block_bytes()?;
        let mut target = ((blocks.saturating_add(wanted) as f64) > ev.high * budget as f64)
            .then_some(((ev.low * budget as f64) as u64).saturating_sub(wanted));
        if let Some(cap) = self.store.capacity() {
            // The log's fill counts the room promised to freezes in progress (many freezes
            // finishing at once must find it) and the room refused freezes wait for.
            let fill = || self.store.used_bytes() + self.store.reserved_bytes() + wanted;
            let full = |used: u64| (used as f64) > ev.high * cap as f64;
            if full(fill()) {
                // Garbage first: a compaction may be all it takes.
                self.compact_evicted(&self.next_victims(budget, None)?)?;
            }
            let used = fill();
            if full(used) {
                let excess = used.saturating_sub((ev.low * cap as f64) as u64);
                let t = self.store.block_bytes()?.saturating_sub(excess);
                target = Some(target.map_or(t, |x| x.min(t)));
            }
        }
        Ok(target)
    }

    /// Makes room for a freeze of `need` bytes refused for room: evicts unnamed windows until
    /// the log, once compacted, can take it. False when there is nothing unnamed to evict.
    pub(super) fn make_room(&self, need: u64) -> Result<bool, ApiError> {
        if self.store.has_room(need) {
            // Room came back since the refusal.
            return Ok(true);
        }
        if !self.store.has_unnamed()? {
            // Nothing eviction could give up (pinned data fills the budget).
            return Ok(false);
        }
        if let Some(served) = self.retention_kick.ask(need, Duration::from_secs(30)) {
            return Ok(served);
        }
        // No expiry and eviction thread: evict here.
        let ev = &self.cfg.maintenance.eviction;
        let budget = self.budget();
        // Block bytes to give up: the window's, plus whatever the log is over the low watermark.
        let over = self
            .store
            .used_bytes()
            .saturating_add(self.store.reserved_bytes())
            .saturating_add(need)
            .saturating_sub((ev.low * budget as f64) as u64);
        let target = self.store.block_bytes()?.saturating_sub(over.max(need));
        let rep = self.store.evict(ev.policy, target, budget)?;
        self.count_evictions(&rep);
        if rep.evicted.is_empty() {
            return Ok(false);
        }
        crate::log::info(&format!(
            "eviction for a freeze of {need} bytes: {} unnamed windows, {} block bytes given up",
            rep.evicted.len(),
            rep.bytes
        ));
        self.compact_evicted(&self.next_victims(budget, Some(rep.bytes))?)?;
        if !self.store.has_room(need) {
            // The segments left alone hold the room this freeze needs now.
            self.compact_evicted(&HashSet::new())?;
        }
        Ok(true)
    }

    /// The segments the next eviction pass would empty — `pass` bytes of victims, or the gap
    /// between the watermarks when `None` — which compaction leaves for it; none while the
    /// log and the block bytes are both more than a pass below the low watermark (no eviction
    /// is near).
    fn next_victims(&self, budget: u64, pass: Option<u64>) -> Result<HashSet<u64>, ApiError> {
        let ev = &self.cfg.maintenance.eviction;
        let gap = (ev.high - ev.low).max(0.0);
        let pass = pass.unwrap_or((3.0 * gap * budget as f64) as u64);
        let near = ((ev.low * budget as f64) as u64).saturating_sub(pass);
        let fill = self.store.block_bytes()?.max(self.store.used_bytes());
        if fill < near {
            return Ok(HashSet::new());
        }
        Ok(self.store.about_to_empty(ev.policy, budget, pass)?)
    }

    /// Kicks an expiry and eviction pass when the block bytes or the log passed the high
    /// watermark (after a freeze: at a high write rate the timed pass comes too late, and the
    /// next freeze would be refused and evict inline).
    pub(super) fn kick_retention_if_full(&self) {
        let ev = &self.cfg.maintenance.eviction;
        if ev.interval_ms == 0 {
            return;
        }
        let high = |limit: u64| (ev.high * limit as f64) as u64;
        let blocks = self.store.block_bytes().unwrap_or(0);
        let log_full = self
            .store
            .capacity()
            .is_some_and(|c| self.store.used_bytes() + self.store.reserved_bytes() > high(c));
        if log_full || blocks > high(self.budget()) {
            self.retention_kick.kick();
        }
    }

    /// Counts an eviction pass in the metrics.
    fn count_evictions(&self, rep: &crate::store::EvictReport) {
        let l = vec![("reason".into(), "capacity".into())];
        self.metrics
            .evictions
            .get_or_create(&l)
            .inc_by(rep.evicted.len() as u64);
        self.metrics
            .evicted_bytes
            .get_or_create(&l)
            .inc_by(rep.bytes);
    }

    /// Compacts every sealed segment at most 90 % live (or the configured ratio, if higher),
    /// except those in `skip` (the next eviction pass empties them: copying their live blocks
    /// now would be wasted), so what eviction gave up comes back as free log space.
    fn compact_evicted(&self, skip: &HashSet<u64>) -> Result<Value, ApiError> {
        let opts = CompactOptions {
            live_ratio: self.cfg.maintenance.compact.live_ratio.max(0.9),
            ..self.cfg.maintenance.compact.clone()
        };
        self.compact_except(&opts, skip)
    }

    /// A compaction pass over the candidates of `opts` except the segments in `skip`.
    fn compact_except(
        &self,
        opts: &CompactOptions,
        skip: &HashSet<u64>,
    ) -> Result<Value, ApiError> {
        let mut ids: Vec<u64> = self
            .store
            .compact_candidates(opts.live_ratio)?
            .into_iter()
            .filter(|id| !skip.contains(id))
            .collect();
        if opts.max_segments > 0 {
            ids.truncate(opts.max_segments);
        }
        let rep = self.store.compact_segments(&ids, opts, &mut |_| {})?;
        self.count_compaction(&rep);
        Ok(json!({ "report": rep }))
    }

    /// Sleeps `d` in short steps; false once the server is stopping.
    fn sleep_unless_stopping(&self, d: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < d {
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100).min(d));
        }
        !self.stopping.load(Ordering::SeqCst)
    }

    fn compact_pass(
        &self,
        opts: &CompactOptions,
        progress: &dyn Fn(&crate::store::CompactProgress),
    ) -> Result<Value, ApiError> {
        let rep = self.store.compact(opts, &mut |p| progress(p))?;
        self.count_compaction(&rep);
        Ok(json!({ "report": rep }))
    }

    /// Counts and logs a compaction.
    fn count_compaction(&self, rep: &crate::store::CompactReport) {
        self.metrics.compaction_bytes.inc_by(rep.bytes_copied);
        self.metrics
            .compaction_segments
            .inc_by(rep.segments_removed.len() as u64);
        if !rep.segments_removed.is_empty() {
            crate::log::info(&format!(
                "compaction: segments {:?} deleted, {} bytes copied, {} bytes given back in {:.2} s",
                rep.segments_removed, rep.bytes_copied, rep.bytes_reclaimed, rep.seconds
            ));
        }
    }

    /// One scrub pass; `progress(done, total)` after each window verified.
    fn scrub_pass(&self, rate: u64, progress: &dyn Fn(usize, usize)) -> Result<Value, ApiError> {
        let started = super::integrity::Integrity::now();
        let (windows, bytes) = crate::fsck::verify_windows(&self.store, rate, progress)?;
        let lost: Vec<(String, u64)> = self.store.incomplete_windows()?;
        let catalog = self.store.scrub_catalog()?;
        let catalog_bad = catalog.rewritten as usize + catalog.bad_tombstones.len();
        let bad = windows.iter().filter(|w| w.status != "ok").count() + lost.len() + catalog_bad;
        self.metrics.corruption.inc_by(catalog_bad as u64);
        for t in &catalog.bad_tombstones {
            crate::log::warn(&format!(
                "scrub: {t}; the window it deleted may come back at the next start: delete it again"
            ));
        }
        self.metrics.scrub_passes.inc();
        self.metrics.scrub_problems.inc_by(bad as u64);
        for w in windows.iter().filter(|w| w.status != "ok") {
            self.metrics.corruption.inc();
            crate::log::warn(&format!(
                "scrub: window {:?} is {}: {}",
                w.name,
                w.status,
                w.detail.as_deref().unwrap_or("")
            ));
        }
        for (name, _) in &lost {
            crate::log::warn(&format!(
                "scrub: window {name:?} is lost (a block is missing from the log)"
            ));
        }
        // What health reports from now on (a clean pass clears earlier findings).
        let mut found: Vec<String> = windows
            .iter()
            .filter(|w| w.status != "ok")
            .map(|w| {
                format!(
                    "window {:?} is {}: {}",
                    w.name,
                    w.status,
                    w.detail.as_deref().unwrap_or("")
                )
            })
            .collect();
        found.extend(
            lost.iter()
                .map(|(n, _)| format!("window {n:?} is lost: a block is missing from the log")),
        );
        found.extend(catalog.bad_tombstones.iter().map(|t| {
            format!("{t}; the window it deleted may come back at the next start: delete it again")
        }));
        self.integrity.scrubbed(started, found);
        let mut out: Vec<Value> = windows.iter().map(|w| json!(w)).collect();
        out.extend(lost.iter().map(|(n, _)| {
            json!({"name": n, "status": "lost", "blocks": 0, "intact_blocks": 0,
                   "detail": "a block is missing from the log"})
        }));
        Ok(json!({"windows": out, "bytes_verified": bytes, "problems": bad, "catalog": catalog}))
    }

    /// `compact`, `scrub` and `check`; `None` for any other op.
    pub(super) fn maintenance_op(
        &self,
        op: &str,
        a: &Value,
        progress: &(dyn Fn(&str, Value) + Sync),
    ) -> Option<Result<Value, ApiError>> {
        Some(match op {
            "compact" => (|| {
                let mut opts = self.cfg.maintenance.compact.clone();
                if let Some(r) = f64_field(a, "live_ratio")? {
                    opts.live_ratio = r;
                }
                if let Some(r) = rate_field(a)? {
                    opts.rate = r;
                }
                self.compact_pass(&opts, &|p| {
                    progress("compacting", json!({"progress": p}));
                })
            })(),
            "scrub" => (|| {
                let rate = rate_field(a)?.unwrap_or(0);
                // At most ten progress lines a second, and the last one.
                let last = std::cell::Cell::new(None::<std::time::Instant>);
                self.scrub_pass(rate, &|done, total| {
                    if done == total || last.get().is_none_or(|t| t.elapsed().as_millis() >= 100) {
                        last.set(Some(std::time::Instant::now()));
                        let p = json!({"windows_done": done, "windows_total": total});
                        progress("scrubbing", json!({ "progress": p }));
                    }
                })
            })(),
            "check" => (|| {
                let violations = self.store.check_invariants()?;
                let garbage = self.store.garbage_bytes()?;
                Ok(json!({"violations": violations, "garbage_bytes": garbage}))
            })(),
            _ => return None,
        })
    }
}
