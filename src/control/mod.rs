//! The control server: newline-delimited JSON over a Unix stream socket (docs/PROTOCOL.md).
//! One thread per connection; every request line gets one or more response lines with the same
//! `id`, the last one marked `"final": true`. Bad input of any kind gets an error response and
//! the connection keeps serving.

pub mod client;
pub mod integrity;
pub mod maint;
pub mod metrics;
pub mod protocol;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::device::host::{ProcessMemory, ShmMemory};
use crate::device::KvMemory;
use crate::error::ErrorCode;
use crate::pipeline::{
    freeze, thaw, Engine, FreezeOptions, FreezeRequest, PipelineConfig, ThawOptions, ThawRequest,
};
use crate::store::{Replace, Store};
use crate::tier::RamTier;
use protocol::{ApiError, Request};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Uids allowed to connect (empty: only the server's own uid).
    pub allow_uids: Vec<u32>,
    /// Directory shared-memory KV files must live in.
    pub shm_dir: PathBuf,
    /// Longest accepted request line.
    pub max_line: usize,
    /// Pipeline settings.
    pub pipeline: PipelineConfig,
    /// RAM tier bytes (0: off).
    pub tier_bytes: u64,
    /// Most sessions in ACTIVE at once (EC-021).
    pub max_sessions: usize,
    /// Serve Prometheus metrics over HTTP here (`GET /metrics`); off when `None`.
    pub metrics_addr: Option<String>,
    /// Most freezes and thaws running at once; more are refused with BUSY.
    pub max_ops: usize,
    /// Background compaction and scrub.
    pub maintenance: maint::Maintenance,
}

/// The running server's state.
pub struct Server {
    store: Arc<Store>,
    cfg: ServeConfig,
    engines: Mutex<HashMap<String, Arc<Engine>>>,
    idem: Mutex<HashMap<String, Vec<Value>>>,
    tier: RamTier,
    sessions: crate::session::Registry,
    metrics: metrics::Metrics,
    stopping: AtomicBool,
    /// An eventfd [`Server::stop`] writes to, waking the accept loop (`None` if it could not be
    /// made: the loop then looks at `stopping` every second).
    wake: Option<std::fs::File>,
    /// Estimated thaw GB/s (f64 bits), for EC-041 deadlines.
    thaw_rate: AtomicU64,
    /// EWMA of thaws served wholly from the RAM tier (GB/s, f64 bits): lookup's estimate.
    tier_rate: AtomicU64,
    heavy_ops: std::sync::atomic::AtomicUsize,
    inflight: Mutex<HashMap<String, Arc<Inflight>>>,
    /// Damage known in the log (EC-051), reported by `health`.
    integrity: integrity::Integrity,
    /// Idempotency keys with a request running (see `handle`).
    idem_running: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Every staging pool made for an engine. A pool only this list holds belongs to an engine
    /// that went away (a vLLM restart): the next engine with that block size takes it, since
    /// its memory stays pinned and registered with the I/O engine anyway.
    staging_pools: Mutex<Vec<Arc<crate::staging::StagingPool>>>,
}

thread_local! {
    /// The engine `register` inserted while handling this connection's current request (none
    /// for a replayed one): what a connection-scoped registration owns.
    static REGISTERED: std::cell::RefCell<Option<(String, Arc<Engine>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One in-flight request's outcome, shared with identical requests that arrive meanwhile.
type Inflight = (Mutex<Option<Result<Value, ApiError>>>, std::sync::Condvar);

/// What makes two thaws identical: engine (or session), window, destination blocks, tokens,
/// prefix range, request salt (a thaw in another namespace must be checked, not told
/// `loaded`) and deadline.
fn thaw_key(a: &Value) -> String {
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

/// Key of a catalog record of `kind` ("session", "idem") named `name`.
fn meta_key(kind: &str, name: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(format!("cwm-{kind}\0{name}").as_bytes())
}

/// True when the peer of connection `fd` has closed it (or shut down its writing side): a
/// zero-timeout poll, cheap enough to ask between batches. The fd stays open (owned by the
/// connection's thread, which is the caller's) for as long as this can be called.
fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A non-blocking eventfd, or `None` (logged) if the system would not make one.
fn eventfd() -> Option<std::fs::File> {
    // SAFETY: eventfd has no memory preconditions; a non-negative result is a new descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        crate::log::warn(&format!(
            "eventfd: {}; stopping may take up to a second",
            std::io::Error::last_os_error()
        ));
        return None;
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The (device, inode) of the file at `p`, if any.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    peer_uid_of_fd(s.as_raw_fd())
}

fn peer_uid_of_fd(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

impl Server {
    /// A server over an open store.
    #[must_use]
    pub fn new(store: Arc<Store>, cfg: ServeConfig) -> Arc<Self> {
        let tier = RamTier::new(cfg.tier_bytes);
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
        let sessions =
            crate::session::Registry::restored(cfg.max_sessions.max(1), restored, persist);
        for (id, window) in frozen_late {
            crate::log::warn(&format!(
                "session {id:?}: window {window:?} was committed but the daemon stopped before \
                 the session was marked FROZEN; it is FROZEN now"
            ));
            if let Err(e) = sessions.transition(&id, crate::session::SessionState::Frozen) {
                crate::log::warn(&format!("session {id:?} not reconciled: {e}"));
            }
        }
        Arc::new(Self {
            sessions,
            store,
            cfg,
            engines: Mutex::new(HashMap::new()),
            idem: Mutex::new(idem),
            tier,
            metrics: metrics::Metrics::default(),
            stopping: AtomicBool::new(false),
            wake: eventfd(),
            thaw_rate: AtomicU64::new(0.5f64.to_bits()),
            tier_rate: AtomicU64::new(2.0f64.to_bits()),
            heavy_ops: std::sync::atomic::AtomicUsize::new(0),
            inflight: Mutex::new(HashMap::new()),
            integrity: integrity::Integrity::default(),
            staging_pools: Mutex::new(Vec::new()),
            idem_running: Mutex::new(HashMap::new()),
        })
    }

    /// Records the damage opening the store found (its recovery report), for `health`.
    pub fn opened(&self, report: &crate::store::RecoveryReport) {
        self.integrity.opened(report);
    }

    /// Binds the socket (mode 0600 in a 0700 directory it creates) and serves until
    /// [`Server::stop`] is called.
    pub fn serve(self: &Arc<Self>) -> std::io::Result<()> {
        let sock = &self.cfg.socket;
        if let Some(dir) = sock.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        if sock.exists() {
            // A stale socket of an earlier run — unless something answers on it: a daemon on
            // another data directory (the store's LOCK covers only this one's).
            if UnixStream::connect(sock).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by another running process (another cwm?)",
                        sock.display()
                    ),
                ));
            }
            std::fs::remove_file(sock)?;
        }
        if let Some(addr) = &self.cfg.metrics_addr {
            let l = std::net::TcpListener::bind(addr)?;
            if !l.local_addr()?.ip().is_loopback() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("metrics address {addr} is not a loopback address; expose it through a proxy instead"),
                ));
            }
            crate::log::info(&format!("metrics on http://{}/metrics", l.local_addr()?));
            let me = self.clone();
            std::thread::spawn(move || me.metrics_http(l));
        }
        self.start_maintenance();
        let listener = UnixListener::bind(sock)?;
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
        // Which file is ours: at exit the path is removed only if it still names it (another
        // daemon may listen there by then).
        let ours = file_id(sock);
        // Never blocked in accept: the loop waits in poll for a connection or for `stop`.
        listener.set_nonblocking(true)?;
        crate::log::info(&format!("listening on {}", sock.display()));
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        while !self.stopping.load(Ordering::SeqCst) {
            if !self.wait_for_connection(&listener) {
                continue;
            }
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // Out of descriptors or memory: do not spin on a listener that stays
                    // readable.
                    crate::log::warn(&format!("accept: {e}"));
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
            };
            if conn.set_nonblocking(false).is_err() {
                continue;
            }
            let uid = peer_uid(&conn);
            let allowed = match uid {
                Some(u) => u == me || self.cfg.allow_uids.contains(&u),
                None => false,
            };
            if !allowed {
                crate::log::warn(&format!(
                    "refused a client with uid {uid:?}: not in the allow-list"
                ));
                let mut c = conn;
                let _ = writeln!(
                    c,
                    "{}",
                    protocol::error_line(
                        &Value::Null,
                        &ApiError::new(ErrorCode::PermissionDenied, "this uid may not use cwm")
                    )
                );
                continue;
            }
            let me2 = self.clone();
            std::thread::spawn(move || me2.connection(conn));
        }
        if ours.is_some() && file_id(sock) == ours {
            let _ = std::fs::remove_file(sock);
        }
        Ok(())
    }

    /// Waits until `listener` has a connection (true) or [`Server::stop`] was called, a signal
    /// interrupted the wait or the fallback period passed (false).
    fn wait_for_connection(&self, listener: &UnixListener) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ms = if self.wake.is_some() { -1 } else { 1000 };
        // SAFETY: fds is a live array of two pollfd (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            crate::log::warn(&format!("poll: {}", std::io::Error::last_os_error()));
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        n > 0 && fds[0].revents != 0
    }

    /// Stops accepting: the accept loop wakes and exits (whatever became of the socket path).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(mut w) = self.wake.as_ref() {
            // The eventfd's counter only grows: it stays readable, the loop sees it whenever
            // it polls next.
            let _ = w.write_all(&1u64.to_ne_bytes());
        }
    }

    /// After [`Server::stop`]: waits up to `limit` for the freezes and thaws still running (a
    /// freeze already `captured` holds the only copy of its blocks); returns how many were
    /// still running. New ones are refused meanwhile.
    pub fn drain(&self, limit: std::time::Duration) -> usize {
        let t = std::time::Instant::now();
        loop {
            let n = self.heavy_ops.load(Ordering::SeqCst);
            if n == 0 || t.elapsed() >= limit {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn connection(&self, conn: UnixStream) {
        let owned: Mutex<Vec<(String, Arc<Engine>)>> = Mutex::new(Vec::new());
        self.serve_connection(conn, &owned);
        // Engines registered with scope "connection" go away with it (their IPC mappings are
        // closed when the last reference drops), unless re-registered since.
        let owned = owned.into_inner().unwrap_or_default();
        if let Ok(mut engines) = self.engines.lock() {
            for (name, eng) in owned {
                if engines.get(&name).is_some_and(|e| Arc::ptr_eq(e, &eng)) {
                    engines.remove(&name);
                    crate::log::info(&format!(
                        "engine {name:?} unregistered: its connection closed"
                    ));
                }
            }
        }
    }

    fn serve_connection(&self, conn: UnixStream, owned: &Mutex<Vec<(String, Arc<Engine>)>>) {
        // A client that stops reading must not stall the daemon: a freeze's `captured` line is
        // sent while its writer holds the log. A send that cannot go out in this time fails
        // (the request still completes).
        let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(10)));
        let Ok(read_half) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let out = Mutex::new(conn);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut reader)
                .take(self.cfg.max_line as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if n > self.cfg.max_line && line.last() != Some(&b'\n') {
                // Oversized: answer, then skip the rest of the line.
                self.send(
                    &out,
                    &protocol::error_line(
                        &Value::Null,
                        &ApiError::new(
                            ErrorCode::Validation,
                            format!(
                                "request line longer than {} bytes; the limit is max_line",
                                self.cfg.max_line
                            ),
                        ),
                    ),
                );
                let mut sink = Vec::new();
                loop {
                    sink.clear();
                    match (&mut reader).take(1 << 20).read_until(b'\n', &mut sink) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if sink.last() == Some(&b'\n') => break,
                        Ok(_) => {}
                    }
                }
                continue;
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            self.metrics.requests.inc();
            match protocol::parse(&line) {
                Ok(req) => {
                    let scoped = req.op == "register"
                        && req.args.get("scope").and_then(Value::as_str) == Some("connection");
                    REGISTERED.with(|r| *r.borrow_mut() = None);
                    self.handle(req, &out);
                    // Owned: exactly the engine this request registered (not one another
                    // connection registered under the name meanwhile, nor any for a replay).
                    if let Some(reg) = REGISTERED.with(|r| r.borrow_mut().take()) {
                        if scoped {
                            if let Ok(mut o) = owned.lock() {
                                o.push(reg);
                            }
                        }
                    }
                }
                Err((id, e)) => {
                    self.metrics.errors.inc();
                    self.send(&out, &protocol::error_line(&id, &e));
                }
            }
        }
    }

    fn send(&self, out: &Mutex<UnixStream>, line: &str) {
        if let Ok(mut o) = out.lock() {
            let _ = o.write_all(line.as_bytes());
            let _ = o.write_all(b"\n");
        }
    }

    /// Answers one request; true when it succeeded.
    fn handle(&self, req: Request, out: &Mutex<UnixStream>) -> bool {
        let id = req.id.clone();
        // Requests with one idempotency key run one at a time: a retry that arrives while the
        // first is still running waits for it, then replays its success (or runs, if it
        // failed).
        let key_lock = req.idempotency_key.as_ref().map(|k| {
            self.idem_running
                .lock()
                .map(|mut m| m.entry(k.clone()).or_default().clone())
                .unwrap_or_default()
        });
        let _key_guard = key_lock
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let answered = self.handle_keyed(req, out, id);
        drop(_key_guard);
        if let Some(l) = key_lock {
            if let Ok(mut m) = self.idem_running.lock() {
                // Only this and the table hold it: nobody else is waiting on the key.
                if Arc::strong_count(&l) == 2 {
                    m.retain(|_, v| !Arc::ptr_eq(v, &l));
                }
            }
        }
        answered
    }

    fn handle_keyed(&self, req: Request, out: &Mutex<UnixStream>, id: Value) -> bool {
        // Idempotency: a retry with the same key gets the first outcome, no work done twice.
        if let Some(k) = &req.idempotency_key {
            let prior = self.idem.lock().ok().and_then(|m| m.get(k).cloned());
            if let Some(lines) = prior {
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
                self.dispatch(&req, &progress, fd)
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
        if let Some(k) = req.idempotency_key.as_ref().filter(|_| succeeded) {
            let mut lines = sent.lock().map(|s| s.clone()).unwrap_or_default();
            lines.push(last.clone());
            let rec = json!({"kind": "idem", "key": k, "lines": lines}).to_string();
            if let Err(e) = self.store.put_meta(meta_key("idem", k), rec.as_bytes()) {
                crate::log::warn(&format!("idempotency key {k:?} not persisted: {e}"));
            }
            if let Ok(mut m) = self.idem.lock() {
                m.entry(k.clone()).or_insert(lines);
            }
        }
        emit(last);
        succeeded
    }

    fn engine(&self, name: &str) -> Result<Arc<Engine>, ApiError> {
        self.engines
            .lock()
            .map_err(|_| ApiError::internal("engine table poisoned"))?
            .get(name)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("no engine {name:?} is registered; send register first"),
                )
            })
    }

    fn dispatch(
        &self,
        req: &Request,
        progress: &(dyn Fn(&str, Value) + Sync),
        conn: Option<std::os::fd::RawFd>,
    ) -> Result<Value, ApiError> {
        // A freeze or thaw whose requester hangs up stops (PipelineConfig::cancel).
        let cancel = conn.map(|fd| crate::pipeline::Cancel(Arc::new(move || peer_gone(fd))));
        let a = &req.args;
        if let Some(r) = self.maintenance_op(&req.op, a, progress) {
            return r;
        }
        match req.op.as_str() {
            "hello" => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": protocol::PROTOCOL_VERSION,
                "capabilities": ["register.shm", "register.process", "register.cuda", "sessions", "freeze", "thaw", "lookup", "list", "stat", "delete", "idempotency", "metrics", "thaw.prefix", "lookup.estimate", "layout.pieces", "compact", "scrub", "check"],
            })),
            "health" => {
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
                    "engines": self.engines.lock().map(|e| e.len()).unwrap_or(0)}),
                )
            }
            "register" => self.register(a, conn.and_then(peer_uid_of_fd)),
            "unregister" => {
                let name = protocol::str_field(a, "engine")?;
                let removed = self
                    .engines
                    .lock()
                    .map_err(|_| ApiError::internal("engine table poisoned"))?
                    .remove(name);
                match removed {
                    Some(_) => Ok(json!({"engine": name})),
                    None => Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("no engine {name:?} is registered"),
                    )),
                }
            }
            "freeze" => {
                // Engine, tokens and blocks may come from what the session holds.
                let sess_id = protocol::opt_str(a, "session")?;
                let held = sess_id
                    .as_deref()
                    .and_then(|s| self.sessions.get(s).ok())
                    .and_then(|s| s.held);
                let eng_name = match (protocol::opt_str(a, "engine")?, &held) {
                    (Some(e), _) => e,
                    (None, Some((e, _, _))) => e.clone(),
                    (None, None) => return Err(ApiError::validation(
                        "missing field engine (or a session whose engine reported what it holds)",
                    )),
                };
                let eng = self.engine(&eng_name)?;
                let (tokens, block_ids) = match (a.get("tokens"), &held) {
                    (Some(_), _) | (None, None) => (
                        protocol::u32_list(a, "tokens")?,
                        protocol::u64_list(a, "block_ids")?,
                    ),
                    (None, Some((_, t, b))) => (t.clone(), b.clone()),
                };
                let replace = match a.get("replace") {
                    None | Some(Value::Bool(false)) | Some(Value::Null) => Replace::No,
                    Some(Value::Bool(true)) => Replace::Any,
                    Some(v) => Replace::IfVersion(v.as_u64().ok_or_else(|| {
                        ApiError::validation("replace must be a boolean or a version number")
                    })?),
                };
                let fr = FreezeRequest {
                    window: protocol::str_field(a, "window")?.to_string(),
                    session: protocol::opt_str(a, "session")?.unwrap_or_default(),
                    tokens,
                    block_ids,
                    replace,
                    salt: protocol::opt_str(a, "salt")?,
                };
                // `captured` goes out from the gather thread the moment the engine's blocks are
                // free, before the writes finish.
                let on_captured = || progress("captured", json!({}));
                let session = fr.session.clone();
                if !session.is_empty() {
                    self.sessions
                        .begin_freeze(&session)
                        .map_err(ApiError::from)?;
                }
                let opts = FreezeOptions {
                    tier: Some(&self.tier).filter(|t| t.enabled()),
                    on_captured: Some(&on_captured),
                    cancel: cancel.clone(),
                    progress: None,
                };
                let res = freeze(&self.store, &eng, fr, &self.cfg.pipeline, &opts);
                if !session.is_empty() {
                    self.sessions.end_freeze(&session, res.is_ok());
                }
                let r = res.map_err(ApiError::from)?;
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
                Ok(json!({"status": "durable", "window": r.info, "report": r}))
            }
            "thaw" => self.coalesce(&thaw_key(a), || {
                let sess_id = protocol::opt_str(a, "session")?;
                let held = sess_id
                    .as_deref()
                    .and_then(|s| self.sessions.get(s).ok())
                    .and_then(|s| s.held);
                let eng_name =
                    match (protocol::opt_str(a, "engine")?, &held) {
                        (Some(e), _) => e,
                        (None, Some((e, _, _))) => e.clone(),
                        (None, None) => return Err(ApiError::validation(
                            "missing field engine (or a session whose engine reported its blocks)",
                        )),
                    };
                let eng = self.engine(&eng_name)?;
                // A session that cannot become THAWED is refused before any block is written.
                if let Some(cur) = sess_id.as_deref().and_then(|s| self.sessions.get(s).ok()) {
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
                let block_ids = match (a.get("block_ids"), &held) {
                    (Some(_), _) | (None, None) => protocol::u64_list(a, "block_ids")?,
                    (None, Some((_, _, b))) => b.clone(),
                };
                let expect_tokens = match a.get("tokens") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(protocol::u32_list(a, "tokens")?),
                };
                let prefix = match a.get("prefix") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(ApiError::validation("field prefix must be a boolean")),
                };
                let salt = protocol::opt_str(a, "salt")?;
                // Without a window name, the window holding the longest stored prefix of the
                // tokens (what `lookup` found) is restored, as far as block_ids reach.
                let (window, prefix) = match (protocol::opt_str(a, "window")?, &expect_tokens) {
                    (Some(w), _) => (w, prefix),
                    (None, Some(t)) => {
                        let found = self
                            .store
                            .longest_prefix(&eng.keys_with(t, salt.as_deref()), None)
                            .map_err(ApiError::from)?;
                        let (w, _) = found.ok_or_else(|| {
                            ApiError::new(
                                ErrorCode::NotFound,
                                "no stored window starts with these tokens",
                            )
                        })?;
                        (w.name, true)
                    }
                    (None, None) => return Err(ApiError::validation(
                        "missing field window (or tokens, to restore the longest stored prefix)",
                    )),
                };
                let tr = ThawRequest {
                    window,
                    block_ids,
                    expect_tokens,
                    prefix,
                    first_block: protocol::opt_u64(a, "first_block")?.unwrap_or(0) as usize,
                    salt,
                };
                // EC-041: a deadline scaled to the window (or the request's timeout_ms).
                let limit = match protocol::opt_u64(a, "timeout_ms")? {
                    Some(ms) => std::time::Duration::from_millis(ms),
                    None => {
                        let bytes = self.store.get(&tr.window).map(|w| w.bytes).unwrap_or(0);
                        crate::pipeline::thaw_timeout(
                            bytes,
                            f64::from_bits(self.thaw_rate.load(Ordering::Relaxed)),
                        )
                    }
                };
                let opts = ThawOptions {
                    tier: Some(&self.tier).filter(|t| t.enabled()),
                    cancel: cancel.clone(),
                    progress: None,
                    deadline: Some(std::time::Instant::now() + limit),
                };
                let r = thaw(&self.store, &eng, &tr, &self.cfg.pipeline, &opts)
                    .map_err(ApiError::from)?;
                if let Some(sess) = protocol::opt_str(a, "session")? {
                    self.sessions.thawed(&sess).map_err(ApiError::from)?;
                }
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
                if r.loaded_secs > 0.0 && r.bytes > (64 << 20) {
                    // Running estimates of thaw speed (disk, RAM tier) for the next deadlines
                    // and lookups' thaw-or-recompute estimates.
                    let seen = r.bytes as f64 / r.loaded_secs / 1e9;
                    let rate = if r.blocks_from_tier == r.blocks_restored {
                        &self.tier_rate
                    } else {
                        &self.thaw_rate
                    };
                    let old = f64::from_bits(rate.load(Ordering::Relaxed));
                    rate.store((0.7 * old + 0.3 * seen).to_bits(), Ordering::Relaxed);
                }
                self.metrics.thaw_bytes.inc_by(r.bytes);
                Ok(json!({"status": "loaded", "report": r}))
            }),
            "lookup" => {
                let eng = self.engine(protocol::str_field(a, "engine")?)?;
                let tokens = protocol::u32_list(a, "tokens")?;
                let prefill = match a.get("prefill_tokens_per_s") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_f64().ok_or_else(|| {
                        ApiError::validation("prefill_tokens_per_s must be a number")
                    })?),
                };
                let keys = eng.keys_with(&tokens, protocol::opt_str(a, "salt")?.as_deref());
                let only = protocol::opt_str(a, "window")?;
                let found = self
                    .store
                    .longest_prefix(&keys, only.as_deref())
                    .map_err(ApiError::from)?;
                let blocks = found.as_ref().map_or(0, |(_, n)| *n);
                let bs = eng.layout.block_size as usize;
                let tokens_matched = (blocks * bs).min(tokens.len());
                let matched: Vec<String> =
                    keys[..blocks].iter().map(|k| format!("{k:032x}")).collect();
                // Blocks all in the RAM tier thaw at the tier's measured speed, else the disk's
                // (also while a thaw holds the tier: the scheduler never waits for one).
                let from_tier = blocks > 0
                    && self.tier.enabled()
                    && self.tier.contains_all(&keys[..blocks]) == Some(true);
                let rate = if from_tier {
                    &self.tier_rate
                } else {
                    &self.thaw_rate
                };
                let est = crate::decision::estimate(
                    blocks as u64 * eng.layout.block_bytes(),
                    f64::from_bits(rate.load(Ordering::Relaxed)),
                    tokens_matched as u64,
                    prefill,
                );
                Ok(
                    json!({"blocks_matched": blocks, "tokens_matched": tokens_matched,
                    "block_keys": matched,
                    "window": found.as_ref().map(|(w, _)| w.name.clone()),
                    "window_version": found.as_ref().map(|(w, _)| w.version),
                    "from_tier": from_tier,
                    "estimated_thaw_secs": est.thaw_secs,
                    "estimated_recompute_secs": est.recompute_secs,
                    "thaw_wins": est.thaw_wins}),
                )
            }
            "list" => {
                let offset = protocol::opt_u64(a, "offset")?.unwrap_or(0) as usize;
                let limit = protocol::opt_u64(a, "limit")?.unwrap_or(1000).min(10_000) as usize;
                let session = protocol::opt_str(a, "session")?;
                let (page, total) = self
                    .store
                    .list_page(offset, limit, session.as_deref())
                    .map_err(ApiError::from)?;
                Ok(json!({"windows": page, "total": total}))
            }
            "stat" => {
                let info = self
                    .store
                    .get(protocol::str_field(a, "window")?)
                    .map_err(ApiError::from)?;
                Ok(json!({"window": info}))
            }
            "delete" => {
                let info = self
                    .store
                    .delete_window(
                        protocol::str_field(a, "window")?,
                        protocol::opt_u64(a, "expected_version")?,
                    )
                    .map_err(ApiError::from)?;
                Ok(json!({"deleted": info}))
            }
            "metrics" => Ok(json!({"text": self.metrics_text()})),
            "session.open" => {
                let s = self
                    .sessions
                    .open(
                        protocol::str_field(a, "session")?,
                        protocol::opt_u64(a, "max_context")?,
                    )
                    .map_err(ApiError::from)?;
                Ok(json!({"session": s}))
            }
            "session.state" => {
                let id = protocol::str_field(a, "session")?;
                let generating = match a.get("generating") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(b)) => Some(*b),
                    Some(_) => {
                        return Err(ApiError::validation("field generating must be a boolean"))
                    }
                };
                let mut s = self
                    .sessions
                    .set_generating(id, generating, protocol::opt_u64(a, "tokens")?)
                    .map_err(ApiError::from)?;
                if let Some(engine) = protocol::opt_str(a, "engine")? {
                    let t = protocol::u32_list(a, "token_ids")?;
                    let b = protocol::u64_list(a, "block_ids")?;
                    self.sessions
                        .set_held(id, (engine, t, b))
                        .map_err(ApiError::from)?;
                    s = self.sessions.get(id).map_err(ApiError::from)?;
                }
                if let Some(to) = protocol::opt_str(a, "state")? {
                    let to = crate::session::SessionState::parse(&to).ok_or_else(|| {
                        ApiError::validation(
                            "state must be ACTIVE, FROZEN, THAWED, EXPIRED or DELETED",
                        )
                    })?;
                    s = self.sessions.transition(id, to).map_err(ApiError::from)?;
                }
                let warning = crate::session::context_warning(s.tokens, s.max_context);
                if warning != crate::session::ContextWarning::Ok {
                    crate::log::warn(&format!(
                        "session {id:?} at {}/{} tokens ({warning:?})",
                        s.tokens,
                        s.max_context.unwrap_or(0)
                    ));
                }
                Ok(json!({"session": s, "context_warning": warning}))
            }
            "session.close" => {
                let s = self
                    .sessions
                    .transition(
                        protocol::str_field(a, "session")?,
                        crate::session::SessionState::Expired,
                    )
                    .map_err(ApiError::from)?;
                Ok(json!({"session": s}))
            }
            "session.list" => Ok(json!({"sessions": self.sessions.list()})),
            "session.delete" => {
                let id = protocol::str_field(a, "session")?;
                let cascade = a.get("cascade").and_then(Value::as_bool).unwrap_or(false);
                let windows: Vec<String> = self
                    .store
                    .list()
                    .map_err(ApiError::from)?
                    .into_iter()
                    .filter(|w| w.session == id)
                    .map(|w| w.name)
                    .collect();
                let known = self.sessions.get(id).is_ok();
                if !known && windows.is_empty() {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("session {id:?} not found"),
                    ));
                }
                if !windows.is_empty() && !cascade {
                    return Err(ApiError::new(
                        ErrorCode::SessionHasWindows,
                        format!(
                            "session {id:?} has {} window(s) ({}); delete them first or pass cascade=true",
                            windows.len(),
                            windows.join(", ")
                        ),
                    ));
                }
                for w in &windows {
                    self.store.delete_window(w, None).map_err(ApiError::from)?;
                }
                if known {
                    self.sessions
                        .transition(id, crate::session::SessionState::Deleted)
                        .map_err(ApiError::from)?;
                }
                Ok(json!({"session": id, "windows_deleted": windows}))
            }
            op => Err(ApiError::new(
                ErrorCode::UnknownOp,
                format!("unknown op {op:?}; see docs/PROTOCOL.md (hello lists the capabilities)"),
            )),
        }
    }

    /// `peer`: the requester's uid. Memory it names must be its own: a shared-memory file it
    /// owns, a process running as it (cwm reads and writes that memory with its own rights,
    /// so an `--allow-uid` peer could otherwise name cwm's own files and processes).
    fn register(&self, a: &Value, peer: Option<u32>) -> Result<Value, ApiError> {
        use std::os::unix::fs::MetadataExt;
        let owned_by_peer = |what: &str, path: &Path| -> Result<(), ApiError> {
            let owner = std::fs::metadata(path)
                .map_err(|e| ApiError::validation(format!("{what}: {e}")))?
                .uid();
            match peer {
                Some(p) if p == owner => Ok(()),
                _ => Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "{what} belongs to uid {owner}, not to the requester (uid {})",
                        peer.map_or_else(|| "unknown".to_string(), |p| p.to_string())
                    ),
                )),
            }
        };
        let name = protocol::str_field(a, "engine")?.to_string();
        let layout_spec: crate::layout::spec::LayoutSpec = serde_json::from_value(
            a.get("layout")
                .cloned()
                .ok_or_else(|| ApiError::validation("missing field layout"))?,
        )
        .map_err(|e| ApiError::validation(format!("layout: {e}")))?;
        let layout = crate::layout::spec::layout_of(&layout_spec).map_err(ApiError::validation)?;
        let mem = a
            .get("memory")
            .ok_or_else(|| ApiError::validation("missing field memory"))?;
        let mem: Arc<dyn KvMemory> = if let Some(paths) = mem.get("shm") {
            let paths: Vec<String> = serde_json::from_value(paths.clone()).map_err(|e| {
                ApiError::validation(format!("memory.shm must be a list of paths: {e}"))
            })?;
            let allowed = std::fs::canonicalize(&self.cfg.shm_dir)
                .unwrap_or_else(|_| self.cfg.shm_dir.clone());
            let mut ps = Vec::new();
            for p in &paths {
                let c = std::fs::canonicalize(p)
                    .map_err(|e| ApiError::validation(format!("{p}: {e}")))?;
                if !c.starts_with(&allowed) {
                    return Err(ApiError::new(
                        ErrorCode::PermissionDenied,
                        format!(
                            "{p} is outside the allowed shared-memory directory {}",
                            allowed.display()
                        ),
                    ));
                }
                owned_by_peer(p, &c)?;
                ps.push(c);
            }
            let refs: Vec<&Path> = ps.iter().map(PathBuf::as_path).collect();
            Arc::new(ShmMemory::open(&refs).map_err(|e| ApiError::new(e.code(), e.to_string()))?)
        } else if let Some(p) = mem.get("process") {
            let pid = p
                .get("pid")
                .and_then(Value::as_i64)
                .ok_or_else(|| ApiError::validation("memory.process.pid must be an integer"))?;
            owned_by_peer(
                &format!("process {pid}"),
                Path::new(&format!("/proc/{pid}")),
            )?;
            let tensors: Vec<(u64, u64)> = serde_json::from_value(
                p.get("tensors").cloned().unwrap_or(Value::Null),
            )
            .map_err(|e| {
                ApiError::validation(format!(
                    "memory.process.tensors must be [[address, bytes], …]: {e}"
                ))
            })?;
            Arc::new(ProcessMemory::new(pid as i32, tensors))
        } else if let Some(cuda) = mem.get("cuda") {
            self.cuda_memory(cuda)?
        } else {
            return Err(ApiError::validation(
                "memory must name shm (paths), process (pid, tensors) or cuda (tensors)",
            ));
        };
        let engine = Engine::new(
            layout,
            mem,
            protocol::opt_str(a, "model")?.unwrap_or_else(|| "default".into()),
            protocol::opt_str(a, "salt")?,
        )
        .map_err(ApiError::from)?;
        let idle = self.staging_pools.lock().ok().and_then(|pools| {
            pools
                .iter()
                .find(|p| Arc::strong_count(p) == 1 && engine.fits_staging(p, &self.cfg.pipeline))
                .cloned()
        });
        if !idle.is_some_and(|p| engine.adopt_staging(p)) {
            engine
                .prepare_staging(&self.cfg.pipeline, self.store.engine().as_ref())
                .map_err(ApiError::from)?;
            if let (Some(p), Ok(mut pools)) = (engine.staging(), self.staging_pools.lock()) {
                pools.push(p.clone());
            }
        }
        if self.tier.enabled() {
            // The RAM tier's arena is sized for the first engine's blocks and mapped into its
            // device (a GPU thaws from it with one copy).
            self.tier.prepare(engine.layout.block_bytes() as usize);
            self.tier.attach(engine.mem.as_ref());
        }
        let out = json!({"engine": name, "block_bytes": engine.layout.block_bytes(),
            "fingerprint": format!("{:016x}", engine.layout.fingerprint())});
        let engine = Arc::new(engine);
        self.engines
            .lock()
            .map_err(|_| ApiError::internal("engine table poisoned"))?
            .insert(name.clone(), engine.clone());
        REGISTERED.with(|r| *r.borrow_mut() = Some((name, engine)));
        Ok(out)
    }

    fn metrics_http(&self, l: std::net::TcpListener) {
        for conn in l.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let (status, body) =
                if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
                    ("200 OK", self.metrics_text())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_string())
                };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    }

    /// Runs `f` unless an identical request (same key) is already running, in which case this
    /// one waits for that outcome and shares it, marked `"coalesced": true` (EC-002).
    fn coalesce(
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

    fn edge_case(&self, id: &'static str, outcome: &'static str) {
        self.metrics.edge_case(id, outcome);
    }

    fn concurrency(&self, op: &str, delta: i64) {
        self.metrics.concurrency(op, delta);
    }

    /// Imports an engine's GPU tensors (CUDA IPC handles) and its optional interprocess event.
    fn cuda_memory(&self, cuda: &Value) -> Result<Arc<dyn KvMemory>, ApiError> {
        use crate::device::cuda::{Cuda, CudaMemory, IpcTensor};
        let tensors: Vec<crate::layout::spec::TensorSpec> = serde_json::from_value(
            cuda.get("tensors").cloned().unwrap_or(Value::Null),
        )
        .map_err(|e| {
            ApiError::validation(format!(
                "memory.cuda.tensors must be [{{handle, offset, size}}, …]: {e}"
            ))
        })?;
        let device = cuda.get("device").and_then(Value::as_i64).unwrap_or(0) as i32;
        let ctx = Cuda::shared(device)
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let ipc = tensors
            .iter()
            .map(|t| {
                Ok(IpcTensor {
                    handle: crate::layout::spec::hex64(&t.handle).map_err(ApiError::validation)?,
                    offset: t.offset,
                    size: t.size,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let m = CudaMemory::open(ctx, &ipc).map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        if let Some(ev) = cuda.get("event").and_then(Value::as_str) {
            let h = crate::layout::spec::hex64(ev).map_err(ApiError::validation)?;
            m.wait_for_event(&h)
                .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
        }
        Ok(Arc::new(m))
    }

    fn metrics_text(&self) -> String {
        self.metrics
            .integrity_problems
            .set(self.integrity.problems() as i64);
        self.metrics.render(self.store.stats().ok().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::peer_gone;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_gone_sees_a_close_and_a_half_close_not_pending_data() {
        let (a, b) = UnixStream::pair().expect("pair");
        assert!(!peer_gone(a.as_raw_fd()));
        std::io::Write::write_all(&mut &b, b"{\"op\":\"hello\"}\n").expect("write");
        assert!(
            !peer_gone(a.as_raw_fd()),
            "a pipelined request is not a hangup"
        );
        b.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert!(peer_gone(a.as_raw_fd()));
        let (c, d) = UnixStream::pair().expect("pair");
        drop(d);
        assert!(peer_gone(c.as_raw_fd()));
    }
}
