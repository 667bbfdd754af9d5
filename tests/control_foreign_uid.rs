//! A peer let in with `--allow-uid` may register only memory it owns: a shared-memory file or
//! a process of another uid (cwm's own files and processes included) is refused with
//! PERMISSION_DENIED, since cwm would read and write it with its own rights. Needs root (to
//! run a client as another uid); says "skipped" otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::fixture;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

const NOBODY: u32 = 65534;

#[test]
fn an_allowed_uid_cannot_register_memory_it_does_not_own() {
    // SAFETY: a plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let f = fixture(&["--allow-uid", &NOBODY.to_string()]);
    // Let the other uid reach the socket (an operator opening it up).
    for d in [
        f.tmp.path().to_path_buf(),
        f.daemon.socket.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&f.daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
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
    let script = "import socket,sys\n\
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f=s.makefile('rwb')\n\
for line in sys.argv[2:]:\n    f.write(line.encode()+b'\\n'); f.flush(); print(f.readline().decode().strip())\n";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&f.daemon.socket)
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
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
