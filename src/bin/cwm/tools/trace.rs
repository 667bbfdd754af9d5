//! `cwm bench trace`: replays a request trace (Mooncake JSONL: `timestamp`, `input_length`,
//! `output_length`, `hash_ids` = one id per 512-token block, equal ids = equal prefixes)
//! against the real store with automatic saving and eviction, and simulates the same trace
//! under the window-level eviction policies (the store's own ordering code) and two block-level
//! references: LRU and Belady's offline bound (evict the block used farthest in the future).
//!
//! Hits are prefix hits: the longest prefix of a prompt's blocks found stored, counted in
//! blocks over all prompt blocks (and in tokens, capped at the prompt's length).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::Instant;

use cwm::prng::Rng;
use cwm::store::retention::{order, Cand};
use cwm::store::{BlockDesc, Class, EvictionPolicy, Retention, Store, StoreConfig, WindowSpec};
use serde::Serialize;

/// Tokens per trace block.
pub const BLOCK_TOKENS: u64 = 512;

/// One request of a trace.
#[derive(Debug, Clone)]
pub struct Req {
    /// Prompt tokens.
    pub input: u64,
    /// Prompt blocks (chained ids).
    pub ids: Vec<u64>,
}

/// Reads a Mooncake-format JSONL trace.
pub fn load(path: &Path) -> Result<Vec<Req>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        let ids: Vec<u64> = v["hash_ids"]
            .as_array()
            .ok_or_else(|| format!("{}:{}: no hash_ids", path.display(), i + 1))?
            .iter()
            .map(|x| x.as_u64().ok_or("a hash id is not an integer"))
            .collect::<Result<_, _>>()?;
        let input = v["input_length"]
            .as_u64()
            .unwrap_or(ids.len() as u64 * BLOCK_TOKENS);
        out.push(Req { input, ids });
    }
    Ok(out)
}

/// A synthetic trace with a different reuse pattern than the Mooncake one.
/// `agents`: agent loops — a few long shared tool prompts, each agent's conversation growing by
/// a block or two a step, agents interleaved. `chats`: many short chats behind a short shared
/// system prompt, a Zipf-like few coming back for more turns.
pub fn synthetic(kind: &str, n: usize, seed: u64) -> Result<Vec<Req>, String> {
    let mut r = Rng(seed | 1);
    let mut next_id = 1_000_000u64;
    let mut fresh = |k: usize| -> Vec<u64> {
        (0..k)
            .map(|_| {
                next_id += 1;
                next_id
            })
            .collect()
    };
    let mut out = Vec::with_capacity(n);
    match kind {
        "agents" => {
            let tools: Vec<Vec<u64>> = (0..3).map(|_| fresh(24)).collect();
            let mut convs: Vec<Vec<u64>> = Vec::new();
            while out.len() < n {
                // A new agent now and then; otherwise a step of a live one (recent ones more).
                if convs.is_empty() || r.below(8) == 0 {
                    let mut c = tools[r.below(3) as usize].clone();
                    c.extend(fresh(1 + r.below(3) as usize));
                    convs.push(c);
                } else {
                    let live = convs.len().min(24);
                    let i = convs.len() - 1 - r.below(live as u64) as usize;
                    let more = fresh(1 + r.below(2) as usize);
                    convs[i].extend(more);
                }
                let c = convs.last().map_or_else(Vec::new, Clone::clone);
                let pick = if r.below(4) == 0 {
                    c
                } else {
                    convs[convs.len() - 1 - r.below(convs.len().min(24) as u64) as usize].clone()
                };
                out.push(Req {
                    input: pick.len() as u64 * BLOCK_TOKENS,
                    ids: pick,
                });
            }
        }
        "chats" => {
            let system = fresh(2);
            let mut chats: Vec<Vec<u64>> = Vec::new();
            while out.len() < n {
                let c = if chats.is_empty() || r.below(3) != 0 {
                    let mut c = system.clone();
                    c.extend(fresh(1 + r.below(3) as usize));
                    chats.push(c.clone());
                    c
                } else {
                    // Zipf-like: a low rank comes back more often.
                    let rank = (r.below(chats.len() as u64) * r.below(chats.len() as u64))
                        / chats.len() as u64;
                    let i = chats.len() - 1 - rank as usize;
                    let more = fresh(1);
                    chats[i].extend(more);
                    chats[i].clone()
                };
                out.push(Req {
                    input: c.len() as u64 * BLOCK_TOKENS,
                    ids: c,
                });
            }
        }
        k => {
            return Err(format!(
                "unknown synthetic trace {k:?}: use agents or chats"
            ))
        }
    }
    Ok(out)
}

/// Prefix hits over a trace.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Hits {
    /// Prompt blocks served from the cache / all prompt blocks.
    pub block_ratio: f64,
    /// Prompt tokens served / all prompt tokens.
    pub token_ratio: f64,
}

struct Counter {
    blocks: u64,
    hit_blocks: u64,
    tokens: u64,
    hit_tokens: u64,
}

impl Counter {
    fn new() -> Self {
        Counter {
            blocks: 0,
            hit_blocks: 0,
            tokens: 0,
            hit_tokens: 0,
        }
    }
    fn add(&mut self, r: &Req, hit: usize) {
        self.blocks += r.ids.len() as u64;
        self.hit_blocks += hit as u64;
        self.tokens += r.input;
        self.hit_tokens += (hit as u64 * BLOCK_TOKENS).min(r.input);
    }
    fn hits(&self) -> Hits {
        Hits {
            block_ratio: self.hit_blocks as f64 / self.blocks.max(1) as f64,
            token_ratio: self.hit_tokens as f64 / self.tokens.max(1) as f64,
        }
    }
}

/// Distinct blocks of a trace.
#[must_use]
pub fn unique_blocks(reqs: &[Req]) -> usize {
    reqs.iter()
        .flat_map(|r| r.ids.iter())
        .collect::<HashSet<_>>()
        .len()
}

/// Block-level LRU with `cap` blocks.
#[must_use]
pub fn block_lru(reqs: &[Req], cap: usize) -> Hits {
    let mut c = Counter::new();
    let mut stamp: HashMap<u64, u64> = HashMap::new();
    let mut by_age: BTreeSet<(u64, u64)> = BTreeSet::new();
    for (t, r) in reqs.iter().enumerate() {
        let hit = r.ids.iter().take_while(|k| stamp.contains_key(k)).count();
        c.add(r, hit);
        for &k in &r.ids {
            if let Some(old) = stamp.insert(k, t as u64) {
                by_age.remove(&(old, k));
            }
            by_age.insert((t as u64, k));
        }
        while stamp.len() > cap {
            let Some((_, k)) = by_age.pop_first() else {
                break;
            };
            stamp.remove(&k);
        }
    }
    c.hits()
}

/// Belady's offline bound at block level with `cap` blocks: on overflow, evict the block whose
/// next use is farthest (never used again first).
#[must_use]
pub fn belady(reqs: &[Req], cap: usize) -> Hits {
    let mut uses: HashMap<u64, VecDeque<usize>> = HashMap::new();
    for (t, r) in reqs.iter().enumerate() {
        for &k in &r.ids {
            uses.entry(k).or_default().push_back(t);
        }
    }
    let mut c = Counter::new();
    let mut next: HashMap<u64, usize> = HashMap::new(); // cached block -> its next use
    let mut by_next: BTreeSet<(usize, u64)> = BTreeSet::new();
    for (t, r) in reqs.iter().enumerate() {
        let hit = r.ids.iter().take_while(|k| next.contains_key(k)).count();
        c.add(r, hit);
        for &k in &r.ids {
            let q = uses.entry(k).or_default();
            while q.front().is_some_and(|&u| u <= t) {
                q.pop_front();
            }
            let n = q.front().copied().unwrap_or(usize::MAX);
            if let Some(old) = next.insert(k, n) {
                by_next.remove(&(old, k));
            }
            by_next.insert((n, k));
        }
        while next.len() > cap {
            let Some((_, k)) = by_next.pop_last() else {
                break;
            };
            next.remove(&k);
        }
    }
    c.hits()
}

/// The store's model at window level, simulated: every request saved as an unnamed window of
/// its blocks (deduplicated, reference-counted), looked up by longest stored prefix, evicted
/// by `policy` (the store's own ordering) from the high to the low watermark of `cap` blocks.
#[must_use]
pub fn simulate(reqs: &[Req], cap: usize, policy: EvictionPolicy, marks: (f64, f64)) -> Hits {
    struct W {
        keys: Vec<u64>,
        seq: u64,
        last_use: i64,
        hits: u64,
    }
    let mut c = Counter::new();
    let mut windows: HashMap<String, W> = HashMap::new();
    let mut refs: HashMap<u64, u64> = HashMap::new();
    // Block -> a window holding it (newest first), to count the hit on it.
    let mut holder: HashMap<u64, Vec<String>> = HashMap::new();
    let (high, low) = (
        (cap as f64 * marks.0) as usize,
        (cap as f64 * marks.1) as usize,
    );
    for (t, r) in reqs.iter().enumerate() {
        let hit = r.ids.iter().take_while(|k| refs.contains_key(k)).count();
        c.add(r, hit);
        if hit > 0 {
            let k = r.ids[hit - 1];
            if let Some(n) = holder
                .get(&k)
                .and_then(|v| v.iter().rev().find(|n| windows.contains_key(*n)))
            {
                if let Some(w) = windows.get_mut(n) {
                    w.last_use = t as i64;
                    w.hits += 1;
                }
            }
        }
        let name = format!("r{t}");
        for &k in &r.ids {
            *refs.entry(k).or_default() += 1;
            holder.entry(k).or_default().push(name.clone());
        }
        windows.insert(
            name,
            W {
                keys: r.ids.clone(),
                seq: t as u64,
                last_use: t as i64,
                hits: 0,
            },
        );
        if refs.len() > high {
            let cands: Vec<Cand> = windows
                .iter()
                .map(|(n, w)| Cand {
                    name: n.clone(),
                    version: 1,
                    seq: w.seq,
                    last_use: w.last_use,
                    hits: w.hits,
                    bytes: w.keys.len() as u64,
                })
                .collect();
            for v in order(cands, policy, cap as u64) {
                if refs.len() <= low {
                    break;
                }
                if let Some(w) = windows.remove(&v.name) {
                    for k in w.keys {
                        if let Some(n) = refs.get_mut(&k) {
                            *n -= 1;
                            if *n == 0 {
                                refs.remove(&k);
                                holder.remove(&k);
                            }
                        }
                    }
                }
            }
        }
    }
    c.hits()
}

/// A replay against the real store.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// Prefix hits.
    pub hits: Hits,
    /// Windows evicted.
    pub evicted: u64,
    /// Requests saved per second (each a durable window: blocks not stored yet, manifest,
    /// fdatasync).
    pub saves_per_sec: f64,
    /// Lookup latency, µs.
    pub lookup_p50_us: f64,
    /// Lookup latency, µs.
    pub lookup_p99_us: f64,
    /// Block payload bytes per trace block (scaled down from a real model's).
    pub payload_bytes: u64,
}

/// Replays `reqs` against a store in `dir` with a budget of `cap` blocks' records.
pub fn replay(
    reqs: &[Req],
    dir: &Path,
    cap: usize,
    policy: EvictionPolicy,
    marks: (f64, f64),
) -> Result<Replay, String> {
    const PAYLOAD: u64 = 4032; // the largest payload that fits its record's header page
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut cfg = StoreConfig::new(dir);
    cfg.segment_size = 64 << 20;
    let (store, _) = Store::open(cfg).map_err(|x| e(&x))?;
    let budget = cap as u64 * cwm::store::format::record_len(PAYLOAD);
    let payload = vec![7u8; PAYLOAD as usize];
    let mut c = Counter::new();
    let (mut lookups, mut evicted, mut save_secs) = (Vec::new(), 0u64, 0.0);
    for (t, r) in reqs.iter().enumerate() {
        let keys: Vec<u128> = r.ids.iter().map(|&k| u128::from(k) + 1).collect();
        let t0 = Instant::now();
        let found = store.longest_prefix(&keys, None).map_err(|x| e(&x))?;
        lookups.push(t0.elapsed().as_secs_f64() * 1e6);
        let hit = found.as_ref().map_or(0, |(_, n)| *n);
        if let Some((w, _)) = &found {
            store.record_hit(&w.name);
        }
        c.add(r, hit);
        let spec = WindowSpec {
            name: format!("r{t}"),
            session: "trace".into(),
            namespace: "trace".into(),
            layout: b"{}".to_vec(),
            tokens: Vec::new(),
            blocks: keys
                .iter()
                .map(|&key| BlockDesc { key, len: PAYLOAD })
                .collect(),
            retention: Retention {
                class: Class::Unnamed,
                expires_unix_ms: None,
            },
            ..Default::default()
        };
        let payloads: Vec<&[u8]> = keys.iter().map(|_| payload.as_slice()).collect();
        let t0 = Instant::now();
        store.put_window(spec, &payloads).map_err(|x| e(&x))?;
        save_secs += t0.elapsed().as_secs_f64();
        if store.block_bytes().map_err(|x| e(&x))? as f64 > marks.0 * budget as f64 {
            let rep = store
                .evict(policy, (marks.1 * budget as f64) as u64, budget)
                .map_err(|x| e(&x))?;
            evicted += rep.evicted.len() as u64;
        }
    }
    lookups.sort_by(f64::total_cmp);
    let pct = |p: f64| lookups[((lookups.len() - 1) as f64 * p) as usize];
    Ok(Replay {
        hits: c.hits(),
        evicted,
        saves_per_sec: reqs.len() as f64 / save_secs.max(1e-9),
        lookup_p50_us: pct(0.5),
        lookup_p99_us: pct(0.99),
        payload_bytes: PAYLOAD,
    })
}

/// One capacity point of `cwm bench trace`.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Capacity as a fraction of the trace's unique blocks.
    pub capacity_fraction: f64,
    /// Capacity in blocks.
    pub capacity_blocks: usize,
    /// Simulated, window level, per policy (the store's ordering).
    pub lru: Hits,
    /// Same, S3-FIFO.
    pub s3fifo: Hits,
    /// Same, FIFO (write order).
    pub fifo: Hits,
    /// Block-level LRU (reference).
    pub block_lru: Hits,
    /// Belady's offline bound, block level.
    pub belady: Hits,
    /// The policy asked for, replayed against the real store (when asked).
    pub store: Option<Replay>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct TraceBench {
    /// Where the trace came from.
    pub trace: String,
    /// Requests.
    pub requests: usize,
    /// Distinct blocks.
    pub unique_blocks: usize,
    /// Prompt blocks in all.
    pub prompt_blocks: usize,
    /// Policy replayed against the store.
    pub policy: EvictionPolicy,
    /// High and low watermarks (fractions of the capacity) of the simulations and the replay.
    pub watermarks: (f64, f64),
    /// One per capacity.
    pub points: Vec<Point>,
}

/// What `cwm bench trace` runs.
pub struct Plan {
    /// Capacities, as fractions of the unique blocks.
    pub fractions: Vec<f64>,
    /// The policy replayed against the real store.
    pub policy: EvictionPolicy,
    /// The capacities at which it is.
    pub replay_at: Vec<f64>,
    /// High and low watermarks.
    pub marks: (f64, f64),
}

/// Runs the simulations at each capacity fraction, and the real-store replay of the plan's
/// policy at those it lists.
pub fn bench(
    trace: &str,
    reqs: &[Req],
    plan: &Plan,
    dir: &Path,
    progress: &crate::progress::Progress,
) -> Result<TraceBench, String> {
    let Plan {
        fractions,
        policy,
        replay_at,
        marks,
    } = plan;
    let (policy, marks) = (*policy, *marks);
    let unique = unique_blocks(reqs);
    let mut points = Vec::new();
    for (i, &f) in fractions.iter().enumerate() {
        progress.update("capacities", i as u64, fractions.len() as u64, "");
        let cap = ((unique as f64 * f) as usize).max(1);
        let store = if replay_at.iter().any(|x| (x - f).abs() < 1e-9) {
            let tmp = tempfile::Builder::new()
                .prefix("cwm-bench-trace-")
                .tempdir_in(dir)
                .map_err(|e| e.to_string())?;
            Some(replay(reqs, tmp.path(), cap, policy, marks)?)
        } else {
            None
        };
        points.push(Point {
            capacity_fraction: f,
            capacity_blocks: cap,
            lru: simulate(reqs, cap, EvictionPolicy::Lru, marks),
            s3fifo: simulate(reqs, cap, EvictionPolicy::S3fifo, marks),
            fifo: simulate(reqs, cap, EvictionPolicy::Fifo, marks),
            block_lru: block_lru(reqs, cap),
            belady: belady(reqs, cap),
            store,
        });
    }
    progress.finish();
    Ok(TraceBench {
        trace: trace.to_string(),
        requests: reqs.len(),
        unique_blocks: unique,
        prompt_blocks: reqs.iter().map(|r| r.ids.len()).sum(),
        policy,
        watermarks: marks,
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64]) -> Req {
        Req {
            input: ids.len() as u64 * BLOCK_TOKENS,
            ids: ids.to_vec(),
        }
    }

    #[test]
    fn prefix_hits_and_bounds() {
        // A shared prefix [1, 2] reused by three requests.
        let t = vec![req(&[1, 2, 3]), req(&[1, 2, 4]), req(&[9]), req(&[1, 2, 5])];
        assert_eq!(unique_blocks(&t), 6);
        let big = block_lru(&t, 100);
        // Hits: 0, 2, 0, 2 of 3 + 3 + 1 + 3 = 10 prompt blocks.
        assert!((big.block_ratio - 0.4).abs() < 1e-9, "{big:?}");
        assert!((belady(&t, 100).block_ratio - 0.4).abs() < 1e-9);
        let lru = simulate(&t, 100, EvictionPolicy::Lru, (0.9, 0.8));
        assert!((lru.block_ratio - 0.4).abs() < 1e-9);
        // With room for 3 blocks Belady keeps 1 and 2 (used again) and beats LRU.
        assert!(belady(&t, 3).block_ratio >= block_lru(&t, 3).block_ratio);
        assert_eq!(belady(&t, 0).block_ratio, 0.0);
    }

    #[test]
    fn synthetic_traces_are_chains_with_reuse() {
        for kind in ["agents", "chats"] {
            let t = synthetic(kind, 500, 3).unwrap();
            assert_eq!(t.len(), 500);
            let unlimited = block_lru(&t, usize::MAX).block_ratio;
            assert!(unlimited > 0.3, "{kind}: reuse {unlimited}");
        }
        assert!(synthetic("nope", 1, 1).is_err());
    }
}
