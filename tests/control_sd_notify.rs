//! `Type=notify` under systemd: with NOTIFY_SOCKET set, `cwm serve` sends READY=1 once it
//! listens, WATCHDOG=1 while it runs (WATCHDOG_USEC), and STOPPING=1 on SIGTERM, then exits
//! cleanly. A real datagram socket stands in for the service manager.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[test]
fn serve_tells_the_service_manager_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let socket = tmp.path().join("cwm.sock");
    let mut child = daemon_command()
        .args([
            "serve",
            "--segment-size",
            "4MiB",
            "--staging",
            "8MiB",
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    // Ready means serving: the socket answers.
    let mut c = cwm::control::client::Client::connect(&socket).unwrap();
    let v = c.call_final(serde_json::json!({"op": "hello"})).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(next(), "WATCHDOG=1");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut seen = next();
    while seen == "WATCHDOG=1" {
        seen = next();
    }
    assert_eq!(seen, "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
