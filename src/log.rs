//! Minimal logging to stderr (one line per event, UTC timestamp). The daemon will replace this
//! with structured `tracing` output.

/// Logs a warning line.
pub fn warn(msg: &str) {
    line("WARN", msg);
}

/// Logs an informational line.
pub fn info(msg: &str) {
    line("INFO", msg);
}

fn line(level: &str, msg: &str) {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    eprintln!("{}.{:03}Z {level} cwm: {msg}", ms / 1000, ms % 1000);
}
