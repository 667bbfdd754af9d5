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
    /// Payload bytes of the blocks written.
    pub written_bytes: u64,
    /// Payload bytes of the window.
    pub bytes: u64,
}

/// Fetches blocks `batch` of manifest `m`, verified, as record images.
fn fetch_images(
    remote: &Remote,
    m: &Manifest,
    batch: &[usize],
) -> Result<Vec<(usize, AlignedBuf)>, RemoteError> {
    let asked: Vec<(u128, Option<(u64, u64)>)> = batch
        .iter()
        .map(|&i| {
            (
                m.blocks[i].key,
                Some((m.blocks[i].len, m.blocks[i].checksum)),
            )
        })
        .collect();
    batch
        .iter()
        .zip(remote.get_blocks(&asked)?)
        .map(|(&i, p)| {
            let p = p?;
            let len = m.blocks[i].len;
            let mut img = AlignedBuf::zeroed(record_len(len) as usize);
            let po = payload_offset(len);
            img[po..po + p.len()].copy_from_slice(&p);
            Ok((i, img))
        })
        .collect()
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
    let keys: Vec<u128> = r.manifest.blocks.iter().map(|b| b.key).collect();
    let mut held = Vec::with_capacity(n);
    for chunk in keys.chunks(10_000) {
        held.extend(remote.probe(chunk)?);
    }
    // Runs of consecutive blocks the tier lacks, about PUSH_BATCH bytes each: read from the
    // log on one thread while the previous run is sent on this one.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut size = 0;
    for i in (0..n).filter(|&i| !held[i]) {
        match runs.last_mut() {
            Some((s, e)) if *e == i && size < PUSH_BATCH => {
                *e = i + 1;
                size += r.manifest.blocks[i].len;
            }
            _ => {
                runs.push((i, i + 1));
                size = r.manifest.blocks[i].len;
            }
        }
    }
    let written: u64 = runs.iter().map(|(s, e)| (e - s) as u64).sum();
    let written_bytes: u64 = runs
        .iter()
        .flat_map(|&(s, e)| s..e)
        .map(|i| r.manifest.blocks[i].len)
        .sum();
    std::thread::scope(|sc| -> Result<(), RemoteError> {
        let (tx, rx) =
            crossbeam_channel::bounded::<Result<(usize, Vec<AlignedBuf>), RemoteError>>(1);
        let (r, runs) = (&r, &runs);
        sc.spawn(move || {
            for &(s, e) in runs {
                let mut images: Vec<AlignedBuf> = (s..e)
                    .map(|i| AlignedBuf::zeroed(r.record_len(i) as usize))
                    .collect();
                let mut views: Vec<&mut [u8]> = images.iter_mut().map(|b| &mut b[..]).collect();
                let read = store.read_blocks(r, s, &mut views).map(|()| (s, images));
                let failed = read.is_err();
                if tx.send(read.map_err(RemoteError::from)).is_err() || failed {
                    return;
                }
            }
        });
        for got in rx {
            let (s, images) = got?;
            let blocks: Vec<(u128, &[u8])> = images
                .iter()
                .enumerate()
                .map(|(j, img)| (keys[s + j], r.payload(s + j, img)))
                .collect();
            remote.write_blocks(&blocks)?;
        }
        Ok(())
    })?;
    let head = remote.publish(name, &r.manifest.encode(), expect, token)?;
    Ok(PushReport {
        name: name.to_string(),
        generation: head.generation,
        blocks: n as u64,
        written,
        written_bytes,
        bytes: r.manifest.blocks.iter().map(|b| b.len).sum(),
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
    let wanted: Vec<usize> = (0..m.blocks.len()).filter(|&i| w.needs_write(i)).collect();
    // Batches of about PUSH_BATCH bytes, fetched (two pipelined round trips each), verified
    // and laid out as record images on one thread while the previous batch is written here.
    let mut batches: Vec<&[usize]> = Vec::new();
    let mut at = 0;
    while at < wanted.len() {
        let mut end = at;
        let mut size = 0;
        while end < wanted.len() && (end == at || size < PUSH_BATCH) {
            size += m.blocks[wanted[end]].len;
            end += 1;
        }
        batches.push(&wanted[at..end]);
        at = end;
    }
    let got: u64 = wanted.iter().map(|&i| m.blocks[i].len).sum();
    std::thread::scope(|sc| -> Result<(), RemoteError> {
        type Batch = Result<Vec<(usize, AlignedBuf)>, RemoteError>;
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(1);
        let (m, batches) = (&m, &batches);
        sc.spawn(move || {
            for batch in batches {
                let fetched = fetch_images(remote, m, batch);
                let failed = fetched.is_err();
                if tx.send(fetched).is_err() || failed {
                    return;
                }
            }
        });
        for fetched in rx {
            let mut fetched = fetched?;
            let mut images: Vec<BlockImage<'_>> = fetched
                .iter_mut()
                .map(|(i, img)| BlockImage {
                    index: *i,
                    image: &mut img[..],
                    checksum: Some(m.blocks[*i].checksum),
                })
                .collect();
            w.write_blocks(&mut images)?;
        }
        Ok(())
    })?;
    let fetched = wanted.len() as u64;
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
