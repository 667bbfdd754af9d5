//! deploy/systemd/cwm.service says what the daemon implements: Type=notify (tests/
//! control_sd_notify.rs checks READY, WATCHDOG and STOPPING), a watchdog, unlimited locked
//! memory for pinned staging, and a stop timeout above the 30 s drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

fn setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

fn secs(v: &str) -> u64 {
    v.trim_end_matches('s').parse().expect("seconds")
}

#[test]
fn the_unit_matches_what_cwm_serve_does() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/cwm.service");
    let unit = std::fs::read_to_string(path).unwrap();
    assert_eq!(setting(&unit, "Type"), Some("notify"));
    assert_eq!(setting(&unit, "NotifyAccess"), Some("main"));
    assert_eq!(setting(&unit, "LimitMEMLOCK"), Some("infinity"));
    assert!(secs(setting(&unit, "TimeoutStopSec").unwrap()) > 30);
    assert!(secs(setting(&unit, "WatchdogSec").unwrap()) >= 2);
    assert_eq!(setting(&unit, "KillSignal"), Some("SIGTERM"));
    let exec = setting(&unit, "ExecStart").unwrap();
    assert!(exec.contains("cwm serve"), "{exec}");
    // The paths cwm writes stay writable under ProtectSystem=strict.
    let rw = setting(&unit, "ReadWritePaths").unwrap();
    for p in ["/var/lib/cwm", "/run/cwm", "/dev/shm"] {
        assert!(rw.split_whitespace().any(|x| x == p), "{p} not in {rw}");
    }
    // systemd's own check of the unit, with ExecStart pointing at the binary just built.
    let verify = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if verify.is_ok_and(|o| o.status.success()) {
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("cwm.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/local/bin/cwm", env!("CARGO_BIN_EXE_cwm")),
        )
        .unwrap();
        let o = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    } else {
        eprintln!("systemd-analyze not installed: the unit's static checks only");
    }
}
