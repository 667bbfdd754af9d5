//! What the kernel says about memory.

/// Bytes of memory the kernel says are available (`MemAvailable` in /proc/meminfo);
/// `u64::MAX` when it cannot be read (nothing is refused for want of a figure).
#[must_use]
pub fn available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}
