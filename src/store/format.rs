//! The on-disk bytes of segment headers and record headers (docs/FORMAT.md describes them; keep
//! the two in step). All integers are little-endian.

use crate::checksum::{record_header_checksum, segment_header_checksum};

/// Version of the record format written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Version of the segment header written by this build: 2 keeps a copy of the header in page 1
/// and starts records at page 2; 3 adds the record limit of a segment written into a reused
/// file. Version 1 and 2 segments are still read.
pub const SEGMENT_VERSION: u16 = 3;
/// Version written for a segment in a new file (no record limit): 2, so that a build that
/// predates format 3 still reads every segment not written into a reused file.
pub const SEGMENT_VERSION_NO_LIMIT: u16 = 2;
/// Size of a segment header page and of a record header page.
pub const PAGE: u64 = 4096;
/// Bytes before the first record of a segment written by this build (the header and its copy).
pub const SEGMENT_HEADER_LEN: u64 = 2 * PAGE;
/// Encoded size of a record header (the rest of its page is zero or inline payload).
pub const RECORD_HEADER_LEN: usize = 64;
/// Payloads up to this size are stored inline, in the header page right after the header.
pub const INLINE_MAX: u64 = PAGE - RECORD_HEADER_LEN as u64;

const SEGMENT_MAGIC: [u8; 8] = *b"CWMSEG\0\x01";
const RECORD_MAGIC: [u8; 4] = *b"CWMR";

/// Why a header did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Every byte is zero: unwritten space (a clean end of log).
    #[error("empty (all-zero) header")]
    Empty,
    /// Not a header of ours.
    #[error("bad magic")]
    Magic,
    /// A format version this build cannot read.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// The header checksum does not match (torn write, bit flip, or bytes from an earlier
    /// generation of the segment).
    #[error("header checksum mismatch")]
    Checksum,
    /// A field holds a value no writer produces.
    #[error("invalid field: {0}")]
    Field(&'static str),
    /// Fewer bytes than a header.
    #[error("truncated header")]
    Truncated,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn u128_at(b: &[u8], o: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    u128::from_le_bytes(a)
}

/// True when `page` starts like a record header of segment `segment_id` (its magic and its
/// segment id field), whether or not its checksum holds: a torn or damaged header of that
/// segment — never bytes a reused file kept from its earlier use, which name another segment
/// (a new segment id is above every id a file of the directory names).
#[must_use]
pub fn names_segment(page: &[u8], segment_id: u64) -> bool {
    page.len() >= RECORD_HEADER_LEN && page[0..4] == RECORD_MAGIC && u64_at(page, 48) == segment_id
}

/// The first page of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Segment number (also in the file name).
    pub segment_id: u64,
    /// Random per creation of the segment; seeds every record header checksum in it.
    pub generation: u64,
    /// Preallocated size of the segment file.
    pub segment_size: u64,
    /// Creation time, milliseconds since the Unix epoch (UTC).
    pub created_unix_ms: i64,
    /// Segment format version: 1 (one header page), 2 (header copy in page 1) or 3 (a record
    /// limit: written into a reused file).
    pub version: u16,
    /// Length of the segment when it was sealed (rotation), written into both header pages
    /// then; 0 while it is open (or sealed by a failure). A sealed segment found shorter, or
    /// whose records end earlier, was truncated: reported, never taken for its whole.
    pub sealed_len: u64,
    /// Record limit (format 3): no record of the segment lies at or past this offset. Set
    /// when the segment was written into a reused file (a compacted segment's), whose bytes
    /// past the records are left over from its earlier use rather than zeros; recovery looks
    /// for records only below it. Raised (both header pages rewritten, each synced) before
    /// room past it is handed out. 0: none (a fresh file, zeros after the records).
    pub record_limit: u64,
}

impl SegmentHeader {
    /// Offset of the first record: after the header page, and its copy from version 2 on.
    #[must_use]
    pub const fn first_record(&self) -> u64 {
        if self.version >= 2 {
            2 * PAGE
        } else {
            PAGE
        }
    }

    /// Encoded length.
    pub const LEN: usize = 64;

    /// Writes the header into `out[..64]`.
    pub fn encode(&self, out: &mut [u8]) {
        out[..Self::LEN].fill(0);
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&self.version.to_le_bytes());
        if self.version >= 3 {
            // In 4 KiB pages (a multiple of PAGE, checked at decode).
            let pages = u32::try_from(self.record_limit / PAGE).unwrap_or(u32::MAX);
            out[12..16].copy_from_slice(&pages.to_le_bytes());
        }
        out[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.generation.to_le_bytes());
        out[32..40].copy_from_slice(&self.segment_size.to_le_bytes());
        out[40..48].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        out[48..56].copy_from_slice(&self.sealed_len.to_le_bytes());
        let sum = segment_header_checksum(&out[0..56]);
        out[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    /// Decodes and verifies a segment header.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < Self::LEN {
            return Err(HeaderError::Truncated);
        }
        let b = &b[..Self::LEN];
        if b.iter().all(|&x| x == 0) {
            return Err(HeaderError::Empty);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        if segment_header_checksum(&b[0..56]) != u64_at(b, 56) {
            return Err(HeaderError::Checksum);
        }
        let v = u16_at(b, 8);
        if !(1..=SEGMENT_VERSION).contains(&v) {
            return Err(HeaderError::Version(v));
        }
        let h = Self {
            version: v,
            segment_id: u64_at(b, 16),
            generation: u64_at(b, 24),
            segment_size: u64_at(b, 32),
            created_unix_ms: i64::from_le_bytes(
                b[40..48].try_into().map_err(|_| HeaderError::Truncated)?,
            ),
            sealed_len: u64_at(b, 48),
            record_limit: if v >= 3 {
                u64::from(u32::from_le_bytes(
                    b[12..16].try_into().map_err(|_| HeaderError::Truncated)?,
                )) * PAGE
            } else {
                0
            },
        };
        if v >= 3 && b[10..12] != [0, 0] {
            return Err(HeaderError::Field("reserved"));
        }
        if h.record_limit != 0
            && (h.record_limit < h.first_record()
                || h.record_limit > h.segment_size
                || (h.sealed_len != 0 && h.sealed_len > h.record_limit))
        {
            return Err(HeaderError::Field("record_limit"));
        }
        if h.segment_size < 2 * PAGE || h.segment_size % PAGE != 0 {
            return Err(HeaderError::Field("segment_size"));
        }
        if h.sealed_len != 0
            && (h.sealed_len < h.first_record()
                || h.sealed_len > h.segment_size
                || h.sealed_len % PAGE != 0)
        {
            return Err(HeaderError::Field("sealed_len"));
        }
        Ok(h)
    }
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// One KV block's bytes (all layers, K and V) under its 128-bit block key.
    Block = 1,
    /// A window's manifest: the commit record of a window.
    Manifest = 2,
    /// Deletion of a window version.
    Tombstone = 3,
    /// A catalog record of the daemon (a session, an idempotent outcome): opaque bytes under a
    /// key; the newest record of a key wins.
    Meta = 4,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Block),
            2 => Some(Self::Manifest),
            3 => Some(Self::Tombstone),
            4 => Some(Self::Meta),
            _ => None,
        }
    }
}

/// A record header (64 bytes at the start of a 4 KiB-aligned record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record kind.
    pub kind: RecordKind,
    /// Log-wide sequence number, strictly increasing in write order.
    pub seq: u64,
    /// Block key, or the window-name key for manifests and tombstones.
    pub key: u128,
    /// Payload length in bytes (not counting padding).
    pub payload_len: u64,
    /// xxh3-64 of the payload bytes.
    pub payload_xxh3: u64,
    /// Segment the record was written into.
    pub segment_id: u64,
    /// Flag bit 0: a copy made by compaction. `seq` is then the sequence number of the
    /// original record (so recovery orders it exactly as before), not its append position.
    pub copied: bool,
    /// Flag bit 1: the second copy of a metadata record (manifest, tombstone, catalog record),
    /// written right after the first with the same sequence number, key and payload.
    pub ditto: bool,
}

/// Flag bit of a record copied by compaction.
pub const FLAG_COPIED: u8 = 1;
/// Flag bit of the second copy of a metadata record.
pub const FLAG_DITTO: u8 = 2;

impl RecordHeader {
    /// Writes the header into `out[..64]`, its checksum seeded with the segment generation.
    pub fn encode(&self, generation: u64, out: &mut [u8]) {
        out[..RECORD_HEADER_LEN].fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] =
            if self.copied { FLAG_COPIED } else { 0 } | if self.ditto { FLAG_DITTO } else { 0 };
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..32].copy_from_slice(&self.key.to_le_bytes());
        out[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        out[40..48].copy_from_slice(&self.payload_xxh3.to_le_bytes());
        out[48..56].copy_from_slice(&self.segment_id.to_le_bytes());
        let sum = record_header_checksum(&out[0..56], generation);
        out[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    /// Decodes and verifies a record header written into a segment of `generation`.
    pub fn decode(b: &[u8], generation: u64) -> Result<Self, HeaderError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(HeaderError::Truncated);
        }
        let b = &b[..RECORD_HEADER_LEN];
        if b.iter().all(|&x| x == 0) {
            return Err(HeaderError::Empty);
        }
        if b[0..4] != RECORD_MAGIC {
            return Err(HeaderError::Magic);
        }
        if record_header_checksum(&b[0..56], generation) != u64_at(b, 56) {
            return Err(HeaderError::Checksum);
        }
        let v = u16_at(b, 4);
        if v != FORMAT_VERSION {
            return Err(HeaderError::Version(v));
        }
        let kind = RecordKind::from_u8(b[6]).ok_or(HeaderError::Field("kind"))?;
        if b[7] & !(FLAG_COPIED | FLAG_DITTO) != 0 {
            return Err(HeaderError::Field("flags"));
        }
        if b[7] & FLAG_DITTO != 0 && kind == RecordKind::Block {
            return Err(HeaderError::Field("flags"));
        }
        let payload_len = u64_at(b, 32);
        if payload_len == 0 || payload_len > (1 << 40) {
            return Err(HeaderError::Field("payload_len"));
        }
        Ok(Self {
            kind,
            seq: u64_at(b, 8),
            key: u128_at(b, 16),
            payload_len,
            payload_xxh3: u64_at(b, 40),
            segment_id: u64_at(b, 48),
            copied: b[7] & FLAG_COPIED != 0,
            ditto: b[7] & FLAG_DITTO != 0,
        })
    }
}

/// How many copies of a record of this kind are written: two of every metadata record
/// (manifests, tombstones, catalog records: small and decisive), one of a block (its loss is
/// caught by its checksum and costs a partial thaw).
#[must_use]
pub const fn copies(kind: RecordKind) -> u64 {
    match kind {
        RecordKind::Block => 1,
        _ => 2,
    }
}

/// Bytes a record of this kind takes in the log, all its copies included.
#[must_use]
pub const fn stored_len(kind: RecordKind, payload_len: u64) -> u64 {
    copies(kind) * record_len(payload_len)
}

/// Total on-disk length of a record with a payload of `payload_len` bytes.
#[must_use]
pub const fn record_len(payload_len: u64) -> u64 {
    if payload_len <= INLINE_MAX {
        PAGE
    } else {
        PAGE + crate::io::align_up(payload_len)
    }
}

/// Where the payload starts inside a record image.
#[must_use]
pub const fn payload_offset(payload_len: u64) -> usize {
    if payload_len <= INLINE_MAX {
        RECORD_HEADER_LEN
    } else {
        PAGE as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_generation_seed() {
        let h = RecordHeader {
            kind: RecordKind::Block,
            seq: 42,
            key: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            payload_len: 2 << 20,
            payload_xxh3: 7,
            segment_id: 3,
            copied: false,
            ditto: false,
        };
        let mut page = vec![0u8; 4096];
        h.encode(99, &mut page);
        assert_eq!(RecordHeader::decode(&page, 99), Ok(h));
        assert_eq!(RecordHeader::decode(&page, 98), Err(HeaderError::Checksum));
        for bit in 0..(RECORD_HEADER_LEN * 8) {
            let mut p = page.clone();
            p[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&p, 99).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn segment_header_round_trip() {
        let h = SegmentHeader {
            segment_id: 1,
            generation: 5,
            segment_size: 1 << 30,
            created_unix_ms: 1_700_000_000_000,
            version: SEGMENT_VERSION,
            sealed_len: 0,
            record_limit: 0,
        };
        let mut page = vec![0u8; 4096];
        h.encode(&mut page);
        assert_eq!(SegmentHeader::decode(&page), Ok(h));
        page[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&page), Err(HeaderError::Checksum));
        assert_eq!(SegmentHeader::decode(&[0u8; 64]), Err(HeaderError::Empty));
    }

    #[test]
    fn lengths() {
        assert_eq!(record_len(1), 4096);
        assert_eq!(record_len(INLINE_MAX), 4096);
        assert_eq!(record_len(INLINE_MAX + 1), 8192);
        assert_eq!(record_len(2 << 20), 4096 + (2 << 20));
        assert_eq!(payload_offset(10), 64);
        assert_eq!(payload_offset(5000), 4096);
    }
}
