//! The bytes cwm stores in Redis, and their checks. Redis does not checksum values and anyone
//! with access to the prefix can write under it, so every value read back is decoded here
//! first: a value that is short, long, of another key, or whose payload fails its checksum is a
//! typed [`ValueError`], never bytes handed on.
//!
//! A block is one value of at most `max_value` bytes, or several: the first holds a header and
//! the first `chunk` payload bytes, each further part the next `chunk` (the last the rest).
//! Header (56 bytes, little-endian): magic `CWMRB1\0\0`, key (u128), payload length (u64),
//! payload xxh3-64, parts (u32), chunk (u32), xxh3-64 of the 48 bytes before it.
//!
//! A manifest is one immutable value: magic `CWMRM1\0\0`, length (u64), xxh3-64 of the
//! manifest bytes (u64), then the store's own manifest encoding (docs/FORMAT.md).

use crate::checksum::payload_checksum;
use xxhash_rust::xxh3::xxh3_64;

/// Bytes of a block value's header.
pub const BLOCK_HEADER: usize = 56;
/// Bytes of a manifest value's header.
pub const MANIFEST_HEADER: usize = 24;
const BLOCK_MAGIC: [u8; 8] = *b"CWMRB1\0\0";
const MANIFEST_MAGIC: [u8; 8] = *b"CWMRM1\0\0";

/// Why a value read from Redis was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Shorter than its header, or than the header says.
    #[error("value truncated: {got} bytes, expected {want}")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
    /// Longer than the header says.
    #[error("value has {0} trailing bytes")]
    Trailing(usize),
    /// Not a cwm value (or another version of one).
    #[error("bad magic")]
    Magic,
    /// The header's own checksum fails.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// The header describes an impossible split.
    #[error("inconsistent header: {0}")]
    Inconsistent(&'static str),
    /// The value is another key's.
    #[error("value holds key {found:032x}, expected {expected:032x}")]
    WrongKey {
        /// Key asked for.
        expected: u128,
        /// Key in the header.
        found: u128,
    },
    /// The payload differs from what the header or the manifest says.
    #[error("payload mismatch: {0}")]
    Payload(String),
}

/// A decoded block header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// The block key.
    pub key: u128,
    /// Payload bytes.
    pub len: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
    /// Values the block is split into (at least 1).
    pub parts: u32,
    /// Payload bytes per part (the last holds the rest).
    pub chunk: u32,
}

impl BlockHeader {
    /// Payload bytes part `i` holds.
    #[must_use]
    pub fn part_len(&self, i: u32) -> usize {
        let start = u64::from(i) * u64::from(self.chunk);
        self.len.saturating_sub(start).min(u64::from(self.chunk)) as usize
    }
}

/// Splits `payload` of block `key` into values of at most `max_value` bytes: the first with
/// the header. `max_value` is raised to hold the header and one payload byte.
#[must_use]
pub fn encode_block(key: u128, payload: &[u8], max_value: usize) -> Vec<Vec<u8>> {
    let b = EncodedBlock::new(key, payload, None, max_value);
    (0..b.parts())
        .map(|i| {
            let (head, body) = b.value(i);
            [head, body].concat()
        })
        .collect()
}

/// A block's values as they are written, borrowing the payload (no copy is made before the
/// bytes go into the request buffer): value `i` is `(head, body)` — the header before the
/// first part's bytes, nothing before the others.
pub struct EncodedBlock<'a> {
    header: [u8; BLOCK_HEADER],
    payload: &'a [u8],
    chunk: usize,
    parts: usize,
}

impl<'a> EncodedBlock<'a> {
    /// Block `key` with `payload` (`checksum`: its xxh3-64 when known — the local log's
    /// records carry it — else computed here), in values of at most `max_value` bytes.
    #[must_use]
    pub fn new(key: u128, payload: &'a [u8], checksum: Option<u64>, max_value: usize) -> Self {
        let chunk = max_value
            .saturating_sub(BLOCK_HEADER)
            .clamp(1, u32::MAX as usize);
        let parts = payload.len().div_ceil(chunk).max(1);
        let mut header = [0u8; BLOCK_HEADER];
        header[..8].copy_from_slice(&BLOCK_MAGIC);
        header[8..24].copy_from_slice(&key.to_le_bytes());
        header[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let sum = checksum.unwrap_or_else(|| payload_checksum(payload));
        header[32..40].copy_from_slice(&sum.to_le_bytes());
        header[40..44].copy_from_slice(&(parts as u32).to_le_bytes());
        header[44..48].copy_from_slice(&(chunk as u32).to_le_bytes());
        let hc = xxh3_64(&header[..48]);
        header[48..].copy_from_slice(&hc.to_le_bytes());
        Self {
            header,
            payload,
            chunk,
            parts,
        }
    }

    /// Values the block is split into.
    #[must_use]
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Value `i`: `(head, body)`.
    #[must_use]
    pub fn value(&self, i: usize) -> (&[u8], &'a [u8]) {
        let start = (i * self.chunk).min(self.payload.len());
        let end = (start + self.chunk).min(self.payload.len());
        let head: &[u8] = if i == 0 { &self.header } else { &[] };
        (head, &self.payload[start..end])
    }

    /// Value `i` as one Redis argument, written straight into the request buffer.
    #[must_use]
    pub fn arg(&self, i: usize) -> ValueArg<'_> {
        let (head, body) = self.value(i);
        ValueArg { head, body }
    }
}

/// One value as a Redis argument made of two slices.
pub struct ValueArg<'a> {
    head: &'a [u8],
    body: &'a [u8],
}

impl redis::ToRedisArgs for ValueArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // Writing into the command's in-memory buffer cannot fail.
        let _ = w.write_all(self.head);
        let _ = w.write_all(self.body);
    }
}

impl ValueArg<'_> {
    /// Its length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether it is empty (never, for a block's value).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Decodes the header of a block's first value, checking it is block `key`'s.
pub fn decode_block_header(first: &[u8], key: u128) -> Result<BlockHeader, ValueError> {
    if first.len() < BLOCK_HEADER {
        return Err(ValueError::Truncated {
            got: first.len(),
            want: BLOCK_HEADER,
        });
    }
    if first[..8] != BLOCK_MAGIC {
        return Err(ValueError::Magic);
    }
    if xxh3_64(&first[..48]) != u64_at(first, 48) {
        return Err(ValueError::HeaderChecksum);
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&first[8..24]);
    let h = BlockHeader {
        key: u128::from_le_bytes(k),
        len: u64_at(first, 24),
        checksum: u64_at(first, 32),
        parts: u32_at(first, 40),
        chunk: u32_at(first, 44),
    };
    if h.key != key {
        return Err(ValueError::WrongKey {
            expected: key,
            found: h.key,
        });
    }
    if h.chunk == 0 {
        return Err(ValueError::Inconsistent("zero chunk"));
    }
    if u64::from(h.parts) != h.len.div_ceil(u64::from(h.chunk)).max(1) {
        return Err(ValueError::Inconsistent(
            "part count does not match length and chunk",
        ));
    }
    Ok(h)
}

/// Checks part `i` of a block against its header and copies its payload bytes into their
/// place in `payload` (the whole payload, `h.len` bytes; `value`: the whole stored value —
/// for part 0 that includes the header).
pub fn put_part(
    h: &BlockHeader,
    i: u32,
    value: &[u8],
    payload: &mut [u8],
) -> Result<(), ValueError> {
    let skip = if i == 0 { BLOCK_HEADER } else { 0 };
    let want = skip + h.part_len(i);
    match value.len() {
        n if n < want => Err(ValueError::Truncated { got: n, want }),
        n if n > want => Err(ValueError::Trailing(n - want)),
        _ => {
            let (at, total) = ((u64::from(i) * u64::from(h.chunk)) as usize, payload.len());
            let dst = payload.get_mut(at..at + (want - skip)).ok_or_else(|| {
                ValueError::Payload(format!(
                    "part {i} ends past the {total} bytes of the payload"
                ))
            })?;
            dst.copy_from_slice(&value[skip..]);
            Ok(())
        }
    }
}

/// Checks an assembled payload against its header and, when given, the manifest's expected
/// (length, checksum).
pub fn check_payload(
    h: &BlockHeader,
    payload: &[u8],
    expected: Option<(u64, u64)>,
) -> Result<(), ValueError> {
    if payload.len() as u64 != h.len {
        return Err(ValueError::Payload(format!(
            "{} bytes, header says {}",
            payload.len(),
            h.len
        )));
    }
    if let Some((len, sum)) = expected {
        if (len, sum) != (h.len, h.checksum) {
            return Err(ValueError::Payload(format!(
                "header says {} bytes / {:016x}, the manifest {len} / {sum:016x}",
                h.len, h.checksum
            )));
        }
    }
    let got = payload_checksum(payload);
    if got != h.checksum {
        return Err(ValueError::Payload(format!(
            "checksum {got:016x}, expected {:016x}",
            h.checksum
        )));
    }
    Ok(())
}

/// A manifest as stored: header + the store's manifest bytes.
#[must_use]
pub fn encode_manifest(manifest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MANIFEST_HEADER + manifest.len());
    v.extend_from_slice(&MANIFEST_MAGIC);
    v.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    v.extend_from_slice(&xxh3_64(manifest).to_le_bytes());
    v.extend_from_slice(manifest);
    v
}

/// The manifest bytes of a stored manifest value, checked against its header and the head's
/// (length, checksum).
pub fn decode_manifest(v: &[u8], len: u64, checksum: u64) -> Result<&[u8], ValueError> {
    if v.len() < MANIFEST_HEADER {
        return Err(ValueError::Truncated {
            got: v.len(),
            want: MANIFEST_HEADER,
        });
    }
    if v[..8] != MANIFEST_MAGIC {
        return Err(ValueError::Magic);
    }
    let (l, c) = (u64_at(v, 8), u64_at(v, 16));
    if (l, c) != (len, checksum) {
        return Err(ValueError::Payload(format!(
            "manifest value says {l} bytes / {c:016x}, the head {len} / {checksum:016x}"
        )));
    }
    let body = &v[MANIFEST_HEADER..];
    if body.len() as u64 != len {
        return Err(ValueError::Payload(format!(
            "manifest of {} bytes, expected {len}",
            body.len()
        )));
    }
    if xxh3_64(body) != checksum {
        return Err(ValueError::Payload("manifest checksum mismatch".into()));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(len: usize, max: usize) {
        let p: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let vals = encode_block(42, &p, max);
        assert!(vals.iter().all(|v| v.len() <= max.max(BLOCK_HEADER + 1)));
        let h = decode_block_header(&vals[0], 42).expect("header");
        assert_eq!(h.parts as usize, vals.len());
        let mut out = vec![0; h.len as usize];
        for (i, v) in vals.iter().enumerate() {
            put_part(&h, i as u32, v, &mut out).expect("part");
        }
        check_payload(&h, &out, Some((len as u64, xxh3_64(&p)))).expect("payload");
        assert_eq!(out, p);
    }

    #[test]
    fn blocks_round_trip_whole_and_split() {
        round_trip(0, 4096);
        round_trip(1, 4096);
        round_trip(4096 - BLOCK_HEADER, 4096);
        round_trip(4096 - BLOCK_HEADER + 1, 4096);
        round_trip(100_000, 4096);
        round_trip(5, 1);
    }

    #[test]
    fn foreign_and_damaged_values_are_refused() {
        let p = vec![9u8; 1000];
        let vals = encode_block(7, &p, 300);
        assert!(matches!(
            decode_block_header(&vals[0], 8),
            Err(ValueError::WrongKey { .. })
        ));
        assert!(matches!(
            decode_block_header(&vals[0][..20], 7),
            Err(ValueError::Truncated { .. })
        ));
        let mut bad = vals[0].clone();
        bad[30] ^= 1;
        assert_eq!(
            decode_block_header(&bad, 7),
            Err(ValueError::HeaderChecksum)
        );
        let mut bad = vals[0].clone();
        bad[0] = b'X';
        assert_eq!(decode_block_header(&bad, 7), Err(ValueError::Magic));
        let h = decode_block_header(&vals[0], 7).expect("header");
        let mut out = vec![0; h.len as usize];
        assert!(matches!(
            put_part(&h, 1, &vals[1][1..], &mut out),
            Err(ValueError::Truncated { .. })
        ));
        let mut long = vals[1].clone();
        long.push(0);
        assert_eq!(
            put_part(&h, 1, &long, &mut out),
            Err(ValueError::Trailing(1))
        );
        let mut out = vec![0; h.len as usize];
        for (i, v) in vals.iter().enumerate() {
            put_part(&h, i as u32, v, &mut out).expect("part");
        }
        // A part written to a payload too short for it is refused, not a panic.
        assert!(matches!(
            put_part(&h, 1, &vals[1], &mut out[..10]),
            Err(ValueError::Payload(_))
        ));
        out[500] ^= 0x10;
        assert!(matches!(
            check_payload(&h, &out, None),
            Err(ValueError::Payload(_))
        ));
        out[500] ^= 0x10;
        assert!(matches!(
            check_payload(&h, &out, Some((1000, 1))),
            Err(ValueError::Payload(_))
        ));
        let m = encode_manifest(b"manifest bytes");
        let sum = xxh3_64(b"manifest bytes");
        assert_eq!(
            decode_manifest(&m, 14, sum).expect("manifest"),
            b"manifest bytes"
        );
        assert!(decode_manifest(&m, 14, sum ^ 1).is_err());
        assert!(decode_manifest(&m[..30], 14, sum).is_err());
        let mut bad = m.clone();
        bad[30] ^= 1;
        assert!(decode_manifest(&bad, 14, sum).is_err());
    }
}
