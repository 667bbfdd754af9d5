//! A peer let in with `--allow-uid` may register only memory it owns: a shared-memory file or
//! a process of another uid (cwm's own files and processes included) is refused with
//! PERMISSION_DENIED, since cwm would read and write it with its own rights. Nor may it use,
//! replace or unregister an engine another uid registered, or share another uid's idempotency
//! keys. Needs root (to run a client as another uid); says "skipped" otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::fixture;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

const NOBODY: u32 = 65534;

#[test]
fn an_allowed_uid_cannot_register_memory_it_does_not_own() {
    let Some(f) = open_to_nobody() else {
        return;
    };
    let shm: Vec<String> = f.paths.iter().map(|p| p.display().to_string()).collect();
    let reqs = [
        serde_json::json!({"op": "hello"}),
        serde_json::json!({"op": "register", "engine": "x1", "model": "m",
            "layout": {"kind": "flash_2nbhd", "layers": 2, "blocks": 64, "block_size": 16,
                       "heads": 2, "head": 64, "dtype": "bf16"},
            "memory": {"process": {"pid": f.daemon.child.id(), "tensors": [[4096, 4096]]}}}),
        serde_json::json!({"op": "register", "engine": "x2", "model": "m",
            "layout": {"kind": "flash_2nbhd", "layers": 2, "blocks": 64, "block_size": 16,
                       "heads": 2, "head": 64, "dtype": "bf16"},
            "memory": {"shm": shm}}),
    ];
    let lines = as_nobody(&f.daemon.socket, &reqs);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0]["ok"], true,
        "the allowed uid gets in: {:?}",
        lines[0]
    );
    for l in &lines[1..] {
        assert_eq!(l["error"]["code"], "PERMISSION_DENIED", "{l}");
        assert!(
            l["error"]["message"].as_str().unwrap().contains("uid 0"),
            "{l}"
        );
    }
}

/// A daemon (engine e1) that lets `NOBODY` in, its socket opened up to it (as an operator
/// would); `None` (the test skipped) when not root, which running a client as another uid
/// needs.
fn open_to_nobody() -> Option<common::daemon::Fixture> {
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return None;
    }
    let f = fixture(&["--allow-uid", &NOBODY.to_string()]);
    for d in [
        f.tmp.path().to_path_buf(),
        f.daemon.socket.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&f.daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    Some(f)
}

/// Runs the request lines as uid `NOBODY` on one connection; returns the final answers.
fn as_nobody(socket: &std::path::Path, reqs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let script = "import socket,sys,json\n\
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f=s.makefile('rwb')\n\
for line in sys.argv[2:]:\n    f.write(line.encode()+b'\\n'); f.flush()\n    while True:\n        r=f.readline().decode().strip()\n        if json.loads(r).get('final', True): break\n    print(r)\n";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .args(reqs.iter().map(|r| r.to_string()))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An engine is its registrant's: another allowed uid can neither read it (freeze), write
/// it (thaw), unregister it nor take its name; its own engine it may use, and the daemon's
/// own uid (the operator) may unregister any. Idempotency keys are per uid: the same key
/// from two users names two requests.
#[test]
fn an_allowed_uid_cannot_use_or_take_another_uids_engine() {
    let Some(f) = open_to_nobody() else {
        return;
    };
    // Memory of nobody's own, in the shared-memory directory.
    let own = f.tmp.path().join("shm").join("nobody");
    std::fs::create_dir_all(&own).unwrap();
    let (paths, _mem) = common::daemon::engine_files(&own);
    for p in &paths {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let mut root = cwm::control::client::Client::connect(&f.daemon.socket).unwrap();
    let freeze = |engine: &str, window: &str| {
        serde_json::json!({"op": "freeze", "engine": engine, "window": window,
            "tokens": (0..64).collect::<Vec<u32>>(), "block_ids": [0, 1, 2, 3],
            "idempotency_key": "same-key"})
    };
    let v = root.call_final(freeze("e1", "root-w")).unwrap();
    assert_eq!(v["status"], "durable", "{v}");
    let mut theirs = common::daemon::register_req(&paths);
    let mut take_e1 = theirs.clone();
    theirs["engine"] = serde_json::json!("n1");
    let lines = as_nobody(
        &f.daemon.socket,
        &[
            freeze("e1", "stolen"),
            serde_json::json!({"op": "thaw", "engine": "e1", "window": "root-w",
                "block_ids": [8, 9, 10, 11]}),
            serde_json::json!({"op": "unregister", "engine": "e1"}),
            {
                take_e1["engine"] = serde_json::json!("e1");
                take_e1
            },
            theirs,
            freeze("n1", "nobody-w"),
        ],
    );
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines[..4] {
        assert_eq!(l["error"]["code"], "PERMISSION_DENIED", "{l}");
        assert!(
            l["error"]["message"]
                .as_str()
                .unwrap()
                .contains("registered by uid 0"),
            "{l}"
        );
    }
    assert_eq!(lines[4]["ok"], true, "its own engine: {}", lines[4]);
    // Its freeze under the key root used ran (not replayed, not refused).
    assert_eq!(lines[5]["status"], "durable", "{}", lines[5]);
    assert!(lines[5].get("replayed").is_none(), "{}", lines[5]);
    // e1 is still root's; the operator may unregister nobody's engine.
    let v = root.call_final(freeze("e1", "root-w")).unwrap();
    assert_eq!(v["replayed"], true, "{v}");
    let v = root
        .call_final(serde_json::json!({"op": "unregister", "engine": "n1"}))
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

/// Identical thaws running at once share one outcome (EC-002) — but only within one uid: while
/// root thaws its window into its engine back to back, the same request from another allowed
/// uid is refused every time (PERMISSION_DENIED), never answered with root's outcome. (Before,
/// the coalescing key named no uid, and a thaw arriving while root's ran rode past the check.)
#[test]
fn an_allowed_uid_never_shares_another_uids_thaw() {
    let Some(f) = open_to_nobody() else {
        return;
    };
    let mut root = cwm::control::client::Client::connect(&f.daemon.socket).unwrap();
    let v = root
        .call_final(
            serde_json::json!({"op": "freeze", "engine": "e1", "window": "root-w",
            "tokens": (0..256).collect::<Vec<u32>>(), "block_ids": (0..16).collect::<Vec<u64>>()}),
        )
        .unwrap();
    assert_eq!(v["status"], "durable", "{v}");
    let thaw = serde_json::json!({"op": "thaw", "engine": "e1", "window": "root-w",
        "block_ids": (32..48).collect::<Vec<u64>>()});
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (lines, thaws) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let v = root.call_final(thaw.clone()).unwrap();
                assert_eq!(v["status"], "loaded", "root's own thaw: {v}");
                n += 1;
            }
            n
        });
        let lines = as_nobody(&f.daemon.socket, &vec![thaw.clone(); 200]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (lines, t.join().unwrap())
    });
    assert!(thaws > 0, "root's thaws ran meanwhile");
    assert_eq!(lines.len(), 200, "{lines:?}");
    for l in &lines {
        assert_eq!(l["error"]["code"], "PERMISSION_DENIED", "{l}");
    }
}
