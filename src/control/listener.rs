//! The accept loop: binds the socket, admits the allowed uids, one thread per connection;
//! [`Server::stop`] and [`Server::drain`]; the HTTP listener for Prometheus scrapes.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::conn::peer_uid_of_fd;
use super::protocol::{self, ApiError};
use super::Server;
use crate::error::ErrorCode;

impl Server {
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
        let me2 = self.clone();
        super::notify::ready(move || !me2.stopping.load(Ordering::SeqCst));
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
                refuse(
                    conn,
                    ApiError::new(ErrorCode::PermissionDenied, "this uid may not use cwm"),
                );
                continue;
            }
            // One thread a connection, and at most `max_connections` of them: past it the
            // client is told BUSY and closed (a client opening connections without end would
            // otherwise exhaust threads and memory).
            if self.metrics.connections.get() >= self.cfg.max_connections.max(1) as i64 {
                self.metrics.connections_refused.inc();
                crate::log::warn(&format!(
                    "refused a connection: {} are open (max_connections)",
                    self.cfg.max_connections
                ));
                refuse(
                    conn,
                    ApiError::new(
                        ErrorCode::Busy,
                        format!(
                            "{} connections are open (max_connections); retry shortly",
                            self.cfg.max_connections
                        ),
                    ),
                );
                continue;
            }
            self.metrics.connections.inc();
            let me2 = self.clone();
            let spawned = std::thread::Builder::new()
                .name("cwm-conn".into())
                .spawn(move || {
                    let _open = Open(me2.metrics.connections.clone());
                    me2.connection(conn, uid);
                });
            if let Err(e) = spawned {
                self.metrics.connections.dec();
                crate::log::warn(&format!("no thread for a connection: {e}"));
            }
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
        if !self.stopping.swap(true, Ordering::SeqCst) {
            super::notify::send("STOPPING=1");
        }
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

    /// Serves `GET /metrics`, each scrape on its own thread (at most 16 at once; more are
    /// answered 503 at once), so a client that stalls cannot hold up the next scrape.
    fn metrics_http(self: &Arc<Self>, l: std::net::TcpListener) {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for conn in l.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(5)));
            if running.fetch_add(1, Ordering::SeqCst) >= 16 {
                running.fetch_sub(1, Ordering::SeqCst);
                let _ = conn.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let (me, running) = (self.clone(), running.clone());
            std::thread::spawn(move || {
                me.scrape(conn);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Answers one HTTP request: the metrics as OpenMetrics text when the client accepts it
    /// (Prometheus does), else as Prometheus text 0.0.4 (the same samples without `# EOF`).
    fn scrape(&self, mut conn: std::net::TcpStream) {
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let open_metrics = head
            .lines()
            .any(|l| l.starts_with("accept:") && l.contains("application/openmetrics-text"));
        let (status, ctype, body) =
            if head.starts_with("get /metrics ") || head.starts_with("get /metrics?") {
                let text = self.metrics_text();
                if open_metrics {
                    let t = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    ("200 OK", t, text)
                } else {
                    let body = text.strip_suffix("# EOF\n").unwrap_or(&text).to_string();
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
                }
            } else {
                let t = "text/plain; charset=utf-8";
                ("404 Not Found", t, "try GET /metrics\n".to_string())
            };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// A non-blocking eventfd, or `None` (logged) if the system would not make one.
pub(super) fn eventfd() -> Option<std::fs::File> {
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

/// Counts a connection open until dropped (also when its thread unwinds).
struct Open(prometheus_client::metrics::gauge::Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Answers a connection not served with one error line (never waiting on the client long),
/// then closes it.
fn refuse(mut conn: UnixStream, e: ApiError) {
    let _ = conn.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = writeln!(conn, "{}", protocol::error_line(&Value::Null, &e));
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    peer_uid_of_fd(s.as_raw_fd())
}
