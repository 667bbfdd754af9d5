//! The damage sweep (`cwm torture --damage`, and a bounded run in the test suite): builds a data
//! directory of many windows (shared prefixes, deletes, replaces, unnamed windows, TTLs and
//! pins changed after creation, catalog records and catalog deletions) across
//! several small segments, then, for every 4 KiB page of every file in it in turn, damages the
//! page (zeroes it; random bytes; one flipped bit), reopens the store and checks:
//!
//! - **nothing lost**: every window that should exist is listed, with its version;
//! - **nothing resurrected**: no deleted window is listed;
//! - **nothing reverted**: every replaced window is listed with its newest version and its
//!   newest class and expiry, and every catalog key holds its newest record (a deleted one
//!   none);
//! - **no wrong bytes**: every block a window serves verifies and equals what was frozen (a
//!   window whose block lay in the damaged page may thaw partially: it stops at that block);
//! - **damage reported**: the open's recovery report, a failed block verification, or a full
//!   verification of the log ([`Store::verify_log`]) names a problem.
//!
//! Then the directory is restored byte for byte from the pristine copy for the next page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::{self, IoEngine};
use crate::store::{
    BlockDesc, Class, Replace, Retention, Store, StoreConfig, StoreError, WindowSpec,
};

/// How a page is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Damage {
    /// Every byte zero (a lost sector).
    Zero,
    /// Random bytes.
    Random,
    /// One bit flipped.
    BitFlip,
}

/// Sweep settings.
#[derive(Debug, Clone)]
pub struct DamageConfig {
    /// Windows frozen (at least 50 for the sweep); some are deleted or replaced.
    pub windows: usize,
    /// Random seed (workload, random bytes, bit positions).
    pub seed: u64,
    /// Segment size: small, so the log spans several segments.
    pub segment_size: u64,
    /// Damage kinds, each applied to every page in turn.
    pub modes: Vec<Damage>,
    /// Damage only every `stride`-th page (1: every page).
    pub stride: usize,
    /// Where to build the directory (a fresh temporary one when `None`).
    pub dir: Option<PathBuf>,
    /// I/O engine of the reopened stores.
    pub engine: io::EngineKind,
}

impl Default for DamageConfig {
    fn default() -> Self {
        Self {
            windows: 56,
            seed: 1,
            segment_size: 256 << 10,
            modes: vec![Damage::Zero, Damage::Random, Damage::BitFlip],
            stride: 1,
            dir: None,
            engine: io::EngineKind::Psync,
        }
    }
}

/// What a sweep found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DamageSummary {
    /// Files in the directory (segments).
    pub files: usize,
    /// Pages of those files.
    pub pages: usize,
    /// Damage cases run (page × mode, pages whose bytes the damage would not change skipped).
    pub cases: u64,
    /// Windows expected after each case (summed).
    pub windows_checked: u64,
    /// Windows that thawed only partially (their block lay in the damaged page).
    pub partial_windows: u64,
    /// Opens refused (damage the store could not open past).
    pub refused_opens: u64,
    /// Windows missing.
    pub lost: u64,
    /// Deleted windows listed again.
    pub resurrected: u64,
    /// Windows (or catalog keys) back at an older version.
    pub reverted: u64,
    /// Blocks served with bytes other than those frozen.
    pub wrong_bytes: u64,
    /// Cases whose damage nothing reported.
    pub unreported: u64,
    /// Pages holding no part of the log — past the last record of a segment written into a
    /// reused file (bytes of the file's earlier use): damaged like the others, nothing may be
    /// lost or come back, but there is nothing to report.
    pub stale_pages: u64,
    /// The first violations, described.
    pub failures: Vec<String>,
}

impl DamageSummary {
    /// No property violated.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.refused_opens
            + self.lost
            + self.resurrected
            + self.reverted
            + self.wrong_bytes
            + self.unreported
            == 0
    }
}

const BLOCK_LEN: u64 = 5000; // a header page and two payload pages
/// Segment files kept for reuse while the directory is built (its last quarter goes into them).
const RECYCLE: usize = 4;
const SYSTEM_PROMPTS: u128 = 4;

fn payload(key: u128) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK_LEN as usize];
    crate::prng::fill_random(&mut v, (key as u64) ^ ((key >> 64) as u64) ^ 0x5eed);
    v
}

use crate::prng::Rng;

/// What the directory must hold.
#[derive(Default)]
struct Expected {
    /// Live windows: name -> (version, block keys).
    live: BTreeMap<String, (u64, Vec<u128>)>,
    /// Their class and expiry (absent: the default, pinned without expiry).
    retention: BTreeMap<String, Retention>,
    /// Catalog keys deleted (and not written since).
    meta_deleted: Vec<u128>,
    /// Deleted names.
    deleted: Vec<String>,
    /// Catalog: key -> newest payload.
    meta: BTreeMap<u128, Vec<u8>>,
    /// Segments written into reused files: file -> offset past their last record. What lies
    /// after it is left over from the file's earlier use, no part of the log (a page there
    /// damaged changes nothing the store reads as data: not a case).
    stale_from: BTreeMap<PathBuf, u64>,
}

fn spec(name: &str, keys: &[u128], replace: Replace, retention: Retention) -> WindowSpec {
    WindowSpec {
        name: name.into(),
        session: format!("s-{name}"),
        namespace: "damage-sweep".into(),
        layout: b"{\"sweep\":1}".to_vec(),
        tokens: (0..keys.len() as u32 * 16).collect(),
        blocks: keys
            .iter()
            .map(|&key| BlockDesc {
                key,
                len: BLOCK_LEN,
            })
            .collect(),
        replace,
        retention,
        // Some windows carry an origin (a version-3 manifest), so damage to those is swept too.
        origin: (name.len() % 2 == 1).then(|| xxhash_rust::xxh3::xxh3_128(name.as_bytes()) | 1),
    }
}

fn put(
    store: &Store,
    name: &str,
    keys: &[u128],
    replace: Replace,
    retention: Retention,
) -> Result<u64, StoreError> {
    let payloads: Vec<Vec<u8>> = keys.iter().map(|&k| payload(k)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    Ok(store
        .put_window(spec(name, keys, replace, retention), &refs)?
        .version)
}

/// A far expiry (the sweep must not see windows expire): a year from the build.
fn far_expiry(i: usize) -> Option<i64> {
    Some(crate::clock::now_unix_ms() + 365 * 86_400_000 + i as i64)
}

fn build(cfg: &DamageConfig, dir: &Path) -> Result<Expected, StoreError> {
    let mut sc = StoreConfig::new(dir);
    sc.segment_size = cfg.segment_size;
    sc.engine = cfg.engine;
    sc.recycle_segments = RECYCLE;
    let (store, _) = Store::open(sc)?;
    let mut rng = Rng(cfg.seed);
    let mut exp = Expected::default();
    for i in 0..cfg.windows {
        if i == cfg.windows * 3 / 4 {
            // The last quarter of the log goes into reused files, whose bytes past the records
            // are left over from their earlier use.
            recycle_files(&store, &mut exp, i)?;
        }
        // A shared system prompt (two blocks), then one to three blocks of its own.
        let sp = u128::from(rng.below(SYSTEM_PROMPTS as u64) as u8);
        let mut keys = vec![(sp << 96) | 1, (sp << 96) | 2];
        let own = 1 + rng.below(3) as u128;
        keys.extend((0..own).map(|j| (1u128 << 120) | ((i as u128) << 32) | j));
        let name = format!("w{i:03}");
        // One in four unnamed (in the manifest: a version-2 trailer).
        let r = if i % 4 == 1 {
            Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            }
        } else {
            Retention::default()
        };
        let v = put(&store, &name, &keys, Replace::No, r)?;
        exp.retention.insert(name.clone(), r);
        exp.live.insert(name, (v, keys));
        // Now and then a retention change after creation (a catalog record): a TTL, a pin.
        if i % 6 == 2 {
            let victim = format!("w{:03}", rng.below(i as u64 + 1));
            if exp.live.contains_key(&victim) {
                let r = Retention {
                    class: if rng.below(2) == 0 {
                        Class::Pinned
                    } else {
                        Class::Unnamed
                    },
                    expires_unix_ms: far_expiry(i),
                };
                store.set_retention(&victim, None, r)?;
                exp.retention.insert(victim, r);
            }
        }
        // Now and then: replace an earlier window, delete one, write catalog records.
        if i % 7 == 3 {
            let victim = format!("w{:03}", rng.below(i as u64));
            if let Some(entry) = exp.live.get_mut(&victim) {
                let keys = vec![(sp << 96) | 1, (2u128 << 120) | ((i as u128) << 32)];
                let v = put(&store, &victim, &keys, Replace::Any, Retention::default())?;
                *entry = (v, keys);
                // A replacement carries its own retention; older changes no longer apply.
                exp.retention.insert(victim.clone(), Retention::default());
            }
        }
        if i % 9 == 5 {
            let victim = format!("w{:03}", rng.below(i as u64));
            if exp.live.remove(&victim).is_some() {
                store.delete_window(&victim, None)?;
                exp.deleted.push(victim);
            }
        }
        if i % 5 == 0 {
            let key = 0xC0DE_0000 + u128::from(rng.below(4) as u8);
            let val = format!("catalog record {i} of key {key:x}").into_bytes();
            store.put_meta(key, &val)?;
            exp.meta.insert(key, val);
            exp.meta_deleted.retain(|k| *k != key);
        }
        if i % 11 == 8 {
            // A catalog deletion: the key must stay gone.
            if let Some((&key, _)) = exp.meta.iter().nth(rng.below(4) as usize) {
                store.delete_meta(key)?;
                exp.meta.remove(&key);
                exp.meta_deleted.push(key);
            }
        }
    }
    for s in store.stats()?.segments {
        if s.record_limit != 0 {
            let file = dir.join(format!("segment-{:010}.log", s.id));
            exp.stale_from.insert(file, s.frontier);
        }
    }
    Ok(exp)
}

/// Fills four segments with windows, deletes them and compacts, so that compaction keeps their
/// files for reuse and the segments written next go into them (over the deleted windows' old
/// records: none may ever come back).
fn recycle_files(store: &Store, exp: &mut Expected, i: usize) -> Result<(), StoreError> {
    let segments = |s: &Store| -> Result<usize, StoreError> { Ok(s.stats()?.segments.len()) };
    let start = segments(store)?;
    let mut n = 0;
    while segments(store)? < start + 5 {
        let name = format!("f{i:03}-{n:03}");
        let keys: Vec<u128> = (0..3u128)
            .map(|j| (3u128 << 120) | ((n as u128) << 32) | j)
            .collect();
        put(store, &name, &keys, Replace::No, Retention::default())?;
        store.delete_window(&name, None)?;
        exp.deleted.push(name);
        n += 1;
    }
    store.compact(
        &crate::store::CompactOptions {
            live_ratio: 1.0,
            ..Default::default()
        },
        &mut |_| {},
    )?;
    Ok(())
}

fn data_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, StoreError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::Recovery(e.to_string()))? {
        let p = e.map_err(|e| StoreError::Recovery(e.to_string()))?.path();
        // The LOCK file holds a pid, no data.
        if p.file_name().is_some_and(|n| n == "LOCK") || !p.is_file() {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| StoreError::Recovery(e.to_string()))?;
        v.push((p, bytes));
    }
    v.sort();
    Ok(v)
}

fn restore(dir: &Path, pristine: &[(PathBuf, Vec<u8>)]) -> Result<(), StoreError> {
    let io =
        |e: std::io::Error| StoreError::Recovery(format!("restoring the sweep directory: {e}"));
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        if p.file_name().is_some_and(|n| n != "LOCK") && !pristine.iter().any(|(q, _)| *q == p) {
            std::fs::remove_file(&p).map_err(io)?;
        }
    }
    for (p, bytes) in pristine {
        std::fs::write(p, bytes).map_err(io)?;
    }
    Ok(())
}

/// Runs the sweep.
pub fn run(cfg: &DamageConfig) -> Result<DamageSummary, StoreError> {
    let tmp;
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| StoreError::Recovery(e.to_string()))?;
            tmp.path().join("sweep")
        }
    };
    let exp = build(cfg, &dir)?;
    let pristine = data_files(&dir)?;
    // A free segment file (kept for reuse) is out of the log: nothing in it is read until a
    // new segment's header is written over it. It is restored, not damaged.
    let is_free = |p: &Path| p.extension().is_some_and(|x| x == "free");
    let mut sum = DamageSummary {
        files: pristine.iter().filter(|(p, _)| !is_free(p)).count(),
        pages: pristine
            .iter()
            .filter(|(p, _)| !is_free(p))
            .map(|(_, b)| b.len().div_ceil(4096))
            .sum(),
        ..Default::default()
    };
    let engine: Arc<dyn IoEngine> = io::build_engine(cfg.engine, 32);
    let mut rng = Rng(cfg.seed ^ 0xDA3A_6E00);
    let mut page_no = 0usize;
    for (path, bytes) in pristine.iter().filter(|(p, _)| !is_free(p)) {
        for p in 0..bytes.len().div_ceil(4096) {
            page_no += 1;
            if (page_no - 1) % cfg.stride.max(1) != 0 {
                continue;
            }
            // Past the records of a segment in a reused file: no part of the log, so nothing is
            // to be reported — but nothing may be lost or come back either.
            let stale = exp
                .stale_from
                .get(path)
                .is_some_and(|&end| (p * 4096) as u64 >= end);
            if stale {
                sum.stale_pages += 1;
            }
            let range = p * 4096..((p + 1) * 4096).min(bytes.len());
            for &mode in &cfg.modes {
                let mut damaged = bytes.clone();
                let pg = &mut damaged[range.clone()];
                match mode {
                    Damage::Zero => pg.fill(0),
                    Damage::Random => crate::prng::fill_random(pg, rng.next()),
                    Damage::BitFlip => {
                        let bit = rng.below(pg.len() as u64 * 8) as usize;
                        pg[bit / 8] ^= 1 << (bit % 8);
                    }
                }
                if damaged[range.clone()] == bytes[range.clone()] {
                    continue;
                }
                sum.cases += 1;
                restore(&dir, &pristine)?;
                std::fs::write(path, &damaged)
                    .map_err(|e| StoreError::Recovery(format!("damaging: {e}")))?;
                let what = format!(
                    "{} page {p} ({mode:?})",
                    path.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
                );
                check_case(cfg, &dir, &engine, &exp, &what, &mut sum, !stale)?;
            }
        }
    }
    restore(&dir, &pristine)?;
    Ok(sum)
}

fn fail(sum: &mut DamageSummary, what: String) {
    if sum.failures.len() < 20 {
        sum.failures.push(what);
    }
}

fn check_case(
    cfg: &DamageConfig,
    dir: &Path,
    engine: &Arc<dyn IoEngine>,
    exp: &Expected,
    what: &str,
    sum: &mut DamageSummary,
    must_report: bool,
) -> Result<(), StoreError> {
    let mut sc = StoreConfig::new(dir);
    sc.segment_size = cfg.segment_size;
    sc.recycle_segments = RECYCLE;
    let (store, report) = match Store::open_with_engine(sc, engine.clone()) {
        Ok(x) => x,
        Err(e) => {
            sum.refused_opens += 1;
            fail(sum, format!("{what}: open refused: {e}"));
            return Ok(());
        }
    };
    let mut reported = !(report.torn_tails.is_empty()
        && report.damaged_records.is_empty()
        && report.damaged_regions.is_empty()
        && report.incomplete_windows.is_empty()
        && report.removed_empty_segments.is_empty()
        && report.ignored_checkpoints.is_empty()
        && report.ignored_usage.is_none());
    let infos: BTreeMap<String, crate::store::WindowInfo> = store
        .list()?
        .into_iter()
        .map(|w| (w.name.clone(), w))
        .collect();
    let listed: BTreeMap<String, u64> = infos.iter().map(|(n, w)| (n.clone(), w.version)).collect();
    for (name, (version, keys)) in &exp.live {
        sum.windows_checked += 1;
        match listed.get(name) {
            None => {
                sum.lost += 1;
                fail(sum, format!("{what}: window {name} lost"));
                continue;
            }
            Some(v) if v != version => {
                sum.reverted += 1;
                fail(
                    sum,
                    format!("{what}: window {name} at version {v}, not {version}"),
                );
                continue;
            }
            Some(_) => {}
        }
        let want = exp.retention.get(name).copied().unwrap_or_default();
        if let Some(w) = infos.get(name) {
            if (w.class, w.expires_unix_ms) != (want.class, want.expires_unix_ms) {
                sum.reverted += 1;
                fail(
                    sum,
                    format!(
                        "{what}: window {name} is {:?} expiring {:?}, not {:?} {:?}",
                        w.class, w.expires_unix_ms, want.class, want.expires_unix_ms
                    ),
                );
            }
        }
        // Every block either verifies and holds what was frozen, or fails (the intact prefix
        // ends there).
        let r = store.open_window(name);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                reported = true;
                sum.partial_windows += 1;
                if e.code() != crate::ErrorCode::Corruption {
                    fail(sum, format!("{what}: window {name}: {e}"));
                }
                continue;
            }
        };
        let mut img = crate::io::AlignedBuf::zeroed(r.record_len(0) as usize);
        let mut partial = false;
        for (i, k) in keys.iter().enumerate() {
            match store.read_blocks(&r, i, &mut [&mut img[..]]) {
                Ok(()) if partial => {}
                Ok(()) => {
                    if r.payload(i, &img) != &payload(*k)[..] {
                        sum.wrong_bytes += 1;
                        fail(sum, format!("{what}: window {name} block {i}: wrong bytes"));
                    }
                }
                Err(_) => {
                    reported = true;
                    partial = true;
                }
            }
        }
        if partial {
            sum.partial_windows += 1;
        }
    }
    for name in &exp.deleted {
        if !exp.live.contains_key(name) && listed.contains_key(name) {
            sum.resurrected += 1;
            fail(sum, format!("{what}: deleted window {name} is back"));
        }
    }
    let meta: BTreeMap<u128, Vec<u8>> = store.meta()?.into_iter().collect();
    for k in &exp.meta_deleted {
        if meta.contains_key(k) {
            sum.resurrected += 1;
            fail(sum, format!("{what}: deleted catalog key {k:x} is back"));
        }
    }
    for (k, v) in &exp.meta {
        if meta.get(k) != Some(v) {
            sum.reverted += 1;
            fail(
                sum,
                format!("{what}: catalog key {k:x} does not hold its newest record"),
            );
        }
    }
    if must_report && !reported && store.verify_log()?.is_empty() {
        sum.unreported += 1;
        fail(sum, format!("{what}: damage not reported"));
    }
    Ok(())
}
