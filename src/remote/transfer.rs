//! Moving whole windows between the local store and the shared tier: a push publishes a
//! stored window (blocks first, then the fenced manifest), a pull stores a published one
//! locally (every block verified against the manifest before it is written; blocks the store
//! holds already are not fetched).

use std::time::Duration;

use serde::Serialize;

use super::{Expect, Remote, RemoteError};
use crate::io::AlignedBuf;
use crate::store::format::{payload_offset, record_len};
use crate::store::{BlockImage, Replace, Store, StoreError, WindowSpec, WindowWriter};
use crate::tier::RamTier;

/// Bytes of block payloads read from the store per pipelined write to the tier.
const PUSH_BATCH: u64 = 64 << 20;

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Window name.
    pub name: String,
    /// Its generation in the shared tier now (0: its blocks only were pushed).
    pub generation: u64,
    /// Blocks of the window.
    pub blocks: u64,
    /// Blocks written (the rest were in the tier already: stored by anyone before).
    pub written: u64,
    /// Payload bytes of the blocks written.
    pub written_bytes: u64,
    /// Payload bytes of the window.
    pub bytes: u64,
    /// With `wait_replicas`: whether that many replicas of every master received the publish
    /// within the timeout (`None`: not asked).
    pub replicated: Option<bool>,
}

/// What a block of a fetch must be: its key, payload length and (from a manifest) checksum;
/// without a checksum the value's own header checksum is what is verified.
#[derive(Clone, Copy)]
struct Want {
    key: u128,
    len: u64,
    checksum: Option<u64>,
}

/// A block's record image (`record_len(len)` bytes, 4 KiB-aligned) with its payload
/// assembled in place by the fetch: the one copy out of the value as read.
struct RecordImage {
    img: AlignedBuf,
    len: usize,
}

impl super::PayloadBuf for RecordImage {
    fn for_payload(len: usize) -> Self {
        Self {
            img: AlignedBuf::zeroed(record_len(len as u64) as usize),
            len,
        }
    }

    fn payload_mut(&mut self) -> &mut [u8] {
        let po = payload_offset(self.len as u64);
        &mut self.img[po..po + self.len]
    }
}

/// Fetches blocks `batch` (indices into `want`) in two pipelined round trips, each checked
/// (its length before anything is allocated for it) and laid out as a record image — its
/// payload's checksum still to verify —, or the reason it was refused.
type Fetched = Vec<(usize, Result<super::Unverified<RecordImage>, RemoteError>)>;

fn fetch_images(remote: &Remote, want: &[Want], batch: &[usize]) -> Result<Fetched, RemoteError> {
    let asked: Vec<super::Want> = batch
        .iter()
        .map(|&i| super::Want {
            key: want[i].key,
            len: Some(want[i].len),
            checksum: want[i].checksum,
        })
        .collect();
    Ok(batch
        .iter()
        .copied()
        .zip(remote.get_blocks_unverified::<RecordImage>(&asked)?)
        .collect())
}

/// Receives the blocks of a pull or fill as they are verified and written to the local log
/// (in window order, on a thread of its own, beside the next batch's fetch and write): what
/// lets a thaw into the engine run while the window arrives instead of reading it back after.
pub trait BlockSink: Send {
    /// The window about to be fetched, before any block is: its spec, and the ascending
    /// indices of the blocks that will be delivered (the others are held locally already).
    fn begin(&mut self, spec: &WindowSpec, fetched: &[usize]);
    /// Verified blocks `(index in the window, payload)`, ascending, each written to the log
    /// (not yet committed). A fetch that stops early delivers nothing past the block it
    /// stopped at.
    fn blocks(&mut self, blocks: &[(usize, &[u8])]);
    /// Batches of scratch memory the sink holds while it takes one (a layout permutation's
    /// copy), after [`BlockSink::begin`]: counted in the fetch's memory (EC-022).
    fn scratch_batches(&self) -> u64 {
        0
    }
}

/// Where the blocks of a fetch go besides the log: the RAM tier (when given and enabled) and
/// a [`BlockSink`].
struct Deliver<'a, 's> {
    ram: Option<&'a RamTier>,
    sink: Option<&'a mut (dyn BlockSink + 's)>,
}

impl Deliver<'_, '_> {
    fn wanted(&self) -> bool {
        self.ram.is_some() || self.sink.is_some()
    }

    /// Batches a fetch holds at once ([`batches_in_flight`]) and the sink's scratch.
    fn stages(&self) -> u64 {
        batches_in_flight(self.wanted()) + self.sink.as_ref().map_or(0, |s| s.scratch_batches())
    }

    fn batch(&mut self, want: &[Want], batch: &[(usize, AlignedBuf, u64)]) {
        let payloads: Vec<(usize, &[u8])> = batch
            .iter()
            .map(|(i, img, _)| {
                let (po, len) = (payload_offset(want[*i].len), want[*i].len as usize);
                (*i, &img[po..po + len])
            })
            .collect();
        if let Some(t) = self.ram {
            for ((i, p), (_, _, sum)) in payloads.iter().zip(batch) {
                t.put(want[*i].key, p, *sum, false);
            }
        }
        if let Some(s) = self.sink.as_mut() {
            s.blocks(&payloads);
        }
    }
}

/// Batches of a pull or fill held at once: two while one is fetched (the Redis client's
/// values and the images assembled from them), one queued, one written, and, when blocks are
/// delivered (RAM tier, sink), one queued for delivery and one delivered.
fn batches_in_flight(delivered: bool) -> u64 {
    if delivered {
        6
    } else {
        4
    }
}

/// The byte size of a pull's or fill's batches: [`PUSH_BATCH`], or less so that the `stages`
/// batches in flight hold at most half of `available` (the rest is the engine's, the page
/// cache's, other requests'), down to one block a batch; not even that fits: refused before
/// anything is fetched (EC-022). `records`: the record bytes of the blocks to fetch.
fn batch_bytes(records: &[u64], stages: u64, available: u64) -> Result<u64, RemoteError> {
    let largest = records.iter().copied().max().unwrap_or(0);
    let needed = largest.saturating_mul(stages);
    if needed > available {
        return Err(RemoteError::InsufficientMemory { needed, available });
    }
    Ok(PUSH_BATCH.min(available / 2 / stages))
}

/// Memory a running fetch planned to hold, given back to the link's budget when dropped.
struct Planned<'a> {
    budget: &'a std::sync::Mutex<u64>,
    bytes: u64,
}

impl Drop for Planned<'_> {
    fn drop(&mut self) {
        let mut b = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *b = b.saturating_sub(self.bytes);
    }
}

/// The batch size of a fetch of `records` (record bytes of the blocks) through `remote` with
/// `stages` batches in flight ([`batch_bytes`]), from the memory available less what the
/// fetches already running planned, and that fetch's share of the link's budget until the
/// guard drops.
fn plan<'a>(
    remote: &'a Remote,
    records: &[u64],
    stages: u64,
) -> Result<(u64, Planned<'a>), RemoteError> {
    let available = remote
        .config()
        .memory_available
        .unwrap_or_else(crate::meminfo::available);
    let mut held = remote
        .in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limit = batch_bytes(records, stages, available.saturating_sub(*held))?;
    let largest = records.iter().copied().max().unwrap_or(0);
    let total: u64 = records.iter().sum();
    let bytes = stages.saturating_mul(limit.max(largest).min(total));
    *held = held.saturating_add(bytes);
    Ok((
        limit,
        Planned {
            budget: &remote.in_flight,
            bytes,
        },
    ))
}

/// Fetches the blocks `wanted` (ascending indices into `want`) from the tier in batches of
/// about [`PUSH_BATCH`] bytes (fewer when memory is short: [`batch_bytes`]) on one thread
/// while the previous batch is written to `w` here and the one before it goes into `ram`
/// (when given and enabled: the thaw that follows a fill reads none of it back from the
/// disk) and `sink` on a third.
/// Stops at the first block the tier lacks or that fails its checks: `Some((index, why))`,
/// every wanted block before it written. `Err`: the tier or the store failed, or memory is
/// too short for even one block a stage (nothing fetched).
fn stream_into(
    remote: &Remote,
    w: &mut WindowWriter<'_>,
    want: &[Want],
    wanted: &[usize],
    ram: Option<&RamTier>,
    sink: Option<&mut (dyn BlockSink + '_)>,
) -> Result<Option<(usize, RemoteError)>, RemoteError> {
    let mut deliver = Deliver {
        ram: ram.filter(|t| t.enabled()),
        sink,
    };
    let records: Vec<u64> = wanted.iter().map(|&i| record_len(want[i].len)).collect();
    let (limit, _planned) = plan(remote, &records, deliver.stages())?;
    let mut batches: Vec<&[usize]> = Vec::new();
    let mut at = 0;
    while at < wanted.len() {
        let mut end = at;
        let mut size = 0;
        while end < wanted.len() && (end == at || size + records[end] <= limit) {
            size += records[end];
            end += 1;
        }
        batches.push(&wanted[at..end]);
        at = end;
    }
    std::thread::scope(|sc| {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Fetched, RemoteError>>(1);
        let batches = &batches;
        sc.spawn(move || {
            for batch in batches {
                let fetched = fetch_images(remote, want, batch);
                let stop = fetched
                    .as_ref()
                    .map_or(true, |f| f.iter().any(|(_, r)| r.is_err()));
                if tx.send(fetched).is_err() || stop {
                    return;
                }
            }
        });
        // Written batches go to the RAM tier and the sink here, after the write and off the
        // writing thread: the fetch (GET, verify, lay out) is the slowest stage, and a copy
        // on its thread cost a pull into the engine ~20 %.
        let (dtx, drx) = crossbeam_channel::bounded::<Vec<(usize, AlignedBuf, u64)>>(1);
        if deliver.wanted() {
            let deliver = &mut deliver;
            sc.spawn(move || {
                for batch in drx {
                    deliver.batch(want, &batch);
                }
            });
        } else {
            drop(drx);
        }
        for fetched in rx {
            let fetched = fetched?;
            let mut good: Vec<(usize, AlignedBuf, u64)> = Vec::with_capacity(fetched.len());
            let mut refused = None;
            // Verified here, while the fetching thread reads the next batch; in order, up to
            // the first block refused.
            for (i, r) in fetched {
                if refused.is_some() {
                    break;
                }
                match r.and_then(super::Unverified::verify) {
                    Ok((b, sum)) => good.push((i, b.img, sum)),
                    Err(e) => refused = Some((i, e)),
                }
            }
            let mut images: Vec<BlockImage<'_>> = good
                .iter_mut()
                .map(|(i, img, sum)| BlockImage {
                    index: *i,
                    image: &mut img[..],
                    // Verified against the payload by the fetch (and, given a manifest, equal
                    // to its checksum): the writer need not hash it again.
                    checksum: Some(*sum),
                })
                .collect();
            w.write_blocks(&mut images)?;
            drop(images);
            // (No one receiving: nothing to deliver.)
            let _ = dtx.send(good);
            if let Some((i, e)) = refused {
                return Ok(Some((i, e)));
            }
        }
        Ok(None)
    })
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
/// blocks it lacks, then the manifest, then the head's compare-and-set (`expect`), holding the
/// name's lease (`lock_lease`; another instance publishing it meanwhile: BUSY). `None`:
/// the blocks only (for an unnamed window: found by lookups through their keys, no head —
/// heads and manifests carry no TTL); the report's generation is then 0.
pub fn push_window(
    store: &Store,
    remote: &Remote,
    name: &str,
    expect: Option<Expect>,
) -> Result<PushReport, RemoteError> {
    let lease = remote.config().lock_lease;
    let token = match expect {
        Some(_) if !lease.is_zero() => Some(remote.lock(name, lease)?),
        Some(_) => Some(remote.token(name)?),
        None => None,
    };
    let held = token.filter(|_| !lease.is_zero());
    let done = std::sync::atomic::AtomicBool::new(false);
    let r = std::thread::scope(|sc| {
        if let Some(t) = held {
            let done = &done;
            sc.spawn(move || renew_lease(remote, name, t, lease, done));
        }
        let r = push_held(store, remote, name, expect, token);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    });
    if let Some(t) = held {
        // (An expired lease is simply gone; the fence decided the publish.)
        let _ = remote.unlock(name, t);
    }
    r
}

/// Renews the publish lease of `name` held with `token` every third of `lease` until `done`
/// (a lost lease is left to the fence: the publish of a newer holder wins).
fn renew_lease(
    remote: &Remote,
    name: &str,
    token: u64,
    lease: Duration,
    done: &std::sync::atomic::AtomicBool,
) {
    let step = Duration::from_millis(20);
    let mut since = std::time::Instant::now();
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(step);
        if since.elapsed() >= lease / 3 {
            since = std::time::Instant::now();
            if !matches!(remote.renew(name, token, lease), Ok(true)) {
                crate::log::warn(&format!(
                    "publish lease of {name:?} lost; the fence decides its publish"
                ));
                return;
            }
        }
    }
}

/// [`push_window`] once the fencing token (and lease) is held.
fn push_held(
    store: &Store,
    remote: &Remote,
    name: &str,
    expect: Option<Expect>,
    token: Option<u64>,
) -> Result<PushReport, RemoteError> {
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
            // (read_blocks verified each record against its checksum: reused, not recomputed)
            let blocks: Vec<(u128, &[u8], Option<u64>)> = images
                .iter()
                .enumerate()
                .map(|(j, img)| {
                    let i = s + j;
                    (
                        keys[i],
                        r.payload(i, img),
                        Some(r.manifest.blocks[i].checksum),
                    )
                })
                .collect();
            remote.write_blocks_summed(&blocks)?;
        }
        Ok(())
    })?;
    // Others' remembered misses of these blocks end now (best effort: they expire anyway).
    if let Err(e) = remote.announce(&keys) {
        crate::log::warn(&format!("announcing {name:?}: {e}"));
    }
    let generation = match (expect, token) {
        (Some(expect), Some(token)) => {
            remote
                .publish(name, &r.manifest.encode(), expect, token)?
                .generation
        }
        _ => 0,
    };
    let cfg = remote.config();
    let replicated = match cfg.wait_replicas {
        0 => None,
        n => Some(remote.wait_replicated(n, cfg.timeout)?),
    };
    Ok(PushReport {
        replicated,
        name: name.to_string(),
        generation,
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
    pull_window_since(store, remote, name, replace, 0, None, None)
}

/// [`pull_window`], refusing a head older than generation `seen` (one this instance saw
/// before: a failover to a replica that had not received the newer publish shows an older
/// one) with [`RemoteError::Stale`]; the blocks fetched also go into the RAM tier `ram` and
/// `sink`.
pub fn pull_window_since(
    store: &Store,
    remote: &Remote,
    name: &str,
    replace: Replace,
    seen: u64,
    ram: Option<&RamTier>,
    mut sink: Option<&mut (dyn BlockSink + '_)>,
) -> Result<PullReport, RemoteError> {
    let (head, m) = remote.published_live(name)?;
    if head.generation < seen {
        return Err(RemoteError::Stale {
            name: name.to_string(),
            found: head.generation,
            seen,
        });
    }
    let spec = m.spec(m.name.clone(), replace, m.retention);
    let seen_spec = sink.is_some().then(|| spec.clone());
    let mut w = store.begin_window(spec)?;
    let wanted: Vec<usize> = (0..m.blocks.len()).filter(|&i| w.needs_write(i)).collect();
    if let (Some(s), Some(spec)) = (sink.as_mut(), &seen_spec) {
        s.begin(spec, &wanted);
    }
    let got: u64 = wanted.iter().map(|&i| m.blocks[i].len).sum();
    let want: Vec<Want> = m
        .blocks
        .iter()
        .map(|b| Want {
            key: b.key,
            len: b.len,
            checksum: Some(b.checksum),
        })
        .collect();
    if let Some((_, e)) = stream_into(remote, &mut w, &want, &wanted, ram, sink)? {
        return Err(e);
    }
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

/// The valid prefix of window `name` published in the tier, stored locally as the unnamed
/// window `fill_name(blocks, last key)` names (a pull of it failed: some block is gone or
/// bad). Every block is checked against the manifest; those fetched also go into `ram`.
pub fn fill_published_prefix(
    store: &Store,
    remote: &Remote,
    name: &str,
    fill_name: impl Fn(usize, u128) -> String,
    ram: Option<&RamTier>,
) -> Result<FillReport, RemoteError> {
    let (head, m) = remote.published_live(name)?;
    let bad = |what: String| RemoteError::Corruption {
        key: remote.window_key(name, &format!("m:{}", head.token)),
        source: super::value::ValueError::Payload(what),
    };
    let layout = crate::layout::Layout::from_json(&m.layout)
        .map_err(|e| bad(format!("manifest layout: {e}")))?;
    let last = m
        .blocks
        .last()
        .ok_or_else(|| bad("manifest lists no block".into()))?;
    let unnamed = crate::store::Retention {
        class: crate::store::Class::Unnamed,
        expires_unix_ms: None,
    };
    let spec = m.spec(fill_name(m.blocks.len(), last.key), Replace::No, unnamed);
    let sums: Vec<u64> = m.blocks.iter().map(|b| b.checksum).collect();
    fill_prefix(
        store,
        remote,
        spec,
        layout.block_size as usize,
        Some(&sums),
        ram,
        None,
    )
}

/// What a fill did.
#[derive(Debug, Clone, Serialize)]
pub struct FillReport {
    /// The local (unnamed) window the blocks were stored as.
    pub name: String,
    /// Blocks asked for.
    pub asked: u64,
    /// Blocks the window holds: the prefix of those asked that the tier had and that passed
    /// every check.
    pub blocks: u64,
    /// Blocks fetched from the tier (the rest were in the local store already).
    pub fetched: u64,
    /// Payload bytes fetched.
    pub bytes: u64,
    /// Why the window is shorter than asked, if it is.
    pub stopped: Option<String>,
    /// Seconds the fill took.
    pub secs: f64,
}

/// Stores the blocks `spec.blocks` (a chained prefix found by its keys in the tier, each
/// verified against its value's header, its key, its expected length and, given
/// `checksums` — a published manifest's —, its checksum) in `store` as
/// window `spec.name` (`block_size` tokens a block). A block the tier lacks or that fails a
/// check ends the window there: the valid prefix is stored and the report says why. Nothing
/// of it valid: NOT_FOUND or CORRUPTION. A window of that name already there, or committed
/// first by a concurrent fill: reported as it is. The blocks fetched also go into the RAM tier `ram` (when
/// given and enabled: a thaw right after the fill scatters them from memory) and `sink`.
pub fn fill_prefix(
    store: &Store,
    remote: &Remote,
    spec: WindowSpec,
    block_size: usize,
    checksums: Option<&[u64]>,
    ram: Option<&RamTier>,
    mut sink: Option<&mut (dyn BlockSink + '_)>,
) -> Result<FillReport, RemoteError> {
    let t0 = std::time::Instant::now();
    let asked = spec.blocks.len() as u64;
    let want: Vec<Want> = spec
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| Want {
            key: b.key,
            len: b.len,
            checksum: checksums.and_then(|c| c.get(i).copied()),
        })
        .collect();
    let name = spec.name.clone();
    let seen_spec = sink.is_some().then(|| spec.clone());
    let mut w = match store.begin_window(spec) {
        Ok(w) => w,
        Err(StoreError::AlreadyExists(_)) => {
            let held = store.get(&name)?;
            return Ok(FillReport {
                name: held.name,
                asked,
                blocks: held.num_blocks,
                fetched: 0,
                bytes: 0,
                stopped: None,
                secs: t0.elapsed().as_secs_f64(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let wanted: Vec<usize> = (0..want.len()).filter(|&i| w.needs_write(i)).collect();
    if let (Some(s), Some(spec)) = (sink.as_mut(), &seen_spec) {
        s.begin(spec, &wanted);
    }
    let (blocks, stopped) = match stream_into(remote, &mut w, &want, &wanted, ram, sink)? {
        None => (want.len(), None),
        Some((0, e)) => return Err(e),
        Some((j, e)) => {
            crate::log::warn(&format!(
                "fill {name:?}: block {j} of {asked} not usable ({e}); keeping the {j} before it"
            ));
            w.truncate(j, j * block_size)?;
            (j, Some(e.to_string()))
        }
    };
    let done: Vec<usize> = wanted.into_iter().filter(|&i| i < blocks).collect();
    let name = w.name().to_string();
    let blocks = match w.commit() {
        Ok(_) => blocks as u64,
        // A fill of the same prefix committed first: the name is the prefix's (its length
        // and last chained key), so that window holds these blocks (or a shorter valid
        // prefix of them, if that fill stopped sooner).
        Err(StoreError::AlreadyExists(_)) => store.get(&name)?.num_blocks,
        Err(e) => return Err(e.into()),
    };
    Ok(FillReport {
        name,
        asked,
        blocks,
        fetched: done.len() as u64,
        bytes: done.iter().map(|&i| want[i].len).sum(),
        stopped,
        secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_to_the_memory_available_down_to_one_block_a_stage() {
        let rec = record_len(2 << 20);
        let records = vec![rec; 100];
        // Plenty: the usual batch.
        assert_eq!(batch_bytes(&records, 6, 64 << 30).ok(), Some(PUSH_BATCH));
        // 96 MiB available, six stages delivering: half of it over six batches.
        assert_eq!(
            batch_bytes(&records, 6, 96 << 20).ok(),
            Some((96 << 20) / 2 / 6)
        );
        // Four stages without delivery get larger batches from the same memory.
        assert_eq!(
            batch_bytes(&records, 4, 96 << 20).ok(),
            Some((96 << 20) / 2 / 4)
        );
        // One block a stage is the least: exactly that fits, one byte less does not.
        assert!(batch_bytes(&records, 4, 4 * rec).is_ok());
        match batch_bytes(&records, 4, 4 * rec - 1) {
            Err(RemoteError::InsufficientMemory { needed, available }) => {
                assert_eq!((needed, available), (4 * rec, 4 * rec - 1));
            }
            other => panic!("{other:?}"),
        }
        // Nothing to fetch needs nothing.
        assert!(batch_bytes(&[], 6, 0).is_ok());
    }
}
