//! Helpers shared by the integration tests. Every store scenario runs on both I/O engines.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]
pub mod daemon;
pub mod kv;
pub mod redis;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cwm::io::fault::FaultEngine;
use cwm::io::psync::PsyncEngine;
use cwm::io::uring::UringEngine;
use cwm::io::AlignedBuf;
use cwm::io::IoEngine;
use cwm::store::format::{payload_offset, record_len};
use cwm::store::{
    BlockDesc, BlockImage, RecoveryReport, Store, StoreConfig, WindowSpec, WindowWriter,
};

/// Both engines (io_uring only where the kernel allows it; the skip is printed).
pub fn engines() -> Vec<(&'static str, Arc<dyn IoEngine>)> {
    let mut v: Vec<(&'static str, Arc<dyn IoEngine>)> =
        vec![("psync", Arc::new(PsyncEngine::new()))];
    match UringEngine::new(32) {
        Ok(e) => v.push(("io_uring", Arc::new(e))),
        Err(e) => eprintln!("SKIPPED io_uring engine: {e}"),
    }
    v
}

/// A config with small segments so file-level surgery stays cheap.
pub fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 4 << 20;
    c
}

pub fn open(dir: &Path, engine: &Arc<dyn IoEngine>) -> (Store, RecoveryReport) {
    verified(Store::open_with_engine(config(dir), engine.clone()).expect("open store"))
}

/// Opens with the first engine and no checkpoints: every segment scanned, so file surgery on
/// a cleanly stopped store is seen by the scan (a checkpoint would stand in for it).
pub fn no_checkpoints(dir: &Path) -> StoreConfig {
    let mut c = config(dir);
    c.use_checkpoints = false;
    c
}

/// [`no_checkpoints`] opened with the first engine.
pub fn open_scanned(dir: &Path) -> (Store, RecoveryReport) {
    let (_, engine) = engines().remove(0);
    Store::open_with_engine(no_checkpoints(dir), engine).expect("open store")
}

/// What an open reports once the walk of its checkpointed segments is done (what `health`
/// shows when `cwm serve` has verified them in the background): the open's report with the
/// walk's damaged regions and incomplete windows added.
pub fn verified((store, mut rep): (Store, RecoveryReport)) -> (Store, RecoveryReport) {
    let v = store.verify_checkpoints().expect("verify checkpoints");
    rep.damaged_regions.extend(v.damaged_regions);
    for w in v.incomplete_windows {
        if !rep.incomplete_windows.contains(&w) {
            rep.incomplete_windows.push(w);
        }
    }
    (store, rep)
}

/// What a kill -9 leaves beside the segments: the newest (active) segment has no checkpoint
/// (that one is written at a clean stop only). Tests that make a crash's torn tail out of a
/// cleanly stopped store's files call this first.
pub fn as_after_kill(dir: &Path) {
    if let Some(newest) = segments(dir).last() {
        let _ = std::fs::remove_file(newest.with_extension("ckpt"));
    }
}

pub fn fault(engine: &Arc<dyn IoEngine>) -> Arc<FaultEngine> {
    Arc::new(FaultEngine::new(engine.clone()))
}

/// Deterministic payload bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    cwm::prng::fill_random(&mut v, seed.wrapping_mul(0x9E37_79B9) + 1);
    v
}

/// A spec with the given keys, each block `len` bytes.
pub fn spec(name: &str, keys: &[u128], len: u64) -> WindowSpec {
    WindowSpec {
        name: name.into(),
        session: format!("session-{name}"),
        namespace: "test-model".into(),
        layout: b"{\"test\":1}".to_vec(),
        tokens: (0..keys.len() as u32 * 16).collect(),
        blocks: keys.iter().map(|&key| BlockDesc { key, len }).collect(),
        ..Default::default()
    }
}

/// Writes a window whose block `i` holds `payload(key, len)`.
pub fn put(store: &Store, name: &str, keys: &[u128], len: u64) -> cwm::store::WindowInfo {
    put_spec(store, spec(name, keys, len)).expect("put window")
}

/// [`put`] with a real layout (`len` = its block bytes), for what reads the layout back: a
/// fill of a published prefix takes its block size from it.
pub fn put_laid_out(
    store: &Store,
    name: &str,
    keys: &[u128],
    layout: &cwm::layout::Layout,
) -> cwm::store::WindowInfo {
    let spec = WindowSpec {
        layout: layout.to_json(),
        ..spec(name, keys, layout.block_bytes())
    };
    put_spec(store, spec).expect("put window")
}

/// Puts `s`, each block holding `payload(key, len)`.
pub fn put_spec(
    store: &Store,
    s: WindowSpec,
) -> Result<cwm::store::WindowInfo, cwm::store::StoreError> {
    let payloads: Vec<Vec<u8>> = s
        .blocks
        .iter()
        .map(|b| payload(b.key as u64, b.len as usize))
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    store.put_window(s, &refs)
}

/// Asserts a window reads back verified and bit-exact.
pub fn check(store: &Store, name: &str, keys: &[u128], len: u64) {
    let (m, blocks) = store
        .read_window(name)
        .unwrap_or_else(|e| panic!("read {name}: {e}"));
    assert_eq!(m.blocks.len(), keys.len());
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(
            b,
            &payload(keys[i] as u64, len as usize),
            "{name} block {i}"
        );
    }
}

pub fn keys(base: u128, n: usize) -> Vec<u128> {
    (0..n as u128).map(|i| (base << 32) | i).collect()
}

/// The segment checkpoint files (`*.ckpt`) of a data dir, sorted.
pub fn checkpoint_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
        .collect();
    v.sort();
    v
}

/// The segment files of a data dir, sorted.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    v.sort();
    v
}

/// Copies a data dir (without its LOCK file).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        if e.file_name() == "LOCK" || e.path().is_dir() {
            continue;
        }
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Flips one bit of a file.
pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 1 << bit;
    f.write_all_at(&b, offset).expect("write");
    f.sync_all().expect("sync");
}

/// A tmpfs mounted for a test, unmounted on drop (also when an assertion fails).
pub struct Tmpfs(pub PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Stores windows 0, 1, … with `put` until one fails; returns how many fitted and the error
/// (at most `limit` tries).
pub fn fill_until_error(
    limit: u128,
    mut put: impl FnMut(u128) -> Result<(), cwm::store::StoreError>,
) -> (u128, cwm::store::StoreError) {
    let mut n = 0u128;
    loop {
        match put(n) {
            Ok(()) => n += 1,
            Err(e) => return (n, e),
        }
        assert!(n < limit, "never filled after {limit} windows");
    }
}

/// Mounts a tmpfs of `size` (mount's syntax, "64m") at `dir` (created); `None`, saying why on
/// stderr, where mounting is not allowed (the test then reports itself skipped).
pub fn mount_tmpfs(dir: &Path, size: &str) -> Option<Tmpfs> {
    std::fs::create_dir_all(dir).unwrap();
    match std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
    {
        Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            eprintln!("skipped: cannot mount tmpfs ({why})");
            None
        }
        Err(e) => {
            eprintln!("skipped: cannot mount tmpfs ({e})");
            None
        }
    }
}

/// The record image of a block holding `payload(seed, len)` (header filled in by the writer).
pub fn block_image(seed: u64, len: u64) -> AlignedBuf {
    let p = payload(seed, len as usize);
    let mut img = AlignedBuf::zeroed(record_len(len) as usize);
    let po = payload_offset(len);
    img[po..po + p.len()].copy_from_slice(&p);
    img
}

/// Writes block `i` of a window being written: `payload(seed, len)`.
pub fn write_block(w: &mut WindowWriter<'_>, i: usize, seed: u64, len: u64) {
    let mut img = block_image(seed, len);
    w.write_blocks(&mut [BlockImage {
        index: i,
        image: &mut img[..],
        checksum: None,
    }])
    .unwrap();
}

/// Overwrites `len` bytes at `from` with zeros, durably.
pub fn zero(path: &Path, from: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], from).unwrap();
    f.sync_all().unwrap();
}

/// Offsets of the pages of a segment file that start with a record header's magic.
pub fn record_pages(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    (0..bytes.len() / 4096)
        .filter(|p| &bytes[p * 4096..p * 4096 + 4] == b"CWMR")
        .map(|p| (p * 4096) as u64)
        .collect()
}

/// Files in `dir` whose name ends with `suffix`.
pub fn files_ending(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

/// Bytes free for an unprivileged writer on the file system holding `dir` (statvfs).
pub fn free(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs is plain old data; all zeros is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(rc, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Compacts every sealed segment holding any garbage (live ratio 1.0).
pub fn compact_everything(store: &Store) -> cwm::store::CompactReport {
    store
        .compact(
            &cwm::store::CompactOptions {
                live_ratio: 1.0,
                ..Default::default()
            },
            &mut |_| {},
        )
        .expect("compact")
}
