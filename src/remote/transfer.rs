//! Moving whole windows between the local store and the shared tier: a push publishes a
//! stored window (blocks first, then the fenced manifest), a pull stores a published one
//! locally (every block verified against the manifest before it is written; blocks the store
//! holds already are not fetched).

use serde::Serialize;

use super::{Expect, Remote, RemoteError};
use crate::io::AlignedBuf;
use crate::store::format::{payload_offset, record_len};
use crate::store::{BlockDesc, BlockImage, Manifest, Replace, Store, WindowSpec};

/// Bytes of block payloads read from the store per pipelined write to the tier.
const PUSH_BATCH: u64 = 64 << 20;

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Window name.
    pub name: String,
    /// Its generation in the shared tier now.
    pub generation: u64,
    /// Blocks of the window.
    pub blocks: u64,
    /// Blocks written (the rest were in the tier already: stored by anyone before).
    pub written: u64,
    /// Payload bytes of the window.
    pub bytes: u64,
}

/// What a pull did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    /// Window name.
    pub name: String,
    /// The generation pulled.
    pub generation: u64,
    /// Its version in the local store now.
    pub version: u64,
    /// Blocks of the window.
    pub blocks: u64,
    /// Blocks fetched from the tier (the rest were in the local store already).
    pub fetched: u64,
    /// Payload bytes fetched.
    pub bytes: u64,
}

/// Publishes window `name` of `store` to the shared tier, holding a fresh fencing token:
/// blocks it lacks, then the manifest, then the head's compare-and-set (`expect`).
pub fn push_window(
    store: &Store,
    remote: &Remote,
    name: &str,
    expect: Expect,
) -> Result<PushReport, RemoteError> {
    let token = remote.token(name)?;
    let r = store.open_window(name)?;
    let n = r.num_blocks();
    let (mut written, mut bytes) = (0u64, 0u64);
    let mut i = 0;
    while i < n {
        let mut images = Vec::new();
        let mut size = 0;
        while i + images.len() < n && (images.is_empty() || size < PUSH_BATCH) {
            let len = r.record_len(i + images.len());
            size += len;
            images.push(AlignedBuf::zeroed(len as usize));
        }
        let mut views: Vec<&mut [u8]> = images.iter_mut().map(|b| &mut b[..]).collect();
        store.read_blocks(&r, i, &mut views)?;
        let blocks: Vec<(u128, &[u8])> = images
            .iter()
            .enumerate()
            .map(|(j, img)| (r.manifest.blocks[i + j].key, r.payload(i + j, img)))
            .collect();
        bytes += blocks.iter().map(|(_, p)| p.len() as u64).sum::<u64>();
        written += remote.put_blocks(&blocks)? as u64;
        i += images.len();
    }
    let head = remote.publish(name, &r.manifest.encode(), expect, token)?;
    Ok(PushReport {
        name: name.to_string(),
        generation: head.generation,
        blocks: n as u64,
        written,
        bytes,
    })
}

/// Stores the window `name` published in the shared tier into `store` (`replace`: what to do
/// when the name exists locally). Every fetched block is verified against the manifest
/// before it is written; a block missing from the tier or failing its checks fails the pull
/// and nothing of it becomes visible.
pub fn pull_window(
    store: &Store,
    remote: &Remote,
    name: &str,
    replace: Replace,
) -> Result<PullReport, RemoteError> {
    let (head, bytes) = remote.manifest(name)?;
    let m = Manifest::decode(&bytes).map_err(|e| RemoteError::Corruption {
        key: remote.window_key(name, &format!("m:{}", head.token)),
        source: super::value::ValueError::Payload(format!("manifest does not decode: {e}")),
    })?;
    if m.name != name {
        return Err(RemoteError::Corruption {
            key: remote.window_key(name, "head"),
            source: super::value::ValueError::Inconsistent("manifest of another window"),
        });
    }
    let spec = WindowSpec {
        name: m.name.clone(),
        session: m.session.clone(),
        namespace: m.namespace.clone(),
        layout: m.layout.clone(),
        tokens: m.tokens.clone(),
        blocks: m
            .blocks
            .iter()
            .map(|b| BlockDesc {
                key: b.key,
                len: b.len,
            })
            .collect(),
        replace,
        retention: m.retention,
    };
    let mut w = store.begin_window(spec)?;
    let (mut fetched, mut got) = (0u64, 0u64);
    for (i, b) in m.blocks.iter().enumerate() {
        if !w.needs_write(i) {
            continue;
        }
        let p = remote.get_block(b.key, Some((b.len, b.checksum)))?;
        let mut img = AlignedBuf::zeroed(record_len(b.len) as usize);
        let po = payload_offset(b.len);
        img[po..po + p.len()].copy_from_slice(&p);
        w.write_blocks(&mut [BlockImage {
            index: i,
            image: &mut img[..],
            checksum: Some(b.checksum),
        }])?;
        fetched += 1;
        got += b.len;
    }
    let info = w.commit()?;
    Ok(PullReport {
        name: name.to_string(),
        generation: head.generation,
        version: info.version,
        blocks: m.blocks.len() as u64,
        fetched,
        bytes: got,
    })
}
