//! EC-022 for the shared tier: a pull (or a fill) sizes the batches it holds in flight to the
//! memory available — down to one block a stage — and when not even that fits, it is refused
//! with INSUFFICIENT_MEMORY before anything is fetched or stored. (Before, a pull held up to
//! six 64 MiB batches whatever the memory, and the thaw's memory check did not count them.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use cwm::error::ErrorCode;
use cwm::layout::{Dtype, Layout};
use cwm::remote::{
    fill_published_prefix, pull_window, pull_window_since, push_window, Expect, Remote,
    RemoteConfig,
};
use cwm::store::format::record_len;
use cwm::store::Replace;
use cwm::tier::RamTier;

fn remote(urls: Vec<String>, memory: u64) -> Remote {
    Remote::connect(RemoteConfig {
        nodes: urls,
        memory_available: Some(memory),
        ..Default::default()
    })
    .expect("connect")
}

#[test]
fn ec_022_a_pull_fits_its_batches_to_memory_or_is_refused_before_fetching() {
    let cluster = common::redis::Cluster::start(3, 0);
    let (_, engine) = common::engines().remove(0);
    // A real layout (a fill reads its block size from it): 16 KiB blocks.
    let layout = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let len = layout.block_bytes();
    let rec = record_len(len);
    let keys: Vec<u128> = (1..=24u128).map(|i| i * 0x3_0000_0007).collect();
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) = common::open(a_dir.path(), &engine);
    common::put_laid_out(&a, "w", &keys, &layout);
    push_window(
        &a,
        &remote(cluster.urls(), u64::MAX),
        "w",
        Some(Expect::New),
    )
    .unwrap();

    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);
    // Four stages (fetching counts twice, queued, written) of one block each do not fit.
    let short = remote(cluster.urls(), 4 * rec - 1);
    let e = pull_window(&b, &short, "w", Replace::No).expect_err("too little memory");
    assert_eq!(e.code(), ErrorCode::InsufficientMemory, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "{} bytes needed, {} available",
            4 * rec,
            4 * rec - 1
        )),
        "{e}"
    );
    let e = fill_published_prefix(&b, &short, "w", |n, k| format!("fill-{n}-{k:032x}"), None)
        .expect_err("too little memory for a fill");
    assert_eq!(e.code(), ErrorCode::InsufficientMemory, "{e}");
    assert!(b.read_window("w").is_err(), "nothing stored");
    assert!(b.list().unwrap().is_empty(), "nothing stored");
    assert_eq!(b.block_bytes().unwrap(), 0, "no block written");

    // Delivered as they arrive (a RAM tier here), two more stages: six blocks' worth.
    let tier = RamTier::new(64 << 20);
    let four = remote(cluster.urls(), 4 * rec);
    let e = pull_window_since(&b, &four, "w", Replace::No, 0, Some(&tier), None)
        .expect_err("delivered: six stages");
    assert_eq!(e.code(), ErrorCode::InsufficientMemory, "{e}");
    assert_eq!(b.block_bytes().unwrap(), 0, "no block written");

    // Exactly one block a stage: the pull runs in one-block batches, bit-exact.
    let r = pull_window(&b, &four, "w", Replace::No).expect("pull in one-block batches");
    assert_eq!((r.blocks, r.fetched), (24, 24));
    common::check(&b, "w", &keys, len);
    // With memory to spare, as before.
    let c_dir = tempfile::tempdir().unwrap();
    let (c, _) = common::open(c_dir.path(), &engine);
    let r = pull_window_since(
        &c,
        &remote(cluster.urls(), 1 << 30),
        "w",
        Replace::No,
        0,
        Some(&tier),
        None,
    )
    .expect("pull");
    assert_eq!(r.fetched, 24);
    common::check(&c, "w", &keys, len);
}
