//! The shared tier as the daemon uses it: a connection made on first use (and again after an
//! outage), so a cluster that is down at start-up never stops local service; `push` and
//! `pull`; and the tier's state for `health`.

use std::sync::{Arc, Mutex, Weak};

use serde_json::{json, Value};

use super::protocol::ApiError;
use super::Server;
use crate::error::ErrorCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::remote::{
    pull_window, push_window, Expect, Publish, PullReport, PushReport, Remote, RemoteConfig,
    RemoteError,
};
use crate::store::{Replace, Store};

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
    queue: Mutex<Option<crossbeam_channel::Sender<String>>>,
    /// `cwm_remote_operations_total` and `cwm_remote_bytes_total`.
    counters: Option<(Family<Labels, Counter>, Family<Labels, Counter>)>,
}

type Labels = Vec<(String, String)>;

impl RemoteLink {
    pub(super) fn new(cfg: Option<RemoteConfig>, metrics: &super::metrics::Metrics) -> Self {
        Self {
            cfg,
            counters: Some((metrics.remote_ops.clone(), metrics.remote_bytes.clone())),
            ..Default::default()
        }
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
    fn push(&self, store: &Store, name: &str, expect: Expect) -> Result<PushReport, RemoteError> {
        let r = self.with(|r| push_window(store, r, name, expect));
        self.count("push", &r, "sent", |p| p.written_bytes);
        r
    }

    /// Stores window `name` of the tier in `store` (counted).
    fn pull(&self, store: &Store, name: &str, replace: Replace) -> Result<PullReport, RemoteError> {
        let r = self.with(|r| pull_window(store, r, name, replace));
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
    fn with<T>(&self, f: impl FnOnce(&Remote) -> Result<T, RemoteError>) -> Result<T, RemoteError> {
        let r = self.get().and_then(|r| f(&r));
        if let Ok(mut last) = self.last_error.lock() {
            match &r {
                Err(e) if e.is_outage() => {
                    let msg = e.to_string();
                    if last.as_deref() != Some(msg.as_str()) {
                        crate::log::warn(&format!("remote tier degraded: {msg}"));
                    }
                    *last = Some(msg);
                }
                Ok(_) => *last = None,
                Err(_) => {}
            }
        }
        r
    }

    /// After a durable freeze of `name`: publishes it as the configuration says. `Sync`:
    /// now, returning what to add to the answer; `Async`: queued for the background publisher.
    pub(super) fn after_freeze(self: &Arc<Self>, store: &Arc<Store>, name: &str) -> Option<Value> {
        match self.cfg.as_ref()?.publish {
            Publish::Off => None,
            Publish::Sync => Some(match self.push(store, name, Expect::Any) {
                Ok(p) => json!({"generation": p.generation, "written": p.written}),
                Err(e) => {
                    json!({"error": {"code": e.code().as_str(), "message": e.to_string()}})
                }
            }),
            Publish::Async => {
                self.enqueue(store, name);
                Some(json!({"status": "pending"}))
            }
        }
    }

    /// Queues `name` for the background publisher, starting it if needed.
    fn enqueue(self: &Arc<Self>, store: &Arc<Store>, name: &str) {
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let tx = q.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::bounded::<String>(PUBLISH_QUEUE);
            let (link, store): (Weak<Self>, Weak<Store>) =
                (Arc::downgrade(self), Arc::downgrade(store));
            std::thread::spawn(move || {
                for name in rx {
                    let (Some(link), Some(store)) = (link.upgrade(), store.upgrade()) else {
                        return;
                    };
                    if let Err(e) = link.push(&store, &name, Expect::Any) {
                        crate::log::warn(&format!("publishing {name:?} to the remote tier: {e}"));
                    }
                }
            });
            tx
        });
        if tx.try_send(name.to_string()).is_err() {
            crate::log::warn(&format!(
                "remote publish queue full: {name:?} not published (a later push does)"
            ));
        }
    }

    /// Before a thaw of `name`, which the local store does not hold: pulls it from the tier.
    /// `None`: no tier configured.
    pub(super) fn pull_missing(
        &self,
        store: &Store,
        name: &str,
    ) -> Option<Result<PullReport, RemoteError>> {
        self.cfg.as_ref()?;
        Some(self.pull(store, name, Replace::No))
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
        let r = self.remote.push(&self.store, &name, expect)?;
        Ok(json!({"push": r}))
    }

    /// `pull`: stores a window of the shared tier locally.
    pub(super) fn op_pull(&self, a: &Value) -> Result<Value, ApiError> {
        let name = super::args::name(a, "window")?;
        let replace = if replace_flag(a)? {
            Replace::Any
        } else {
            Replace::No
        };
        let r = self.remote.pull(&self.store, &name, replace)?;
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
