//! `cwm serve` as a child process, driven over its Unix socket: every op of the first protocol
//! slice, the error codes for bad input (the connection keeps serving), idempotency, the CLI's
//! exit codes, SIGTERM, and a window surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

mod common;
use common::daemon::{code, engine_files, register_req};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

fn start(data: &Path, socket: &Path, shm: &Path) -> common::daemon::Daemon {
    common::daemon::start(data, socket, shm, &[])
}

fn layout() -> Layout {
    Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16)
}

fn cli(socket: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn serve_protocol_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let socket = tmp.path().join("run/cwm.sock");
    let (paths, mem) = engine_files(&shm);
    let l = layout();
    let tokens: Vec<u32> = (1000..1000 + 16 * 5 - 4).collect();
    let src = [3u64, 7, 11, 20, 40];
    let want: Vec<Vec<u8>> = src
        .iter()
        .map(|&b| cwm::device::read_block(&l, &mem, b).unwrap())
        .collect();
    let reg = register_req(&paths);
    {
        let d = start(&data, &socket, &shm);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut c = Client::connect(&d.socket).unwrap();
        let hello = c.call_final(json!({"op": "hello"})).unwrap();
        assert_eq!(hello["protocol"], 1);
        assert_eq!(
            c.call_final(json!({"op": "health"})).unwrap()["status"],
            "ok"
        );
        let r = c.call_final(reg.clone()).unwrap();
        assert_eq!(r["block_bytes"], 16384, "{r}");
        // Freeze: a `captured` progress line, then the final `durable` one.
        let lines = c
            .call(
                json!({"op": "freeze", "engine": "e1", "session": "s1", "window": "chat-1",
                "tokens": tokens, "block_ids": src, "idempotency_key": "f-1"}),
            )
            .unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["status"], "captured");
        assert_eq!(lines[1]["status"], "durable");
        assert_eq!(lines[1]["window"]["num_tokens"], tokens.len());
        // The same idempotency key replays the first outcome; no second window version.
        let again = c
            .call(
                json!({"op": "freeze", "engine": "e1", "session": "s1", "window": "chat-1",
                "tokens": tokens, "block_ids": src, "idempotency_key": "f-1"}),
            )
            .unwrap();
        assert_eq!(again.last().unwrap()["replayed"], true);
        assert_eq!(again.last().unwrap()["window"]["version"], 1);
        // A refusal is not an outcome: retried under the same key once the cause is gone
        // (here: the engine was not registered yet), the request runs.
        let refused = c
            .call_final(
                json!({"op": "freeze", "engine": "later", "window": "chat-2",
                "tokens": tokens, "block_ids": src, "idempotency_key": "f-2"}),
            )
            .unwrap();
        assert_eq!(code(&refused), "NOT_FOUND", "{refused}");
        let mut later = register_req(&paths);
        later["engine"] = json!("later");
        assert_eq!(code(&c.call_final(later).unwrap()), "OK");
        let ran = c
            .call_final(
                json!({"op": "freeze", "engine": "later", "window": "chat-2",
                "tokens": tokens, "block_ids": src, "idempotency_key": "f-2"}),
            )
            .unwrap();
        assert_eq!(ran["status"], "durable", "{ran}");
        assert!(ran.get("replayed").is_none(), "{ran}");
        assert_eq!(
            code(
                &c.call_final(json!({"op": "delete", "window": "chat-2"}))
                    .unwrap()
            ),
            "OK"
        );
        // Without the key, a second freeze of the name is refused.
        let dup = c
            .call_final(json!({"op": "freeze", "engine": "e1", "window": "chat-1", "tokens": tokens, "block_ids": src}))
            .unwrap();
        assert_eq!(code(&dup), "ALREADY_EXISTS");
        let list = c.call_final(json!({"op": "list", "limit": 10})).unwrap();
        assert_eq!(list["total"], 1);
        let lk = c
            .call_final(json!({"op": "lookup", "engine": "e1", "tokens": tokens}))
            .unwrap();
        assert_eq!(lk["blocks_matched"], 5);
        assert_eq!(lk["block_keys"].as_array().unwrap().len(), 5);
        assert_eq!(lk["tokens_matched"], tokens.len());
        // Bad input of every kind: an error, and the connection keeps serving.
        c.send_raw(b"{not json").unwrap();
        assert_eq!(code(&c.read_line().unwrap()), "VALIDATION");
        c.send_raw(&vec![b'x'; 5000]).unwrap();
        assert!(c.read_line().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than 4096"));
        assert_eq!(
            code(&c.call_final(json!({"op": "nope"})).unwrap()),
            "UNKNOWN_OP"
        );
        assert_eq!(
            code(&c.call_final(json!({"op": "stat", "window": 5})).unwrap()),
            "VALIDATION"
        );
        assert_eq!(
            code(
                &c.call_final(json!({"op": "stat", "window": "bad name!"}))
                    .unwrap()
            ),
            "VALIDATION"
        );
        assert_eq!(
            code(&c.call_final(json!({"op": "thaw", "engine": "e1", "window": "chat-1", "block_ids": [1, 2, 3, 4, 64]})).unwrap()),
            "VALIDATION"
        );
        assert_eq!(
            code(&c.call_final(json!({"op": "freeze", "engine": "nope", "window": "x", "tokens": [1], "block_ids": [1]})).unwrap()),
            "NOT_FOUND"
        );
        let outside = json!({"op": "register", "engine": "e2",
            "layout": reg["layout"], "memory": {"shm": ["/etc/hostname"]}});
        assert_eq!(code(&c.call_final(outside).unwrap()), "PERMISSION_DENIED");
        assert!(
            c.call_final(json!({"op": "metrics"})).unwrap()["text"]
                .as_str()
                .unwrap()
                .contains("cwm_freezes_total 2"),
            "chat-1 and chat-2"
        );
        // CLI: table and exit codes.
        let (rc, out) = cli(&socket, &["ls"]);
        assert_eq!(rc, 0);
        assert!(out.contains("chat-1"), "{out}");
        assert_eq!(cli(&socket, &["stat", "missing"]).0, 3);
        assert_eq!(cli(&socket, &["stat", "bad name!"]).0, 2);
        // SIGTERM: clean exit 0.
        let mut d = d;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                assert!(st.success(), "exit status {st}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Restart: the window survives and thaws bit-exactly into other (poisoned) blocks.
    mem.fill_random(0, 99).unwrap();
    mem.fill_random(1, 98).unwrap();
    let d = start(&data, &socket, &shm);
    let mut c = Client::connect(&d.socket).unwrap();
    assert_eq!(
        c.call_final(json!({"op": "stat", "window": "chat-1"}))
            .unwrap()["window"]["version"],
        1
    );
    c.call_final(reg).unwrap();
    let dst = [60u64, 50, 0, 1, 2];
    let lines = c
        .call(json!({"op": "thaw", "engine": "e1", "window": "chat-1", "block_ids": dst, "tokens": tokens}))
        .unwrap();
    let fin = lines.last().unwrap();
    assert_eq!(fin["status"], "loaded", "{fin}");
    assert_eq!(fin["report"]["tokens_to_recompute"], 0);
    for (i, &b) in dst.iter().enumerate() {
        assert_eq!(
            cwm::device::read_block(&l, &mem, b).unwrap(),
            want[i],
            "block {i}"
        );
    }
    assert_eq!(
        c.call_final(json!({"op": "delete", "window": "chat-1"}))
            .unwrap()["deleted"]["name"],
        "chat-1"
    );
    assert_eq!(
        code(
            &c.call_final(json!({"op": "stat", "window": "chat-1"}))
                .unwrap()
        ),
        "NOT_FOUND"
    );
}

#[test]
fn a_second_instance_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let data = tmp.path().join("data");
    let d = start(&data, &tmp.path().join("a.sock"), &shm);
    let out = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["serve", "--socket"])
        .arg(tmp.path().join("b.sock"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by process {}", d.child.id())),
        "{err}"
    );
}

#[test]
fn a_second_daemon_on_another_data_dir_does_not_take_a_live_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let sock = tmp.path().join("a.sock");
    let _d = start(&tmp.path().join("data-a"), &sock, &shm);
    let out = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--data-dir")
        .arg(tmp.path().join("data-b"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another running process"), "{err}");
    // The first one still answers on it.
    let mut c = Client::connect(&sock).unwrap();
    assert_eq!(
        c.call_final(json!({"op": "health"})).unwrap()["status"],
        "ok"
    );
}

#[test]
fn ec_041_b_a_thaw_past_its_deadline_stops_with_timeout() {
    let f = common::daemon::fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let tokens: Vec<u32> = (0..40 * 16).collect();
    let r = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "window": "long", "tokens": tokens,
            "block_ids": (0..40).collect::<Vec<u64>>()}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let r = c
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": "long", "timeout_ms": 0,
            "block_ids": (24..64).collect::<Vec<u64>>()}),
        )
        .unwrap();
    assert_eq!(code(&r), "TIMEOUT", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("of 40 blocks"),
        "{r}"
    );
    // With the scaled default deadline the same thaw completes.
    let r = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "long",
            "block_ids": (24..64).collect::<Vec<u64>>()}))
        .unwrap();
    assert_eq!(r["status"], "loaded", "{r}");
}

#[test]
fn a_client_killed_mid_freeze_leaves_nothing_partial() {
    let f = common::daemon::fixture(&[]);
    let l = layout();
    let src: Vec<u64> = (0..40).collect();
    let tokens: Vec<u32> = (0..40 * 16).collect();
    // Send a freeze and hang up at once, several times over.
    for i in 0..5 {
        let mut c = Client::connect(&f.daemon.socket).unwrap();
        c.send_raw(
            json!({"op": "freeze", "engine": "e1", "window": format!("gone-{i}"), "tokens": tokens, "block_ids": src})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    assert_eq!(
        c.call_final(json!({"op": "health"})).unwrap()["status"],
        "ok"
    );
    // Each window is either absent or complete and verifies.
    let want: Vec<Vec<u8>> = src
        .iter()
        .map(|&b| cwm::device::read_block(&l, &f.mem, b).unwrap())
        .collect();
    for i in 0..5 {
        let name = format!("gone-{i}");
        let st = c.call_final(json!({"op": "stat", "window": name})).unwrap();
        if code(&st) == "NOT_FOUND" {
            continue;
        }
        assert_eq!(st["window"]["num_blocks"], 40);
        let dst: Vec<u64> = (24..64).collect();
        let r = c
            .call_final(json!({"op": "thaw", "engine": "e1", "window": name, "block_ids": dst}))
            .unwrap();
        assert_eq!(r["status"], "loaded", "{r}");
        for (k, &d) in dst.iter().enumerate() {
            assert_eq!(cwm::device::read_block(&l, &f.mem, d).unwrap(), want[k]);
        }
    }
}

#[test]
fn metrics_over_http_on_loopback() {
    let port = common::daemon::free_loopback_port();
    let addr = format!("127.0.0.1:{port}");
    let f = common::daemon::fixture(&["--metrics-addr", &addr]);
    let _ = &f;
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let body = get("/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("cwm_requests_total"), "{body}");
    assert!(get("/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn connection_scoped_engines_go_away_with_their_connection() {
    let f = common::daemon::fixture(&[]);
    let mut reg = register_req(&f.paths);
    reg["engine"] = json!("scoped");
    reg["scope"] = json!("connection");
    {
        let mut c = Client::connect(&f.daemon.socket).unwrap();
        assert_eq!(code(&c.call_final(reg).unwrap()), "OK");
        let r = c
            .call_final(json!({"op": "lookup", "engine": "scoped", "tokens": [1, 2, 3]}))
            .unwrap();
        assert_eq!(code(&r), "OK");
    }
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let t = Instant::now();
    loop {
        let r = c
            .call_final(json!({"op": "lookup", "engine": "scoped", "tokens": [1]}))
            .unwrap();
        if code(&r) == "NOT_FOUND" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "scoped engine outlived its connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The daemon-scoped engine of the fixture is still there.
    assert_eq!(
        code(
            &c.call_final(json!({"op": "lookup", "engine": "e1", "tokens": [1]}))
                .unwrap()
        ),
        "OK"
    );
    // A CUDA registration on a machine without a driver: a clear error, not a crash.
    if !cwm::device::cuda::available() {
        let r = c
            .call_final(json!({"op": "register", "engine": "gpu", "layout": register_req(&f.paths)["layout"],
                "memory": {"cuda": {"tensors": [{"handle": "00".repeat(64), "offset": 0, "size": 1}]}}}))
            .unwrap();
        assert_eq!(code(&r), "UNAVAILABLE", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("libcuda"));
    }
}
