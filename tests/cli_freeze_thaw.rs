//! The README's client commands against a running daemon: `cwm freeze` without an engine says
//! what to give instead of a bare VALIDATION; with `--engine --tokens --block-ids` it freezes,
//! and `cwm thaw W --engine E --block-ids …` brings the same bytes back into other blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use cwm::device::read_block;
use cwm::layout::{Dtype, Layout};

fn cwm(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

#[test]
fn cli_freeze_names_its_engine_and_thaw_restores_the_bytes() {
    let f = fixture(&[]);
    let sock = &f.daemon.socket;
    // No engine, and the session's engine never reported what it holds: refused (exit 2),
    // saying how to name the engine.
    let o = cwm(sock, &["freeze", "--session", "s1", "--window", "w1"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("VALIDATION") && err.contains("--engine"),
        "{err}"
    );
    // Named: 40 tokens in engine blocks 0, 1, 2.
    let tokens: Vec<String> = (0..40).map(|t| t.to_string()).collect();
    let o = cwm(
        sock,
        &[
            "freeze",
            "--session",
            "s1",
            "--window",
            "w1",
            "--engine",
            "e1",
            "--tokens",
            &tokens.join(","),
            "--block-ids",
            "0,1,2",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("froze w1 v1: 40 tokens, 3 blocks"), "{out}");
    // --tokens without --engine is a usage error of the CLI itself.
    let o = cwm(
        sock,
        &[
            "freeze",
            "--session",
            "s2",
            "--window",
            "w2",
            "--tokens",
            "1",
        ],
    );
    assert!(!o.status.success());
    // Thawed into blocks 10, 11, 12: the bytes of 0, 1, 2.
    let o = cwm(
        sock,
        &["thaw", "w1", "--engine", "e1", "--block-ids", "10,11,12"],
    );
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("thawed w1: 3 of 3 blocks"), "{out}");
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    for (a, b) in [(0, 10), (1, 11), (2, 12)] {
        assert_eq!(
            read_block(&layout, &f.mem, a).unwrap(),
            read_block(&layout, &f.mem, b).unwrap(),
            "block {a} -> {b}"
        );
    }
}
