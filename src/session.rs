//! Sessions and their state machine (the seed's EC-030 table): ACTIVE → FROZEN | EXPIRED |
//! DELETED; FROZEN → THAWED | DELETED; THAWED → ACTIVE | FROZEN | DELETED; EXPIRED → DELETED;
//! DELETED is terminal. A generation-in-progress flag blocks freezes (EC-003); one freeze per
//! session at a time (EC-001); a bound on active sessions names the oldest (EC-021); context
//! warnings near and at the model limit (EC-011). Durations use a monotonic clock, stored
//! times are UTC, ordering uses sequence numbers (EC-042).
//!
//! Sessions live in the daemon's memory for now; windows (which are durable) carry their
//! session id, so `session.delete` can find them after a restart.

use crate::error::ErrorCode;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionState {
    /// Generating or ready to.
    Active,
    /// Captured into a window.
    Frozen,
    /// Restored from a window.
    Thawed,
    /// Closed by the engine.
    Expired,
    /// Gone (terminal).
    Deleted,
}

impl SessionState {
    /// States reachable from this one.
    #[must_use]
    pub fn allowed(self) -> &'static [SessionState] {
        use SessionState::*;
        match self {
            Active => &[Frozen, Expired, Deleted],
            Frozen => &[Thawed, Deleted],
            Thawed => &[Active, Frozen, Deleted],
            Expired => &[Deleted],
            Deleted => &[],
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        use SessionState::*;
        Some(match s {
            "ACTIVE" => Active,
            "FROZEN" => Frozen,
            "THAWED" => Thawed,
            "EXPIRED" => Expired,
            "DELETED" => Deleted,
            _ => return None,
        })
    }
}

/// Session errors (codes reach the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A transition the table does not allow.
    #[error("cannot go from {from:?} to {to:?}; allowed from {from:?}: {allowed:?}")]
    InvalidTransition {
        /// Current state.
        from: SessionState,
        /// Requested state.
        to: SessionState,
        /// What is allowed.
        allowed: &'static [SessionState],
    },
    /// A freeze while the engine is generating (EC-003).
    #[error("cannot freeze session {0:?} while generation is in progress; wait for it to finish (session.state generating=false) or cancel it")]
    Generating(String),
    /// Already frozen (EC-001).
    #[error("session {0:?} is already frozen")]
    AlreadyFrozen(String),
    /// Another freeze of this session is running (EC-001).
    #[error("session {0:?} is being frozen by another request; retry when it finishes")]
    Busy(String),
    /// Too many active sessions (EC-021).
    #[error("maximum active sessions ({max}) reached; oldest active session: {oldest:?} (created {created_unix_ms} ms UTC); freeze or delete sessions to continue")]
    TooMany {
        /// The limit.
        max: usize,
        /// Oldest active session.
        oldest: String,
        /// Its creation time.
        created_unix_ms: i64,
    },
    /// Unknown session.
    #[error("session {0:?} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("session {0:?} already exists")]
    Exists(String),
}

impl SessionError {
    /// Stable wire code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::InvalidTransition { .. } | SessionError::Generating(_) => {
                ErrorCode::InvalidStateTransition
            }
            SessionError::AlreadyFrozen(_) => ErrorCode::SessionAlreadyFrozen,
            SessionError::Busy(_) => ErrorCode::Busy,
            SessionError::TooMany { .. } => ErrorCode::TooManySessions,
            SessionError::NotFound(_) => ErrorCode::NotFound,
            SessionError::Exists(_) => ErrorCode::AlreadyExists,
        }
    }
}

/// How close a session is to its model's context limit (EC-011).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ContextWarning {
    /// Below 95 %.
    Ok,
    /// At or above 95 %.
    NearLimit,
    /// At or above the limit.
    AtLimit,
}

/// The warning for `tokens` of a model limit.
#[must_use]
pub fn context_warning(tokens: u64, max: Option<u64>) -> ContextWarning {
    match max {
        Some(m) if m > 0 && tokens >= m => ContextWarning::AtLimit,
        Some(m) if m > 0 && u128::from(tokens) * 100 >= u128::from(m) * 95 => {
            ContextWarning::NearLimit
        }
        _ => ContextWarning::Ok,
    }
}

/// One session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: String,
    /// State.
    pub state: SessionState,
    /// A generation is in progress.
    pub generating: bool,
    /// A freeze of it is running.
    pub freezing: bool,
    /// Tokens held.
    pub tokens: u64,
    /// The model's context limit, when known.
    pub max_context: Option<u64>,
    /// Creation time, ms since the Unix epoch (UTC).
    pub created_unix_ms: i64,
    /// Creation order (not wall time).
    pub seq: u64,
    /// When the state last changed, ms since the Unix epoch (0 in records written before it
    /// was kept: the creation time stands in).
    #[serde(default)]
    pub changed_unix_ms: i64,
    /// Seconds since creation (this process's monotonic clock).
    #[serde(default)]
    pub age_secs: f64,
    #[serde(skip)]
    created: Option<Instant>,
    /// What the engine last reported the session holds: (engine, token ids, block ids). Not
    /// persisted: the engine reports it again.
    #[serde(skip)]
    pub held: Option<(String, Vec<u32>, Vec<u64>)>,
}

impl Session {
    /// When the state last changed, ms since the Unix epoch (the creation time for records
    /// written before that was kept).
    #[must_use]
    pub fn changed_at(&self) -> i64 {
        if self.changed_unix_ms > 0 {
            self.changed_unix_ms
        } else {
            self.created_unix_ms
        }
    }

    fn new(id: &str, state: SessionState, max_context: Option<u64>, seq: u64) -> Self {
        Self {
            id: id.into(),
            state,
            generating: false,
            freezing: false,
            tokens: 0,
            max_context,
            created_unix_ms: crate::store::now_unix_ms(),
            seq,
            changed_unix_ms: crate::store::now_unix_ms(),
            age_secs: 0.0,
            created: Some(Instant::now()),
            held: None,
        }
    }
}

/// Called with a session after each state change (the daemon writes it to the log, so states
/// survive a restart). Calls come in the order of the changes, outside the registry's lock: a
/// slow write (the log's appender busy with a long freeze) never stalls readers or other
/// sessions' flags, only later state changes, which must be written after it.
pub type Persist = Box<dyn Fn(&Session) + Send + Sync>;

/// Called with the id of a DELETED session the registry forgets (the daemon deletes its
/// record from the log), in order with [`Persist`] calls.
pub type Forget = Box<dyn Fn(&str) + Send + Sync>;

type Table = (HashMap<String, Session>, u64);

/// The daemon's sessions.
pub struct Registry {
    max_active: usize,
    inner: Mutex<Table>,
    persist: Option<Persist>,
    forget: Option<Forget>,
    /// Taken before the registry's lock is released and held while persisting: writes keep
    /// the order of the changes.
    persist_order: Mutex<()>,
}

impl Registry {
    /// A registry allowing `max_active` sessions in ACTIVE.
    #[must_use]
    pub fn new(max_active: usize) -> Self {
        Self {
            max_active,
            inner: Mutex::new((HashMap::new(), 0)),
            persist: None,
            forget: None,
            persist_order: Mutex::new(()),
        }
    }

    /// A registry that starts from `sessions` (recovered from the log) and reports every state
    /// change to `persist`. Freezes in flight when the daemon stopped are not running any more.
    #[must_use]
    pub fn restored(max_active: usize, sessions: Vec<Session>, persist: Persist) -> Self {
        let mut map = HashMap::new();
        let mut seq = 0;
        for mut s in sessions {
            // Flags of a running process, not state: the engine reports generation again.
            s.freezing = false;
            s.generating = false;
            s.created = Some(Instant::now());
            seq = seq.max(s.seq);
            map.insert(s.id.clone(), s);
        }
        Self {
            max_active,
            inner: Mutex::new((map, seq)),
            persist: Some(persist),
            forget: None,
            persist_order: Mutex::new(()),
        }
    }

    /// Calls `forget` for every DELETED session [`Registry::forget_deleted`] drops.
    #[must_use]
    pub fn forgetting(mut self, forget: Forget) -> Self {
        self.forget = Some(forget);
        self
    }

    /// Drops the sessions DELETED at least `ttl_ms` ago (a deleted id stays listed as DELETED
    /// that long, then is gone: its record too, so session metadata stays bounded). Returns
    /// their ids. The drop and the record deletions are ordered with state changes: a session
    /// opened again under a forgotten id is written after its old record is deleted.
    pub fn forget_deleted(&self, now_ms: i64, ttl_ms: i64) -> Vec<String> {
        let mut g = self.lock();
        let gone: Vec<String> =
            g.0.values()
                .filter(|s| s.state == SessionState::Deleted)
                .filter(|s| now_ms.saturating_sub(s.changed_at()) >= ttl_ms)
                .map(|s| s.id.clone())
                .collect();
        if gone.is_empty() {
            return gone;
        }
        for id in &gone {
            g.0.remove(id);
        }
        let order = match self.persist_order.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        drop(g);
        if let Some(f) = &self.forget {
            for id in &gone {
                f(id);
            }
        }
        drop(order);
        gone
    }

    /// Persists a change made under `g`: takes the ordering lock, releases the registry's,
    /// then writes.
    fn saved(&self, g: std::sync::MutexGuard<'_, Table>, s: &Session) {
        let Some(p) = &self.persist else { return };
        let order = match self.persist_order.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        drop(g);
        p(s);
        drop(order);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn snapshot(s: &Session) -> Session {
        let mut s = s.clone();
        s.age_secs = s.created.map_or(0.0, |c| c.elapsed().as_secs_f64());
        s
    }

    /// Opens a session in ACTIVE (EC-021 bounds how many).
    pub fn open(&self, id: &str, max_context: Option<u64>) -> Result<Session, SessionError> {
        let mut g = self.lock();
        let (map, seq) = &mut *g;
        if let Some(s) = map.get(id) {
            if s.state != SessionState::Deleted {
                return Err(SessionError::Exists(id.into()));
            }
        }
        let active: Vec<&Session> = map
            .values()
            .filter(|s| s.state == SessionState::Active)
            .collect();
        if active.len() >= self.max_active {
            let oldest = active.iter().min_by_key(|s| s.seq).map(|s| (*s).clone());
            let (oldest, created_unix_ms) =
                oldest.map_or((String::new(), 0), |s| (s.id, s.created_unix_ms));
            return Err(SessionError::TooMany {
                max: self.max_active,
                oldest,
                created_unix_ms,
            });
        }
        *seq += 1;
        let s = Session::new(id, SessionState::Active, max_context, *seq);
        map.insert(id.into(), s.clone());
        self.saved(g, &s);
        Ok(s)
    }

    /// The session, or NOT_FOUND.
    pub fn get(&self, id: &str) -> Result<Session, SessionError> {
        self.lock()
            .0
            .get(id)
            .map(Self::snapshot)
            .ok_or_else(|| SessionError::NotFound(id.into()))
    }

    /// Moves a session to `to` if the table allows it.
    pub fn transition(&self, id: &str, to: SessionState) -> Result<Session, SessionError> {
        let mut g = self.lock();
        let s =
            g.0.get_mut(id)
                .ok_or_else(|| SessionError::NotFound(id.into()))?;
        if s.freezing {
            // The freeze ends by making the session FROZEN: a state set meanwhile (DELETED by a
            // cascade that could not see the uncommitted window, say) would be overwritten.
            return Err(SessionError::Busy(id.into()));
        }
        if !s.state.allowed().contains(&to) {
            return Err(SessionError::InvalidTransition {
                from: s.state,
                to,
                allowed: s.state.allowed(),
            });
        }
        s.state = to;
        s.changed_unix_ms = crate::store::now_unix_ms();
        let snap = Self::snapshot(s);
        self.saved(g, &snap);
        Ok(snap)
    }

    /// Sets the generation flag and token count the engine reports.
    pub fn set_generating(
        &self,
        id: &str,
        generating: Option<bool>,
        tokens: Option<u64>,
    ) -> Result<Session, SessionError> {
        let mut g = self.lock();
        let s =
            g.0.get_mut(id)
                .ok_or_else(|| SessionError::NotFound(id.into()))?;
        if let Some(gen) = generating {
            s.generating = gen;
        }
        if let Some(t) = tokens {
            s.tokens = t;
        }
        Ok(Self::snapshot(s))
    }

    /// Records what the engine says the session holds (used by freezes and thaws that name only
    /// the session, such as `cwm freeze --session S --window W`).
    pub fn set_held(
        &self,
        id: &str,
        held: (String, Vec<u32>, Vec<u64>),
    ) -> Result<(), SessionError> {
        let mut g = self.lock();
        let s =
            g.0.get_mut(id)
                .ok_or_else(|| SessionError::NotFound(id.into()))?;
        s.tokens = held.1.len() as u64;
        s.held = Some(held);
        Ok(())
    }

    /// Starts a freeze: the session must be ACTIVE or THAWED, not generating, not already being
    /// frozen. Unknown sessions are opened first (an engine may freeze without session.open).
    pub fn begin_freeze(&self, id: &str) -> Result<(), SessionError> {
        if !self.lock().0.contains_key(id) {
            match self.open(id, None) {
                Ok(_) | Err(SessionError::Exists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let mut g = self.lock();
        let s =
            g.0.get_mut(id)
                .ok_or_else(|| SessionError::NotFound(id.into()))?;
        if s.freezing {
            return Err(SessionError::Busy(id.into()));
        }
        if s.state == SessionState::Frozen {
            return Err(SessionError::AlreadyFrozen(id.into()));
        }
        if s.generating {
            return Err(SessionError::Generating(id.into()));
        }
        if !s.state.allowed().contains(&SessionState::Frozen) {
            return Err(SessionError::InvalidTransition {
                from: s.state,
                to: SessionState::Frozen,
                allowed: s.state.allowed(),
            });
        }
        s.freezing = true;
        Ok(())
    }

    /// Ends a freeze: FROZEN on success; on failure the state is left as it was (EC-040).
    pub fn end_freeze(&self, id: &str, ok: bool) {
        let mut g = self.lock();
        if let Some(s) = g.0.get_mut(id) {
            s.freezing = false;
            if ok
                && (s.state == SessionState::Frozen
                    || s.state.allowed().contains(&SessionState::Frozen))
            {
                s.state = SessionState::Frozen;
                let snap = Self::snapshot(s);
                self.saved(g, &snap);
            }
        }
    }

    /// Marks a session THAWED after a thaw into it (opening it when unknown).
    pub fn thawed(&self, id: &str) -> Result<Session, SessionError> {
        let mut g = self.lock();
        let (map, seq) = &mut *g;
        match map.get_mut(id) {
            Some(s) => {
                if !s.state.allowed().contains(&SessionState::Thawed)
                    && s.state != SessionState::Thawed
                {
                    return Err(SessionError::InvalidTransition {
                        from: s.state,
                        to: SessionState::Thawed,
                        allowed: s.state.allowed(),
                    });
                }
                s.state = SessionState::Thawed;
                let snap = Self::snapshot(s);
                self.saved(g, &snap);
                Ok(snap)
            }
            None => {
                *seq += 1;
                let s = Session::new(id, SessionState::Thawed, None, *seq);
                map.insert(id.into(), s.clone());
                self.saved(g, &s);
                Ok(s)
            }
        }
    }

    /// All sessions, in creation order.
    #[must_use]
    pub fn list(&self) -> Vec<Session> {
        let g = self.lock();
        let mut v: Vec<Session> = g.0.values().map(Self::snapshot).collect();
        v.sort_by_key(|s| s.seq);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::SessionState::*;
    use super::*;

    const ALL: [SessionState; 5] = [Active, Frozen, Thawed, Expired, Deleted];

    #[test]
    fn persistence_runs_outside_the_registry_lock_in_change_order() {
        use std::sync::{Arc, Mutex as M, OnceLock};
        let reg_slot: Arc<OnceLock<Arc<Registry>>> = Arc::new(OnceLock::new());
        let written: Arc<M<Vec<(String, SessionState, usize)>>> = Arc::default();
        let (slot, log) = (reg_slot.clone(), written.clone());
        let reg = Arc::new(Registry::restored(
            8,
            Vec::new(),
            Box::new(move |s: &Session| {
                // Reading the registry while a change is being written: with the write under
                // the registry's lock this would deadlock.
                let seen = slot.get().map_or(0, |r| r.list().len());
                log.lock().unwrap().push((s.id.clone(), s.state, seen));
            }),
        ));
        reg_slot.set(reg.clone()).ok().unwrap();
        reg.open("a", None).unwrap();
        reg.begin_freeze("a").unwrap();
        reg.end_freeze("a", true);
        reg.thawed("a").unwrap();
        reg.transition("a", Active).unwrap();
        reg.thawed("b").unwrap();
        let w = written.lock().unwrap().clone();
        let states: Vec<(&str, SessionState)> =
            w.iter().map(|(id, st, _)| (id.as_str(), *st)).collect();
        assert_eq!(
            states,
            [
                ("a", Active),
                ("a", Frozen),
                ("a", Thawed),
                ("a", Active),
                ("b", Thawed)
            ]
        );
        assert_eq!(w.last().unwrap().2, 2, "the writer saw the registry");
    }

    #[test]
    fn writes_keep_the_order_of_concurrent_changes() {
        use std::sync::{Arc, Mutex as M};
        let written: Arc<M<Vec<u64>>> = Arc::default();
        let log = written.clone();
        let reg = Arc::new(Registry::restored(
            1000,
            Vec::new(),
            Box::new(move |s: &Session| {
                std::thread::yield_now();
                log.lock().unwrap().push(s.seq);
            }),
        ));
        std::thread::scope(|sc| {
            for t in 0..4 {
                let reg = reg.clone();
                sc.spawn(move || {
                    for i in 0..50 {
                        reg.open(&format!("s{t}-{i}"), None).unwrap();
                    }
                });
            }
        });
        let w = written.lock().unwrap().clone();
        assert_eq!(w.len(), 200);
        // Each open takes the next sequence number under the lock; the writes come in that
        // order.
        assert!(w.windows(2).all(|p| p[0] < p[1]), "{w:?}");
    }

    fn at(r: &Registry, id: &str, path: &[SessionState]) {
        r.open(id, None).expect("open");
        for s in path {
            r.transition(id, *s).expect("path");
        }
    }

    #[test]
    fn ec_030_every_transition_checked_one_by_one() {
        let paths: [(SessionState, &[SessionState]); 5] = [
            (Active, &[]),
            (Frozen, &[Frozen]),
            (Thawed, &[Frozen, Thawed]),
            (Expired, &[Expired]),
            (Deleted, &[Deleted]),
        ];
        let mut n = 0;
        for (from, path) in paths {
            for to in ALL {
                let r = Registry::new(10);
                let id = format!("s-{n}");
                n += 1;
                at(&r, &id, path);
                assert_eq!(r.get(&id).expect("get").state, from);
                let res = r.transition(&id, to);
                if from.allowed().contains(&to) {
                    assert_eq!(res.expect("allowed").state, to, "{from:?} -> {to:?}");
                } else {
                    let e = res.expect_err("refused");
                    assert_eq!(e.code(), "INVALID_STATE_TRANSITION", "{from:?} -> {to:?}");
                    assert!(e.to_string().contains("allowed"), "{e}");
                    assert_eq!(
                        r.get(&id).expect("get").state,
                        from,
                        "state changed by a refused transition"
                    );
                }
            }
        }
        assert_eq!(n, 25);
    }

    #[test]
    fn ec_003_freeze_during_generation_refused() {
        let r = Registry::new(10);
        r.open("s", None).expect("open");
        r.set_generating("s", Some(true), Some(10)).expect("gen");
        let e = r.begin_freeze("s").expect_err("refused");
        assert_eq!(e.code(), "INVALID_STATE_TRANSITION");
        assert!(e.to_string().contains("generation is in progress"));
        r.set_generating("s", Some(false), None).expect("gen");
        r.begin_freeze("s").expect("ok");
    }

    #[test]
    fn ec_001_second_freeze_busy_then_already_frozen() {
        let r = Registry::new(10);
        r.begin_freeze("s").expect("first");
        assert_eq!(r.begin_freeze("s").expect_err("busy").code(), "BUSY");
        r.end_freeze("s", true);
        assert_eq!(
            r.begin_freeze("s").expect_err("frozen").code(),
            "SESSION_ALREADY_FROZEN"
        );
        // A failed freeze leaves the state as it was (EC-040).
        r.open("t", None).expect("open");
        r.begin_freeze("t").expect("t");
        r.end_freeze("t", false);
        assert_eq!(r.get("t").expect("t").state, Active);
    }

    /// A session being frozen changes state only through its freeze: a delete meanwhile is
    /// BUSY (the freeze would make the deleted session FROZEN again), and a freeze ending on
    /// a state FROZEN cannot follow leaves that state.
    #[test]
    fn no_state_change_while_a_freeze_runs() {
        let r = Registry::new(10);
        r.open("s", None).expect("open");
        r.begin_freeze("s").expect("freeze");
        assert_eq!(r.transition("s", Deleted).expect_err("busy").code(), "BUSY");
        r.end_freeze("s", true);
        assert_eq!(r.get("s").expect("s").state, Frozen);
        r.transition("s", Deleted).expect("delete after the freeze");
        // (A restored registry could hold a DELETED session marked freezing by a crash.)
        r.end_freeze("s", true);
        assert_eq!(r.get("s").expect("s").state, Deleted, "terminal");
        assert_eq!(
            context_warning(u64::MAX, Some(u64::MAX - 1)),
            ContextWarning::AtLimit
        );
        assert_eq!(
            context_warning(u64::MAX / 50, Some(u64::MAX / 48)),
            ContextWarning::NearLimit
        );
    }

    #[test]
    fn ec_021_too_many_active_names_the_oldest() {
        let r = Registry::new(2);
        r.open("first", None).expect("1");
        r.open("second", None).expect("2");
        let e = r.open("third", None).expect_err("full");
        assert_eq!(e.code(), "TOO_MANY_SESSIONS");
        assert!(e.to_string().contains("\"first\""), "{e}");
        r.transition("first", Expired).expect("expire");
        r.open("third", None).expect("room again");
    }

    #[test]
    fn ec_011_context_warnings() {
        assert_eq!(context_warning(100, Some(128_000)), ContextWarning::Ok);
        assert_eq!(
            context_warning(121_600, Some(128_000)),
            ContextWarning::NearLimit
        );
        assert_eq!(
            context_warning(128_000, Some(128_000)),
            ContextWarning::AtLimit
        );
        assert_eq!(context_warning(10, None), ContextWarning::Ok);
    }
}
