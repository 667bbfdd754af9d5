//! The checksums of the on-disk format, defined once: the block payload checksum (computed by
//! the gather path, stored in every block record header and in the manifest, checked on every
//! read) and the two header checksums. `device`, `pipeline` and `store` all call these; none
//! computes a checksum of its own. docs/FORMAT.md gives the byte ranges.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Checksum of a block's payload (the KV bytes): xxh3-64, seed 0.
#[must_use]
pub fn payload_checksum(payload: &[u8]) -> u64 {
    xxh3_64(payload)
}

/// Checksum of a segment header: xxh3-64 of its bytes `[0, 56)` (stored at `[56, 64)`).
#[must_use]
pub fn segment_header_checksum(header56: &[u8]) -> u64 {
    xxh3_64(header56)
}

/// Checksum of a record header: xxh3-64 of its bytes `[0, 56)` seeded with the generation of
/// the segment it was written into (stored at `[56, 64)`), so a record copied into another
/// generation's segment fails it.
#[must_use]
pub fn record_header_checksum(header56: &[u8], generation: u64) -> u64 {
    xxh3_64_with_seed(header56, generation)
}
