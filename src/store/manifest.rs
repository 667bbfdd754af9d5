//! Manifest and tombstone payloads: the commit record of a window and of its deletion.
//! Decoders check every length against the bytes that remain, so arbitrary input gives a typed
//! error, never a panic or an unbounded allocation.

use serde::Serialize;

use super::types::{Class, Retention};

const MANIFEST_MAGIC: [u8; 4] = *b"CWMM";
const TOMBSTONE_MAGIC: [u8; 4] = *b"CWMT";
const RETENTION_MAGIC: [u8; 4] = *b"CWMK";
const PAYLOAD_VERSION: u16 = 1;
/// A manifest with a retention trailer (class, expiry); written only when the retention is not
/// the default, so windows without one keep the version-1 bytes.
const MANIFEST_V2: u16 = 2;
/// A manifest with the retention trailer (default or not) and an origin trailer (16 bytes):
/// written only for a window frozen under an idempotency key.
const MANIFEST_V3: u16 = 3;
/// Bytes of the retention trailer.
const RETENTION_LEN: usize = 16;

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
    /// Class and expiry at creation (changed later by [`RetentionChange`] records).
    pub retention: Retention,
    /// The request that froze it, when it carried an idempotency key: a digest of the key,
    /// its requester and its fields. Committed with the window, so a retry whose answer a
    /// crash lost is told of its success even when the outcome record never reached the log.
    pub origin: Option<u128>,
}

/// A change of a window's class or expiry after its creation (`pin`, `unpin`, `ttl`): a
/// catalog record; the newest one for the window's current version applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionChange {
    /// Window name.
    pub name: String,
    /// The version it applies to (ignored once the name holds another version).
    pub version: u64,
    /// The new class and expiry.
    pub retention: Retention,
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
    /// A retention trailer with an unknown class or expiry flag.
    #[error("invalid retention: {0}")]
    Retention(&'static str),
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
    /// The retention trailer: class u8, has-expiry u8, 6 reserved zero bytes, expiry i64.
    fn retention(&mut self, r: &Retention) {
        self.0.push(match r.class {
            Class::Pinned => 0,
            Class::Unnamed => 1,
        });
        self.0.push(u8::from(r.expires_unix_ms.is_some()));
        self.0.extend_from_slice(&[0; 6]);
        self.u64(r.expires_unix_ms.unwrap_or(0) as u64);
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
    /// Magic, version (1 up to `newest`), reserved zero; returns the version.
    fn header(&mut self, magic: [u8; 4], newest: u16) -> Result<u16, DecodeError> {
        if self.take(4)? != magic {
            return Err(DecodeError::Magic);
        }
        let v = self.u16()?;
        if !(PAYLOAD_VERSION..=newest).contains(&v) {
            return Err(DecodeError::Version(v));
        }
        match self.u16()? {
            0 => Ok(v),
            r => Err(DecodeError::Reserved(r)),
        }
    }
    fn retention(&mut self) -> Result<Retention, DecodeError> {
        let t = self.take(RETENTION_LEN)?;
        let class = match t[0] {
            0 => Class::Pinned,
            1 => Class::Unnamed,
            _ => return Err(DecodeError::Retention("unknown class")),
        };
        if t[2..8] != [0; 6] {
            return Err(DecodeError::Reserved(u16::from_le_bytes([t[2], t[3]]) | 1));
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&t[8..16]);
        let e = i64::from_le_bytes(e);
        let expires_unix_ms = match t[1] {
            0 if e == 0 => None,
            0 => return Err(DecodeError::Retention("an expiry without its flag")),
            1 => Some(e),
            _ => return Err(DecodeError::Retention("unknown expiry flag")),
        };
        Ok(Retention {
            class,
            expires_unix_ms,
        })
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

impl Manifest {
    /// The spec of a window holding this manifest's blocks and tokens under `name` (a copy
    /// of it elsewhere: a pull from the shared tier, a fill of a published prefix).
    #[must_use]
    pub fn spec(
        &self,
        name: String,
        replace: super::Replace,
        retention: Retention,
    ) -> super::WindowSpec {
        super::WindowSpec {
            name,
            session: self.session.clone(),
            namespace: self.namespace.clone(),
            layout: self.layout.clone(),
            tokens: self.tokens.clone(),
            blocks: self
                .blocks
                .iter()
                .map(|b| super::BlockDesc {
                    key: b.key,
                    len: b.len,
                })
                .collect(),
            replace,
            retention,
            // (Another instance's request: no retry here names it.)
            origin: None,
        }
    }

    /// Encodes the manifest payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            64 + self.layout.len() + self.tokens.len() * 4 + self.blocks.len() * 32,
        ));
        let v2 = self.retention != Retention::default();
        let version = match (self.origin, v2) {
            (Some(_), _) => MANIFEST_V3,
            (None, true) => MANIFEST_V2,
            (None, false) => PAYLOAD_VERSION,
        };
        w.0.extend_from_slice(&MANIFEST_MAGIC);
        w.u16(version);
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
        if version >= MANIFEST_V2 {
            w.retention(&self.retention);
        }
        if let Some(o) = self.origin {
            w.0.extend_from_slice(&o.to_le_bytes());
        }
        w.0
    }

    /// Decodes a manifest payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, at: 0 };
        let payload_version = r.header(MANIFEST_MAGIC, MANIFEST_V3)?;
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
        let retention = match payload_version {
            MANIFEST_V2 => match r.retention()? {
                // One encoding per manifest: the default retention is written as version 1.
                d if d == Retention::default() => {
                    return Err(DecodeError::Retention(
                        "version 2 with the default retention",
                    ))
                }
                d => d,
            },
            MANIFEST_V3 => r.retention()?,
            _ => Retention::default(),
        };
        let origin = if payload_version == MANIFEST_V3 {
            Some(r.u128()?)
        } else {
            None
        };
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
            retention,
            origin,
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
        r.header(TOMBSTONE_MAGIC, PAYLOAD_VERSION)?;
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

impl RetentionChange {
    /// Encodes the record payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(40 + self.name.len()));
        w.0.extend_from_slice(&RETENTION_MAGIC);
        w.u16(PAYLOAD_VERSION);
        w.u16(0);
        w.u64(self.version);
        w.bytes32(self.name.as_bytes());
        w.retention(&self.retention);
        w.0
    }

    /// Decodes a record payload.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, at: 0 };
        r.header(RETENTION_MAGIC, PAYLOAD_VERSION)?;
        let version = r.u64()?;
        let name = r.string("name")?;
        let retention = r.retention()?;
        r.finish()?;
        Ok(Self {
            name,
            version,
            retention,
        })
    }

    /// Whether a catalog payload is a retention record (by its magic).
    #[must_use]
    pub fn is_one(payload: &[u8]) -> bool {
        payload.starts_with(&RETENTION_MAGIC)
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
            retention: Retention::default(),
            origin: None,
        }
    }

    #[test]
    fn a_manifest_with_an_origin_is_version_3_with_both_trailers() {
        let m = sample();
        let v1 = m.encode();
        for r in [
            Retention::default(),
            Retention {
                class: Class::Unnamed,
                expires_unix_ms: Some(1_800_000_000_000),
            },
        ] {
            let m3 = Manifest {
                retention: r,
                origin: Some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
                ..m.clone()
            };
            let e = m3.encode();
            assert_eq!(&e[4..6], &3u16.to_le_bytes());
            assert_eq!(e.len(), v1.len() + RETENTION_LEN + 16);
            assert_eq!(Manifest::decode(&e), Ok(m3));
            for n in 0..e.len() {
                assert!(Manifest::decode(&e[..n]).is_err(), "prefix {n}");
            }
            // Read as version 2, the origin is trailing bytes (or the default retention is
            // refused).
            let mut wrong = e.clone();
            wrong[4..6].copy_from_slice(&2u16.to_le_bytes());
            assert!(Manifest::decode(&wrong).is_err());
        }
        // A version 4 is not read.
        let mut e = Manifest {
            origin: Some(1),
            ..m
        }
        .encode();
        e[4..6].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(Manifest::decode(&e), Err(DecodeError::Version(4)));
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
    fn default_retention_keeps_version_1_bytes_and_a_set_one_round_trips() {
        let m = sample();
        let v1 = m.encode();
        assert_eq!(&v1[4..6], &1u16.to_le_bytes());
        for r in [
            Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            Retention {
                class: Class::Pinned,
                expires_unix_ms: Some(1_800_000_000_000),
            },
            Retention {
                class: Class::Unnamed,
                expires_unix_ms: Some(-5),
            },
        ] {
            let m2 = Manifest {
                retention: r,
                ..m.clone()
            };
            let e = m2.encode();
            assert_eq!(&e[4..6], &2u16.to_le_bytes());
            assert_eq!(e.len(), v1.len() + RETENTION_LEN);
            assert_eq!(Manifest::decode(&e), Ok(m2));
            for n in 0..e.len() {
                assert!(Manifest::decode(&e[..n]).is_err(), "prefix {n}");
            }
            // A version-1 manifest never carries a trailer.
            let mut wrong = e.clone();
            wrong[4..6].copy_from_slice(&1u16.to_le_bytes());
            assert_eq!(
                Manifest::decode(&wrong),
                Err(DecodeError::Trailing(RETENTION_LEN))
            );
        }
        // Bad trailers are refused.
        let m2 = Manifest {
            retention: Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            ..m
        };
        let e = m2.encode();
        let t = e.len() - RETENTION_LEN;
        for (at, v) in [(t, 2u8), (t + 1, 2), (t + 3, 1), (t + 8, 1)] {
            let mut bad = e.clone();
            bad[at] = v;
            assert!(Manifest::decode(&bad).is_err(), "byte {at} = {v}");
        }
    }

    #[test]
    fn retention_change_round_trip() {
        let c = RetentionChange {
            name: "chat-1".into(),
            version: 4,
            retention: Retention {
                class: Class::Pinned,
                expires_unix_ms: Some(123),
            },
        };
        let e = c.encode();
        assert!(RetentionChange::is_one(&e));
        assert_eq!(RetentionChange::decode(&e), Ok(c));
        for n in 0..e.len() {
            assert!(RetentionChange::decode(&e[..n]).is_err(), "prefix {n}");
        }
        assert!(!RetentionChange::is_one(b"{\"json\": 1}"));
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
