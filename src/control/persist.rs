//! Session states and idempotent outcomes as catalog records in the store (JSON, keyed by
//! [`meta_key`]): written as they change, restored when the daemon starts, and reconciled
//! with the windows committed after a session's newest record.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::Server;
use crate::session::Registry;
use crate::store::Store;

/// Key of a catalog record of `kind` ("session", "idem") named `name`.
pub(super) fn meta_key(kind: &str, name: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(format!("cwm-{kind}\0{name}").as_bytes())
}

/// Idempotency key -> the response lines of its request's success.
pub(super) type Outcomes = HashMap<String, Vec<Value>>;

/// The session registry (at most `max_sessions` active) and the idempotent outcomes the
/// store's catalog holds; sessions persist into it from now on.
pub(super) fn restore(store: &Arc<Store>, max_sessions: usize) -> (Registry, Outcomes) {
    // Sessions and idempotent outcomes are catalog records in the log: restore them.
    let mut restored = Vec::new();
    let mut idem = HashMap::new();
    for (_, rec_seq, bytes) in store.meta_with_seq().unwrap_or_default() {
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        match v.get("kind").and_then(Value::as_str) {
            Some("session") => {
                if let Ok(s) =
                    serde_json::from_value::<crate::session::Session>(v["session"].clone())
                {
                    restored.push((rec_seq, s));
                }
            }
            Some("idem") => {
                if let (Some(k), Some(lines)) = (v["key"].as_str(), v["lines"].as_array()) {
                    idem.insert(k.to_string(), lines.clone());
                }
            }
            _ => {}
        }
    }
    let st2 = store.clone();
    let persist: crate::session::Persist = Box::new(move |s| {
        let rec = json!({"kind": "session", "session": s}).to_string();
        if let Err(e) = st2.put_meta(meta_key("session", &s.id), rec.as_bytes()) {
            crate::log::warn(&format!("session {:?} state not persisted: {e}", s.id));
        }
    });
    // A window of a session committed after the session's newest record: the daemon
    // stopped between a freeze's commit and its FROZEN record. The freeze is durable, so
    // the session is FROZEN.
    let windows = store.list().unwrap_or_default();
    let frozen_late: Vec<(String, String)> = restored
        .iter()
        .filter(|(_, s)| {
            matches!(
                s.state,
                crate::session::SessionState::Active | crate::session::SessionState::Thawed
            )
        })
        .filter_map(|(rec_seq, s)| {
            windows
                .iter()
                .filter(|w| w.session == s.id && w.seq > *rec_seq)
                .max_by_key(|w| w.seq)
                .map(|w| (s.id.clone(), w.name.clone()))
        })
        .collect();
    let restored: Vec<crate::session::Session> = restored.into_iter().map(|(_, s)| s).collect();
    let sessions = crate::session::Registry::restored(max_sessions.max(1), restored, persist);
    for (id, window) in frozen_late {
        crate::log::warn(&format!(
            "session {id:?}: window {window:?} was committed but the daemon stopped before \
                 the session was marked FROZEN; it is FROZEN now"
        ));
        if let Err(e) = sessions.transition(&id, crate::session::SessionState::Frozen) {
            crate::log::warn(&format!("session {id:?} not reconciled: {e}"));
        }
    }
    (sessions, idem)
}

impl Server {
    /// Remembers (durably, before the final line goes out) the response lines of a request
    /// that succeeded under idempotency key `k`.
    pub(super) fn remember_outcome(&self, k: &str, lines: Vec<Value>) {
        let rec = json!({"kind": "idem", "key": k, "lines": lines}).to_string();
        if let Err(e) = self.store.put_meta(meta_key("idem", k), rec.as_bytes()) {
            crate::log::warn(&format!("idempotency key {k:?} not persisted: {e}"));
        }
        if let Ok(mut m) = self.idem.lock() {
            m.entry(k.to_string()).or_insert(lines);
        }
    }
}
