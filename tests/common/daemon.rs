//! Starting `cwm serve` as a child process, and a shared-memory engine for it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::device::host::ShmMemory;
use serde_json::{json, Value};

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `cwm` command for a test daemon: killed if the test process dies, and not holding the
/// test harness's output pipes (an orphan must never keep `cargo test` waiting).
pub fn daemon_command() -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_cwm"));
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// `cwm serve` with the tests' defaults (8 MiB staging, 4096-byte lines, 4 MiB segments),
/// each overridden by the same option in `extra`.
pub fn start(data: &Path, socket: &Path, shm: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["serve"];
    for (k, v) in [
        ("--staging", "8MiB"),
        ("--max-line", "4096"),
        ("--segment-size", "4MiB"),
    ] {
        if !extra.contains(&k) {
            args.extend([k, v]);
        }
    }
    let child = daemon_command()
        .args(args)
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(socket)
        .arg("--shm-dir")
        .arg(shm)
        .spawn()
        .expect("spawn cwm serve");
    let t = Instant::now();
    while Client::connect(socket).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "cwm serve did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon {
        child,
        socket: socket.to_path_buf(),
    }
}

/// Two layer files of a (2, 64, 16, 2, 64) bf16 flash layout in `dir`, filled.
pub fn engine_files(dir: &Path) -> (Vec<PathBuf>, ShmMemory) {
    engine_files_n(dir, 64)
}

/// Two layer files of a (2, `blocks`, 16, 2, 64) bf16 flash layout in `dir`, filled.
pub fn engine_files_n(dir: &Path, blocks: u64) -> (Vec<PathBuf>, ShmMemory) {
    let size = 2 * blocks * 4096u64;
    let paths: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("layer{i}"))).collect();
    for p in &paths {
        std::fs::File::create(p)
            .expect("create")
            .set_len(size)
            .expect("size");
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let mem = ShmMemory::open(&refs).expect("map");
    mem.fill_random(0, 1).expect("fill");
    mem.fill_random(1, 2).expect("fill");
    (paths, mem)
}

pub fn register_req(paths: &[PathBuf]) -> Value {
    register_req_n(paths, 64)
}

pub fn register_req_n(paths: &[PathBuf], blocks: u64) -> Value {
    json!({"op": "register", "engine": "e1", "model": "tiny",
        "layout": {"kind": "flash_2nbhd", "layers": 2, "blocks": blocks, "block_size": 16, "heads": 2, "head": 64, "dtype": "bf16"},
        "memory": {"shm": paths}})
}

pub fn code(v: &Value) -> &str {
    v.pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("OK")
}

/// A running daemon with engine `e1` registered, in a temp dir.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub daemon: Daemon,
    pub paths: Vec<PathBuf>,
    pub mem: ShmMemory,
}

/// Daemon flags of a log that unnamed windows outgrow at once: a 2 MiB budget in 256 KiB
/// segments, eviction every 100 ms, no background compaction.
pub const TIGHT_BUDGET: [&str; 8] = [
    "--capacity",
    "2MiB",
    "--segment-size",
    "256KiB",
    "--eviction-interval-ms",
    "100",
    "--compact-interval",
    "0",
];

pub fn fixture(extra: &[&str]) -> Fixture {
    fixture_n(extra, 64)
}

/// A fixture whose engine has `blocks` blocks.
pub fn fixture_n(extra: &[&str], blocks: u64) -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).expect("mkdir");
    let (paths, mem) = engine_files_n(&shm, blocks);
    let daemon = start(
        &tmp.path().join("data"),
        &tmp.path().join("cwm.sock"),
        &shm,
        extra,
    );
    let mut c = Client::connect(&daemon.socket).expect("connect");
    assert_eq!(
        code(
            &c.call_final(register_req_n(&paths, blocks))
                .expect("register")
        ),
        "OK"
    );
    Fixture {
        tmp,
        daemon,
        paths,
        mem,
    }
}

/// A loopback TCP port free a moment ago (for `--metrics-addr`).
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs the `cwm` binary with `args` against the daemon at `socket`.
pub fn cli(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run cwm")
}

/// `cwm freeze` of `window` from engine e1: 16 tokens per block of `block_ids` (comma-separated).
pub fn cli_freeze(socket: &Path, window: &str, block_ids: &str) -> std::process::Output {
    let n = block_ids.split(',').count() * 16;
    let tokens: Vec<String> = (0..n).map(|t| t.to_string()).collect();
    cli(
        socket,
        &[
            "freeze",
            "--session",
            "s1",
            "--window",
            window,
            "--engine",
            "e1",
            "--tokens",
            &tokens.join(","),
            "--block-ids",
            block_ids,
        ],
    )
}

/// The daemon's metrics in the Prometheus text exposition (op `metrics`).
pub fn metrics_text(socket: &Path) -> String {
    let mut c = Client::connect(socket).expect("connect");
    let m = c
        .call_final(serde_json::json!({"op": "metrics"}))
        .expect("metrics");
    m["text"].as_str().expect("text").to_string()
}

/// Asserts that each of `series` (a series with its labels, and its value when given) is in
/// `text`.
pub fn assert_series(text: &str, series: &[&str]) {
    for s in series {
        assert!(text.contains(s), "{s} in\n{text}");
    }
}

/// Kills the daemon (-9), starts it again over the same directories with `extra`, and
/// registers the engine again.
pub fn restart(f: &mut Fixture, extra: &[&str]) -> Client {
    f.daemon.child.kill().expect("kill");
    f.daemon.child.wait().expect("wait");
    f.daemon = start(
        &f.tmp.path().join("data"),
        &f.tmp.path().join("cwm.sock"),
        &f.tmp.path().join("shm"),
        extra,
    );
    let mut c = Client::connect(&f.daemon.socket).expect("connect");
    assert_eq!(
        code(&c.call_final(register_req(&f.paths)).expect("register")),
        "OK"
    );
    c
}
