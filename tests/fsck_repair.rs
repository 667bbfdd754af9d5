//! `cwm fsck --repair`: a flipped payload bit in one window's block and in one copy of the
//! newest catalog record; repair deletes the damaged window (tombstone), rewrites the damaged
//! segment, says what it changed, and afterwards fsck is clean, the intact window reads back
//! bit-exactly and the catalog key still resolves to its newest record (its other copy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use std::process::Command;

fn cwm(args: &[&str], dir: &std::path::Path) -> (i32, serde_json::Value) {
    let o = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code().unwrap_or(-1), v)
}

#[test]
fn repair_drops_damage_and_keeps_the_rest() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let len = 8192u64;
    {
        let (store, _) = open(&dir, &engine);
        put(&store, "good", &keys(1, 3), len);
        put(&store, "bad", &keys(2, 5), len);
        store.put_meta(9, b"first").unwrap();
        store.put_meta(9, b"second").unwrap();
    }
    let rec = 4096 + len;
    // Segment header pages; every manifest and catalog record is two pages (two copies).
    let bad_block3 = 8192 + 3 * rec + 8192 + 3 * rec + 4096 + 10;
    let meta2 = 8192 + 3 * rec + 8192 + 5 * rec + 8192 + 8192;
    let seg = segments(&dir)[0].clone();
    flip_bit(&seg, bad_block3, 1);
    flip_bit(&seg, meta2 + 64 + 2, 3);
    let (rc, v) = cwm(&["fsck", "--json"], &dir);
    assert_eq!(rc, 5, "{v}");

    let (rc, v) = cwm(&["fsck", "--repair", "--json"], &dir);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["tombstoned"], serde_json::json!(["bad"]), "{v}");
    let changes: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        changes.iter().any(|c| c.contains("deleted window \"bad\"")),
        "{changes:?}"
    );
    assert!(changes.iter().any(|c| c.contains("damaged")), "{changes:?}");
    assert!(
        changes.iter().any(|c| c.contains("rewrote segments")),
        "{changes:?}"
    );

    let (rc, v) = cwm(&["fsck", "--json"], &dir);
    assert_eq!(rc, 0, "after repair: {v}");
    let (store, rep) = open(&dir, &engine);
    assert!(
        rep.damaged_records.is_empty() && rep.damaged_regions.is_empty(),
        "{rep:?}"
    );
    let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
    assert_eq!(names, vec!["good".to_string()]);
    check(&store, "good", &keys(1, 3), len);
    assert_eq!(store.meta().unwrap(), vec![(9, b"second".to_vec())]);
    assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
    // Repair of a clean directory changes nothing.
    drop(store);
    let (rc, v) = cwm(&["fsck", "--repair", "--json"], &dir);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["changes"], serde_json::json!([]), "{v}");
}
