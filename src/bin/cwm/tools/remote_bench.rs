//! `cwm bench remote`: a window pushed to and pulled from a Redis Cluster through cwm, against
//! the raw `redis` client moving the same bytes (same value size, same pipeline batches, one
//! connection) in the same run. Without `--remote`, a throwaway 3-master cluster of Debian's
//! `redis-server` is started on loopback and stopped at the end.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::progress::Progress;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::synthetic::Synthetic;
use cwm::remote::{
    fill_prefix, pull_window, pull_window_since, push_window, Expect, Remote, RemoteConfig,
};
use cwm::store::{BlockDesc, Replace, Store, StoreConfig, WindowSpec};
use cwm::tier::RamTier;

/// Result of `cwm bench remote`.
#[derive(Debug, Serialize)]
pub struct RemoteBench {
    /// Where the cluster was: `local` (started by the bench) or the URLs given.
    pub cluster: String,
    /// Payload bytes of the window.
    pub bytes: u64,
    /// Bytes per block.
    pub block_bytes: u64,
    /// Largest value written (blocks above it are split).
    pub max_value: u64,
    /// Push through cwm (read from the local log, probe, write missing blocks, publish), GB/s.
    pub push_gbps: f64,
    /// Raw pipelined `SET`s of the same bytes in values of the same sizes, GB/s.
    pub raw_set_gbps: f64,
    /// `push_gbps / raw_set_gbps`.
    pub push_ratio: f64,
    /// Pull through cwm (fetch, verify, write into another instance's log, commit), GB/s.
    pub pull_gbps: f64,
    /// Raw pipelined `GET`s of the same bytes, GB/s.
    pub raw_get_gbps: f64,
    /// `pull_gbps / raw_get_gbps`.
    pub pull_ratio: f64,
    /// Raw O_DIRECT write + fdatasync of the same bytes to the pulling instance's disk, GB/s
    /// (a pull ends durable in the local log: it cannot beat this either).
    pub raw_disk_write_gbps: f64,
    /// `pull_gbps / min(raw_get_gbps, raw_disk_write_gbps)`.
    pub pull_ratio_of_slower: f64,
    /// A fill of the same blocks found by their keys (what a thaw of a prefix found by an
    /// automatic lookup does before it scatters: fetch, verify against the value's header,
    /// write into a third instance's log, commit), GB/s.
    pub fill_gbps: f64,
    /// `fill_gbps / raw_get_gbps`.
    pub fill_ratio: f64,
    /// A pull into the engine as the daemon's thaw of a window it does not hold runs it:
    /// the window pulled into a fresh instance's log while each verified batch is scattered
    /// into a synthetic engine, GB/s of the whole (`None` when the block size is not a whole
    /// number of 64 KiB layers).
    pub engine_pull_gbps: Option<f64>,
    /// `engine_pull_gbps / raw_get_gbps` (goal ≥ 0.80).
    pub engine_pull_ratio: Option<f64>,
    /// The same one after the other: the pull (into a RAM tier too), then a thaw of the
    /// committed window from that tier (verify + scatter), GB/s.
    pub engine_pull_via_ram_gbps: Option<f64>,
    /// One after the other without a RAM tier: the thaw reads the blocks back from the log
    /// they were just written to, GB/s.
    pub engine_pull_from_disk_gbps: Option<f64>,
    /// Lookups through an in-process daemon whose prompts were stored by another instance:
    /// latency of the whole lookup (client round trip, local index, the tier's probe).
    pub lookup: LookupBench,
}

/// Lookup latency through the shared tier.
#[derive(Debug, Serialize)]
pub struct LookupBench {
    /// Windows (prompts of 4 blocks) stored in the tier before.
    pub windows: u64,
    /// Lookups made of each kind.
    pub lookups: u64,
    /// Prompts of a stored window plus 4 blocks more: found in the tier (4 blocks matched).
    pub hit_p50_ms: f64,
    /// 99th percentile of the hits.
    pub hit_p99_ms: f64,
    /// Prompts stored nowhere, first asked: a definite miss (one probe).
    pub miss_p50_ms: f64,
    /// 99th percentile of the first misses.
    pub miss_p99_ms: f64,
    /// The same prompts again: remembered misses (no request to the tier).
    pub cached_miss_p99_ms: f64,
    /// The same lookups against a daemon without a tier (client round trip and local index
    /// only: the floor), p99.
    pub local_only_p99_ms: f64,
}

/// A local cluster for the bench, killed when dropped.
struct LocalCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

fn port_free(p: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
}

fn start_cluster(dir: &Path) -> Result<LocalCluster, String> {
    let mut ports = Vec::new();
    // Ports and bus ports (+10000) below the ephemeral range, which outgoing connections use.
    let mut p = 11000 + (std::process::id() % 10000) as u16;
    while ports.len() < 3 {
        p = if p >= 21990 { 11000 } else { p + 1 };
        if port_free(p) && port_free(p + 10000) {
            ports.push(p);
        }
    }
    let mut c = LocalCluster {
        nodes: Vec::new(),
        ports: ports.clone(),
    };
    for &port in &ports {
        let d = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("redis-server: {e} (install Debian's redis-server, or pass --remote)")
            })?;
        c.nodes.push(child);
    }
    let cli = |port: u16, args: &[&str]| -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let t = Instant::now();
    let wait = |ok: &dyn Fn() -> bool, what: &str| -> Result<(), String> {
        while !ok() {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("local cluster: timed out waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    for &port in &ports {
        wait(&|| cli(port, &["PING"]).trim() == "PONG", "PING")?;
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args: Vec<&str> = vec!["--cluster", "create"];
    args.extend(addrs.iter().map(String::as_str));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    let out = cli(ports[0], &args);
    if !out.contains("All 16384 slots covered") {
        return Err(format!("local cluster: create failed: {out}"));
    }
    for &port in &ports {
        wait(
            &|| cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"),
            "cluster_state:ok",
        )?;
    }
    Ok(c)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / secs / 1e9
    }
}

/// Runs the bench: a window of `bytes` in blocks of `block` bytes, values of at most
/// `max_value`; then lookups over `lookup_windows` stored prompts.
pub fn remote(
    dir: &Path,
    urls: Option<String>,
    (bytes, block, max_value): (u64, u64, u64),
    lookup_windows: u64,
    p: &Progress,
) -> Result<RemoteBench, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let tmp = tempfile::Builder::new()
        .prefix("cwm-bench-remote-")
        .tempdir_in(dir)
        .map_err(|x| e(&x))?;
    let (_local, nodes, cluster) = match urls {
        Some(u) => (None, u.split(',').map(String::from).collect::<Vec<_>>(), u),
        None => {
            let c = start_cluster(tmp.path())?;
            let nodes = c
                .ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect();
            (Some(c), nodes, "local".to_string())
        }
    };
    let prefix = format!("cwm-bench-{}", std::process::id());
    let remote = Remote::connect(RemoteConfig {
        nodes,
        prefix: prefix.clone(),
        max_value: max_value as usize,
        block_ttl: Duration::from_secs(3600),
        ..Default::default()
    })
    .map_err(|x| e(&x))?;
    let n = bytes.div_ceil(block).max(1) as usize;
    let stamp = u128::from(std::process::id()) << 64;
    let keys: Vec<u128> = (0..n as u128).map(|i| stamp | (i + 1)).collect();
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut v = vec![0u8; block as usize];
            cwm::prng::fill_random(&mut v, i as u64 + 1);
            v
        })
        .collect();
    p.update("remote", 0, 5, "storing the window locally");
    let (a, _) = Store::open(StoreConfig::new(tmp.path().join("a"))).map_err(|x| e(&x))?;
    let syn = bench_engine(block, n)?;
    let mut spec = spec("bench", &keys, block);
    if let Some(s) = &syn {
        spec.layout = s.engine.layout.to_json();
        spec.namespace = s.engine.namespace_with(None, &s.engine.layout).label();
    }
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    a.put_window(spec, &refs).map_err(|x| e(&x))?;
    // The raw client's values: the same bytes, cut at the same value size.
    let chunk = max_value as usize - cwm::remote::value::BLOCK_HEADER;
    let raw: Vec<(String, &[u8])> = payloads
        .iter()
        .enumerate()
        .flat_map(|(i, pl)| {
            let prefix = &prefix;
            pl.chunks(chunk)
                .enumerate()
                .map(move |(j, c)| (format!("{prefix}:raw:{i}:{j}"), c))
        })
        .collect();
    let client =
        redis::cluster::ClusterClient::new(remote.config().nodes.clone()).map_err(|x| e(&x))?;
    let mut conn = client.get_connection().map_err(|x| e(&x))?;
    let batch = 64usize << 20;
    p.update("remote", 1, 5, "raw SET");
    let t = Instant::now();
    for group in batches(&raw, batch) {
        let mut pipe = redis::cluster::cluster_pipe();
        for (k, v) in group {
            pipe.cmd("SET").arg(k).arg(*v).ignore();
        }
        pipe.query::<()>(&mut conn).map_err(|x| e(&x))?;
    }
    let raw_set = t.elapsed().as_secs_f64();
    p.update("remote", 2, 5, "push");
    let t = Instant::now();
    push_window(&a, &remote, "bench", Some(Expect::Any)).map_err(|x| e(&x))?;
    let push = t.elapsed().as_secs_f64();
    p.update("remote", 3, 5, "raw GET");
    let t = Instant::now();
    let mut got = 0u64;
    for group in batches(&raw, batch) {
        let mut pipe = redis::cluster::cluster_pipe();
        for (k, _) in group {
            pipe.cmd("GET").arg(k);
        }
        let vals: Vec<Vec<u8>> = pipe.query(&mut conn).map_err(|x| e(&x))?;
        got += vals.iter().map(|v| v.len() as u64).sum::<u64>();
    }
    let raw_get = t.elapsed().as_secs_f64();
    if got != n as u64 * block {
        return Err(format!("raw GET read {got} bytes of {}", n as u64 * block));
    }
    p.update("remote", 4, 5, "pull");
    let (b, _) = Store::open(StoreConfig::new(tmp.path().join("b"))).map_err(|x| e(&x))?;
    let t = Instant::now();
    let r = pull_window(&b, &remote, "bench", Replace::No).map_err(|x| e(&x))?;
    let pull = t.elapsed().as_secs_f64();
    if r.fetched != n as u64 {
        return Err(format!("pull fetched {} of {n} blocks", r.fetched));
    }
    // Leave nothing behind on a cluster that was given.
    let mut pipe = redis::cluster::cluster_pipe();
    for (k, _) in &raw {
        pipe.cmd("DEL").arg(k).ignore();
    }
    for (i, k) in keys.iter().enumerate() {
        for part in 0..payloads[i].len().div_ceil(chunk).max(1) {
            pipe.cmd("DEL")
                .arg(remote.block_key(*k, part as u32))
                .ignore();
        }
    }
    p.update("remote", 5, 5, "fill");
    let fill = fill_once(tmp.path(), &remote, &keys, block)?;
    drop(b);
    let engine_pull = engine_pulls(tmp.path(), &remote, syn.as_ref(), n)?;
    let _ = pipe.query::<()>(&mut conn);
    let lookup = lookups(tmp.path(), &remote, lookup_windows, p)?;
    let total = n as u64 * block;
    let eng = cwm::io::build_engine(cwm::io::EngineKind::Uring, 32);
    let (raw_write, _) =
        crate::tools::bench::raw_disk(eng.as_ref(), tmp.path(), total, block as usize, 32)
            .map_err(|x| e(&x))?;
    let (push_gbps, raw_set_gbps) = (gbps(total, push), gbps(total, raw_set));
    let (pull_gbps, raw_get_gbps) = (gbps(total, pull), gbps(total, raw_get));
    Ok(RemoteBench {
        cluster,
        bytes: total,
        block_bytes: block,
        max_value,
        push_gbps,
        raw_set_gbps,
        push_ratio: push_gbps / raw_set_gbps.max(f64::MIN_POSITIVE),
        pull_gbps,
        raw_get_gbps,
        pull_ratio: pull_gbps / raw_get_gbps.max(f64::MIN_POSITIVE),
        raw_disk_write_gbps: raw_write,
        pull_ratio_of_slower: pull_gbps / raw_get_gbps.min(raw_write).max(f64::MIN_POSITIVE),
        fill_gbps: gbps(total, fill),
        fill_ratio: gbps(total, fill) / raw_get_gbps.max(f64::MIN_POSITIVE),
        engine_pull_gbps: engine_pull.map(|(t, _, _)| gbps(total, t)),
        engine_pull_ratio: engine_pull
            .map(|(t, _, _)| gbps(total, t) / raw_get_gbps.max(f64::MIN_POSITIVE)),
        engine_pull_via_ram_gbps: engine_pull.map(|(_, r, _)| gbps(total, r)),
        engine_pull_from_disk_gbps: engine_pull.map(|(_, _, d)| gbps(total, d)),
        lookup,
    })
}

/// Bytes of one layer of a 16-token block of the bench's synthetic engine (K and V, 8 heads
/// of 128, bf16).
const LAYER_BYTES: u64 = 2 * 16 * 8 * 128 * 2;

/// A synthetic engine whose blocks are the window's (Llama-shaped: 8 KV heads of 128, bf16,
/// 16 tokens, as many layers as make `block` bytes) with room for `n` of them; `None` when
/// `block` is not a whole number of layers. The window carries its layout and namespace, so
/// it can be thawed into it.
fn bench_engine(block: u64, n: usize) -> Result<Option<Synthetic>, String> {
    if block % LAYER_BYTES != 0 {
        return Ok(None);
    }
    let layers = (block / LAYER_BYTES) as u32;
    let layout = Layout::flash_2nbhd(layers, n as u64 + 8, 16, 8, 128, Dtype::Bf16);
    Synthetic::new(layout, "bench", 3)
        .map(Some)
        .map_err(|x| x.to_string())
}

/// Seconds of a pull into `syn`'s engine each way ([`Route`]: as it arrives, then via the
/// RAM tier, then from the disk); `None` without an engine.
fn engine_pulls(
    dir: &Path,
    remote: &Remote,
    syn: Option<&Synthetic>,
    n: usize,
) -> Result<Option<(f64, f64, f64)>, String> {
    let Some(syn) = syn else { return Ok(None) };
    let go = |how| engine_pull(dir, remote, &syn.engine, n, how);
    Ok(Some((
        go(Route::Streamed)?,
        go(Route::ViaRam)?,
        go(Route::FromDisk)?,
    )))
}

/// How a pull reaches the engine in [`engine_pull`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Each verified batch scattered as it arrives, beside its write to the log.
    Streamed,
    /// The pull (its blocks also into a RAM tier), then a thaw from that tier.
    ViaRam,
    /// The pull, then a thaw reading the blocks back from the log.
    FromDisk,
}

/// Seconds a pull of window "bench" (`n` blocks) into a fresh store and into `eng` takes,
/// the way `how` says (the bench fails unless every block reaches the engine that way).
fn engine_pull(
    dir: &Path,
    remote: &Remote,
    eng: &cwm::pipeline::Engine,
    n: usize,
    how: Route,
) -> Result<f64, String> {
    use cwm::pipeline::{thaw, PipelineConfig, StreamThaw, ThawOptions, ThawRequest};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let bb = eng.layout.block_bytes();
    let d = dir.join(match how {
        Route::Streamed => "engine-streamed",
        Route::ViaRam => "engine-ram",
        Route::FromDisk => "engine-disk",
    });
    let (store, _) = Store::open(StoreConfig::new(&d)).map_err(|x| e(&x))?;
    let cfg = PipelineConfig::default();
    let io = cwm::io::build_engine(cwm::io::EngineKind::Uring, 32);
    eng.prepare_staging(&cfg, io.as_ref()).map_err(|x| e(&x))?;
    let ram = how == Route::ViaRam;
    let tier = RamTier::new(if ram { bb * n as u64 + (64 << 20) } else { 0 });
    tier.prepare(bb as usize);
    let req = ThawRequest {
        prefix: false,
        first_block: 0,
        window: "bench".into(),
        block_ids: (0..n as u64).collect(),
        expect_tokens: None,
        salt: None,
    };
    let t = Instant::now();
    let mut sink = StreamThaw::new(eng, &req, &cfg, None, None, 1.0);
    let streamed = how == Route::Streamed;
    let r = pull_window_since(
        &store,
        remote,
        "bench",
        Replace::No,
        0,
        Some(&tier),
        streamed.then_some(&mut sink as &mut dyn cwm::remote::BlockSink),
    )
    .map_err(|x| e(&x))?;
    let rep = match sink.finish() {
        Some(s) if streamed && s.local == 0 => s.report,
        _ if streamed => return Err("pull into the engine: the stream did not restore it".into()),
        _ => thaw(
            &store,
            eng,
            &req,
            &cfg,
            &ThawOptions {
                tier: ram.then_some(&tier),
                ..Default::default()
            },
        )
        .map_err(|x| e(&x))?,
    };
    let secs = t.elapsed().as_secs_f64();
    let (from_tier, from_stream) = match how {
        Route::Streamed => (0, n as u64),
        Route::ViaRam => (n as u64, 0),
        Route::FromDisk => (0, 0),
    };
    if r.fetched != n as u64
        || rep.blocks_restored != n as u64
        || rep.blocks_from_tier != from_tier
        || rep.blocks_streamed != from_stream
    {
        return Err(format!(
            "pull into the engine: {} fetched, {} restored, {} from the RAM tier, {} as they \
             arrived, of {n}",
            r.fetched, rep.blocks_restored, rep.blocks_from_tier, rep.blocks_streamed
        ));
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&d);
    Ok(secs)
}

/// A window `name` of blocks `keys` of `block` bytes, 16 tokens each.
fn spec(name: &str, keys: &[u128], block: u64) -> WindowSpec {
    WindowSpec {
        name: name.into(),
        session: name.into(),
        namespace: "bench".into(),
        layout: b"{}".to_vec(),
        tokens: (0..keys.len() as u32 * 16).collect(),
        blocks: keys
            .iter()
            .map(|&key| BlockDesc { key, len: block })
            .collect(),
        ..Default::default()
    }
}

/// Seconds a fill of blocks `keys` (each `block` bytes) from the tier into a fresh store
/// takes, checked to have fetched them all.
fn fill_once(dir: &Path, remote: &Remote, keys: &[u128], block: u64) -> Result<f64, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let n = keys.len();
    let (c, _) = Store::open(StoreConfig::new(dir.join("c"))).map_err(|x| e(&x))?;
    let spec = spec("fill", keys, block);
    let t = Instant::now();
    let f = fill_prefix(&c, remote, spec, 16, None, None, None).map_err(|x| e(&x))?;
    let secs = t.elapsed().as_secs_f64();
    if f.fetched != n as u64 || f.stopped.is_some() {
        return Err(format!(
            "fill fetched {} of {n} blocks ({:?})",
            f.fetched, f.stopped
        ));
    }
    Ok(secs)
}

/// The `q` quantile of `v` (sorted here), in ms from µs.
fn quantile_ms(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
        / 1e3
}

/// Stores `windows` prompts of 4 blocks in the tier (their blocks, as another instance's
/// unnamed windows would be), then times lookups through an in-process daemon: hits, first
/// misses, remembered misses, and the same lookups against a daemon without a tier.
fn lookups(dir: &Path, remote: &Remote, windows: u64, p: &Progress) -> Result<LookupBench, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let layout = cwm::layout::Layout::flash_2nbhd(2, 64, 16, 2, 64, cwm::layout::Dtype::Bf16);
    let ns = cwm::keys::Namespace {
        model: "bench".into(),
        layout_fingerprint: layout.fingerprint(),
        salt: None,
    };
    let prompt = |i: u64| -> Vec<u32> { (0..128).map(|t| (i * 1000 + t) as u32 + 7).collect() };
    let payload = vec![5u8; 1024];
    let mut stored = Vec::new();
    for i in 0..windows {
        if i % 1000 == 0 {
            p.update("lookup", i, windows, "storing prompts in the tier");
        }
        let keys = cwm::keys::block_keys(&ns, &prompt(i)[..64], 16);
        stored.extend(keys.into_iter().map(|k| (k, payload.as_slice())));
        if stored.len() >= 4096 || i + 1 == windows {
            remote.write_blocks(&stored).map_err(|x| e(&x))?;
            stored.clear();
        }
    }
    let mut out = LookupBench {
        windows,
        lookups: windows.min(2000),
        hit_p50_ms: 0.0,
        hit_p99_ms: 0.0,
        miss_p50_ms: 0.0,
        miss_p99_ms: 0.0,
        cached_miss_p99_ms: 0.0,
        local_only_p99_ms: 0.0,
    };
    for with_tier in [true, false] {
        let d = dir.join(if with_tier { "lk-remote" } else { "lk-local" });
        let (store, _) = Store::open(StoreConfig::new(d.join("data"))).map_err(|x| e(&x))?;
        let shm = d.join("shm");
        std::fs::create_dir_all(&shm).map_err(|x| e(&x))?;
        let socket = d.join("cwm.sock");
        let cfg = with_tier.then(|| RemoteConfig {
            lookup_timeout: Duration::from_millis(100),
            ..remote.config().clone()
        });
        let server = super::bench::bench_server(
            store,
            &socket,
            &shm,
            16 << 20,
            super::bench::no_compaction(),
            cfg,
        );
        let s2 = server.clone();
        let th = std::thread::spawn(move || s2.serve());
        let mut c = super::bench::connect_daemon(&socket)?;
        super::bench::register_small_engine(&mut c, &shm)?;
        let mut time = |tokens: Vec<u32>, want: Option<(u64, &str)>| -> Result<f64, String> {
            let t = Instant::now();
            let r = c
                .call_final(serde_json::json!({"op": "lookup", "engine": "b", "tokens": tokens}))
                .map_err(|x| e(&x))?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            if let Some((blocks, outcome)) = want {
                if r["blocks_matched"] != blocks || r["remote"]["outcome"] != outcome {
                    return Err(format!(
                        "lookup: expected {blocks} blocks ({outcome}), got {r}"
                    ));
                }
            }
            Ok(us)
        };
        let n = out.lookups;
        let step = (windows / n.max(1)).max(1);
        let (mut hits, mut misses, mut cached) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..n {
            if k % 500 == 0 {
                p.update(
                    "lookup",
                    k,
                    n,
                    if with_tier {
                        "with the tier"
                    } else {
                        "local only"
                    },
                );
            }
            let i = k * step;
            hits.push(time(prompt(i), with_tier.then_some((4, "hit")))?);
            let fresh = prompt(windows + 1 + k);
            misses.push(time(fresh.clone(), with_tier.then_some((0, "miss")))?);
            cached.push(time(fresh, with_tier.then_some((0, "cached_miss")))?);
        }
        if with_tier {
            out.hit_p50_ms = quantile_ms(&mut hits, 0.5);
            out.hit_p99_ms = quantile_ms(&mut hits, 0.99);
            out.miss_p50_ms = quantile_ms(&mut misses, 0.5);
            out.miss_p99_ms = quantile_ms(&mut misses, 0.99);
            out.cached_miss_p99_ms = quantile_ms(&mut cached, 0.99);
        } else {
            hits.extend(misses);
            out.local_only_p99_ms = quantile_ms(&mut hits, 0.99);
        }
        drop(c);
        server.stop();
        let _ = th.join();
    }
    Ok(out)
}

/// Consecutive groups of about `bytes` bytes of values.
fn batches<'a>(vals: &'a [(String, &'a [u8])], bytes: usize) -> Vec<&'a [(String, &'a [u8])]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, (_, v)) in vals.iter().enumerate() {
        size += v.len();
        if size >= bytes {
            out.push(&vals[start..=i]);
            start = i + 1;
            size = 0;
        }
    }
    if start < vals.len() {
        out.push(&vals[start..]);
    }
    out
}
