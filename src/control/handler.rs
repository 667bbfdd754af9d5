//! One request, start to end: idempotency keys (one request per key at a time, a success
//! replayed to retries), the BUSY and stopping refusals, concurrency and edge-case metrics,
//! and the dispatch of each op to its method.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::args::{self, DeleteArgs, FreezeArgs, ListArgs, LookupArgs, RetainArgs, ThawArgs};
use super::args::{SessionDeleteArgs, SessionOpenArgs, SessionStateArgs};
use super::coalesce::thaw_key;
use super::conn::peer_gone;
use super::persist;
use super::protocol::{self, ApiError, Request};
use super::Server;
use crate::error::ErrorCode;
use crate::pipeline::{Cancel, Engine};

/// Where `register` leaves the engine it inserted (none for a replayed request): what a
/// connection-scoped registration owns.
pub(super) type Registered = Mutex<Option<(String, Arc<Engine>)>>;

/// What an op may use besides its arguments.
pub(super) struct Ctx<'a> {
    /// Sends a non-final line (`captured`, compaction progress).
    pub progress: &'a (dyn Fn(&str, Value) + Sync),
    /// The requester's connection, if the request came over one.
    pub conn: Option<std::os::fd::RawFd>,
    /// The requester's uid, when the kernel says.
    pub uid: Option<u32>,
    /// See [`Registered`].
    pub registered: &'a Registered,
    /// The request's origin when it carries an idempotency key ([`persist::origin`]): a
    /// freeze commits it in its manifest.
    pub origin: Option<u128>,
}

impl Ctx<'_> {
    /// A freeze or thaw whose requester hangs up stops (`FreezeOptions::cancel`).
    pub fn cancel(&self) -> Option<Cancel> {
        self.conn.map(|fd| Cancel(Arc::new(move || peer_gone(fd))))
    }
}

impl Server {
    /// Answers one request of a client of `uid`; true when it succeeded.
    pub(super) fn handle(
        &self,
        req: Request,
        out: &Mutex<UnixStream>,
        registered: &Registered,
        uid: Option<u32>,
    ) -> bool {
        let id = req.id.clone();
        // Keys are the requester's own: clients of two uids never share an outcome.
        let key = req
            .idempotency_key
            .as_ref()
            .map(|k| persist::scoped(uid, k));
        // Requests with one idempotency key run one at a time: a retry that arrives while the
        // first is still running waits for it, then replays its success (or runs, if it
        // failed).
        match &key {
            Some(k) => self.with_key(k, || self.handle_keyed(req, out, id, registered, uid)),
            None => self.handle_keyed(req, out, id, registered, uid),
        }
    }

    fn handle_keyed(
        &self,
        req: Request,
        out: &Mutex<UnixStream>,
        id: Value,
        registered: &Registered,
        uid: Option<u32>,
    ) -> bool {
        // Idempotency: a retry with the same key gets the first outcome, no work done twice —
        // if it is the same request; a different one under a used key is refused (it would
        // otherwise be answered with another request's outcome and never run).
        let fingerprint = req
            .idempotency_key
            .as_ref()
            .map(|_| persist::fingerprint(&req.op, &req.args));
        let scoped = req
            .idempotency_key
            .as_ref()
            .map(|k| persist::scoped(uid, k));
        if let (Some(k), Some(scoped)) = (&req.idempotency_key, &scoped) {
            let prior = self.recorded_outcome(scoped);
            if let Some(o) = prior {
                if o.fingerprint.is_some() && o.fingerprint != fingerprint {
                    let e = ApiError::validation(format!(
                        "idempotency key {k:?} was used by another request ({}, not this {} \
                         with these fields); a retry must repeat its request's op and fields \
                         (id and timeout_ms aside): send a new request under a new key",
                        o.op.as_deref()
                            .map_or_else(|| "an earlier one".to_string(), |op| format!("a {op}")),
                        req.op,
                    ));
                    self.metrics.errors.inc();
                    self.send(out, &protocol::error_line(&id, &e));
                    return false;
                }
                let lines = o.lines;
                let ok = lines
                    .last()
                    .and_then(|l| l["ok"].as_bool())
                    .unwrap_or(false);
                for mut l in lines {
                    l["id"] = id.clone();
                    l["replayed"] = json!(true);
                    self.send(out, &l.to_string());
                }
                return ok;
            }
        }
        let origin = scoped
            .as_ref()
            .zip(fingerprint.as_ref())
            .map(|(s, fp)| persist::origin(s, fp));
        if let (Some(k), Some(fp), Some(o)) = (&req.idempotency_key, &fingerprint, origin) {
            if let Some(line) = self.recovered_outcome(&req, o) {
                // A freeze that committed before a crash lost its answer and outcome record:
                // its window says so. Recorded now, so later retries replay it as usual.
                let mut l = line;
                l["id"] = id.clone();
                self.send(out, &l.to_string());
                self.remember_outcome(uid, (k, &req.op), fp.clone(), vec![l]);
                return true;
            }
        }
        let sent: Mutex<Vec<Value>> = Mutex::new(Vec::new());
        let emit = |v: Value| {
            self.send(out, &v.to_string());
            if let Ok(mut s) = sent.lock() {
                s.push(v);
            }
        };
        let progress = |status: &str, body: Value| {
            let mut v = json!({"id": id, "ok": true, "final": false, "status": status});
            if let (Some(o), Value::Object(b)) = (v.as_object_mut(), body) {
                o.extend(b);
            }
            emit(v);
        };
        let op_kind = match req.op.as_str() {
            "freeze" | "thaw" | "lookup" | "delete" => Some(req.op.clone()),
            _ => None,
        };
        if let Some(k) = &op_kind {
            self.concurrency(k, 1);
        }
        let heavy = matches!(req.op.as_str(), "freeze" | "thaw");
        let fd = out.lock().map(|c| c.as_raw_fd()).ok();
        let t0 = std::time::Instant::now();
        // A heavy op is counted before it looks at `stopping`: `drain` (after `stop`) then
        // either waits for it or it sees `stopping` and refuses.
        let running = if heavy {
            self.heavy_ops.fetch_add(1, Ordering::SeqCst)
        } else {
            0
        };
        let res = if heavy && self.stopping.load(Ordering::SeqCst) {
            Err(ApiError::new(
                ErrorCode::Unavailable,
                "cwm is stopping; retry when it is back",
            ))
        } else if heavy && running >= self.cfg.max_ops.max(1) {
            Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "{} freezes and thaws are already running (max_ops); retry shortly",
                    self.cfg.max_ops
                ),
            ))
        } else {
            // A panic is answered as INTERNAL, and the counters above stay balanced.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ctx = Ctx {
                    progress: &progress,
                    conn: fd,
                    uid,
                    registered,
                    origin,
                };
                self.dispatch(&req, &ctx)
            }))
            .unwrap_or_else(|_| Err(ApiError::internal(format!("{} panicked", req.op))))
        };
        if heavy {
            self.heavy_ops.fetch_sub(1, Ordering::SeqCst);
            if res.is_ok() {
                self.metrics.observe(&req.op, t0.elapsed().as_secs_f64());
            }
        }
        if let Some(k) = &op_kind {
            self.concurrency(k, -1);
        }
        let succeeded = res.is_ok();
        let last = match res {
            Ok(result) => {
                if result
                    .pointer("/report/corruption")
                    .is_some_and(|c| !c.is_null())
                {
                    self.edge_case("EC-050", "recovered");
                }
                let mut v = json!({"id": id, "ok": true, "final": true});
                if let (Some(o), Value::Object(b)) = (v.as_object_mut(), result) {
                    o.extend(b);
                }
                v
            }
            Err(e) => {
                self.metrics.errors.inc();
                if let Some(ec) = protocol::edge_case_of(&e) {
                    self.edge_case(ec, "refused");
                }
                let line = protocol::error_line(&id, &e);
                serde_json::from_str(&line).unwrap_or(Value::Null)
            }
        };
        // Only a success is an outcome to replay under an idempotency key: a refusal or a
        // failure (BUSY, TIMEOUT, a requester that hung up, …) is run again by the retry, as a
        // retry is meant to. It is persisted before the final line goes out, so a retry after
        // a crash never runs a request whose success was answered.
        if let (Some(k), Some(fp)) = (req.idempotency_key.as_ref(), fingerprint) {
            if succeeded {
                let mut lines = sent.lock().map(|s| s.clone()).unwrap_or_default();
                lines.push(last.clone());
                self.remember_outcome(uid, (k, &req.op), fp, lines);
            }
        }
        emit(last);
        succeeded
    }

    /// The answer to a retried `freeze` whose window, as it stands, was committed by this very
    /// request (its manifest carries the request's origin) although no outcome is recorded —
    /// the daemon stopped between the commit and the outcome record, or the record failed:
    /// the final line of a success, rebuilt from the window (`replayed` and `recovered`
    /// true; no `report`, which only the first run knew), while the window is younger than
    /// the idempotency TTL. None: run the request.
    fn recovered_outcome(&self, req: &Request, origin: u128) -> Option<Value> {
        if req.op != "freeze" {
            return None;
        }
        let name = req.args.get("window")?.as_str()?;
        let info = self.store.get(name).ok()?;
        // Only while its outcome would have been kept (`--idempotency-ttl`, counted from the
        // commit, which is before the outcome's own time): after that a retry runs as a new
        // request, as with any forgotten outcome.
        let kept =
            crate::clock::now_unix_ms().saturating_sub(info.created_unix_ms) < self.idem_ttl_ms();
        (kept && info.origin == Some(origin)).then(|| {
            json!({"ok": true, "final": true, "status": "durable", "window": info,
                "replayed": true, "recovered": true})
        })
    }

    fn dispatch(&self, req: &Request, ctx: &Ctx<'_>) -> Result<Value, ApiError> {
        let a = &req.args;
        if let Some(r) = self.maintenance_op(&req.op, a, ctx.progress) {
            return r;
        }
        match req.op.as_str() {
            "hello" => Ok(self.op_hello()),
            "health" => self.op_health(),
            "register" => self.op_register(a, ctx),
            "unregister" => self.op_unregister(&args::name(a, "engine")?, ctx.uid),
            "freeze" => self.op_freeze(FreezeArgs::parse(a)?, ctx),
            // (Thaws of different uids never share an outcome: each is checked for its own
            // right to the engine.)
            "thaw" => self.coalesce(&format!("{:?}\0{}", ctx.uid, thaw_key(a)), || {
                self.op_thaw(ThawArgs::parse(a)?, ctx)
            }),
            "lookup" => self.op_lookup(LookupArgs::parse(a)?),
            "list" => self.op_list(ListArgs::parse(a)?),
            "stat" => self.op_stat(&args::name(a, "window")?),
            "delete" => self.op_delete(DeleteArgs::parse(a)?),
            "pin" | "unpin" => self.op_retain(&req.op, RetainArgs::parse(a, false)?),
            "ttl" => self.op_retain("ttl", RetainArgs::parse(a, true)?),
            "metrics" => Ok(json!({"text": self.metrics_text()})),
            "push" => self.op_push(a),
            "pull" => self.op_pull(a),
            "remote.list" => self.op_remote_list(),
            "remote.scrub" => self.op_remote_scrub(),
            "session.open" => self.op_session_open(SessionOpenArgs::parse(a)?),
            "session.state" => self.op_session_state(SessionStateArgs::parse(a)?),
            "session.close" => self.op_session_close(&args::name(a, "session")?),
            "session.list" => Ok(json!({"sessions": self.sessions.list()})),
            "session.delete" => self.op_session_delete(SessionDeleteArgs::parse(a)?),
            op => Err(ApiError::new(
                ErrorCode::UnknownOp,
                format!("unknown op {op:?}; see docs/PROTOCOL.md (hello lists the capabilities)"),
            )),
        }
    }
}
