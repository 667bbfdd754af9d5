//! Memory a client registers may shrink, vanish or change under the daemon at any time. A
//! request that touches memory that is no longer there fails with INTERRUPTED — that request
//! only: the daemon keeps answering, other engines keep working, and the engine works again
//! once its memory is whole. (The daemon used to copy through a mapping of the client's shm
//! files and died of SIGBUS when a client truncated them.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::path::PathBuf;

use cwm::control::client::Client;
use cwm::device::host::ShmMemory;
use cwm::layout::{Dtype, Layout};
use serde_json::{json, Value};

/// One request; if the connection breaks, the daemon's fate is the failure message.
fn call(d: &mut Daemon, c: &mut Client, req: Value) -> Value {
    match c.call_final(req.clone()) {
        Ok(v) => v,
        Err(e) => {
            std::thread::sleep(std::time::Duration::from_millis(200));
            panic!(
                "{req}: no answer ({e}); the daemon: {:?}",
                d.child.try_wait()
            )
        }
    }
}

fn freeze(d: &mut Daemon, c: &mut Client, engine: &str, window: &str, blocks: &[u64]) -> Value {
    let tokens: Vec<u32> = (0..16 * blocks.len() as u32).collect();
    call(
        d,
        c,
        json!({"op": "freeze", "engine": engine, "window": window, "tokens": tokens,
            "block_ids": blocks}),
    )
}

fn thaw(d: &mut Daemon, c: &mut Client, engine: &str, window: &str, blocks: &[u64]) -> Value {
    call(
        d,
        c,
        json!({"op": "thaw", "engine": engine, "window": window, "block_ids": blocks}),
    )
}

/// The daemon answers `health` with ok.
fn assert_healthy(d: &mut Daemon, c: &mut Client) {
    let h = call(d, c, json!({"op": "health"}));
    assert_eq!(h["ok"], true, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
}

fn layout() -> Layout {
    Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16)
}

/// A second engine `e2` beside the fixture's `e1`, in its own files under the shm dir.
fn register_e2(f: &mut Fixture, c: &mut Client) -> ShmMemory {
    let dir = f.tmp.path().join("shm").join("e2");
    std::fs::create_dir_all(&dir).unwrap();
    let (paths, mem) = engine_files(&dir);
    let mut reg = register_req(&paths);
    reg["engine"] = json!("e2");
    reg["model"] = json!("tiny-e2");
    let r = call(&mut f.daemon, c, reg);
    assert_eq!(code(&r), "OK", "{r}");
    mem
}

/// e2 freezes and thaws into other blocks, bit-exact.
fn assert_other_engine_works(f: &mut Fixture, c: &mut Client, e2: &ShmMemory, window: &str) {
    let l = layout();
    let want: Vec<Vec<u8>> = (0..4)
        .map(|b| cwm::device::read_block(&l, e2, b).unwrap())
        .collect();
    let r = freeze(&mut f.daemon, c, "e2", window, &[0, 1, 2, 3]);
    assert_eq!(r["status"], "durable", "{r}");
    let r = thaw(&mut f.daemon, c, "e2", window, &[40, 41, 42, 43]);
    assert_eq!(r["status"], "loaded", "{r}");
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &cwm::device::read_block(&l, e2, 40 + i as u64).unwrap(),
            w,
            "e2 block {i}"
        );
    }
}

/// Sets every file of `paths` to `len` bytes.
fn set_len(paths: &[PathBuf], len: u64) {
    for p in paths {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len)
            .unwrap();
    }
}

const FULL: u64 = 2 * 64 * 4096;

/// Registers e1 and e2, freezes a window from e1, damages e1's files with `damage`, then:
/// freeze and thaw with e1 fail with INTERRUPTED and leave nothing behind, the daemon stays
/// healthy, e2 keeps working, e1 works again once `repair` made its files whole, and
/// unregistering e1 works.
fn check(damage: impl Fn(&[PathBuf]), repair: impl Fn(&[PathBuf])) {
    let mut f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let e2 = register_e2(&mut f, &mut c);
    let r = freeze(&mut f.daemon, &mut c, "e1", "before", &[0, 1, 2, 3]);
    assert_eq!(r["status"], "durable", "{r}");

    damage(&f.paths);

    let r = freeze(&mut f.daemon, &mut c, "e1", "after", &[4, 5, 6, 7]);
    assert_eq!(code(&r), "INTERRUPTED", "freeze from damaged memory: {r}");
    let r = call(
        &mut f.daemon,
        &mut c,
        json!({"op": "stat", "window": "after"}),
    );
    assert_eq!(
        code(&r),
        "NOT_FOUND",
        "a failed freeze leaves no window: {r}"
    );
    let r = thaw(&mut f.daemon, &mut c, "e1", "before", &[8, 9, 10, 11]);
    assert_eq!(code(&r), "INTERRUPTED", "thaw into damaged memory: {r}");
    assert_healthy(&mut f.daemon, &mut c);
    // Another connection, another engine: unaffected.
    let mut c2 = Client::connect(&f.daemon.socket).unwrap();
    assert_other_engine_works(&mut f, &mut c2, &e2, "other");

    // Whole again: the same registration works (no re-register needed).
    repair(&f.paths);
    let r = thaw(&mut f.daemon, &mut c, "e1", "before", &[8, 9, 10, 11]);
    assert_eq!(r["status"], "loaded", "thaw once whole again: {r}");
    let r = freeze(&mut f.daemon, &mut c, "e1", "after", &[8, 9, 10, 11]);
    assert_eq!(r["status"], "durable", "freeze once whole again: {r}");

    // Damaged again, then unregistered: fine, and the daemon still serves.
    damage(&f.paths);
    let r = call(
        &mut f.daemon,
        &mut c,
        json!({"op": "unregister", "engine": "e1"}),
    );
    assert_eq!(code(&r), "OK", "{r}");
    assert_healthy(&mut f.daemon, &mut c);
    assert_other_engine_works(&mut f, &mut c2, &e2, "other2");
}

#[test]
fn shm_truncated_to_zero_fails_requests_with_interrupted_and_the_daemon_survives() {
    check(|p| set_len(p, 0), |p| set_len(p, FULL));
}

#[test]
fn shm_shrunk_by_half_fails_requests_with_interrupted_and_the_daemon_survives() {
    check(|p| set_len(p, FULL / 2), |p| set_len(p, FULL));
}

#[test]
fn shm_shrunk_inside_its_last_page_fails_requests_with_interrupted() {
    // Bytes past the end of a file but inside its last page read as zeros through a mapping
    // (no fault): a freeze must not store them as KV.
    let mut f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    set_len(&f.paths, FULL - 100);
    let last = 63u64; // its V piece ends at the end of each file
    let r = freeze(&mut f.daemon, &mut c, "e1", "tail", &[last]);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    set_len(&f.paths, FULL);
    let r = freeze(&mut f.daemon, &mut c, "e1", "tail", &[last]);
    assert_eq!(r["status"], "durable", "{r}");
    set_len(&f.paths, FULL - 100);
    let r = thaw(&mut f.daemon, &mut c, "e1", "tail", &[last]);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    assert_healthy(&mut f.daemon, &mut c);
}

#[test]
fn shm_unlinked_then_truncated_through_the_clients_descriptor_fails_with_interrupted() {
    // Unlinking alone takes nothing away (the shm_open/shm_unlink idiom: the daemon holds the
    // file open, the engine its mapping, and transfers keep working). Truncating the unlinked
    // file through a descriptor the client kept takes the memory away.
    let mut f = fixture(&[]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let held: Vec<std::fs::File> = f
        .paths
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p).unwrap())
        .collect();
    for p in &f.paths {
        std::fs::remove_file(p).unwrap();
    }
    let l = layout();
    let want = cwm::device::read_block(&l, &f.mem, 0).unwrap();
    let r = freeze(&mut f.daemon, &mut c, "e1", "w", &[0]);
    assert_eq!(r["status"], "durable", "unlinked, still held: {r}");
    let r = thaw(&mut f.daemon, &mut c, "e1", "w", &[20]);
    assert_eq!(r["status"], "loaded", "{r}");
    assert_eq!(cwm::device::read_block(&l, &f.mem, 20).unwrap(), want);
    for h in &held {
        h.set_len(0).unwrap();
    }
    let r = freeze(&mut f.daemon, &mut c, "e1", "w2", &[0]);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    let r = thaw(&mut f.daemon, &mut c, "e1", "w", &[20]);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    // A new file at the old path is not the registered memory: still INTERRUPTED.
    for p in &f.paths {
        std::fs::File::create(p).unwrap().set_len(FULL).unwrap();
    }
    let r = thaw(&mut f.daemon, &mut c, "e1", "w", &[20]);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    assert_healthy(&mut f.daemon, &mut c);
    let r = call(
        &mut f.daemon,
        &mut c,
        json!({"op": "unregister", "engine": "e1"}),
    );
    assert_eq!(code(&r), "OK", "{r}");
    assert_healthy(&mut f.daemon, &mut c);
}

#[test]
fn shm_shrinking_and_growing_during_transfers_never_crashes_the_daemon() {
    let mut f = fixture(&["--max-line", "1048576"]);
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let blocks: Vec<u64> = (0..32).collect();
    let r = freeze(&mut f.daemon, &mut c, "e1", "w", &blocks);
    assert_eq!(r["status"], "durable", "{r}");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let paths = f.paths.clone();
    let (mut loaded, mut interrupted) = (0, 0);
    std::thread::scope(|s| {
        // Stops the resizing thread however this scope ends (a failed assertion included).
        let _stop = SetOnDrop(&stop);
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                set_len(&paths, [0, FULL / 3, FULL - 4095, FULL][(i % 4) as usize]);
                i += 1;
                std::thread::yield_now();
            }
            set_len(&paths, FULL);
        });
        for i in 0..40 {
            let dst: Vec<u64> = (32..64).collect();
            let r = if i % 2 == 0 {
                thaw(&mut f.daemon, &mut c, "e1", "w", &dst)
            } else {
                freeze(&mut f.daemon, &mut c, "e1", &format!("f{i}"), &dst)
            };
            match code(&r) {
                "OK" => loaded += 1,
                "INTERRUPTED" => interrupted += 1,
                other => panic!("request {i}: {other}: {r}"),
            }
        }
    });
    eprintln!("{loaded} completed, {interrupted} interrupted");
    assert_healthy(&mut f.daemon, &mut c);
    let r = thaw(
        &mut f.daemon,
        &mut c,
        "e1",
        "w",
        &(32..64).collect::<Vec<u64>>(),
    );
    assert_eq!(r["status"], "loaded", "whole again: {r}");
}

struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A forked child that only waits to be killed; killed and reaped at the latest on drop.
struct Paused(i32);

impl Paused {
    fn fork() -> Self {
        // SAFETY: the child only calls pause() until it is killed.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            loop {
                // SAFETY: async-signal-safe.
                unsafe { libc::pause() };
            }
        }
        Self(pid)
    }

    fn kill(&mut self) {
        if self.0 > 0 {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
            self.0 = 0;
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Anonymous memory of `pages` pages at a fixed place in this process (and so in a child
/// forked from it), with `unmapped` of its pages at the end unmapped again.
fn anon(pages: usize, unmapped: usize) -> u64 {
    let len = pages * 4096;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    if unmapped > 0 {
        // SAFETY: unmapping the tail of the mapping just made, which nothing refers to.
        let rc = unsafe {
            libc::munmap(
                p.cast::<u8>().add((pages - unmapped) * 4096).cast(),
                unmapped * 4096,
            )
        };
        assert_eq!(rc, 0);
    }
    p as u64
}

#[test]
fn process_memory_unmapped_or_exited_fails_with_interrupted_and_the_daemon_survives() {
    let pages = (FULL / 4096) as usize;
    // Tensor 0 wholly mapped; tensor 1's second half (every V piece) unmapped.
    let t0 = anon(pages, 0);
    let t1 = anon(pages, pages / 2);
    let mut child = Paused::fork();
    let pid = child.0;
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let mut d = start(
        &tmp.path().join("data"),
        &tmp.path().join("cwm.sock"),
        &shm,
        &[],
    );
    let mut c = Client::connect(&d.socket).unwrap();
    let register = |d: &mut Daemon, c: &mut Client, name: &str, tensors: Value| {
        let mut reg = register_req(&[]);
        reg["engine"] = json!(name);
        reg["memory"] = json!({"process": {"pid": pid, "tensors": tensors}});
        let r = call(d, c, reg);
        assert_eq!(code(&r), "OK", "{r}");
    };
    // A range that starts unmapped (nothing at all is transferred) and one that ends unmapped.
    register(
        &mut d,
        &mut c,
        "hole",
        json!([[t1 + FULL / 2, FULL], [t0, FULL]]),
    );
    register(&mut d, &mut c, "half", json!([[t0, FULL], [t1, FULL]]));
    for e in ["hole", "half"] {
        let r = freeze(&mut d, &mut c, e, &format!("{e}-w"), &[0, 1]);
        assert_eq!(code(&r), "INTERRUPTED", "freeze from {e}: {r}");
    }
    // A window to thaw: from another engine whose memory is all there (tensor 0 twice).
    register(&mut d, &mut c, "whole", json!([[t0, FULL], [t0, FULL]]));
    let r = freeze(&mut d, &mut c, "whole", "w", &[0, 1]);
    assert_eq!(r["status"], "durable", "{r}");
    for e in ["hole", "half"] {
        let r = thaw(&mut d, &mut c, e, "w", &[2, 3]);
        assert_eq!(code(&r), "INTERRUPTED", "thaw into {e}: {r}");
    }
    assert_healthy(&mut d, &mut c);
    child.kill();
    let r = thaw(&mut d, &mut c, "whole", "w", &[2, 3]);
    assert_eq!(code(&r), "INTERRUPTED", "thaw into an exited process: {r}");
    let r = freeze(&mut d, &mut c, "whole", "w2", &[2, 3]);
    assert_eq!(
        code(&r),
        "INTERRUPTED",
        "freeze from an exited process: {r}"
    );
    assert_healthy(&mut d, &mut c);
    let r = call(
        &mut d,
        &mut c,
        json!({"op": "unregister", "engine": "whole"}),
    );
    assert_eq!(code(&r), "OK", "{r}");
    // A shared-memory engine on the same daemon still works (another model: the same tokens
    // under the same namespace would deduplicate into the blocks frozen above).
    let (paths, mem) = engine_files(&shm);
    let mut reg = register_req(&paths);
    reg["model"] = json!("tiny-shm");
    let r = call(&mut d, &mut c, reg);
    assert_eq!(code(&r), "OK", "{r}");
    let want = cwm::device::read_block(&layout(), &mem, 0).unwrap();
    let r = freeze(&mut d, &mut c, "e1", "shm", &[0]);
    assert_eq!(r["status"], "durable", "{r}");
    let r = thaw(&mut d, &mut c, "e1", "shm", &[9]);
    assert_eq!(r["status"], "loaded", "{r}");
    assert_eq!(cwm::device::read_block(&layout(), &mem, 9).unwrap(), want);
}
