//! Logging: `tracing` events, written by [`init`] as text lines or JSON objects to stderr.
//! Library code logs through [`warn`] and [`info`] (plain messages) or `tracing` macros with
//! fields (the daemon's freeze/thaw events).

use std::sync::Once;

/// Installs the stderr subscriber once: `json` for one JSON object per event; the level comes
/// from `CWM_LOG` (error, warn, info, debug, trace; default info).
pub fn init(json: bool) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let level = match std::env::var("CWM_LOG")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            _ => tracing::Level::INFO,
        };
        let b = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(level)
            .with_target(false)
            .with_ansi(false);
        let _ = if json {
            b.json().try_init()
        } else {
            b.try_init()
        };
    });
}

/// Logs a warning.
pub fn warn(msg: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{msg}");
    } else {
        line("WARN", msg);
    }
}

/// Logs an informational event.
pub fn info(msg: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::info!("{msg}");
    } else {
        line("INFO", msg);
    }
}

/// Without a subscriber (library use, tests): one plain line on stderr.
fn line(level: &str, msg: &str) {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    eprintln!("{}.{:03}Z {level} cwm: {msg}", ms / 1000, ms % 1000);
}
