//! A sealed segment truncated to 2,048 bytes (its header bytes intact, the rest gone): the
//! store refuses to open and names `cwm fsck --repair`; repair sets the segment aside (it
//! used to exit 1 with the same message and set nothing aside), writes its new segments at
//! the size it is given, and the repaired store always opens with every window of the other
//! segments.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::process::Command;

#[test]
fn fsck_repair_sets_aside_a_truncated_segment_and_the_store_opens() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let len = 64 << 10;
    {
        let (store, _) = open(&dir, &engine);
        // 4 MiB segments: these fill the first and spill into the next ones.
        for i in 0..160u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 1), len);
        }
    }
    let segs = segments(&dir);
    assert!(segs.len() >= 3, "{segs:?}");
    let victim = segs[1].clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(2048)
        .unwrap();
    let err = cwm::store::Store::open_with_engine(config(&dir), engine.clone())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("fsck --repair"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "fsck",
            "--repair",
            "--json",
            "--segment-size",
            "4MiB",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        o.status.success(),
        "{v} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let changes = v["changes"].to_string();
    assert!(changes.contains("set aside"), "{changes}");
    assert!(victim.with_extension("log.damaged").exists());
    // It opens, and the windows of the other segments are all there and verify.
    let (store, _) = open(&dir, &engine);
    let listed = store.list().unwrap().len();
    assert!((60..160).contains(&listed), "{listed}");
    for w in store.list().unwrap() {
        let i: u128 = w.name[1..].parse().unwrap();
        check(&store, &w.name, &keys(i + 1, 1), len);
    }
    // Segments repair wrote have the size it was given.
    for s in segments(&dir) {
        assert!(std::fs::metadata(&s).unwrap().len() <= 4 << 20, "{s:?}");
    }
    assert!(store.check_invariants().unwrap().is_empty());
}

#[test]
fn a_sealed_segment_cut_at_a_record_boundary_is_reported() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let len = 64 << 10;
    {
        let (store, _) = open(&dir, &engine);
        for i in 0..80u128 {
            put(&store, &format!("w{i}"), &keys(i + 1, 1), len);
        }
    }
    let first = segments(&dir)[0].clone();
    // Ten windows in: each is one block record (a header page and 64 KiB) and a manifest
    // (two pages), after the two segment header pages. A clean cut: what remains scans as a
    // well-formed log that simply ends early.
    let cut = 8192 + 10 * ((4096 + len) + 8192);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (store, report) = open(&dir, &engine);
    assert!(
        report
            .damaged_regions
            .iter()
            .any(|(s, from, _, why)| *s == 1 && *from == cut && why.contains("sealed at")),
        "{report:?}"
    );
    check(&store, "w9", &keys(10, 1), len);
    drop(store);
    // fsck says so too (exit 5: damage).
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["fsck", "--json", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5));
}
