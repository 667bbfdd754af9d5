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

/// Idempotency key -> (when it succeeded, ms since the epoch; the response lines of its
/// request's success).
pub(super) type Outcomes = HashMap<String, (i64, Vec<Value>)>;

/// The session registry (at most `max_sessions` active) and the idempotent outcomes the
/// store's catalog holds; sessions persist into it from now on.
pub(super) fn restore(
    store: &Arc<Store>,
    max_sessions: usize,
    idem_ttl_ms: i64,
) -> (Registry, Outcomes) {
    let now = crate::clock::now_unix_ms();
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
                    if s.state == crate::session::SessionState::Deleted
                        && now.saturating_sub(s.changed_at()) >= idem_ttl_ms
                    {
                        // Deleted long enough ago: forgotten, its record too.
                        let _ = store.delete_meta(meta_key("session", &s.id));
                    } else {
                        restored.push((rec_seq, s));
                    }
                }
            }
            Some("idem") => {
                if let (Some(k), Some(lines)) = (v["key"].as_str(), v["lines"].as_array()) {
                    // (Records from before outcomes had a time expire a TTL from now.)
                    let at = v["at_ms"].as_i64().unwrap_or(now);
                    if now.saturating_sub(at) >= idem_ttl_ms {
                        let _ = store.delete_meta(meta_key("idem", k));
                    } else {
                        idem.insert(k.to_string(), (at, lines.clone()));
                    }
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
    let st3 = store.clone();
    let forget: crate::session::Forget = Box::new(move |id| {
        if let Err(e) = st3.delete_meta(meta_key("session", id)) {
            crate::log::warn(&format!(
                "deleted session {id:?} not forgotten in the log: {e}"
            ));
        }
    });
    let sessions = crate::session::Registry::restored(max_sessions.max(1), restored, persist)
        .forgetting(forget);
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
        let at = crate::clock::now_unix_ms();
        let rec = json!({"kind": "idem", "key": k, "at_ms": at, "lines": lines}).to_string();
        if let Err(e) = self.store.put_meta(meta_key("idem", k), rec.as_bytes()) {
            crate::log::warn(&format!("idempotency key {k:?} not persisted: {e}"));
        }
        if let Ok(mut m) = self.idem.lock() {
            m.entry(k.to_string()).or_insert((at, lines));
        }
    }

    /// Forgets the idempotent outcomes older than the TTL, in memory and in the log (a
    /// catalog deletion each). Returns how many.
    pub(super) fn expire_outcomes(&self) -> usize {
        let ttl = self.idem_ttl_ms();
        let now = crate::clock::now_unix_ms();
        let old: Vec<String> = match self.idem.lock() {
            Ok(mut m) => {
                let old: Vec<String> = m
                    .iter()
                    .filter(|(_, (at, _))| now.saturating_sub(*at) >= ttl)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &old {
                    m.remove(k);
                }
                old
            }
            Err(_) => return 0,
        };
        for k in &old {
            if let Err(e) = self.store.delete_meta(meta_key("idem", k)) {
                crate::log::warn(&format!(
                    "idempotency key {k:?} not forgotten in the log: {e}"
                ));
            }
        }
        old.len()
    }

    /// Forgets the sessions DELETED longer than the idempotency TTL ago, in memory and in the
    /// log. Returns how many.
    pub(super) fn expire_deleted_sessions(&self) -> usize {
        self.sessions
            .forget_deleted(crate::clock::now_unix_ms(), self.idem_ttl_ms())
            .len()
    }

    /// The idempotency TTL in ms.
    pub(super) fn idem_ttl_ms(&self) -> i64 {
        i64::try_from(self.cfg.maintenance.idempotency_ttl_s)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
    }
}
