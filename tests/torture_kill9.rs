//! `cwm torture` briefly: at least 100 SIGKILLs of a serving daemon (during freezes, deletes,
//! compactions and recovery), every acknowledged window verified after each restart, no
//! violation, and no garbage left once everything is compacted; TTLs given and windows seen
//! gone after them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;

use std::process::Command;

#[test]
fn torture_survives_a_hundred_kills() {
    // The run ends after 115 restart cycles (about one kill each); --seconds only bounds a slow
    // machine.
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "torture",
            "--seconds",
            "240",
            "--cycles",
            "115",
            "--seed",
            "7",
            "--kill-max-ms",
            "60",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let line = out
        .lines()
        .find(|l| l.starts_with("torture: cycles="))
        .unwrap_or_else(|| panic!("no summary line: {out}\n{err}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} missing in {line}"))
    };
    assert_eq!(field("violations"), 0, "{line}\n{err}");
    assert!(o.status.success(), "{line}\n{err}");
    assert!(field("kills") >= 100, "{line}");
    assert!(field("windows_verified") > 0, "{line}");
    // The details line: "... TTLs acknowledged=N expiries seen=M ...".
    let detail = |k: &str| -> u64 {
        err.lines()
            .find(|l| l.starts_with("torture: kills during recovery="))
            .and_then(|l| l.split(&format!("{k}=")).nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} missing in {err}"))
    };
    assert!(detail("TTLs acknowledged") > 0, "{err}");
    assert!(detail("expiries seen") > 0, "{err}");
    eprintln!("{line}\n{err}");
}
