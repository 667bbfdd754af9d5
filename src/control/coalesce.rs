//! Identical thaws running at once share one outcome (EC-002): the first runs, the others
//! wait for it and answer it marked `"coalesced": true`.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::protocol::ApiError;
use super::Server;

/// One in-flight request's outcome, shared with identical requests that arrive meanwhile.
pub(super) type Inflight = (Mutex<Option<Result<Value, ApiError>>>, std::sync::Condvar);

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
