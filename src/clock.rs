//! The wall clock cwm stores in manifests and segment headers: milliseconds since the Unix
//! epoch (UTC), plus the clock skew a `failpoints` build may inject
//! ([`crate::failpoint::clock_skew_ms`], EC-042). Nothing orders by it: sequence numbers do.

/// Milliseconds since the Unix epoch (UTC), as stored in manifests and segment headers; 0
/// when the system clock is before the epoch. Includes the injected skew of `failpoints`
/// builds.
#[must_use]
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        + crate::failpoint::clock_skew_ms()
}
