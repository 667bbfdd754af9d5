//! `cwm serve --config FILE`: settings from TOML, overridden by environment variables and flags;
//! an unknown key is refused with the file named.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cwm::control::client::Client;
use serde_json::json;

/// Kills the daemon even when an assertion fails first.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait(sock: &std::path::Path) -> Client {
    let t = Instant::now();
    loop {
        if let Ok(c) = Client::connect(sock) {
            return c;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn toml_then_env_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("c.sock");
    let cfg = tmp.path().join("cwm.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nsocket = {:?}\nshm_dir = {:?}\nmax_sessions = 1\nstaging = \"8MiB\"\nsegment_size = \"4MiB\"\n",
            tmp.path().join("data"),
            sock,
            tmp.path()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_cwm");
    // From the file alone: one active session at most.
    let child = Guard(
        common::daemon::daemon_command()
            .args(["serve", "--config"])
            .arg(&cfg)
            .env_remove("CWM_MAX_SESSIONS")
            .spawn()
            .unwrap(),
    );
    let mut c = wait(&sock);
    c.call_final(json!({"op": "session.open", "session": "a"}))
        .unwrap();
    let r = c
        .call_final(json!({"op": "session.open", "session": "b"}))
        .unwrap();
    assert_eq!(r["error"]["code"], "TOO_MANY_SESSIONS", "{r}");
    drop(child);
    // The environment beats the file, a flag beats the environment.
    for (i, (env, flag, limit)) in [(Some("2"), None, 2), (Some("2"), Some("3"), 3)]
        .into_iter()
        .enumerate()
    {
        let mut cmd = common::daemon::daemon_command();
        // A fresh data dir each time (the flag beats the file's data_dir): sessions persist.
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(tmp.path().join(format!("data{i}")));
        if let Some(e) = env {
            cmd.env("CWM_MAX_SESSIONS", e);
        }
        if let Some(f) = flag {
            cmd.args(["--max-sessions", f]);
        }
        let child = Guard(cmd.spawn().unwrap());
        let mut c = wait(&sock);
        for i in 0..limit {
            let r = c
                .call_final(json!({"op": "session.open", "session": format!("s{i}")}))
                .unwrap();
            assert_eq!(r["ok"], true, "{r}");
        }
        let r = c
            .call_final(json!({"op": "session.open", "session": "over"}))
            .unwrap();
        assert_eq!(r["error"]["code"], "TOO_MANY_SESSIONS");
        drop(child);
    }
    // Unknown keys are refused.
    std::fs::write(&cfg, "data_dir = \"/tmp/x\"\nmax_sesions = 3\n").unwrap();
    let out = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cwm.toml") && err.contains("max_sesions"),
        "{err}"
    );
}

#[test]
fn json_logs_carry_structured_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let (paths, _mem) = common::daemon::engine_files(&shm);
    let sock = tmp.path().join("j.sock");
    let mut cmd = common::daemon::daemon_command();
    cmd.args([
        "serve",
        "--log-format",
        "json",
        "--staging",
        "8MiB",
        "--segment-size",
        "4MiB",
        "--data-dir",
    ])
    .arg(tmp.path().join("data"))
    .arg("--socket")
    .arg(&sock)
    .arg("--shm-dir")
    .arg(&shm)
    .stderr(Stdio::piped());
    let mut child = Guard(cmd.spawn().unwrap());
    let mut c = wait(&sock);
    c.call_final(common::daemon::register_req(&paths)).unwrap();
    let r = c
        .call_final(json!({"op": "freeze", "engine": "e1", "window": "logged", "tokens": [1, 2, 3], "block_ids": [4]}))
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    child.0.kill().unwrap();
    let mut err = String::new();
    use std::io::Read;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let ev = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["op"] == "freeze")
        .unwrap_or_else(|| panic!("no JSON freeze event in:\n{err}"));
    assert_eq!(ev["fields"]["window"], "logged");
    assert_eq!(ev["level"], "INFO");
}
