//! One client connection: reads request lines (bounded by `max_line`), hands each to the
//! handler, writes the response lines; engines registered with scope "connection" go away
//! with it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::protocol::{self, ApiError};
use super::Server;
use crate::error::ErrorCode;
use crate::pipeline::Engine;

impl Server {
    /// Serves one accepted connection of a client of `uid` (as the listener read it once,
    /// at accept) until the client closes it.
    pub(super) fn connection(&self, conn: UnixStream, uid: Option<u32>) {
        let owned: Mutex<Vec<(String, Arc<Engine>)>> = Mutex::new(Vec::new());
        self.serve_connection(conn, &owned, uid);
        // Engines registered with scope "connection" go away with it (their IPC mappings are
        // closed when the last reference drops), unless re-registered since.
        let owned = owned.into_inner().unwrap_or_default();
        if let Ok(mut engines) = self.engines.lock() {
            for (name, eng) in owned {
                if engines
                    .get(&name)
                    .is_some_and(|e| Arc::ptr_eq(&e.engine, &eng))
                {
                    engines.remove(&name);
                    crate::log::info(&format!(
                        "engine {name:?} unregistered: its connection closed"
                    ));
                }
            }
        }
    }

    fn serve_connection(
        &self,
        conn: UnixStream,
        owned: &Mutex<Vec<(String, Arc<Engine>)>>,
        uid: Option<u32>,
    ) {
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
                    let registered = Mutex::new(None);
                    self.handle(req, &out, &registered, uid);
                    // Owned: exactly the engine this request registered (not one another
                    // connection registered under the name meanwhile, nor any for a replay).
                    if let Some(reg) = registered.into_inner().ok().flatten() {
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

    pub(super) fn send(&self, out: &Mutex<UnixStream>, line: &str) {
        if let Ok(mut o) = out.lock() {
            let _ = o.write_all(line.as_bytes());
            let _ = o.write_all(b"\n");
        }
    }
}

/// True when the peer of connection `fd` has closed it (or shut down its writing side): a
/// zero-timeout poll, cheap enough to ask between batches. The fd stays open (owned by the
/// connection's thread, which is the caller's) for as long as this can be called.
pub(super) fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The uid of the peer of connection `fd`, if the kernel says.
pub(super) fn peer_uid_of_fd(fd: std::os::fd::RawFd) -> Option<u32> {
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
