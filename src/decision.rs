//! Thaw or recompute: a restore is only worth it when it beats recomputing the prefill.

use serde::Serialize;

/// Fixed cost of a thaw besides moving bytes: the control round trip, opening the window,
/// the first read's latency (seconds).
pub const THAW_OVERHEAD_SECS: f64 = 0.002;

/// What `lookup` tells the engine about restoring a stored prefix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Estimated seconds to restore the prefix.
    pub thaw_secs: f64,
    /// Estimated seconds to recompute it (`None` when the engine gave no prefill rate).
    pub recompute_secs: Option<f64>,
    /// True when restoring is expected to be faster (or the engine's rate is unknown).
    pub thaw_wins: bool,
}

/// Estimates restoring `bytes` at `read_gbps` (GB/s, cwm's measured thaw throughput) against
/// recomputing `tokens` at `prefill_tokens_per_s` (the engine's prefill rate, if it knows it).
/// With no prefill rate the thaw is preferred: recomputing is never cheaper than reading for
/// the contexts worth storing, and the engine can always ask again with its rate.
#[must_use]
pub fn estimate(
    bytes: u64,
    read_gbps: f64,
    tokens: u64,
    prefill_tokens_per_s: Option<f64>,
) -> Estimate {
    let thaw_secs = THAW_OVERHEAD_SECS + bytes as f64 / (read_gbps.max(1e-3) * 1e9);
    let recompute_secs = prefill_tokens_per_s
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| tokens as f64 / r);
    Estimate {
        thaw_secs,
        recompute_secs,
        thaw_wins: tokens > 0 && recompute_secs.is_none_or(|r| thaw_secs < r),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Llama-3.1-8B: 128 KiB of KV per token (32 layers × 8 heads × 128 × 2 × bf16).
    const KV_PER_TOKEN: u64 = 131_072;

    #[test]
    fn long_context_from_disk_beats_prefill() {
        // 32K tokens = 4 GiB at 2 GB/s ≈ 2.15 s vs a 10,000 tok/s prefill = 3.3 s.
        let e = estimate(32_768 * KV_PER_TOKEN, 2.0, 32_768, Some(10_000.0));
        assert!((e.thaw_secs - (0.002 + 4.294_967_296 / 2.0)).abs() < 1e-9);
        assert!((e.recompute_secs.unwrap() - 3.2768).abs() < 1e-9);
        assert!(e.thaw_wins);
    }

    #[test]
    fn slow_disk_loses_to_a_fast_prefill() {
        // 2K tokens = 256 MiB at 0.1 GB/s ≈ 2.7 s vs 2,048 tokens at 20,000 tok/s ≈ 0.1 s.
        let e = estimate(2_048 * KV_PER_TOKEN, 0.1, 2_048, Some(20_000.0));
        assert!(!e.thaw_wins);
    }

    #[test]
    fn tiny_prefix_loses_to_the_overhead() {
        // 16 tokens recompute in 0.8 ms at 20,000 tok/s; the thaw's fixed 2 ms loses.
        let e = estimate(16 * KV_PER_TOKEN, 50.0, 16, Some(20_000.0));
        assert!(!e.thaw_wins);
    }

    #[test]
    fn unknown_prefill_rate_prefers_thaw() {
        let e = estimate(1 << 20, 1.0, 64, None);
        assert!(e.thaw_wins && e.recompute_secs.is_none());
        let e = estimate(1 << 20, 1.0, 64, Some(f64::NAN));
        assert!(e.thaw_wins && e.recompute_secs.is_none());
    }

    #[test]
    fn nothing_matched_never_thaws() {
        assert!(!estimate(0, 1.0, 0, None).thaw_wins);
    }
}
