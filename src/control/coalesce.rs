//! Identical thaws running at once share one outcome (EC-002): the first runs, the others
//! wait for it and answer it marked `"coalesced": true`. Thaws of one window the instance
//! does not hold share its fetch from the shared tier ([`Fetches`]): the first fetches it, the
//! others wait and then restore the stored window, each into its own blocks.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::ApiError;
use super::Server;
use crate::error::ErrorCode;
use crate::pipeline::Cancel;

/// One in-flight request's outcome, shared with identical requests that arrive meanwhile.
pub(super) type Inflight = (Mutex<Option<Result<Value, ApiError>>>, std::sync::Condvar);

/// Windows being fetched from the shared tier, by local name.
#[derive(Default)]
pub(super) struct Fetches {
    running: Mutex<HashSet<String>>,
    ended: Condvar,
}

/// This thread's fetch of a window: ended (its waiters woken) when dropped, a panic included.
pub(super) struct Fetching<'a> {
    fetches: &'a Fetches,
    name: String,
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        // (A poisoned table is taken as it is: the name must leave it, or waiters would wait
        // for a fetch that never ends.)
        let mut r = self
            .fetches
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.remove(&self.name);
        drop(r);
        self.fetches.ended.notify_all();
    }
}

fn poisoned<T>(_: T) -> ApiError {
    ApiError::internal("fetch table poisoned")
}

/// What ends a thaw's wait for another's fetch: its requester leaving, its deadline.
#[derive(Clone, Copy, Default)]
pub(super) struct Until<'a> {
    pub cancel: Option<&'a Cancel>,
    pub deadline: Option<Instant>,
}

/// How often a thaw waiting for another's fetch looks whether its requester left.
const WAIT_POLL: Duration = Duration::from_millis(50);

impl Fetches {
    /// `Some`: nobody is fetching `name`; the caller does, until the guard is dropped.
    /// `None`: another fetch of it was running and has ended (the caller looks at the store
    /// again: the window is there, or that fetch failed and this one may try). An error:
    /// the requester left (`INTERRUPTED`) or the deadline passed (`TIMEOUT`) while this
    /// waited.
    pub(super) fn start(
        &self,
        name: &str,
        until: Until<'_>,
    ) -> Result<Option<Fetching<'_>>, ApiError> {
        let mut r = self.running.lock().map_err(poisoned)?;
        if r.insert(name.to_string()) {
            return Ok(Some(Fetching {
                fetches: self,
                name: name.to_string(),
            }));
        }
        while r.contains(name) {
            if until.cancel.is_some_and(|c| (c.0)()) {
                return Err(ApiError::new(
                    ErrorCode::Interrupted,
                    format!(
                        "the requester closed its connection while {name:?} was being fetched \
                         for another thaw; stopped"
                    ),
                ));
            }
            if until.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the thaw's time ran out while {name:?} was being fetched for another \
                         thaw (EC-041)"
                    ),
                ));
            }
            r = self.ended.wait_timeout(r, WAIT_POLL).map_err(poisoned)?.0;
        }
        Ok(None)
    }
}

/// What makes two thaws identical: engine (or session), window, destination blocks, tokens,
/// prefix range, request salt (a thaw in another namespace must be checked, not told
/// `loaded`) and deadline.
pub(super) fn thaw_key(a: &Value) -> String {
    format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
        a["engine"],
        a["session"],
        a["window"],
        a["block_ids"],
        a["tokens"],
        a["prefix"],
        a["first_block"],
        a["salt"],
        a["timeout_ms"]
    )
}

impl Server {
    /// Runs `f` unless an identical request (same key) is already running, in which case this
    /// one waits for that outcome and shares it, marked `"coalesced": true` (EC-002).
    pub(super) fn coalesce(
        &self,
        key: &str,
        f: impl FnOnce() -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let (slot, leader) = {
            let mut m = self
                .inflight
                .lock()
                .map_err(|_| ApiError::internal("in-flight table poisoned"))?;
            match m.get(key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s: Arc<Inflight> = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
                    m.insert(key.to_string(), s.clone());
                    (s, true)
                }
            }
        };
        if leader {
            // A panic of the leader still fills the slot: its waiters (and later identical
            // thaws) must never wait for an outcome that cannot come.
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(ApiError::internal("the thaw panicked")));
            if let Ok(mut m) = self.inflight.lock() {
                m.remove(key);
            }
            if let Ok(mut r) = slot.0.lock() {
                *r = Some(res.clone());
            }
            slot.1.notify_all();
            return res;
        }
        self.edge_case("EC-002", "coalesced");
        let mut r = slot
            .0
            .lock()
            .map_err(|_| ApiError::internal("in-flight slot poisoned"))?;
        while r.is_none() {
            r = slot
                .1
                .wait(r)
                .map_err(|_| ApiError::internal("in-flight slot poisoned"))?;
        }
        let mut out = r
            .clone()
            .unwrap_or_else(|| Err(ApiError::internal("no outcome")));
        if let Ok(v) = &mut out {
            v["coalesced"] = json!(true);
        }
        out
    }
}
