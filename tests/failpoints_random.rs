//! Random faults in random operation sequences (feature `failpoints`). Each seed runs a
//! sequence of store operations — pinned and unnamed windows (sharing blocks), some with a
//! TTL, deletions, pin/unpin/TTL changes, the injected clock moving on by hours and expiry
//! passes, catalog writes and bulk catalog deletions, eviction passes, compaction — on small
//! segments, so rotations, background seals and checkpoints happen throughout; a failpoint
//! is armed at a random point, at a random site, to fire after a random number of hits (the
//! middle of an operation, not only its first write), and stays armed until an operation
//! fails (at most 15 operations); then a second one the same way. After every operation the
//! store's list (with each window's class and expiry) and catalog are what the acknowledged
//! operations say (a failed operation changed nothing, or for the bulk ones — eviction,
//! expiry, catalog deletion — only what they finished; a window whose TTL passed is gone at
//! once, tombstoned or not); at the end, after a reopen with the clock where it was, every
//! window and catalog value is the same and reads back bit-exactly, expired windows stay
//! gone, the index is consistent, the log accepts new windows, and — when the faults wrote
//! nothing (errors, not short writes) — the open reports no damage and the log verifies
//! clean.
//!
//! `CWM_FP_SEEDS=N` runs more seeds than CI's (`CWM_FP_SEED0` picks the first);
//! `CWM_FP_OFF=1` arms no failpoint (the concurrent schedule alone: its first finding, a
//! window deleted while compaction moved its manifest, needed no fault).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::collections::BTreeMap;

use cwm::failpoint::{self, Action};
use cwm::store::{Class, CompactOptions, EvictionPolicy, Store, StoreConfig};

/// Every block's payload length (blocks are shared between windows by key).
const LEN: u64 = 48 << 10;

/// Every site that fails an operation ([`failpoint::SITES`]), and the two that fail only
/// background work (a seal left unrecorded, a checkpoint not written).
fn sites() -> Vec<&'static str> {
    let mut v = failpoint::SITES.to_vec();
    v.extend(["segment-seal", "checkpoint-write"]);
    v
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 1 << 20;
    c
}

/// What the acknowledged operations say the store holds.
#[derive(Default)]
struct Model {
    /// Visible window name → (block keys, class).
    windows: BTreeMap<String, (Vec<u128>, Class)>,
    /// Expiry of the visible windows that have one (ms, the injected clock's).
    expires: BTreeMap<String, i64>,
    /// Windows whose TTL passed: invisible from that moment on, tombstoned or not.
    expired: std::collections::BTreeSet<String>,
    metas: BTreeMap<u128, Vec<u8>>,
}

/// The injected clock moves in whole hours and every TTL ends half-way through an hour, so
/// the seconds a seed takes in real time never move a window across its expiry.
const HOUR_MS: i64 = 3_600_000;

impl Model {
    /// Moves the windows whose TTL has passed at `now` out of the visible set.
    fn expire(&mut self, now: i64) {
        let due: Vec<String> = self
            .expires
            .iter()
            .filter(|(_, e)| **e <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for n in due {
            self.expires.remove(&n);
            self.windows.remove(&n);
            self.expired.insert(n);
        }
    }

    /// A window the store reported gone (evicted, expired): it must have been unnamed, or
    /// expired already.
    fn gone(&mut self, name: &str, what: &str) {
        if let Some((_, class)) = self.windows.remove(name) {
            assert_eq!(class, Class::Unnamed, "{what}: evicted pinned {name}");
            self.expires.remove(name);
        } else {
            assert!(self.expired.contains(name), "{what}: {name} unknown");
        }
    }
}

/// An expiry `hours` whole hours from now on the injected clock, half-way through the hour.
fn ttl_hours(hours: u64) -> i64 {
    cwm::clock::now_unix_ms() + hours as i64 * HOUR_MS + HOUR_MS / 2
}

fn listed(store: &Store) -> Vec<String> {
    store.list().unwrap().into_iter().map(|w| w.name).collect()
}

/// The store's list (names, classes, expiries) and catalog against the model.
fn agree(store: &Store, m: &Model, what: &str) {
    let names: Vec<String> = m.windows.keys().cloned().collect();
    assert_eq!(listed(store), names, "{what}");
    for w in store.list().unwrap() {
        let (_, class) = &m.windows[&w.name];
        assert_eq!(
            (w.class, w.expires_unix_ms),
            (*class, m.expires.get(&w.name).copied()),
            "{what}: retention of {}",
            w.name
        );
    }
    let metas: Vec<(u128, Vec<u8>)> = m.metas.iter().map(|(k, v)| (*k, v.clone())).collect();
    // (The catalog also holds the retention records of pin/unpin/TTL changes, under keys
    // derived from window names; the test's own keys are small.)
    let mut now: Vec<(u128, Vec<u8>)> = store
        .meta()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| *k < 1 << 20)
        .collect();
    now.sort();
    assert_eq!(now, metas, "{what}");
}

fn put_window(store: &Store, name: &str, keys: &[u128], class: Class) -> Result<(), String> {
    put_replacing(store, name, keys, class, cwm::store::Replace::No)
}

fn put_expiring(
    store: &Store,
    name: &str,
    keys: &[u128],
    class: Class,
    expires: Option<i64>,
) -> Result<(), String> {
    let mut s = spec(name, keys, LEN);
    s.retention.class = class;
    s.retention.expires_unix_ms = expires;
    put_spec(store, s).map(|_| ()).map_err(|e| e.to_string())
}

fn put_replacing(
    store: &Store,
    name: &str,
    keys: &[u128],
    class: Class,
    replace: cwm::store::Replace,
) -> Result<(), String> {
    let mut s = spec(name, keys, LEN);
    s.retention.class = class;
    s.replace = replace;
    put_spec(store, s).map(|_| ()).map_err(|e| e.to_string())
}

/// One random operation; updates the model by its outcome and checks what a failure left.
/// Returns false when it failed.
fn step(store: &Store, m: &mut Model, rng: &mut Rng, n: usize, what: &str) -> bool {
    let op = rng.below(13);
    if std::env::var_os("CWM_FP_TRACE").is_some() {
        eprintln!("{what}: kind {op}");
    }
    match op {
        0..=3 => {
            // A new window of 1–6 blocks drawn from a small pool (so windows share blocks);
            // one in four with a TTL of 1–3 hours of the injected clock.
            let class = random_class(rng, 3);
            let keys = random_keys(rng, 60, 6);
            let name = format!("w{n:04}");
            let expires = (rng.below(4) == 0).then(|| ttl_hours(1 + rng.below(3)));
            match put_expiring(store, &name, &keys, class, expires) {
                Ok(()) => {
                    if let Some(e) = expires {
                        m.expires.insert(name.clone(), e);
                    }
                    m.windows.insert(name, (keys, class));
                    true
                }
                Err(e) => {
                    assert!(!listed(store).contains(&name), "{what}: failed put {e}");
                    false
                }
            }
        }
        4 => {
            let Some(name) = pick(&m.windows, rng) else {
                return true;
            };
            match store.delete_window(&name, None) {
                Ok(_) => {
                    m.windows.remove(&name);
                    m.expires.remove(&name);
                    true
                }
                Err(e) => {
                    assert!(listed(store).contains(&name), "{what}: {e}");
                    false
                }
            }
        }
        5 => {
            let k = u128::from(rng.below(40));
            let v = format!("v{n}").into_bytes();
            let ok = store.put_meta(k, &v).is_ok();
            if ok {
                m.metas.insert(k, v);
            }
            ok
        }
        6 => {
            let keys: Vec<u128> = m
                .metas
                .keys()
                .copied()
                .filter(|_| rng.below(2) == 0)
                .collect();
            if store.delete_metas_if(&keys, |_, _| true).is_ok() {
                for k in &keys {
                    m.metas.remove(k);
                }
                true
            } else {
                // Finished per segment: each key is either deleted or still its value.
                let now: BTreeMap<u128, Vec<u8>> = store.meta().unwrap().into_iter().collect();
                for k in &keys {
                    match now.get(k) {
                        None => {
                            m.metas.remove(k);
                        }
                        Some(v) => assert_eq!(Some(v), m.metas.get(k), "{what}"),
                    }
                }
                false
            }
        }
        7 | 8 => {
            let live = store.block_bytes().unwrap();
            let target = live * rng.below(4) / 4;
            match store.evict(EvictionPolicy::Lru, target, 1 << 30) {
                Ok(rep) => {
                    for name in &rep.evicted {
                        m.gone(name, what);
                    }
                    true
                }
                Err(_) => {
                    // Runs finished before the failure stay evicted: unnamed windows only.
                    gone_since(store, m, what);
                    false
                }
            }
        }
        9 => {
            // pin, unpin or a new TTL (or none) on a visible window.
            let Some(name) = pick(&m.windows, rng) else {
                return true;
            };
            let class = random_class(rng, 2);
            let expires = (rng.below(2) == 0).then(|| ttl_hours(1 + rng.below(3)));
            let r = cwm::store::Retention {
                class,
                expires_unix_ms: expires,
            };
            match store.set_retention(&name, None, r) {
                Ok(info) => {
                    assert_eq!(
                        (info.class, info.expires_unix_ms),
                        (class, expires),
                        "{what}"
                    );
                    m.windows.get_mut(&name).unwrap().1 = class;
                    match expires {
                        Some(e) => m.expires.insert(name, e),
                        None => m.expires.remove(&name),
                    };
                    true
                }
                // Unchanged (`agree` checks it).
                Err(_) => false,
            }
        }
        10 => {
            // An hour passes: windows whose TTL passed are gone for every reader at once.
            failpoint::set_clock_skew_ms(failpoint::clock_skew_ms() + HOUR_MS);
            m.expire(cwm::clock::now_unix_ms());
            true
        }
        11 => match store.expire_due() {
            Ok(gone) => {
                for w in gone {
                    assert!(m.expired.contains(&w.name), "{what}: expired {}", w.name);
                }
                true
            }
            Err(_) => false,
        },
        _ => {
            let opts = CompactOptions {
                live_ratio: [0.5, 0.9, 1.0][rng.below(3) as usize],
                ..Default::default()
            };
            store.compact(&opts, &mut |_| {}).is_ok()
        }
    }
}

/// An expired window reads NOT_FOUND.
fn assert_gone(store: &Store, name: &str, what: &str) {
    assert!(
        matches!(
            store.read_window(name),
            Err(cwm::store::StoreError::NotFound(_))
        ),
        "{what}: expired {name} still readable"
    );
}

/// Every listed window's name and class.
fn classes(store: &Store) -> Vec<(String, Class)> {
    store
        .list()
        .unwrap()
        .into_iter()
        .map(|w| (w.name, w.class))
        .collect()
}

/// After a bulk operation failed part-way: the visible windows it took are unnamed ones.
fn gone_since(store: &Store, m: &mut Model, what: &str) {
    let now = listed(store);
    let gone: Vec<String> = m
        .windows
        .keys()
        .filter(|n| !now.contains(n))
        .cloned()
        .collect();
    for name in gone {
        m.gone(&name, what);
    }
}

/// [`check`], naming the case when it fails.
fn check_in(store: &Store, name: &str, keys: &[u128], what: &str) {
    let (m, blocks) = store
        .read_window(name)
        .unwrap_or_else(|e| panic!("{what}: read {name}: {e}"));
    let got: Vec<u128> = m.blocks.iter().map(|b| b.key).collect();
    assert_eq!(got, keys, "{what}: {name}");
    for (b, k) in blocks.iter().zip(keys) {
        assert!(
            *b == payload(*k as u64, LEN as usize),
            "{what}: {name} bytes"
        );
    }
}

/// Up to `most` distinct block keys from `1..=pool` (small pools: windows share blocks).
fn random_keys(rng: &mut Rng, pool: u64, most: u64) -> Vec<u128> {
    let mut keys: Vec<u128> = Vec::new();
    for _ in 0..1 + rng.below(most) {
        let k = u128::from(rng.below(pool)) + 1;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys
}

/// Pinned one time in `one_in`, unnamed otherwise.
fn random_class(rng: &mut Rng, one_in: u64) -> Class {
    if rng.below(one_in) == 0 {
        Class::Pinned
    } else {
        Class::Unnamed
    }
}

/// A number from the environment.
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A site, an action (error or short write) and how many hits pass before it fires.
fn random_fault(rng: &mut Rng) -> (&'static str, Action, u32) {
    let sites = sites();
    let site = sites[rng.below(sites.len() as u64) as usize];
    let action = if rng.below(2) == 0 {
        Action::Error
    } else {
        Action::ShortWrite
    };
    (site, action, rng.below(6) as u32)
}

fn pick(w: &BTreeMap<String, (Vec<u128>, Class)>, rng: &mut Rng) -> Option<String> {
    (!w.is_empty()).then(|| w.keys().nth(rng.below(w.len() as u64) as usize).cloned())?
}

fn check_all(store: &Store, m: &Model, what: &str) {
    check_all_but(store, m, what, false);
}

/// [`check_all`]; with `leftover_file`, a segment file the index does not know is no
/// violation: `segment-rotate=short-write` leaves a created file without its header — what a
/// crash inside segment creation leaves for the next open (a real creation error removes the
/// file) — until the next rotation creates that segment again over it.
fn check_all_but(store: &Store, m: &Model, what: &str, leftover_file: bool) {
    agree(store, m, what);
    for (name, (keys, _)) in &m.windows {
        check(store, name, keys, LEN);
    }
    for name in &m.expired {
        assert_gone(store, name, what);
    }
    let mut bad = store.check_invariants().unwrap();
    if leftover_file {
        bad.retain(|b| !b.starts_with("segment files"));
    }
    assert_eq!(bad, Vec::<String>::new(), "{what}");
}

#[test]
fn random_faults_in_random_operations_keep_every_acknowledged_outcome() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seeds = env_u64("CWM_FP_SEEDS").unwrap_or(24);
    let seed0 = env_u64("CWM_FP_SEED0").unwrap_or(1);
    let engines = engines();
    let mut faulted = 0;
    let mut expired = 0;
    // CWM_FP_TRACE=1: each operation's outcome on stderr.
    let trace = std::env::var_os("CWM_FP_TRACE").is_some();
    for seed in seed0..seed0 + seeds {
        let (ename, engine) = &engines[seed as usize % engines.len()];
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let ops = 40 + rng.below(40) as usize;
        // Two faults, one after the other: the first armed at a random operation, the second
        // at a later one once the first is cleared.
        let arm_at = rng.below(ops as u64) as usize;
        let faults = [random_fault(&mut rng), random_fault(&mut rng)];
        let second_at = arm_at + 1 + rng.below(ops as u64) as usize;
        let mut m = Model::default();
        failpoint::set_clock_skew_ms(0);
        let faults_said = format!(
            "{}={:?} after {} hits at op {arm_at}, then {}={:?} after {} hits from op {second_at}",
            faults[0].0, faults[0].1, faults[0].2, faults[1].0, faults[1].1, faults[1].2
        );
        // How many of the two were armed.
        let mut next = 0;
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            // Each armed until an operation fails (or 15 operations later).
            let mut armed: Option<usize> = None;
            let mut hit = false;
            for n in 0..ops {
                if armed.is_none() && next < 2 && n >= [arm_at, second_at][next] {
                    let (site, action, pass) = faults[next];
                    failpoint::set_after(site, pass, action);
                    armed = Some(n);
                    next += 1;
                }
                let what = format!("seed {seed} ({ename}), op {n} of {ops}, {faults_said}");
                let ok = step(&store, &mut m, &mut rng, n, &what);
                if trace {
                    eprintln!("{what}: {}", if ok { "ok" } else { "failed" });
                }
                if armed.is_some_and(|a| !ok || n >= a + 15) {
                    failpoint::clear();
                    armed = None;
                    hit |= !ok;
                }
                agree(&store, &m, &what);
            }
            failpoint::clear();
            faulted += usize::from(hit);
            let what = format!("seed {seed} ({ename}): before the reopen ({faults_said})");
            let leftover = faults[..next]
                .iter()
                .any(|f| f.0 == "segment-rotate" && f.1 == Action::ShortWrite);
            check_all_but(&store, &m, &what, leftover);
        }
        // The injected clock stays where it is: windows expired without a tombstone stay gone.
        expired += m.expired.len();
        let what = format!("seed {seed} ({ename}): after the reopen ({faults_said})");
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        check_all(&store, &m, &what);
        failpoint::set_clock_skew_ms(0);
        if faults[..next].iter().all(|f| f.1 == Action::Error) {
            // Nothing reached the disk that was not meant to: no damage anywhere (a short
            // write leaves torn bytes in the segment it failed, which the open reports).
            assert!(rep.damaged_regions.is_empty(), "{what}: {rep:?}");
            assert!(rep.damaged_records.is_empty(), "{what}: {rep:?}");
            assert!(store.verify_log().unwrap().is_empty(), "{what}");
        }
        put_window(&store, "after", &[1000, 1001], Class::Pinned).unwrap();
        check(&store, "after", &[1000, 1001], LEN);
    }
    eprintln!("{seeds} seeds, {faulted} with an armed operation failed; {expired} windows expired");
}

/// Failpoints are process-wide: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The same with three threads at once: each puts windows (sharing blocks with the others'),
/// deletes, replaces and pins its own, gives its own a TTL (one already passed: the window is
/// gone at once and must stay gone, after the reopen too; or one hours away), reads anyone's,
/// writes and bulk-deletes its own catalog keys, forgets retention records no window uses,
/// scrubs the catalog, and runs expiry passes, eviction passes (which may evict the others'
/// unnamed windows) and compactions, while one failpoint
/// fires somewhere in the middle — so a fault lands beside other freezes' writes, commits and
/// seals. Each thread checks what it was told: an acknowledged pinned window stays listed
/// until it deletes it, a failed put never appears, a read returns the window's bytes or
/// "not found" (never damage: eviction, compaction and reused segment files beside it), its
/// catalog keys hold what it last wrote. At the end every listed window reads back
/// bit-exactly; after a reopen the same windows (with the same class: no pin lost) and
/// catalog are there, the index is consistent and the log accepts new windows.
#[test]
fn random_faults_under_concurrent_operations_keep_every_acknowledged_outcome() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seeds = env_u64("CWM_FP_SEEDS").map_or(12, |n| n / 2);
    let seed0 = env_u64("CWM_FP_SEED0").unwrap_or(1);
    let no_faults = std::env::var("CWM_FP_OFF").is_ok();
    let engines = engines();
    let faulted = std::sync::atomic::AtomicUsize::new(0);
    for seed in seed0..seed0 + seeds {
        let (ename, engine) = &engines[seed as usize % engines.len()];
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (site, action, pass) = random_fault(&mut rng);
        let arm_at = rng.below(60) as usize;
        let what = format!("seed {seed} ({ename}), {site}={action:?} after {pass} hits");
        let ops = std::sync::atomic::AtomicUsize::new(0);
        // Armed once `arm_at` operations have run (all threads together); cleared by the
        // first failed operation or 30 operations later.
        let armed = std::sync::Mutex::new(None::<usize>);
        // Every window put (by name: its keys), and the pinned ones each thread holds.
        let attempted = std::sync::Mutex::new(BTreeMap::<String, Vec<Vec<u128>>>::new());
        // The keys of each window's newest acknowledged version.
        let acked = std::sync::Mutex::new(BTreeMap::<String, Vec<u128>>::new());
        let failed = std::sync::Mutex::new(Vec::<String>::new());
        // Windows given a TTL that had passed: gone from then on, after the reopen too.
        let expired = std::sync::Mutex::new(Vec::<String>::new());
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        let metas: Vec<BTreeMap<u128, Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3u64)
                .map(|t| {
                    let (store, ops, armed, attempted, acked, failed, what, faulted, expired) = (
                        &store, &ops, &armed, &attempted, &acked, &failed, &what, &faulted,
                        &expired,
                    );
                    s.spawn(move || {
                        let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(t) | 1);
                        let mut pinned: Vec<String> = Vec::new();
                        let mut unnamed: Vec<String> = Vec::new();
                        let mut metas: BTreeMap<u128, Vec<u8>> = BTreeMap::new();
                        for n in 0..30 {
                            let at = ops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            {
                                let mut a = armed.lock().unwrap();
                                if at == arm_at && a.is_none() && !no_faults {
                                    failpoint::set_after(site, pass, action);
                                    *a = Some(at);
                                } else if a.is_some_and(|f| at > f + 30) {
                                    failpoint::clear();
                                }
                            }
                            let ok = match rng.below(15) {
                                0..=4 => {
                                    let class = random_class(&mut rng, 2);
                                    let keys = random_keys(&mut rng, 40, 5);
                                    let name = format!("t{t}-w{n:02}");
                                    attempted
                                        .lock()
                                        .unwrap()
                                        .insert(name.clone(), vec![keys.clone()]);
                                    match put_window(store, &name, &keys, class) {
                                        Ok(()) => {
                                            acked.lock().unwrap().insert(name.clone(), keys);
                                            if class == Class::Pinned {
                                                pinned.push(name);
                                            } else {
                                                unnamed.push(name);
                                            }
                                            true
                                        }
                                        Err(_) => {
                                            assert!(!listed(store).contains(&name), "{what}");
                                            failed.lock().unwrap().push(name);
                                            false
                                        }
                                    }
                                }
                                5 if rng.below(2) == 0 => match pinned.pop() {
                                    Some(name) => match store.delete_window(&name, None) {
                                        Ok(_) => true,
                                        Err(_) => {
                                            pinned.push(name);
                                            false
                                        }
                                    },
                                    None => true,
                                },
                                5 => match pinned.last() {
                                    // A new version of its own pinned window.
                                    Some(name) => {
                                        let keys: Vec<u128> = (0..1 + rng.below(4))
                                            .map(|i| u128::from(rng.below(40) * 8 + i) + 1)
                                            .collect();
                                        let mut keys = keys;
                                        keys.dedup();
                                        attempted
                                            .lock()
                                            .unwrap()
                                            .entry(name.clone())
                                            .or_default()
                                            .push(keys.clone());
                                        let any = cwm::store::Replace::Any;
                                        match put_replacing(store, name, &keys, Class::Pinned, any)
                                        {
                                            Ok(()) => {
                                                acked.lock().unwrap().insert(name.clone(), keys);
                                                true
                                            }
                                            Err(_) => {
                                                // The version before it stands, whole.
                                                let old = acked.lock().unwrap()[name].clone();
                                                check_in(
                                                    store,
                                                    name,
                                                    &old,
                                                    &format!("{what}, after a failed replace"),
                                                );
                                                false
                                            }
                                        }
                                    }
                                    None => true,
                                },
                                6 => {
                                    let k = u128::from(t * 100 + rng.below(10));
                                    let v = format!("t{t}v{n}").into_bytes();
                                    let ok = store.put_meta(k, &v).is_ok();
                                    if ok {
                                        metas.insert(k, v);
                                    }
                                    ok
                                }
                                7 => {
                                    let keys: Vec<u128> = metas.keys().copied().collect();
                                    let ok = store.delete_metas_if(&keys, |_, _| true).is_ok();
                                    let now: BTreeMap<u128, Vec<u8>> =
                                        store.meta().unwrap().into_iter().collect();
                                    for k in keys {
                                        match now.get(&k) {
                                            None => {
                                                metas.remove(&k);
                                            }
                                            Some(v) => {
                                                assert!(!ok, "{what}: deleted key {k} still there");
                                                assert_eq!(Some(v), metas.get(&k), "{what}");
                                            }
                                        }
                                    }
                                    ok
                                }
                                8 => {
                                    let live = store.block_bytes().unwrap();
                                    store.evict(EvictionPolicy::Lru, live / 2, 1 << 30).is_ok()
                                }
                                10 => {
                                    // A read beside everything else (eviction, compaction,
                                    // reused segment files): the window's bytes, or not found.
                                    let pick = {
                                        let a = attempted.lock().unwrap();
                                        let i = rng.below(a.len() as u64) as usize;
                                        a.iter().nth(i).map(|(n, k)| (n.clone(), k.clone()))
                                    };
                                    if let Some((name, versions)) = pick {
                                        match store.read_window(&name) {
                                            Ok((m, blocks)) => {
                                                // Some version it was given, whole.
                                                let got: Vec<u128> =
                                                    m.blocks.iter().map(|b| b.key).collect();
                                                assert!(
                                                    versions.contains(&got),
                                                    "{what}: {name} read keys {got:?}"
                                                );
                                                for (b, k) in blocks.iter().zip(&got) {
                                                    assert!(
                                                        *b == payload(*k as u64, LEN as usize),
                                                        "{what}: {name} read wrong bytes"
                                                    );
                                                }
                                            }
                                            Err(cwm::store::StoreError::NotFound(_)) => {}
                                            Err(e) => panic!("{what}: reading {name}: {e}"),
                                        }
                                    }
                                    true
                                }
                                11 => match unnamed.pop() {
                                    // Pinning its own unnamed window (an eviction may win).
                                    Some(name) => {
                                        let pin = cwm::store::Retention {
                                            class: Class::Pinned,
                                            expires_unix_ms: None,
                                        };
                                        match store.set_retention(&name, None, pin) {
                                            Ok(_) => {
                                                pinned.push(name);
                                                true
                                            }
                                            Err(cwm::store::StoreError::NotFound(_)) => true,
                                            Err(_) => false,
                                        }
                                    }
                                    None => true,
                                },
                                9 => match pinned.pop() {
                                    // Its own pinned window given a TTL: one that has passed
                                    // already (gone for every reader at once, tombstoned by a
                                    // later expiry pass) or one ten hours away (kept).
                                    Some(name) => {
                                        let now = cwm::clock::now_unix_ms();
                                        let gone = rng.below(2) == 0;
                                        let r = cwm::store::Retention {
                                            class: Class::Pinned,
                                            expires_unix_ms: Some(if gone {
                                                now - 1
                                            } else {
                                                now + 10 * 3_600_000
                                            }),
                                        };
                                        match store.set_retention(&name, None, r) {
                                            Ok(_) if gone => {
                                                assert!(
                                                    !listed(store).contains(&name),
                                                    "{what}: expired {name} listed"
                                                );
                                                expired.lock().unwrap().push(name);
                                                true
                                            }
                                            Ok(_) => {
                                                pinned.push(name);
                                                true
                                            }
                                            Err(_) => {
                                                pinned.push(name);
                                                false
                                            }
                                        }
                                    }
                                    None => true,
                                },
                                12 => store.forget_inert_retention().is_ok(),
                                13 => store.scrub_catalog().is_ok(),
                                14 if rng.below(2) == 0 => store.expire_due().is_ok(),
                                _ => store
                                    .compact(
                                        &CompactOptions {
                                            live_ratio: 0.9,
                                            ..Default::default()
                                        },
                                        &mut |_| {},
                                    )
                                    .is_ok(),
                            };
                            if !ok {
                                let mut a = armed.lock().unwrap();
                                if a.is_some_and(|f| f > 0) {
                                    failpoint::clear();
                                    faulted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    *a = Some(0);
                                }
                            }
                            let now = listed(store);
                            for p in &pinned {
                                assert!(now.contains(p), "{what}: pinned {p} gone");
                            }
                        }
                        metas
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        failpoint::clear();
        let acked = acked.into_inner().unwrap();
        let failed = failed.into_inner().unwrap();
        let expired = expired.into_inner().unwrap();
        let gone = |store: &Store, when: &str| {
            for n in &expired {
                assert_gone(store, n, &format!("{what}, {when}"));
            }
        };
        let names = listed(&store);
        let classes_before = classes(&store);
        for n in &names {
            assert!(!failed.contains(n), "{what}: failed put {n} listed");
            assert!(!expired.contains(n), "{what}: expired {n} listed");
            check_in(&store, n, &acked[n], &format!("{what}, at the end"));
        }
        gone(&store, "at the end");
        let mut all: Vec<(u128, Vec<u8>)> = metas.into_iter().flatten().collect();
        all.sort();
        let mut now = store.meta().unwrap();
        now.retain(|(k, _)| *k < 1000); // (pins are catalog records too)
        now.sort();
        assert_eq!(now, all, "{what}");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{what}"
        );
        drop(store);
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert_eq!(listed(&store), names, "{what}: after the reopen");
        assert_eq!(
            classes(&store),
            classes_before,
            "{what}: classes after the reopen"
        );
        gone(&store, "after the reopen");
        for n in &names {
            check_in(&store, n, &acked[n], &format!("{what}, after the reopen"));
        }
        let mut again = store.meta().unwrap();
        again.retain(|(k, _)| *k < 1000); // (pins are catalog records too)
        again.sort();
        assert_eq!(again, all, "{what}: after the reopen");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{what}"
        );
        put_window(&store, "after", &[1000, 1001], Class::Pinned).unwrap();
        check(&store, "after", &[1000, 1001], LEN);
    }
    eprintln!(
        "{seeds} concurrent seeds, {} with an operation failed by the fault",
        faulted.into_inner()
    );
}
