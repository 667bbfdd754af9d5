//! Manifest and tombstone payloads: the commit record of a window and of its deletion.
//! Decoders check every length against the bytes that remain, so arbitrary input gives a typed
//! error, never a panic or an unbounded allocation.

use serde::Serialize;

const MANIFEST_MAGIC: [u8; 4] = *b"CWMM";
const TOMBSTONE_MAGIC: [u8; 4] = *b"CWMT";
const PAYLOAD_VERSION: u16 = 1;

/// One block of a window, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockRef {
    /// 128-bit block key.
    pub key: u128,
    /// Payload length in bytes.
    pub len: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

/// A window: everything needed to thaw it and to rebuild the catalog from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Window name (validated, NFKC-normalised).
    pub name: String,
    /// Version of the window under this name, from 1.
    pub version: u64,
    /// Creation time, milliseconds since the Unix epoch, UTC.
    pub created_unix_ms: i64,
    /// Session the window was frozen from.
    pub session: String,
    /// Model / namespace the block keys were computed in.
    pub namespace: String,
    /// Layout descriptor, opaque to the store (JSON from the data path).
    pub layout: Vec<u8>,
    /// Token ids the window's KV was computed from.
    pub tokens: Vec<u32>,
    /// Ordered blocks.
    pub blocks: Vec<BlockRef>,
}

/// Deletion of one version of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Window name.
    pub name: String,
    /// Version deleted.
    pub version: u64,
    /// Sequence number of the manifest record deleted.
    pub manifest_seq: u64,
}

/// Why a manifest or tombstone payload did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Ran out of bytes.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// Wrong magic.
    #[error("bad magic")]
    Magic,
    /// Unknown payload version.
    #[error("unsupported payload version {0}")]
    Version(u16),
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A reserved field is not zero (found by the decoder property tests).
    #[error("reserved field is {0}, not zero")]
    Reserved(u16),
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Truncated(self.at))?;
        if end > self.b.len() {
            return Err(DecodeError::Truncated(self.at));
        }
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }
    fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes32()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8(what))
    }
    /// A count of items of `item` bytes each, checked against what remains.
    fn count(&mut self, item: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item) > self.b.len() - self.at {
            return Err(DecodeError::Truncated(self.at));
        }
        Ok(n)
    }
    fn header(&mut self, magic: [u8; 4]) -> Result<(), DecodeError> {
        if self.take(4)? != magic {
            return Err(DecodeError::Magic);
        }
        let v = self.u16()?;
        if v != PAYLOAD_VERSION {
            return Err(DecodeError::Version(v));
        }
        match self.u16()? {
            0 => Ok(()),
            r => Err(DecodeError::Reserved(r)),
        }
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

impl Manifest {
    /// Encodes the manifest payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            64 + self.layout.len() + self.tokens.len() * 4 + self.blocks.len() * 32,
        ));
        w.0.extend_from_slice(&MANIFEST_MAGIC);
        w.u16(PAYLOAD_VERSION);
        w.u16(0);
        w.u64(self.version);
        w.u64(self.created_unix_ms as u64);
        w.bytes32(self.name.as_bytes());
        w.bytes32(self.session.as_bytes());
        w.bytes32(self.namespace.as_bytes());
        w.bytes32(&self.layout);
        w.u32(self.tokens.len() as u32);
        for t in &self.tokens {
            w.u32(*t);
        }
        w.u32(self.blocks.len() as u32);
        for b in &self.blocks {
            w.0.extend_from_slice(&b.key.to_le_bytes());
            w.u64(b.len);
            w.u64(b.checksum);
        }
        w.0
    }

    /// Decodes a manifest payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, at: 0 };
        r.header(MANIFEST_MAGIC)?;
        let version = r.u64()?;
        let created_unix_ms = r.u64()? as i64;
        let name = r.string("name")?;
        let session = r.string("session")?;
        let namespace = r.string("namespace")?;
        let layout = r.bytes32()?.to_vec();
        let nt = r.count(4)?;
        let mut tokens = Vec::with_capacity(nt);
        for _ in 0..nt {
            tokens.push(r.u32()?);
        }
        let nb = r.count(32)?;
        let mut blocks = Vec::with_capacity(nb);
        for _ in 0..nb {
            blocks.push(BlockRef {
                key: r.u128()?,
                len: r.u64()?,
                checksum: r.u64()?,
            });
        }
        r.finish()?;
        Ok(Self {
            name,
            version,
            created_unix_ms,
            session,
            namespace,
            layout,
            tokens,
            blocks,
        })
    }
}

impl Tombstone {
    /// Encodes the tombstone payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(32 + self.name.len()));
        w.0.extend_from_slice(&TOMBSTONE_MAGIC);
        w.u16(PAYLOAD_VERSION);
        w.u16(0);
        w.u64(self.version);
        w.u64(self.manifest_seq);
        w.bytes32(self.name.as_bytes());
        w.0
    }

    /// Decodes a tombstone payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, at: 0 };
        r.header(TOMBSTONE_MAGIC)?;
        let version = r.u64()?;
        let manifest_seq = r.u64()?;
        let name = r.string("name")?;
        r.finish()?;
        Ok(Self {
            name,
            version,
            manifest_seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "w-1".into(),
            version: 3,
            created_unix_ms: 1_700_000_000_123,
            session: "s".into(),
            namespace: "llama".into(),
            layout: b"{}".to_vec(),
            tokens: vec![1, 2, 3],
            blocks: vec![BlockRef {
                key: 9,
                len: 4096,
                checksum: 11,
            }],
        }
    }

    #[test]
    fn manifest_round_trip_and_truncation() {
        let m = sample();
        let e = m.encode();
        assert_eq!(Manifest::decode(&e), Ok(m));
        for n in 0..e.len() {
            assert!(Manifest::decode(&e[..n]).is_err(), "prefix {n}");
        }
        let mut extra = e.clone();
        extra.push(0);
        assert_eq!(Manifest::decode(&extra), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut e = sample().encode();
        // Overwrite the token count with u32::MAX.
        let at = e.len() - 4 - 32 - 12 - 4;
        e[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&e).is_err());
    }

    #[test]
    fn tombstone_round_trip() {
        let t = Tombstone {
            name: "x".into(),
            version: 2,
            manifest_seq: 77,
        };
        assert_eq!(Tombstone::decode(&t.encode()), Ok(t));
    }
}
