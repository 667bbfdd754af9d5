//! Requests no engine sends, each refused with VALIDATION before it costs anything, the
//! daemon still serving afterwards: a `register` naming 2^32 - 1 layers (its piece table —
//! hundreds of GB — was built before any size was checked, and the allocation aborted the
//! process), heads or head sizes past any model, blocks too large for the log; a `compact`
//! or `scrub` throttled to a few bytes a second (a compaction holds the compaction lock while
//! it throttles: months of no compaction); identifiers (session, engine, salt …) of
//! kilobytes, kept in memory and written to the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use cwm::control::client::Client;
use serde_json::{json, Value};

fn refused(c: &mut Client, req: Value, says: &str) {
    let r = c.call_final(req.clone()).unwrap();
    assert_eq!(code(&r), "VALIDATION", "{req} → {r}");
    assert!(r.to_string().contains(says), "{req} → {r}");
}

#[test]
fn hostile_requests_are_refused_and_the_daemon_keeps_serving() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let paths: Vec<String> = f.paths.iter().map(|p| p.display().to_string()).collect();
    let layout = |kind: &str, layers: u64, heads: u64, head: u64| {
        json!({"kind": kind, "layers": layers, "blocks": 1, "block_size": 1, "heads": heads,
            "head": head, "dtype": "fp8"})
    };
    for (l, says) in [
        (layout("flash_2nbhd", u64::from(u32::MAX), 1, 1), "layers"),
        (layout("mla", u64::from(u32::MAX), 1, 1), "layers"),
        (layout("packed_kv", 2, u64::from(u32::MAX), 1), "heads"),
        (layout("flash_n2bhd", 2, 1, u64::from(u32::MAX)), "head"),
        (layout("flash_2nbhd", 4096, 65536, 65536), "a block"),
    ] {
        refused(
            &mut c,
            json!({"op": "register", "engine": "x", "model": "m", "layout": l,
                "memory": {"shm": paths}}),
            says,
        );
    }
    for op in ["compact", "scrub"] {
        refused(&mut c, json!({"op": op, "rate": 1}), "at least");
    }
    let long = "s".repeat(2000);
    refused(
        &mut c,
        json!({"op": "session.open", "session": long}),
        "at most 1024",
    );
    refused(
        &mut c,
        json!({"op": "lookup", "engine": "e1", "tokens": [1, 2], "salt": long}),
        "at most 1024",
    );

    // Still serving: a freeze and a thaw of the registered engine, a throttled compaction at
    // a sane rate.
    let tokens: Vec<u32> = (0..32).collect();
    let r = c
        .call_final(
            json!({"op": "freeze", "engine": "e1", "session": "s", "window": "w",
            "tokens": tokens, "block_ids": [0, 1]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let r = c
        .call_final(
            json!({"op": "thaw", "engine": "e1", "window": "w", "tokens": tokens,
            "block_ids": [2, 3]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let r = c
        .call_final(json!({"op": "compact", "rate": 1 << 20}))
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    let r = c.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
}

/// Shared-memory paths are checked for what they really are: a symlink in the shared-memory
/// directory to a file outside it is refused (PERMISSION_DENIED), and so is anything but a
/// regular file there (a FIFO, a directory: VALIDATION) — resolved once, without opening it
/// for reading and writing until it passed.
#[test]
fn shared_memory_paths_must_be_regular_files_inside_the_directory() {
    let f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let shm = f.tmp.path().join("shm");
    let outside = f.tmp.path().join("outside");
    std::fs::write(&outside, vec![0u8; 2 * 64 * 4096]).unwrap();
    std::os::unix::fs::symlink(&outside, shm.join("link")).unwrap();
    let fifo = shm.join("fifo");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(shm.join("dir")).unwrap();
    let with = |p: &std::path::Path| {
        let mut r = register_req(&[p.to_path_buf(), f.paths[1].clone()]);
        r["engine"] = json!("e2");
        r
    };
    let r = c.call_final(with(&shm.join("link"))).unwrap();
    assert_eq!(code(&r), "PERMISSION_DENIED", "{r}");
    refused(&mut c, with(&fifo), "not a regular file");
    refused(&mut c, with(&shm.join("dir")), "not a regular file");
    // A symlink inside the directory to a file inside it is that file.
    std::os::unix::fs::symlink(&f.paths[0], shm.join("alias")).unwrap();
    let r = c.call_final(with(&shm.join("alias"))).unwrap();
    assert_eq!(code(&r), "OK", "{r}");
}
