//! Window usage across restarts: each window's last use and hit count, which order eviction,
//! are kept in memory and saved to `usage.bin` (docs/FORMAT.md "Usage file") at a clean stop
//! and periodically by the daemon — written to a temporary file, synced, renamed into place.
//! An open applies the saved usage to the windows still at the commit it names (a manifest's
//! sequence number, unique in the log), so a replaced or recreated window starts afresh.
//! Advisory only: it orders eviction and nothing else; a missing file means no usage, a
//! damaged one is ignored and reported (`RecoveryReport::ignored_usage`), never trusted.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use xxhash_rust::xxh3::xxh3_64;

use super::error::{poisoned, StoreError};
use super::index::State;
use super::Store;

/// The file's name in the data directory.
pub const FILE: &str = "usage.bin";
const MAGIC: &[u8; 8] = b"CWMUSAGE";
const VERSION: u32 = 1;
/// Magic, version, entry count.
const HEAD: usize = 8 + 4 + 8;
/// Longest window name an entry may carry (names are far shorter; a bound for the decoder).
const MAX_NAME: usize = 4096;

/// One window's saved usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Window name.
    pub name: String,
    /// Sequence number of the manifest (commit) the usage belongs to.
    pub seq: u64,
    /// Last use, ms since the Unix epoch.
    pub last_use_ms: i64,
    /// Thaws.
    pub hits: u64,
}

/// Encodes `entries` with the trailing checksum.
#[must_use]
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEAD + 8 + entries.len() * 48);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&(e.name.len() as u32).to_le_bytes());
        b.extend_from_slice(e.name.as_bytes());
        b.extend_from_slice(&e.seq.to_le_bytes());
        b.extend_from_slice(&e.last_use_ms.to_le_bytes());
        b.extend_from_slice(&e.hits.to_le_bytes());
    }
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// Decodes and verifies a usage file's bytes.
pub fn decode(b: &[u8]) -> Result<Vec<Entry>, String> {
    if b.len() < HEAD + 8 {
        return Err(format!("{} bytes: shorter than a header", b.len()));
    }
    let (body, sum) = b.split_at(b.len() - 8);
    if xxh3_64(body).to_le_bytes() != sum {
        return Err("checksum mismatch".to_string());
    }
    if &body[..8] != MAGIC {
        return Err("bad magic".to_string());
    }
    let mut r = Reader { b: body, at: 8 };
    let version = u32::from_le_bytes(r.take::<4>()?);
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let n = u64::from_le_bytes(r.take::<8>()?);
    let mut out = Vec::new();
    for _ in 0..n {
        let len = u32::from_le_bytes(r.take::<4>()?) as usize;
        if len > MAX_NAME {
            return Err(format!("a name of {len} bytes"));
        }
        let name = std::str::from_utf8(r.slice(len)?)
            .map_err(|_| "a name that is not UTF-8".to_string())?
            .to_string();
        out.push(Entry {
            name,
            seq: u64::from_le_bytes(r.take::<8>()?),
            last_use_ms: i64::from_le_bytes(r.take::<8>()?),
            hits: u64::from_le_bytes(r.take::<8>()?),
        });
    }
    if r.at != body.len() {
        return Err(format!("{} bytes after the entries", body.len() - r.at));
    }
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn slice(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| "entries run past the end".to_string())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.slice(N)?);
        Ok(a)
    }
}

/// Applies the saved usage in `dir` to the windows of `st` still at the commit it names (at
/// open). Returns how many applied, or why the file was ignored (`Ok(0)` without a file).
pub(super) fn restore(dir: &Path, st: &mut State) -> Result<u64, String> {
    let bytes = match std::fs::read(dir.join(FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.to_string()),
    };
    let mut n = 0;
    for e in decode(&bytes)? {
        if let Some(w) = st.windows.get(&e.name).filter(|w| w.info.seq == e.seq) {
            w.usage
                .last_use_ms
                .fetch_max(e.last_use_ms, Ordering::Relaxed);
            w.usage.hits.fetch_max(e.hits, Ordering::Relaxed);
            n += 1;
        }
    }
    Ok(n)
}

impl Store {
    /// Saves the usage of every window used since its commit to `usage.bin`, atomically and
    /// durably; returns how many entries it holds. Not done by stores opened without
    /// checkpoints (`cwm fsck`), which write no side files.
    pub fn save_usage(&self) -> Result<usize, StoreError> {
        if !self.cfg.use_checkpoints {
            return Ok(0);
        }
        let entries: Vec<Entry> = {
            let st = self.state.read().map_err(poisoned)?;
            st.windows
                .iter()
                .filter_map(|(name, w)| {
                    let last_use_ms = w.usage.last_use_ms.load(Ordering::Relaxed);
                    let hits = w.usage.hits.load(Ordering::Relaxed);
                    (hits > 0 || last_use_ms != w.info.created_unix_ms).then(|| Entry {
                        name: name.clone(),
                        seq: w.info.seq,
                        last_use_ms,
                        hits,
                    })
                })
                .collect()
        };
        let dir = &self.cfg.dir;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let fs = |what: &'static str, p: &Path, e| StoreError::from_fs(what, p, e);
        let mut f = std::fs::File::create(&tmp).map_err(|e| fs("create", &tmp, e))?;
        f.write_all(&encode(&entries))
            .and_then(|()| f.sync_data())
            .map_err(|e| fs("write", &tmp, e))?;
        drop(f);
        let dst = dir.join(FILE);
        std::fs::rename(&tmp, &dst).map_err(|e| fs("rename", &tmp, e))?;
        crate::io::sync_dir(dir).map_err(|e| fs("sync directory of", dir, e))?;
        Ok(entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_damage_refused() {
        let e = vec![
            Entry {
                name: "chat-1".into(),
                seq: 7,
                last_use_ms: 1_700_000_000_000,
                hits: 3,
            },
            Entry {
                name: "w".into(),
                seq: 9,
                last_use_ms: -1,
                hits: 0,
            },
        ];
        let b = encode(&e);
        assert_eq!(decode(&b).as_ref(), Ok(&e));
        assert_eq!(decode(&encode(&[])), Ok(vec![]));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(decode(&d).is_err(), "bit flip at {i} accepted");
            assert!(decode(&b[..i]).is_err(), "cut at {i} accepted");
        }
    }
}
