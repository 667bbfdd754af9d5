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

/// The success of a request sent with an idempotency key, replayed to its retries.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    /// When it succeeded, ms since the epoch.
    pub at: i64,
    /// [`fingerprint`] of the request (`None`: recorded before requests had one; replayed to
    /// any request with its key).
    pub fingerprint: Option<String>,
    /// Its op (`None`: recorded before outcomes named it).
    pub op: Option<String>,
    /// Its response lines.
    pub lines: Vec<Value>,
    /// Key of its catalog record.
    pub record: u128,
}

/// [`scoped`] idempotency key -> its request's success.
pub(super) type Outcomes = HashMap<String, Outcome>;

/// An idempotency key in the namespace of the requester's uid: clients of different users
/// never see each other's outcomes, whatever keys they choose.
pub(super) fn scoped(uid: Option<u32>, key: &str) -> String {
    match uid {
        Some(u) => format!("{u}/{key}"),
        None => format!("-/{key}"),
    }
}

/// What a retry must repeat: the op and every field of the request but `id`,
/// `idempotency_key` and `timeout_ms` (a retry may wait longer), hashed (xxh3-128, hex) over
/// JSON with its keys in sorted order.
pub(super) fn fingerprint(op: &str, args: &Value) -> String {
    let mut fields = args.clone();
    if let Some(o) = fields.as_object_mut() {
        for k in ["id", "idempotency_key", "timeout_ms"] {
            o.remove(k);
        }
    }
    let mut text = format!("{op}\0");
    canonical(&fields, &mut text);
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// The origin a request under idempotency key `scoped` (see [`scoped`]) with `fingerprint`
/// commits in its window's manifest (xxh3-128 of both): a retry recomputes it to recognise
/// its own window after a crash.
pub(super) fn origin(scoped: &str, fingerprint: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(format!("cwm-origin\0{scoped}\0{fingerprint}").as_bytes())
}

/// `v` as JSON text with every object's keys in sorted order (whatever order the map keeps).
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&o[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Keeps the `max` newest outcomes; returns the others' catalog records and times (removed).
pub(super) fn cap_outcomes(m: &mut Outcomes, max: usize) -> Vec<(u128, i64)> {
    if m.len() <= max {
        return Vec::new();
    }
    let mut ats: Vec<(i64, String)> = m.iter().map(|(k, o)| (o.at, k.clone())).collect();
    ats.sort_unstable();
    let over = m.len() - max;
    ats.into_iter()
        .take(over)
        .filter_map(|(_, k)| m.remove(&k).map(|o| (o.record, o.at)))
        .collect()
}

/// The session registry (at most `max_sessions` active) and the idempotent outcomes the
/// store's catalog holds; sessions persist into it from now on.
pub(super) fn restore(
    store: &Arc<Store>,
    max_sessions: usize,
    idem_ttl_ms: i64,
    idem_max: usize,
) -> (Registry, Outcomes) {
    let now = crate::clock::now_unix_ms();
    // SAFETY: getuid has no preconditions.
    let own_uid = unsafe { libc::getuid() };
    // Sessions and idempotent outcomes are catalog records in the log: restore them.
    let mut restored = Vec::new();
    let mut idem: Outcomes = HashMap::new();
    // Catalog records to delete (expired, superseded, past the most kept): deleted together
    // at the end, one sync, not one each while the daemon starts.
    let mut gone: Vec<u128> = Vec::new();
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
                        gone.push(meta_key("session", &s.id));
                    } else {
                        restored.push((rec_seq, s));
                    }
                }
            }
            Some("idem") => {
                if let (Some(k), Some(lines)) = (v["key"].as_str(), v["lines"].as_array()) {
                    // Records from before outcomes had a time expire a TTL from now; those
                    // from before keys were scoped by uid were made by the daemon's own
                    // (the usual client), and replay to any request with their key.
                    let at = v["at_ms"].as_i64().unwrap_or(now);
                    let key = match v.get("uid") {
                        Some(u) => scoped(u.as_u64().and_then(|u| u32::try_from(u).ok()), k),
                        None => scoped(Some(own_uid), k),
                    };
                    let record = meta_key("idem", if v.get("uid").is_some() { &key } else { k });
                    if now.saturating_sub(at) >= idem_ttl_ms {
                        gone.push(record);
                    } else {
                        let fingerprint = v["fingerprint"].as_str().map(str::to_string);
                        let op = v["op"].as_str().map(str::to_string);
                        let lines = lines.clone();
                        let o = Outcome {
                            at,
                            fingerprint,
                            op,
                            lines,
                            record,
                        };
                        // A record from before keys were scoped and a newer one of the same
                        // uid and key: the newer stands, the other is deleted.
                        match idem.get(&key) {
                            Some(old) if old.at > o.at => gone.push(o.record),
                            _ => gone.extend(idem.insert(key, o).map(|old| old.record)),
                        }
                    }
                }
            }
            _ => {}
        }
    }
    gone.extend(
        cap_outcomes(&mut idem, idem_max.max(1))
            .into_iter()
            .map(|(r, _)| r),
    );
    if let Err(e) = store.delete_metas_if(&gone, |_, _| true) {
        crate::log::warn(&format!(
            "{} expired or superseded catalog records not deleted: {e}",
            gone.len()
        ));
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
    /// Runs `f` holding the lock of the [`scoped`] idempotency key `key`: the requests with one
    /// key run one at a time.
    pub(super) fn with_key<T>(&self, key: &str, f: impl FnOnce() -> T) -> T {
        let lock = self
            .idem_running
            .lock()
            .map(|mut m| m.entry(key.to_string()).or_default().clone())
            .unwrap_or_default();
        let out = {
            let _held = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f()
        };
        if let Ok(mut m) = self.idem_running.lock() {
            // Only this and the table hold it: nobody else is waiting on the key.
            if Arc::strong_count(&lock) == 2 && m.get(key).is_some_and(|l| Arc::ptr_eq(l, &lock)) {
                m.remove(key);
            }
        }
        out
    }

    /// The outcome recorded under `key` (a [`scoped`] key) within the TTL, if any.
    pub(super) fn recorded_outcome(&self, key: &str) -> Option<Outcome> {
        let now = crate::clock::now_unix_ms();
        let ttl = self.idem_ttl_ms();
        self.idem.lock().ok().and_then(|m| {
            m.get(key)
                .filter(|o| now.saturating_sub(o.at) < ttl)
                .cloned()
        })
    }

    /// Remembers (durably, before the final line goes out) the response lines of a request
    /// that succeeded under idempotency key `k` (sent by `uid`, with `fingerprint`). Past
    /// the most outcomes kept, the oldest are forgotten (in memory now, in the log by the
    /// next retention pass).
    pub(super) fn remember_outcome(
        &self,
        uid: Option<u32>,
        (k, op): (&str, &str),
        fingerprint: String,
        lines: Vec<Value>,
    ) {
        let at = crate::clock::now_unix_ms();
        let key = scoped(uid, k);
        let record = meta_key("idem", &key);
        let rec = json!({"kind": "idem", "key": k, "uid": uid, "op": op,
            "fingerprint": fingerprint, "at_ms": at, "lines": lines})
        .to_string();
        if let Err(e) = self.store.put_meta(record, rec.as_bytes()) {
            crate::log::warn(&format!("idempotency key {k:?} not persisted: {e}"));
        }
        if let Ok(mut m) = self.idem.lock() {
            // (Replacing an outcome past its TTL not forgotten yet.)
            let old = m.insert(
                key,
                Outcome {
                    at,
                    fingerprint: Some(fingerprint),
                    op: Some(op.to_string()),
                    lines,
                    record,
                },
            );
            // An outcome replaced under another catalog key (one recorded before keys were
            // scoped by uid) has its record deleted, or it would shadow this one at restore.
            if let Some(old) = old.filter(|o| o.record != record) {
                if let Ok(mut q) = self.idem_forget.lock() {
                    q.push((old.record, old.at));
                }
            }
            let max = self.cfg.maintenance.idempotency_max.max(1);
            // Forgotten in batches (a sixteenth of the most kept), not one per request.
            if m.len() > max + max / 16 {
                let gone = cap_outcomes(&mut m, max);
                if let Ok(mut q) = self.idem_forget.lock() {
                    q.extend(gone);
                }
            } else {
                return;
            }
        }
        // Without background passes (`--eviction-interval-ms 0`) nobody else empties the queue.
        if self.cfg.maintenance.eviction.interval_ms == 0 {
            self.expire_outcomes();
        }
    }

    /// Forgets the idempotent outcomes older than the TTL, in memory and in the log, and
    /// deletes the records of those forgotten for room: catalog deletions written together
    /// (one sync), each only if the key's record is still the outcome forgotten — a request
    /// that recorded a newer one under the key meanwhile keeps it (its record has the same
    /// catalog key). Never waits for a request. Returns how many records were deleted.
    pub(super) fn expire_outcomes(&self) -> usize {
        let ttl = self.idem_ttl_ms();
        let now = crate::clock::now_unix_ms();
        let mut due: Vec<(u128, i64)> = match self.idem.lock() {
            Ok(mut m) => {
                let keys: Vec<String> = m
                    .iter()
                    .filter(|(_, o)| now.saturating_sub(o.at) >= ttl)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.iter()
                    .filter_map(|k| m.remove(k).map(|o| (o.record, o.at)))
                    .collect()
            }
            Err(_) => return 0,
        };
        if let Ok(mut q) = self.idem_forget.lock() {
            due.append(&mut q);
        }
        if due.is_empty() {
            return 0;
        }
        let at: HashMap<u128, i64> = due.iter().copied().collect();
        let records: Vec<u128> = at.keys().copied().collect();
        // The record is the one forgotten when it says when it succeeded and that is the
        // forgotten outcome's time (a record from before outcomes had one: its own).
        let still = |record: u128, payload: &[u8]| {
            serde_json::from_slice::<Value>(payload)
                .ok()
                .is_some_and(|v| {
                    v["at_ms"]
                        .as_i64()
                        .is_none_or(|t| Some(&t) == at.get(&record))
                })
        };
        match self.store.delete_metas_if(&records, still) {
            Ok(n) => n,
            Err(e) => {
                crate::log::warn(&format!(
                    "{} idempotent outcomes not forgotten in the log: {e}",
                    records.len()
                ));
                // Tried again by the next pass.
                if let Ok(mut q) = self.idem_forget.lock() {
                    q.extend(due);
                }
                0
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_ignores_field_order_id_key_and_timeout_but_nothing_else() {
        let a: Value = serde_json::from_str(
            r#"{"id": 1, "op": "freeze", "window": "w", "layout": {"a": 1, "b": [1, {"y": 2, "x": 3}]},
                "idempotency_key": "k", "timeout_ms": 5}"#,
        )
        .unwrap_or_default();
        let b: Value = serde_json::from_str(
            r#"{"layout": {"b": [1, {"x": 3, "y": 2}], "a": 1}, "window": "w", "op": "freeze",
                "id": "other", "timeout_ms": 900}"#,
        )
        .unwrap_or_default();
        assert_eq!(fingerprint("freeze", &a), fingerprint("freeze", &b));
        assert_ne!(fingerprint("freeze", &a), fingerprint("thaw", &a));
        let mut c = a.clone();
        c["layout"]["b"][1]["x"] = json!(4);
        assert_ne!(fingerprint("freeze", &a), fingerprint("freeze", &c));
        let mut d = a.clone();
        d["ttl"] = json!(60);
        assert_ne!(fingerprint("freeze", &a), fingerprint("freeze", &d));
    }

    #[test]
    fn the_newest_outcomes_are_kept() {
        let mut m = Outcomes::new();
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let o = Outcome {
                at: i as i64,
                fingerprint: None,
                op: None,
                lines: vec![],
                record: i as u128,
            };
            m.insert(k.to_string(), o);
        }
        let mut gone = cap_outcomes(&mut m, 2);
        gone.sort();
        assert_eq!(gone, vec![(0, 0), (1, 1)]);
        assert!(m.contains_key("c") && m.contains_key("d"));
        assert!(cap_outcomes(&mut m, 2).is_empty());
    }
}
