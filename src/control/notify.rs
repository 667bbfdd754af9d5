//! systemd's readiness protocol (`sd_notify`, for `Type=notify` units): when `NOTIFY_SOCKET` is
//! set, the daemon sends `READY=1` once its socket listens, `STOPPING=1` when it starts to
//! stop, and `WATCHDOG=1` every half of `WATCHDOG_USEC` while it runs. Without the variable
//! nothing is sent. deploy/systemd/cwm.service uses it.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one state line to the service manager; false when there is none or it failed.
pub(super) fn send(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = &sent {
        crate::log::warn(&format!("sd_notify {state:?}: {e}"));
    }
    sent.is_ok()
}

/// `READY=1`, and the watchdog pings (while `alive()`) when the manager asked for them.
pub(super) fn ready(alive: impl Fn() -> bool + Send + 'static) {
    if !send("READY=1") {
        return;
    }
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0);
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    if let (Some(usec), true) = (usec, for_us) {
        let every = Duration::from_micros(usec / 2);
        std::thread::spawn(move || {
            while alive() {
                send("WATCHDOG=1");
                std::thread::sleep(every);
            }
        });
    }
}
