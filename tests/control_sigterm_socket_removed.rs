//! Stopping does not depend on the socket path: SIGTERM stops a daemon whose socket file was
//! removed (it used to wake its accept loop by connecting to that path, and hung), and a
//! daemon stopping never removes a socket file that is not its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::json;

/// Waits up to 20 s for the daemon to exit after SIGTERM; its exit status.
fn sigterm_and_wait(d: &mut Daemon) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "cwm serve did not exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_stops_a_daemon_whose_socket_file_was_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let sock = tmp.path().join("cwm.sock");
    let mut d = start(&tmp.path().join("data"), &sock, &shm, &[]);
    // A client connected before the removal keeps being served until the stop.
    let mut c = Client::connect(&sock).unwrap();
    std::fs::remove_file(&sock).unwrap();
    let h = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(h["ok"], true, "{h}");
    let st = sigterm_and_wait(&mut d);
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_stopping_daemon_leaves_another_daemons_socket_at_its_path_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let sock = tmp.path().join("cwm.sock");
    let mut a = start(&tmp.path().join("a"), &sock, &shm, &[]);
    std::fs::remove_file(&sock).unwrap();
    // Another daemon (another data directory) now listens at the same path.
    let b = start(&tmp.path().join("b"), &sock, &shm, &[]);
    let st = sigterm_and_wait(&mut a);
    assert!(st.success(), "{st:?}");
    assert!(
        sock.exists(),
        "the stopping daemon removed the other's socket"
    );
    let mut c = Client::connect(&b.socket).unwrap();
    let h = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(h["ok"], true, "{h}");
}
