//! Shared tier: Redis does not checksum values and anyone with access may write under the
//! prefix. A flipped byte, a truncated value, another key's value, a forged head or manifest:
//! each is a typed error, no panic, and no bad byte reaches the local store.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use cwm::error::ErrorCode;
use cwm::remote::{pull_window, push_window, Expect, Remote, RemoteConfig, RemoteError};
use cwm::store::Replace;

/// A cluster, and window "w" of blocks `keys` (10,000 bytes each, in values of 4 KiB)
/// stored in a local store (its directory returned) and published there.
fn published(
    keys: &[u128],
) -> (
    common::redis::Cluster,
    std::sync::Arc<dyn cwm::io::IoEngine>,
    Remote,
    tempfile::TempDir,
) {
    let cluster = common::redis::Cluster::start(3, 0);
    let (_, engine) = common::engines().remove(0);
    let r = Remote::connect(RemoteConfig {
        nodes: cluster.urls(),
        max_value: 4096,
        ..Default::default()
    })
    .unwrap();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(a_dir.path(), &engine);
    common::put(&a, "w", keys, 10_000);
    push_window(&a, &r, "w", Some(Expect::New)).unwrap();
    drop(a);
    (cluster, engine, r, a_dir)
}

#[test]
fn damaged_or_foreign_values_are_refused_and_nothing_bad_is_stored() {
    let keys = [11u128, 12, 13, 14];
    let (cluster, engine, r, _a_dir) = published(&keys);
    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);

    // A byte flipped in the payload of block 13's second part (SETRANGE).
    let k = r.block_key(13, 1);
    cluster.cmd(&["SETRANGE", &k, "100", "\u{1}"]);
    let e = r.get_block(13, None).expect_err("flipped");
    assert!(matches!(e, RemoteError::Corruption { .. }), "{e}");
    let e = pull_window(&b, &r, "w", Replace::No).expect_err("pull with a bad block");
    assert_eq!(e.code(), ErrorCode::Corruption);
    assert!(
        b.read_window("w").is_err(),
        "a failed pull leaves nothing visible"
    );
    // Other blocks still read.
    assert_eq!(r.get_block(12, None).unwrap(), common::payload(12, 10_000));

    // A truncated first value; another block's value under this key; a missing part.
    let k0 = r.block_key(11, 0);
    cluster.cmd(&["SET", &k0, "short"]);
    assert!(matches!(
        r.get_block(11, None),
        Err(RemoteError::Corruption { .. })
    ));
    let v12 = cluster.cmd(&["--no-raw", "GET", &r.block_key(12, 0)]);
    assert!(!v12.is_empty());
    let (c_dir, _) = (tempfile::tempdir().unwrap(), ());
    let (c, _) = common::open(c_dir.path(), &engine);
    common::put(&c, "x", &[21], 100);
    push_window(&c, &r, "x", Some(Expect::New)).unwrap();
    // Copy block 21's value over block 14's first value: a value of another key.
    cluster.cmd(&["DEL", &r.block_key(14, 0)]);
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -c -p {p} --raw GET {src} | head -c -1 | redis-cli -c -p {p} -x SET {dst}",
            p = cluster.nodes[0].port,
            src = r.block_key(21, 0),
            dst = r.block_key(14, 0)
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    match r.get_block(14, None) {
        Err(RemoteError::Corruption { source, .. }) => {
            assert!(
                matches!(source, cwm::remote::value::ValueError::WrongKey { .. }),
                "{source}"
            )
        }
        other => panic!("expected a wrong-key refusal, got {other:?}"),
    }
    cluster.cmd(&["DEL", &r.block_key(12, 1)]);
    assert_eq!(
        r.get_block(12, None).expect_err("part gone").code(),
        ErrorCode::NotFound
    );

    // A forged head: fields that are not numbers, or a head naming another window.
    let head = r.window_key("w", "head");
    cluster.cmd(&["HSET", &head, "gen", "many"]);
    assert_eq!(
        r.head("w").expect_err("forged").code(),
        ErrorCode::Corruption
    );
    cluster.cmd(&["HSET", &head, "gen", "1", "name", "other"]);
    assert_eq!(
        r.head("w").expect_err("other name").code(),
        ErrorCode::Corruption
    );
    cluster.cmd(&["HSET", &head, "name", "w"]);
    // A manifest value replaced by other bytes of any length.
    let h = r.head("w").unwrap().unwrap();
    let mkey = r.window_key("w", &format!("m:{}", h.token));
    cluster.cmd(&["SETRANGE", &mkey, "40", "zz"]);
    assert_eq!(
        r.manifest("w").expect_err("manifest").code(),
        ErrorCode::Corruption
    );
    cluster.cmd(&["SET", &mkey, "x"]);
    assert_eq!(
        r.manifest("w").expect_err("manifest").code(),
        ErrorCode::Corruption
    );
    let e = pull_window(&b, &r, "w", Replace::No).expect_err("pull");
    assert_eq!(e.code(), ErrorCode::Corruption);
    assert!(
        b.list().unwrap().is_empty(),
        "nothing stored from a bad tier"
    );
}

/// A value whose (well-formed, checksummed) header claims a terabyte: a fill, which knows
/// each block's length but no checksum, refuses it before allocating anything for it — it
/// stores the valid prefix and says why — instead of the process aborting on the allocation.
#[test]
fn a_header_claiming_a_huge_length_is_refused_before_any_allocation() {
    let keys = [31u128, 32, 33];
    let (cluster, engine, r, _a_dir) = published(&keys);
    // Block 32's first value: a header for 2^40 bytes in parts of 4 GiB - 1, nothing after.
    let (len, chunk) = (1u64 << 40, u32::MAX);
    let mut h = Vec::new();
    h.extend_from_slice(b"CWMRB1\0\0");
    h.extend_from_slice(&32u128.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&(len.div_ceil(u64::from(chunk)) as u32).to_le_bytes());
    h.extend_from_slice(&chunk.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    assert_eq!(h.len(), cwm::remote::value::BLOCK_HEADER);
    let o = std::process::Command::new("redis-cli")
        .args([
            "-c",
            "-p",
            &cluster.nodes[0].port.to_string(),
            "-x",
            "SET",
            &r.block_key(32, 0),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&h)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);
    let f = cwm::remote::fill_prefix(
        &b,
        &r,
        common::spec("fill-w", &keys, 10_000),
        16,
        None,
        None,
        None,
    )
    .expect("fill of the valid prefix");
    assert_eq!((f.asked, f.blocks), (3, 1), "{f:?}");
    let why = f.stopped.unwrap_or_default();
    assert!(why.contains("expected"), "{why}");
    common::check(&b, "fill-w", &keys[..1], 10_000);
}
