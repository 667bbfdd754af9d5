//! `cwm torture`: crash-consistency torture of the whole daemon. Starts `cwm serve` (this
//! executable) on a data directory with a shared-memory engine, drives random freezes (shared
//! token prefixes included, so blocks are deduplicated), thaws, deletes and compactions
//! through the socket, SIGKILLs the server at random moments (during block writes, manifest
//! and catalog commits, compaction, and during recovery right after a restart), restarts it
//! and checks after every restart:
//!
//! - every window acknowledged durable is listed and thaws bit-exactly (expected bytes are
//!   derived client-side from the window's tokens);
//! - no window that was never acknowledged is visible, except one whose freeze was in flight
//!   at the kill, and that one must thaw and verify too; a window whose delete was
//!   acknowledged stays deleted;
//! - the daemon's own consistency check (`check` op: reference counts equal what manifests
//!   hold, live bytes, segment files) reports nothing;
//! - every few cycles, after compacting everything (`live_ratio` 1.0), no garbage is left
//!   outside the append segment (no space leaked).
//!
//! Unnamed windows are pinned and pinned ones unpinned (retention records, deleted again once
//! their window is gone): a window whose pin was acknowledged must be listed as pinned after
//! every restart. Windows are given TTLs of 1–5 s (`ttl`; the daemon's expiry pass runs every
//! 50 ms, so kills land in its tombstones too): after a restart, a window whose TTL had
//! surely passed when the list was asked for must be gone (tombstoned or not) and stay gone;
//! one whose TTL surely had not must be there, unless it was unnamed (evicted).
//!
//! Half the freezes and deletes carry an idempotency key, so their outcomes are also committed
//! as catalog records (kills land in catalog commits too); a pinned keyed freeze the kill cut
//! off is retried after the restart, as a client without its answer would: if its window is
//! there, the retry must be answered with that success and not run again. A second client freezes windows of
//! its own at the same time (all sharing a first block), so kills land among concurrent
//! freezes whose records interleave in the log; after every restart the daemon's health must
//! be `ok` (a crash alone is no damage: room handed out to a freeze and never written is a torn
//! tail, not a damaged region).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use cwm::control::client::Client;
use cwm::prng::Rng;

/// `cwm torture` settings.
#[derive(Debug, Clone)]
pub struct TortureConfig {
    /// Run this long (then one last restart and check).
    pub seconds: u64,
    /// Stop after this many cycles (0: no limit).
    pub max_cycles: u64,
    /// Random seed.
    pub seed: u64,
    /// Data directory (a fresh temporary one when `None`).
    pub data_dir: Option<PathBuf>,
    /// Kills land at most this many milliseconds after an op phase starts.
    pub kill_max_ms: u64,
}

/// What a torture run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TortureSummary {
    /// Restart cycles.
    pub cycles: u64,
    /// SIGKILLs delivered.
    pub kills: u64,
    /// Kills delivered while the server was still starting (recovery).
    pub kills_in_recovery: u64,
    /// Window thaws verified bit-exactly.
    pub windows_verified: u64,
    /// Freezes acknowledged.
    pub freezes_acked: u64,
    /// Deletes acknowledged.
    pub deletes_acked: u64,
    /// Compactions run to completion.
    pub compactions: u64,
    /// Unnamed windows found evicted (gone without a delete; allowed for them only).
    pub evictions_seen: u64,
    /// Unnamed windows pinned (from then on they must survive like any other, and stay
    /// pinned across restarts).
    pub pins_acked: u64,
    /// Pinned windows unpinned (evictable from then on; their retention record is deleted
    /// once they are deleted or evicted).
    pub unpins_acked: u64,
    /// TTLs acknowledged (`ttl` of 1–5 s on an acknowledged window).
    pub ttls_acked: u64,
    /// Windows found gone after their TTL passed (at a restart's check).
    pub expiries_seen: u64,
    /// Keyed freezes cut off by a kill whose window was there after the restart, retried:
    /// answered with their success (`replayed`), never run again.
    pub retries_replayed: u64,
    /// Of those, answered from the window's origin (the kill came before the outcome
    /// record).
    pub retries_recovered: u64,
    /// Segments found written into a reused file (a compacted segment's) at the restarts,
    /// summed over them: recovery ran over such files this often.
    pub reused_segments_seen: u64,
    /// Segments found unsealed behind a newer one at the restarts (a kill while a rotation's
    /// seal was under way in the background), summed over them: recovery ran over such tails
    /// this often.
    pub unsealed_older_seen: u64,
    /// Violations found (each also printed).
    pub violations: u64,
    /// First violations, in words.
    pub details: Vec<String>,
}

const BLOCKS: u64 = 64;
const SRC_BLOCKS: u64 = 32;
const BS_TOKENS: usize = 16;
/// Bytes of one block in one plane (K or V) of one layer: 16 tokens x 2 heads x 64 x bf16.
const PLANE: u64 = 4096;
const LAYERS: usize = 2;

/// The bytes block `i` of a window with `tokens` holds in one layer (K then V planes): a
/// function of the token prefix it covers, so equal prefixes (equal keys) hold equal bytes.
fn block_bytes(tokens: &[u32], i: usize, layer: usize) -> Vec<u8> {
    let end = ((i + 1) * BS_TOKENS).min(tokens.len());
    let mut seed_bytes = Vec::with_capacity(end * 4 + 8);
    for t in &tokens[..end] {
        seed_bytes.extend_from_slice(&t.to_le_bytes());
    }
    seed_bytes.extend_from_slice(&(layer as u64).to_le_bytes());
    let seed = xxhash_rust::xxh3::xxh3_64(&seed_bytes);
    let mut v = vec![0u8; 2 * PLANE as usize];
    cwm::prng::fill_random(&mut v, seed | 1);
    v
}

struct Engine {
    files: Vec<File>,
    paths: Vec<PathBuf>,
}

impl Engine {
    fn create(dir: &Path) -> Result<Self, String> {
        let mut files = Vec::new();
        let mut paths = Vec::new();
        for l in 0..LAYERS {
            let p = dir.join(format!("layer{l}"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            f.set_len(2 * BLOCKS * PLANE)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            files.push(f);
            paths.push(p);
        }
        Ok(Self { files, paths })
    }

    fn write_block(&self, b: u64, layer: usize, bytes: &[u8]) -> std::io::Result<()> {
        let f = &self.files[layer];
        f.write_all_at(&bytes[..PLANE as usize], b * PLANE)?;
        f.write_all_at(&bytes[PLANE as usize..], (BLOCKS + b) * PLANE)
    }

    fn read_block(&self, b: u64, layer: usize) -> std::io::Result<Vec<u8>> {
        let f = &self.files[layer];
        let mut v = vec![0u8; 2 * PLANE as usize];
        f.read_exact_at(&mut v[..PLANE as usize], b * PLANE)?;
        f.read_exact_at(&mut v[PLANE as usize..], (BLOCKS + b) * PLANE)?;
        Ok(v)
    }

    fn register(&self) -> Value {
        json!({"op": "register", "engine": "e1", "model": "torture",
            "layout": {"kind": "flash_2nbhd", "layers": LAYERS, "blocks": BLOCKS, "block_size": BS_TOKENS,
                       "heads": 2, "head": 64, "dtype": "bf16"},
            "memory": {"shm": self.paths}})
    }
}

struct Run {
    exe: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    shm: PathBuf,
    eng: Arc<Engine>,
    rng: Rng,
    /// Acknowledged windows and their tokens.
    acked: BTreeMap<String, Vec<u32>>,
    /// Windows whose freeze or delete was in flight at a kill: present or absent, and if
    /// present they must verify.
    uncertain: BTreeMap<String, Vec<u32>>,
    /// Deletes acknowledged (must stay absent), and windows seen evicted.
    deleted: std::collections::BTreeSet<String>,
    /// Acknowledged windows frozen unnamed (evictable) and not pinned since.
    unnamed: std::collections::BTreeSet<String>,
    /// Windows whose `pin` was acknowledged (and no `unpin` sent since): listed as pinned
    /// after every restart.
    pinned: std::collections::BTreeSet<String>,
    /// Windows given a TTL (out of `acked` from the request on).
    expiring: BTreeMap<String, Expiring>,
    /// Pinned freezes under an idempotency key that a kill cut off: retried after the restart
    /// (name, the request, tokens).
    retries: Vec<(String, Value, Vec<u32>)>,
    next_window: u64,
    /// Number of the second client's next window.
    next_side: u64,
    sum: TortureSummary,
}

/// A window given a TTL: when it expires, as far as the client can tell (the daemon takes its
/// clock between the request and the answer).
struct Expiring {
    tokens: Vec<u32>,
    /// Not before this (ms since the epoch: the request's time + the TTL).
    lower_ms: i64,
    /// Not after this (the answer's time + the TTL; for a request the kill cut off, the
    /// kill's).
    upper_ms: i64,
    /// The kill cut the request off: the TTL may not have been set at all.
    maybe: bool,
    /// It was unnamed: evictable before its TTL too.
    unnamed: bool,
    /// It was pinned (kept if the TTL is refused).
    pinned: bool,
}

/// Slack for the clocks of the client and the daemon (one clock, read at different moments)
/// and the daemon's millisecond rounding.
const TTL_MARGIN_MS: i64 = 250;

/// What the second client did during one op phase: windows acknowledged, the one in flight at
/// the kill, the ones asked to be unnamed (known before the answer), windows numbered.
#[derive(Default)]
struct Side {
    acked: Vec<(String, Vec<u32>)>,
    uncertain: Option<(String, Vec<u32>)>,
    /// The uncertain freeze's request, when it is a pinned one under an idempotency key.
    retry: Option<Value>,
    unnamed: Vec<String>,
    used: u64,
}

/// The second client: freezes windows `x<n>` from source blocks 16.. until its connection
/// breaks (the kill) or `stop` is set. Every window starts with the same block.
fn side_writer(socket: &Path, eng: &Engine, seed: u64, first: u64, stop: &AtomicBool) -> Side {
    let mut side = Side::default();
    let Ok(mut c) = Client::connect(socket) else {
        return side;
    };
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let name = format!("x{}", first + side.used);
        side.used += 1;
        let n = 2 + rng.below(4) as usize;
        let mut tokens: Vec<u32> = (0..BS_TOKENS as u32).map(|t| 60_000 + t).collect();
        while tokens.len() < n * BS_TOKENS {
            tokens.push((rng.next() % 50_000) as u32);
        }
        let src: Vec<u64> = (16..16 + n as u64).collect();
        for (i, &b) in src.iter().enumerate() {
            for l in 0..LAYERS {
                if eng.write_block(b, l, &block_bytes(&tokens, i, l)).is_err() {
                    return side;
                }
            }
        }
        let mut req = json!({"op": "freeze", "engine": "e1", "window": name,
            "tokens": tokens, "block_ids": src});
        if rng.below(2) == 0 {
            req["idempotency_key"] = json!(format!("k-{name}"));
        }
        if rng.below(3) == 0 {
            req["class"] = json!("unnamed");
            side.unnamed.push(name.clone());
        }
        side.uncertain = Some((name.clone(), tokens.clone()));
        let retry = retry_of(&req);
        match c.call_final(req) {
            Ok(v) if ok(&v) => {
                side.uncertain = None;
                side.acked.push((name, tokens));
            }
            // Refused (quota): it must not appear.
            Ok(_) => side.uncertain = None,
            Err(_) => {
                side.retry = retry;
                return side;
            }
        }
    }
    side
}

/// A freeze to retry after the kill if it cut it off: pinned (no eviction may take its window
/// before the retry) and under an idempotency key.
fn retry_of(req: &Value) -> Option<Value> {
    (req.get("idempotency_key").is_some() && req.get("class").is_none()).then(|| req.clone())
}

fn ok(v: &Value) -> bool {
    v.get("ok").and_then(Value::as_bool) == Some(true)
}

impl Run {
    fn violation(&mut self, what: String) {
        eprintln!("torture: VIOLATION: {what}");
        self.sum.violations += 1;
        if self.sum.violations == 1 {
            // The data directory as the first violation found it (later cycles compact it
            // away), for whoever investigates.
            let to = self.data.with_file_name("data-at-first-violation");
            if copy_flat(&self.data, &to).is_ok() {
                eprintln!(
                    "torture: data directory at the first violation copied to {}",
                    to.display()
                );
            }
        }
        if self.sum.details.len() < 20 {
            self.sum.details.push(what);
        }
    }

    fn spawn(&self) -> Result<Child, String> {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(&self.exe);
        c.args([
            "serve",
            "--segment-size",
            "1MiB",
            "--staging",
            "8MiB",
            "--compact-interval",
            "1",
            "--compact-live-ratio",
            "0.6",
            // A budget that windows of up to 32 blocks outgrow: unnamed ones are evicted (in
            // the background, every 50 ms) while kills land.
            "--capacity",
            "12MiB",
            "--eviction-interval-ms",
            "50",
        ])
        .arg("--data-dir")
        .arg(&self.data)
        .arg("--socket")
        .arg(&self.socket)
        .arg("--shm-dir")
        .arg(&self.shm)
        .env("CWM_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; it only sets the child's parent-death signal, so
        // the server never outlives the torture run.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c.spawn()
            .map_err(|e| format!("spawn {}: {e}", self.exe.display()))
    }

    fn connect(&self, child: &mut Child) -> Result<Client, String> {
        let t = Instant::now();
        loop {
            if let Ok(c) = Client::connect(&self.socket) {
                return Ok(c);
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("cwm serve exited during start: {st}"));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err("cwm serve did not come up in 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn tokens_for_freeze(&mut self) -> Vec<u32> {
        let n = 1 + self.rng.below(6) as usize;
        let mut t: Vec<u32> = Vec::with_capacity(n * BS_TOKENS);
        // Half the time, share a prefix with an acknowledged window (deduplicated blocks).
        if !self.acked.is_empty() && self.rng.below(2) == 0 {
            let i = self.rng.below(self.acked.len() as u64) as usize;
            if let Some(base) = self.acked.values().nth(i) {
                let k = 1 + self.rng.below((base.len() / BS_TOKENS) as u64) as usize;
                t.extend_from_slice(&base[..(k.min(n) * BS_TOKENS).min(base.len())]);
            }
        }
        while t.len() < n * BS_TOKENS {
            t.push((self.rng.next() % 50_000) as u32);
        }
        t
    }

    /// Thaws `name` into the destination half of the engine and compares every byte.
    fn verify_window(&mut self, c: &mut Client, name: &str, tokens: &[u32]) -> Result<(), String> {
        let n = tokens.len() / BS_TOKENS;
        let dest: Vec<u64> = (0..n as u64).map(|i| SRC_BLOCKS + i).collect();
        let v = c
            .call_final(json!({"op": "thaw", "engine": "e1", "window": name, "block_ids": dest}))
            .map_err(|e| format!("thaw {name}: {e}"))?;
        if !ok(&v) {
            if self.evicted(name, &v) {
                return Ok(());
            }
            self.violation(format!("window {name} does not thaw: {v}"));
            return Ok(());
        }
        for (i, &b) in dest.iter().enumerate() {
            for l in 0..LAYERS {
                let got = self
                    .eng
                    .read_block(b, l)
                    .map_err(|e| format!("read back: {e}"))?;
                if got != block_bytes(tokens, i, l) {
                    self.violation(format!(
                        "window {name} block {i} layer {l} differs after thaw"
                    ));
                    return Ok(());
                }
            }
        }
        self.sum.windows_verified += 1;
        Ok(())
    }

    /// An acknowledged unnamed window answered NOT_FOUND: evicted, which only unnamed windows
    /// may be. It must stay gone from now on.
    fn evicted(&mut self, name: &str, v: &Value) -> bool {
        let not_found = v.pointer("/error/code").and_then(Value::as_str) == Some("NOT_FOUND");
        if not_found && self.unnamed.remove(name) {
            self.acked.remove(name);
            self.deleted.insert(name.to_string());
            self.sum.evictions_seen += 1;
            return true;
        }
        false
    }

    /// Takes in what the second client did.
    fn merge_side(&mut self, side: Side) {
        self.next_side += side.used;
        for n in side.unnamed {
            self.unnamed.insert(n);
        }
        for (n, t) in side.acked {
            self.acked.insert(n, t);
            self.sum.freezes_acked += 1;
        }
        if let Some((n, t)) = side.uncertain {
            if let Some(req) = side.retry {
                self.retries.push((n.clone(), req, t.clone()));
            }
            self.uncertain.insert(n, t);
        }
    }

    /// After a restart: the daemon's health (a kill is no damage), the listed windows against
    /// the model, each one thawed and verified, and the daemon's consistency check.
    fn verify_all(&mut self, c: &mut Client) -> Result<(), String> {
        // Once the walk of the checkpointed segments after the open is done (a kill must
        // leave nothing it reports either).
        let t = std::time::Instant::now();
        let h = loop {
            let h = c
                .call_final(json!({"op": "health"}))
                .map_err(|e| format!("health: {e}"))?;
            if h["integrity"]["verifying_checkpoints"] != true
                || t.elapsed() > std::time::Duration::from_secs(60)
            {
                break h;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        if h["integrity"]["verifying_checkpoints"] == true {
            self.violation("the walk of the checkpointed segments did not end in 60 s".into());
        }
        if h["status"] != "ok" {
            self.violation(format!(
                "health {} after a kill alone: {}",
                h["status"], h["integrity"]
            ));
        }
        let asked = cwm::clock::now_unix_ms();
        let v = c
            .call_final(json!({"op": "list", "limit": 100000}))
            .map_err(|e| format!("list: {e}"))?;
        let answered = cwm::clock::now_unix_ms();
        let listed: Vec<String> = v["windows"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| w["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for name in self.acked.keys().cloned().collect::<Vec<_>>() {
            if !listed.contains(&name) {
                if self.unnamed.remove(&name) {
                    // Evicted: it must stay gone.
                    self.sum.evictions_seen += 1;
                    self.deleted.insert(name.clone());
                } else {
                    self.violation(format!("acknowledged window {name} is missing"));
                }
                self.acked.remove(&name);
            }
        }
        let classes: BTreeMap<String, String> = v["windows"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| {
                        Some((
                            w["name"].as_str()?.to_string(),
                            w["class"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.check_expiring(&listed, asked, answered);
        for name in self.pinned.clone() {
            match classes.get(&name).map(String::as_str) {
                Some("pinned") => {}
                Some(other) => self.violation(format!(
                    "window {name} pinned (acknowledged) is {other} after a restart"
                )),
                // (Deleted since, or missing: told apart above.)
                None => {
                    self.pinned.remove(&name);
                }
            }
        }
        for name in &listed {
            if let Some(t) = self.acked.get(name).cloned() {
                self.verify_window(c, name, &t)?;
            } else if let Some(t) = self.uncertain.remove(name) {
                self.verify_window(c, name, &t)?;
                // (Unless it was evicted between the list and the thaw: then it stays gone.)
                if !self.deleted.contains(name) {
                    self.acked.insert(name.clone(), t);
                }
            } else if let Some(e) = self.expiring.get(name) {
                // Thawed only well before its TTL (and when no eviction may take it first).
                if !e.unnamed && e.lower_ms > answered + 2_000 {
                    let t = e.tokens.clone();
                    self.verify_window(c, name, &t)?;
                }
            } else if self.deleted.contains(name) {
                self.violation(format!("deleted window {name} is visible again"));
            } else {
                self.violation(format!("never acknowledged window {name} is visible"));
            }
        }
        // What was in flight and is not listed did not happen.
        self.uncertain.clear();
        self.check(c, false)
    }

    /// The windows given a TTL against a list asked for at `asked` and answered at
    /// `answered` (ms): surely expired when asked — gone (and from now on like a deleted
    /// window); surely not yet expired when answered — listed (or evicted, if unnamed); in
    /// between, either (once gone, gone for good). A window whose `ttl` the kill cut off and
    /// that is still listed after its would-be expiry never got the TTL: acknowledged again.
    fn check_expiring(&mut self, listed: &[String], asked: i64, answered: i64) {
        for (name, e) in std::mem::take(&mut self.expiring) {
            let shown = listed.contains(&name);
            if asked > e.upper_ms.saturating_add(TTL_MARGIN_MS) {
                if !shown {
                    self.sum.expiries_seen += 1;
                    self.deleted.insert(name);
                } else if e.maybe {
                    if e.unnamed {
                        self.unnamed.insert(name.clone());
                    }
                    if e.pinned {
                        self.pinned.insert(name.clone());
                    }
                    self.acked.insert(name, e.tokens);
                } else {
                    self.violation(format!(
                        "window {name} listed {} ms after its TTL passed",
                        asked - e.upper_ms
                    ));
                    self.deleted.insert(name);
                }
            } else if answered + TTL_MARGIN_MS < e.lower_ms {
                if shown {
                    self.expiring.insert(name, e);
                } else if e.unnamed {
                    self.sum.evictions_seen += 1;
                    self.deleted.insert(name);
                } else {
                    self.violation(format!(
                        "window {name} gone {} ms before its TTL",
                        e.lower_ms - answered
                    ));
                    self.deleted.insert(name);
                }
            } else if shown {
                self.expiring.insert(name, e);
            } else {
                self.sum.expiries_seen += 1;
                self.deleted.insert(name);
            }
        }
    }

    /// After [`Run::verify_all`]: every pinned freeze under an idempotency key that the kill
    /// cut off is sent again, as a client that never had its answer would (the engine's
    /// source blocks still hold its bytes: nothing wrote them since). When its window was
    /// there, the retry must be answered with that success (`replayed`, version 1) and never
    /// run again — the outcome record, or the origin in the window's manifest when the kill
    /// came before the record; when it was not, the retry runs (and must not claim a success
    /// no window shows).
    fn retry_cut_off(&mut self, c: &mut Client) -> Result<(), String> {
        for (name, req, tokens) in std::mem::take(&mut self.retries) {
            let there = self.acked.contains_key(&name);
            let v = c
                .call_final(req)
                .map_err(|e| format!("retry of {name}: {e}"))?;
            let replayed = v["replayed"] == true;
            match (ok(&v), there) {
                (true, true) => {
                    if replayed && v["window"]["version"] == 1 {
                        self.sum.retries_replayed += 1;
                        self.sum.retries_recovered += u64::from(v["recovered"] == true);
                    } else {
                        self.violation(format!(
                            "retry of keyed freeze {name}, committed before the kill, ran \
                             again: {v}"
                        ));
                    }
                }
                (true, false) if replayed => self.violation(format!(
                    "retry of keyed freeze {name} replayed a success no window shows: {v}"
                )),
                (true, false) => {
                    self.acked.insert(name, tokens);
                    self.sum.freezes_acked += 1;
                }
                (false, true) => self.violation(format!(
                    "retry of keyed freeze {name}, committed before the kill, refused: {v}"
                )),
                (false, false) => {
                    let full =
                        v.pointer("/error/code").and_then(Value::as_str) == Some("QUOTA_EXCEEDED");
                    if !full {
                        self.violation(format!("retry of keyed freeze {name} refused: {v}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, c: &mut Client, expect_no_garbage: bool) -> Result<(), String> {
        let v = c
            .call_final(json!({"op": "check"}))
            .map_err(|e| format!("check: {e}"))?;
        if let Some(vs) = v["violations"].as_array() {
            for x in vs {
                self.violation(format!("store invariant: {x}"));
            }
        }
        if expect_no_garbage {
            let g = v["garbage_bytes"].as_u64().unwrap_or(0);
            if g > 0 {
                self.violation(format!(
                    "{g} bytes of garbage left after compacting everything"
                ));
            }
        }
        Ok(())
    }

    /// A TTL of 1–5 s on an acknowledged window (its class kept). False when the connection
    /// broke (the kill).
    fn give_ttl(&mut self, c: &mut Client) -> bool {
        let i = self.rng.below(self.acked.len() as u64) as usize;
        let Some(name) = self.acked.keys().nth(i).cloned() else {
            return true;
        };
        let Some(tokens) = self.acked.remove(&name) else {
            return true;
        };
        let secs = [1i64, 2, 5][self.rng.below(3) as usize];
        let sent = cwm::clock::now_unix_ms();
        let e = Expiring {
            tokens,
            lower_ms: sent + secs * 1000,
            upper_ms: i64::MAX,
            maybe: true,
            unnamed: self.unnamed.remove(&name),
            pinned: self.pinned.remove(&name),
        };
        self.expiring.insert(name.clone(), e);
        let res = c.call_final(json!({"op": "ttl", "window": name, "seconds": secs}));
        let upper = cwm::clock::now_unix_ms() + secs * 1000;
        match res {
            Ok(v) if ok(&v) => {
                if let Some(e) = self.expiring.get_mut(&name) {
                    e.upper_ms = upper;
                    e.maybe = false;
                }
                self.sum.ttls_acked += 1;
            }
            Ok(v) => {
                // Not set: the window stays as it was — unless it was evicted.
                if let Some(e) = self.expiring.remove(&name) {
                    if e.unnamed {
                        self.unnamed.insert(name.clone());
                    }
                    if e.pinned {
                        self.pinned.insert(name.clone());
                    }
                    self.acked.insert(name.clone(), e.tokens);
                }
                let full =
                    v.pointer("/error/code").and_then(Value::as_str) == Some("QUOTA_EXCEEDED");
                if !full && !self.evicted(&name, &v) {
                    self.violation(format!("ttl of acknowledged {name} refused: {v}"));
                }
            }
            Err(_) => {
                if let Some(e) = self.expiring.get_mut(&name) {
                    e.upper_ms = upper;
                }
                return false;
            }
        }
        true
    }

    /// Random operations until the connection breaks (the kill) or `stop` is set.
    fn ops(&mut self, c: &mut Client, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            let r = self.rng.below(100);
            if r < 50 || self.acked.is_empty() {
                let name = format!("t{}", self.next_window);
                self.next_window += 1;
                let tokens = self.tokens_for_freeze();
                let n = tokens.len() / BS_TOKENS;
                let src: Vec<u64> = (0..n as u64).collect();
                for (i, &b) in src.iter().enumerate() {
                    for l in 0..LAYERS {
                        if self
                            .eng
                            .write_block(b, l, &block_bytes(&tokens, i, l))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                self.uncertain.insert(name.clone(), tokens.clone());
                let mut req = json!({"op": "freeze", "engine": "e1", "window": name,
                    "tokens": tokens, "block_ids": src});
                // Half the freezes carry an idempotency key: their outcome is committed as a
                // catalog record, so kills also land in catalog commits.
                if self.rng.below(2) == 0 {
                    req["idempotency_key"] = json!(format!("k-{name}"));
                }
                // A third are unnamed: evictable under the budget.
                // (Known unnamed before the answer: a freeze in flight at a kill that turns out
                // to have happened may be evicted like an acknowledged one.)
                if self.rng.below(3) == 0 {
                    req["class"] = json!("unnamed");
                    self.unnamed.insert(name.clone());
                }
                let retry = retry_of(&req);
                let res = c.call_final(req);
                match res {
                    Ok(v) if ok(&v) => {
                        self.uncertain.remove(&name);
                        self.acked.insert(name, tokens);
                        self.sum.freezes_acked += 1;
                    }
                    Ok(_) => {
                        // Refused (e.g. quota): it must not appear.
                        self.uncertain.remove(&name);
                    }
                    Err(_) => {
                        if let Some(req) = retry {
                            self.retries.push((name, req, tokens));
                        }
                        return;
                    }
                }
            } else if (50..53).contains(&r) && !self.pinned.is_empty() {
                // Unpin a pinned window: evictable from then on (also if the kill lands before
                // the answer: it may have happened).
                let i = self.rng.below(self.pinned.len() as u64) as usize;
                let Some(name) = self.pinned.iter().nth(i).cloned() else {
                    continue;
                };
                self.pinned.remove(&name);
                self.unnamed.insert(name.clone());
                match c.call_final(json!({"op": "unpin", "window": name})) {
                    Ok(v) if ok(&v) => self.sum.unpins_acked += 1,
                    Ok(v) => {
                        let full = v.pointer("/error/code").and_then(Value::as_str)
                            == Some("QUOTA_EXCEEDED");
                        if !full {
                            self.violation(format!("unpin of pinned {name} refused: {v}"));
                        }
                    }
                    Err(_) => return,
                }
            } else if (50..56).contains(&r) {
                // Pin a window (an unnamed one, when there is one, two times in three; else a
                // named one, which writes a retention record all the same): once acknowledged
                // it must never disappear, and stays pinned.
                let from = if !self.unnamed.is_empty() && self.rng.below(3) > 0 {
                    &self.unnamed
                } else {
                    &self.acked.keys().cloned().collect()
                };
                let i = self.rng.below(from.len().max(1) as u64) as usize;
                let Some(name) = from.iter().nth(i).cloned() else {
                    continue;
                };
                match c.call_final(json!({"op": "pin", "window": name})) {
                    Ok(v) if ok(&v) => {
                        self.unnamed.remove(&name);
                        self.pinned.insert(name);
                        self.sum.pins_acked += 1;
                    }
                    Ok(v) => {
                        // A full log refuses the pin's record (it stays unnamed); anything
                        // else but its eviction is wrong.
                        let full = v.pointer("/error/code").and_then(Value::as_str)
                            == Some("QUOTA_EXCEEDED");
                        if !full && !self.evicted(&name, &v) {
                            self.violation(format!("pin of acknowledged {name} refused: {v}"));
                        }
                    }
                    Err(_) => return,
                }
            } else if (56..59).contains(&r) {
                if !self.give_ttl(c) {
                    return;
                }
            } else if r < 75 || self.acked.len() > 48 {
                let i = self.rng.below(self.acked.len() as u64) as usize;
                let Some(name) = self.acked.keys().nth(i).cloned() else {
                    continue;
                };
                let Some(t) = self.acked.remove(&name) else {
                    continue;
                };
                self.pinned.remove(&name);
                self.uncertain.insert(name.clone(), t);
                let mut req = json!({"op": "delete", "window": name});
                if self.rng.below(2) == 0 {
                    req["idempotency_key"] = json!(format!("d-{name}"));
                }
                match c.call_final(req) {
                    Ok(v) if ok(&v) => {
                        self.uncertain.remove(&name);
                        self.unnamed.remove(&name);
                        self.deleted.insert(name);
                        self.sum.deletes_acked += 1;
                    }
                    Ok(v) if self.unnamed.contains(&name) => {
                        // Evicted before the delete (or refused: then it must still verify).
                        self.uncertain.remove(&name);
                        if !self.evicted(&name, &v) {
                            self.violation(format!("delete of acknowledged {name} refused: {v}"));
                        }
                    }
                    Ok(v) => {
                        self.violation(format!("delete of acknowledged {name} refused: {v}"));
                        self.uncertain.remove(&name);
                    }
                    Err(_) => return,
                }
            } else if r < 92 {
                let i = self.rng.below(self.acked.len() as u64) as usize;
                let Some((name, t)) = self
                    .acked
                    .iter()
                    .nth(i)
                    .map(|(n, t)| (n.clone(), t.clone()))
                else {
                    continue;
                };
                if self.verify_window(c, &name, &t).is_err() {
                    return;
                }
            } else {
                match c.call_final(json!({"op": "compact", "live_ratio": 0.9})) {
                    Ok(v) if ok(&v) => self.sum.compactions += 1,
                    Ok(v) => self.violation(format!("compact failed: {v}")),
                    Err(_) => return,
                }
            }
        }
    }
}

fn kill(child: &mut Child) {
    // SAFETY: kill on the pid of our own child, which we have not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// Runs the torture; the summary says whether anything was violated.
pub fn run(cfg: &TortureConfig) -> Result<TortureSummary, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let data = cfg
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("data"));
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).map_err(|e| format!("{}: {e}", shm.display()))?;
    let mut run = Run {
        exe: std::env::current_exe().map_err(|e| format!("current executable: {e}"))?,
        data,
        socket: tmp.path().join("cwm.sock"),
        eng: Arc::new(Engine::create(&shm)?),
        shm,
        rng: Rng(cfg.seed ^ 0x5DEE_CE66_D1CE_5EED),
        acked: BTreeMap::new(),
        uncertain: BTreeMap::new(),
        deleted: Default::default(),
        unnamed: Default::default(),
        pinned: Default::default(),
        expiring: BTreeMap::new(),
        retries: Vec::new(),
        next_window: 0,
        next_side: 0,
        sum: TortureSummary::default(),
    };
    let t0 = Instant::now();
    let deadline = Duration::from_secs(cfg.seconds);
    loop {
        let last = t0.elapsed() >= deadline
            || (cfg.max_cycles > 0 && run.sum.cycles + 1 >= cfg.max_cycles);
        run.sum.unsealed_older_seen += unsealed_older(&run.data);
        let mut child = run.spawn()?;
        // Sometimes kill during start-up: recovery itself must survive a crash.
        if !last && run.rng.below(8) == 0 {
            std::thread::sleep(Duration::from_millis(run.rng.below(40)));
            kill(&mut child);
            run.sum.kills += 1;
            run.sum.kills_in_recovery += 1;
            run.sum.cycles += 1;
            continue;
        }
        let mut c = match run.connect(&mut child) {
            Ok(c) => c,
            Err(e) => {
                kill(&mut child);
                return Err(e);
            }
        };
        let reg = c
            .call_final(run.eng.register())
            .map_err(|e| format!("register: {e}"))?;
        if !ok(&reg) {
            kill(&mut child);
            return Err(format!("register refused: {reg}"));
        }
        run.verify_all(&mut c)?;
        run.retry_cut_off(&mut c)?;
        run.sum.cycles += 1;
        run.sum.reused_segments_seen += reused_segments(&run.data);
        if last {
            // Compact everything; then no garbage may remain outside the append segment.
            for _ in 0..3 {
                let v = c
                    .call_final(json!({"op": "compact", "live_ratio": 1.0}))
                    .map_err(|e| format!("compact: {e}"))?;
                if !ok(&v) {
                    run.violation(format!("final compaction failed: {v}"));
                }
            }
            run.check(&mut c, true)?;
            drop(c);
            kill(&mut child);
            break;
        }
        if run.sum.cycles % 10 == 0 {
            for _ in 0..3 {
                let _ = c.call_final(json!({"op": "compact", "live_ratio": 1.0}));
            }
            run.check(&mut c, true)?;
        }
        // The op phase: a timer kills the server after a random delay.
        let delay = Duration::from_millis(1 + run.rng.below(cfg.kill_max_ms.max(1)));
        let pid = child.id() as i32;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill on our child's pid; it is reaped only after this thread is joined.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            stop2.store(true, Ordering::SeqCst);
        });
        let side = std::thread::scope(|s| {
            let (socket, eng, stop) = (run.socket.clone(), run.eng.clone(), &stop);
            let seed = run.rng.next();
            let first = run.next_side;
            let h = s.spawn(move || side_writer(&socket, &eng, seed, first, stop));
            run.ops(&mut c, stop);
            h.join().unwrap_or_default()
        });
        run.merge_side(side);
        let _ = killer.join();
        let _ = child.wait();
        run.sum.kills += 1;
    }
    if run.sum.violations > 0 && cfg.data_dir.is_none() {
        // Kept for whoever investigates (the data directory as the last open found it).
        let kept = tmp.keep();
        eprintln!(
            "torture: data directory kept at {}",
            kept.join("data").display()
        );
    }
    Ok(run.sum)
}

/// The headers of the segment files (`*.log`) in `dir`, in id order (the names are
/// zero-padded); `None` for a header that does not decode.
fn segment_headers(dir: &std::path::Path) -> Vec<Option<cwm::store::format::SegmentHeader>> {
    use std::io::Read;
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|x| x == "log"));
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let mut h = [0u8; cwm::store::format::SegmentHeader::LEN];
            std::fs::File::open(p)
                .and_then(|mut f| f.read_exact(&mut h))
                .ok()?;
            cwm::store::format::SegmentHeader::decode(&h).ok()
        })
        .collect()
}

/// Segment files in `dir` other than the newest whose header records no sealed length.
fn unsealed_older(dir: &std::path::Path) -> u64 {
    let mut hs = segment_headers(dir);
    hs.pop();
    hs.iter().flatten().filter(|h| h.sealed_len == 0).count() as u64
}

/// Segment files in `dir` whose header carries a record limit: written into a reused file.
fn reused_segments(dir: &std::path::Path) -> u64 {
    segment_headers(dir)
        .iter()
        .flatten()
        .filter(|h| h.record_limit != 0)
        .count() as u64
}

/// Copies the plain files of `from` into `to` (created).
fn copy_flat(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}
