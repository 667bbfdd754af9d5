//! The window ops, one method each: `hello`, `health`, `unregister`, `freeze`, `thaw`,
//! `lookup`, `list`, `stat`, `delete`. Arguments arrive parsed ([`super::args`]); answers are
//! the JSON objects docs/PROTOCOL.md describes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::args::{self, DeleteArgs, FreezeArgs, ListArgs, LookupArgs, RetainArgs, ThawArgs};
use super::handler::Ctx;
use super::protocol::{self, ApiError};
use super::Server;
use crate::error::ErrorCode;
use crate::pipeline::{
    freeze, thaw, Engine, FreezeOptions, FreezeReport, FreezeRequest, StreamThaw, ThawOptions,
    ThawReport, ThawRequest,
};
use crate::store::{Class, Retention};

/// What a session's engine reported it holds: (engine, token ids, block ids).
type Held = (String, Vec<u32>, Vec<u64>);

/// Tries a freeze refused for room gets after an eviction for it (see `op_freeze`).
const FREEZE_ROOM_TRIES: usize = 4;

impl Server {
    /// `hello`: version, protocol and capabilities.
    pub(super) fn op_hello(&self) -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": protocol::PROTOCOL_VERSION,
            "capabilities": ["register.shm", "register.process", "register.cuda", "sessions", "freeze", "thaw", "lookup", "list", "stat", "delete", "idempotency", "metrics", "thaw.prefix", "lookup.estimate", "layout.pieces", "compact", "scrub", "check", "push", "pull", "remote.list", "remote.scrub"],
        })
    }

    /// `health`: integrity status, space, staging, engines.
    pub(super) fn op_health(&self) -> Result<Value, ApiError> {
        let st = self.store.stats().map_err(ApiError::from)?;
        let status = if self.integrity.ok() {
            "ok"
        } else {
            "degraded"
        };
        let (pools, pool_bytes) = self.staging_pools.lock().map_or((0, 0), |p| {
            (p.len(), p.iter().map(|x| x.bytes()).sum::<u64>())
        });
        Ok(
            json!({"status": status, "integrity": self.integrity.report(), "windows": st.windows, "used_bytes": st.used_bytes,
            "capacity": st.capacity, "free_bytes": st.free_bytes, "reserved_bytes": st.reserved_bytes, "io_engine": st.engine,
            "staging_pools": pools, "staging_bytes": pool_bytes,
            "engines": self.engines.lock().map(|e| e.len()).unwrap_or(0), "remote": self.remote.health()}),
        )
    }

    /// `unregister`.
    pub(super) fn op_unregister(&self, name: &str, uid: Option<u32>) -> Result<Value, ApiError> {
        let mut engines = self
            .engines
            .lock()
            .map_err(|_| ApiError::internal("engine table poisoned"))?;
        if let Some(r) = engines.get(name) {
            super::register::may_use(r.owner, uid, name)?;
        }
        match engines.remove(name) {
            Some(_) => Ok(json!({"engine": name})),
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no engine {name:?} is registered"),
            )),
        }
    }

    /// The engine a freeze or thaw names, or else the one its session's engine reported
    /// holding the session's KV (with what it holds). `what`: the end of the message when
    /// there is neither.
    fn engine_or_held(
        &self,
        engine: Option<&str>,
        session: Option<&str>,
        (what, uid): (&str, Option<u32>),
    ) -> Result<(Arc<Engine>, Option<Held>), ApiError> {
        let held = session
            .and_then(|s| self.sessions.get(s).ok())
            .and_then(|s| s.held);
        let name = match (engine, &held) {
            (Some(e), _) => e.to_string(),
            (None, Some((e, _, _))) => e.clone(),
            (None, None) => {
                return Err(ApiError::validation(format!(
                    "missing field engine (or a session whose engine {what}): name the \
                     registered engine that holds the KV (`cwm freeze --engine E --tokens … \
                     --block-ids …`), or first report what the session holds with \
                     session.state (engine, token_ids, block_ids)"
                )))
            }
        };
        Ok((self.engine_for(&name, uid)?, held))
    }

    /// `freeze`: `captured` goes out as soon as the engine's blocks are free, the final
    /// `durable` once the manifest is on disk.
    pub(super) fn op_freeze(&self, a: FreezeArgs, ctx: &Ctx<'_>) -> Result<Value, ApiError> {
        let (eng, held) = self.engine_or_held(
            a.engine.as_deref(),
            a.session.as_deref(),
            ("reported what it holds", ctx.uid),
        )?;
        let (tokens, block_ids) = match (a.tokens, held) {
            (Some(t), _) => (
                t,
                a.block_ids.ok_or_else(|| args::missing_list("block_ids"))?,
            ),
            (None, Some((_, t, b))) => (t, b),
            (None, None) => return Err(args::missing_list("tokens")),
        };
        let fr = FreezeRequest {
            window: a.window,
            session: a.session.unwrap_or_default(),
            tokens,
            block_ids,
            replace: a.replace,
            salt: a.salt,
            retention: a.retention,
            origin: ctx.origin,
        };
        // `captured` goes out from the gather thread the moment the engine's blocks are
        // free, before the writes finish.
        let on_captured = || (ctx.progress)("captured", json!({}));
        let session = fr.session.clone();
        if !session.is_empty() {
            self.sessions
                .begin_freeze(&session)
                .map_err(ApiError::from)?;
        }
        let opts = FreezeOptions {
            tier: Some(&self.tier).filter(|t| t.enabled()),
            on_captured: Some(&on_captured),
            cancel: ctx.cancel(),
            progress: None,
        };
        let retry = fr.clone();
        let mut res = freeze(&self.store, &eng, fr, &self.cfg.pipeline, &opts);
        // Refused for room before a byte was written: evict unnamed windows now, as far as
        // this window needs, and try again (the background pass may be a second away). Other
        // freezes finishing meanwhile may take the room first: tried again while each eviction
        // gives some back, a few times at most — refused only when nothing unnamed is left
        // to give up, or the log keeps filling faster than eviction frees it.
        for _ in 0..FREEZE_ROOM_TRIES {
            if !matches!(&res, Err(e) if e.code() == ErrorCode::QuotaExceeded) {
                break;
            }
            let need = self.store.room_for(
                retry.block_ids.len() as u64,
                eng.layout.block_bytes(),
                retry.tokens.len() as u64,
            );
            if !self.make_room(need).unwrap_or(false) {
                break;
            }
            res = freeze(&self.store, &eng, retry.clone(), &self.cfg.pipeline, &opts);
        }
        if !session.is_empty() {
            self.sessions.end_freeze(&session, res.is_ok());
        }
        let r = res.map_err(|e| self.quota_detail(ApiError::from(e)))?;
        self.froze(&r);
        self.kick_retention_if_full();
        let mut out = json!({"status": "durable", "window": r.info, "report": r});
        if let Some(remote) = self
            .remote
            .after_freeze(&self.store, &r.info.name, r.info.class)
        {
            out["remote"] = remote;
        }
        Ok(out)
    }

    /// Logs and counts a durable freeze.
    fn froze(&self, r: &FreezeReport) {
        tracing::info!(
            op = "freeze",
            window = %r.info.name,
            version = r.info.version,
            session = %r.info.session,
            bytes = r.bytes,
            blocks_written = r.blocks_written,
            blocks_deduplicated = r.blocks_deduplicated,
            captured_secs = r.captured_secs,
            durable_secs = r.durable_secs,
            "window durable"
        );
        self.metrics.freezes.inc();
        self.metrics.freeze_bytes.inc_by(r.bytes);
    }

    /// `thaw` (identical thaws running at once are coalesced by the caller).
    pub(super) fn op_thaw(&self, a: ThawArgs, ctx: &Ctx<'_>) -> Result<Value, ApiError> {
        // EC-041: the request's own limit bounds the whole thaw — a wait for another thaw's
        // fetch, the fetch streamed into the engine, and the thaw from the log after it.
        let started = std::time::Instant::now();
        let asked_by = a
            .timeout_ms
            .map(|ms| started + std::time::Duration::from_millis(ms));
        let (eng, held) = self.engine_or_held(
            a.engine.as_deref(),
            a.session.as_deref(),
            ("reported its blocks", ctx.uid),
        )?;
        // A session that cannot become THAWED is refused before any block is written.
        if let Some(cur) = a.session.as_deref().and_then(|s| self.sessions.get(s).ok()) {
            use crate::session::{SessionError, SessionState};
            if cur.state != SessionState::Thawed
                && !cur.state.allowed().contains(&SessionState::Thawed)
            {
                return Err(ApiError::from(SessionError::InvalidTransition {
                    from: cur.state,
                    to: SessionState::Thawed,
                    allowed: cur.state.allowed(),
                }));
            }
        }
        let block_ids = match (a.block_ids, held) {
            (Some(b), _) => b,
            (None, Some((_, _, b))) => b,
            (None, None) => return Err(args::missing_list("block_ids")),
        };
        // Without a window name, the window holding the longest stored prefix of the
        // tokens (what `lookup` found) is restored, as far as block_ids reach.
        let (window, prefix) = match (a.window, &a.tokens) {
            (Some(w), _) => (w, a.prefix),
            (None, Some(t)) => {
                let found = self
                    .store
                    .longest_prefix(&eng.keys_with(t, a.salt.as_deref()), None)
                    .map_err(ApiError::from)?;
                let (w, _) = found.ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NotFound,
                        "no stored window starts with these tokens",
                    )
                })?;
                (w.name, true)
            }
            (None, None) => {
                return Err(ApiError::validation(
                    "missing field window (or tokens, to restore the longest stored prefix)",
                ))
            }
        };
        let mut tr = ThawRequest {
            window,
            block_ids,
            expect_tokens: a.tokens,
            prefix,
            first_block: a.first_block,
            salt: a.salt,
        };
        // A window this instance does not hold: from the shared tier, if there is one,
        // scattered into the engine as its blocks arrive when it can be.
        let mut streamed = None;
        let (fetched, instead) = if self.store.get(&tr.window).is_err() {
            // Its deadline: the slower of a local thaw and a fetch from the tier.
            let local = f64::from_bits(self.thaw_rate.load(Ordering::Relaxed));
            let rate = match self.remote.read_rate() {
                r if r > 0.0 => r.min(local),
                _ => local,
            };
            let mut sink =
                StreamThaw::new(&eng, &tr, &self.cfg.pipeline, ctx.cancel(), asked_by, rate);
            let out = self.fetch_missing(
                &eng,
                &tr.window,
                tr.expect_tokens.as_deref(),
                tr.salt.as_deref(),
                Some(&mut sink),
                super::coalesce::Until {
                    cancel: ctx.cancel().as_ref(),
                    deadline: asked_by,
                },
            )?;
            // Nothing fetched (no tier, or the window was stored meanwhile by another thaw,
            // a pull or a freeze): what the stream got, if anything, is not the stored
            // window; that is thawed the ordinary way.
            streamed = sink.finish().filter(|_| out.0.is_some());
            out
        } else {
            (None, None)
        };
        // Only a prefix of a published window could be had: that is thawed, as a prefix.
        if let Some(w) = instead {
            (tr.window, tr.prefix, streamed) = (w, true, None);
        }
        // EC-041: the request's timeout_ms from its start, else a deadline scaled to the
        // window from now.
        let deadline = asked_by.unwrap_or_else(|| {
            let bytes = self.store.get(&tr.window).map(|w| w.bytes).unwrap_or(0);
            std::time::Instant::now()
                + crate::pipeline::thaw_timeout(
                    bytes,
                    f64::from_bits(self.thaw_rate.load(Ordering::Relaxed)),
                )
        });
        let opts = ThawOptions {
            tier: Some(&self.tier).filter(|t| t.enabled()),
            cancel: ctx.cancel(),
            progress: None,
            deadline: Some(deadline),
        };
        let r = match streamed {
            // The blocks held locally (a prefix of the range) the ordinary way, now.
            Some(s) => match s.local_request(&tr) {
                Some(local) => s.merge(
                    thaw(&self.store, &eng, &local, &self.cfg.pipeline, &opts)
                        .map_err(ApiError::from)?,
                ),
                None => {
                    self.store.record_hit(&s.report.window);
                    s.report
                }
            },
            None => {
                thaw(&self.store, &eng, &tr, &self.cfg.pipeline, &opts).map_err(ApiError::from)?
            }
        };
        if let Some(sess) = &a.session {
            self.sessions.thawed(sess).map_err(ApiError::from)?;
        }
        self.thawed(&r);
        let mut out = json!({"status": "loaded", "report": r});
        if let Some(Value::Object(f)) = fetched {
            for (k, v) in f {
                out[k] = v;
            }
        }
        Ok(out)
    }

    /// Records a thaw's corruption findings, logs and counts it, and updates the running
    /// estimates of thaw speed (disk, RAM tier) for the next deadlines and lookups.
    fn thawed(&self, r: &ThawReport) {
        if let Some(c) = &r.tier_corruption {
            self.metrics.corruption.inc();
            self.integrity.record(
                "thaw",
                format!(
                    "window {:?}: {c} was corrupt in the RAM tier (a host memory error); \
                     the disk copy was used",
                    r.window
                ),
            );
        }
        if let Some(c) = &r.corruption {
            self.metrics.corruption.inc();
            self.integrity
                .record("thaw", format!("window {:?}: {c}", r.window));
        }
        tracing::info!(
            op = "thaw",
            window = %r.window,
            bytes = r.bytes,
            blocks_restored = r.blocks_restored,
            tokens_to_recompute = r.tokens_to_recompute,
            from_tier = r.blocks_from_tier,
            loaded_secs = r.loaded_secs,
            corruption = ?r.corruption,
            "window loaded"
        );
        self.metrics.thaws.inc();
        // (A thaw as the blocks arrived measures the fetch, not a thaw.)
        if r.loaded_secs > 0.0 && r.bytes > (64 << 20) && r.blocks_streamed == 0 {
            let seen = r.bytes as f64 / r.loaded_secs / 1e9;
            let rate = if r.blocks_from_tier == r.blocks_restored {
                &self.tier_rate
            } else {
                &self.thaw_rate
            };
            super::ewma(rate, seen);
        }
        self.metrics.thaw_bytes.inc_by(r.bytes);
    }

    /// `lookup`: the longest stored prefix of the tokens, and whether thawing it beats
    /// recomputing it.
    pub(super) fn op_lookup(&self, a: LookupArgs) -> Result<Value, ApiError> {
        let eng = self.engine(&a.engine)?;
        let keys = eng.keys_with(&a.tokens, a.salt.as_deref());
        let found = self
            .store
            .longest_prefix(&keys, a.window.as_deref())
            .map_err(ApiError::from)?;
        let local = found.as_ref().map_or(0, |(_, n)| *n);
        // Past what this instance holds, the shared tier (automatic lookups only; the probe
        // is bounded by the remote lookup timeout).
        let bs = eng.layout.block_size as usize;
        let full = &keys[..a.tokens.len() / bs];
        let named_remote = match &a.window {
            Some(w) if local == 0 && self.remote.configured() && self.store.get(w).is_err() => {
                Some(w.clone())
            }
            _ => None,
        };
        // A named window held only by the tier: how far its manifest matches (the thaw then
        // pulls it).
        let probe = match (&a.window, &named_remote) {
            (_, Some(w)) => self.remote.probe_window(w, full),
            (None, None) => self.remote.probe_prefix(full, local),
            (Some(_), None) => super::remote_ops::Probe::Off,
        };
        let (local, remote) = match (probe, &named_remote) {
            (super::remote_ops::Probe::Hit(n), Some(_)) => (n, 0),
            (super::remote_ops::Probe::Hit(n), None) => (local, n),
            _ => (local, 0),
        };
        let blocks = local + remote;
        self.metrics.lookups.inc();
        if blocks > 0 {
            self.metrics.lookup_hits.inc();
        }
        let tokens_matched = (blocks * bs).min(a.tokens.len());
        self.metrics.lookup_volume(
            blocks as u64,
            keys.len().saturating_sub(blocks) as u64,
            tokens_matched as u64,
            a.tokens.len().saturating_sub(tokens_matched) as u64,
        );
        let matched: Vec<String> = keys[..blocks].iter().map(|k| format!("{k:032x}")).collect();
        // Blocks all in the RAM tier thaw at the tier's measured speed, else the disk's
        // (also while a thaw holds the tier: the scheduler never waits for one); blocks from
        // the shared tier at its measured read rate.
        let from_tier = local > 0
            && remote == 0
            && self.tier.enabled()
            && self.tier.contains_all(&keys[..local]) == Some(true);
        let local_rate = f64::from_bits(
            if from_tier {
                &self.tier_rate
            } else {
                &self.thaw_rate
            }
            .load(Ordering::Relaxed),
        );
        let bb = eng.layout.block_bytes() as f64;
        let rate = if remote == 0 {
            local_rate
        } else {
            let secs = local as f64 * bb / (local_rate * 1e9)
                + remote as f64 * bb / (self.remote.read_rate() * 1e9);
            blocks as f64 * bb / secs / 1e9
        };
        let est = crate::decision::estimate(
            blocks as u64 * eng.layout.block_bytes(),
            rate,
            tokens_matched as u64,
            a.prefill_tokens_per_s,
        );
        let window = if remote > 0 {
            Some(super::remote_ops::fill_name(blocks, keys[blocks - 1]))
        } else if local > 0 && named_remote.is_some() {
            named_remote
        } else {
            found.as_ref().map(|(w, _)| w.name.clone())
        };
        let mut out = json!({"blocks_matched": blocks, "tokens_matched": tokens_matched,
            "block_keys": matched,
            "window": window,
            "window_version": found.as_ref().filter(|_| remote == 0).map(|(w, _)| w.version),
            "from_tier": from_tier,
            "estimated_thaw_secs": est.thaw_secs,
            "estimated_recompute_secs": est.recompute_secs,
            "thaw_wins": est.thaw_wins});
        if probe != super::remote_ops::Probe::Off {
            out["remote"] = json!({"outcome": probe.label(), "blocks": remote});
        }
        Ok(out)
    }

    /// `list`: a page of windows.
    pub(super) fn op_list(&self, a: ListArgs) -> Result<Value, ApiError> {
        let (page, total) = self
            .store
            .list_page(a.offset, a.limit, a.session.as_deref())
            .map_err(ApiError::from)?;
        Ok(json!({"windows": page, "total": total}))
    }

    /// `stat`: one window.
    pub(super) fn op_stat(&self, window: &str) -> Result<Value, ApiError> {
        let info = self.store.get(window).map_err(ApiError::from)?;
        Ok(json!({"window": info}))
    }

    /// A QUOTA_EXCEEDED says how much of the store is pinned (what eviction cannot free).
    fn quota_detail(&self, mut e: ApiError) -> ApiError {
        if e.code == ErrorCode::QuotaExceeded {
            if let Ok(c) = self.store.class_bytes() {
                e.message = format!(
                    "{}; {} bytes are held by pinned windows and {} by unnamed ones (evictable): \
                     unpin, delete or give TTLs to pinned windows to make room",
                    e.message, c.pinned, c.unnamed
                );
            }
        }
        e
    }

    /// `pin`, `unpin`, `ttl`: a window's class and expiry. `pin`: pinned, no expiry; `unpin`:
    /// evictable (its expiry kept); `ttl`: expires `seconds` from now (0: never; class kept).
    pub(super) fn op_retain(&self, op: &str, a: RetainArgs) -> Result<Value, ApiError> {
        let cur = self.store.get(&a.window).map_err(ApiError::from)?;
        let mut r = Retention {
            class: cur.class,
            expires_unix_ms: cur.expires_unix_ms,
        };
        match (op, a.seconds) {
            ("pin", _) => {
                r.class = Class::Pinned;
                r.expires_unix_ms = None;
            }
            ("unpin", _) => r.class = Class::Unnamed,
            (_, Some(0) | None) => r.expires_unix_ms = None,
            (_, Some(s)) => r.expires_unix_ms = Some(args::expiry(s)?),
        }
        // Without an expected version, the version read above: a replace meanwhile is refused
        // rather than changing the new window.
        let set = || {
            self.store.set_retention(
                &a.window,
                Some(a.expected_version.unwrap_or(cur.version)),
                r,
            )
        };
        // A full log refuses even the small record: eviction makes room as for a freeze, then
        // it is written (pinning is what one does under pressure; the window itself may have
        // been evicted meanwhile, if unnamed: NOT_FOUND then).
        let info = match set() {
            Err(crate::store::StoreError::QuotaExceeded { needed, .. })
                if self.make_room(needed).unwrap_or(false) =>
            {
                set()
            }
            other => other,
        }
        .map_err(|e| self.quota_detail(ApiError::from(e)))?;
        Ok(json!({ "window": info }))
    }

    /// `delete`: one window (at an expected version, if given).
    pub(super) fn op_delete(&self, a: DeleteArgs) -> Result<Value, ApiError> {
        let info = self
            .store
            .delete_window(&a.window, a.expected_version)
            .map_err(ApiError::from)?;
        Ok(json!({"deleted": info}))
    }
}
