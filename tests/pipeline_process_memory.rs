//! The process_vm_readv/writev route: the KV cache lives in another process's anonymous memory
//! (a forked child holding a flash-layout cache at the addresses the parent knows), frozen from
//! it and thawed back into it, then read back out of the child and compared.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;
use cwm::device::host::ProcessMemory;
use cwm::layout::{Dtype, Layout};
use cwm::pipeline::{freeze, thaw, Engine, FreezeRequest, PipelineConfig, ThawRequest};
use cwm::pipeline::{FreezeOptions, ThawOptions};
use std::sync::Arc;

#[test]
fn freeze_and_thaw_through_another_process_memory() {
    let layout = Layout::flash_2nbhd(2, 16, 16, 2, 64, Dtype::Bf16);
    let per_layer = 2 * 16 * 16 * 2 * 64 * 2u64;
    // The "engine": two layer tensors, filled, then handed to a forked child process.
    let mut tensors: Vec<Vec<u8>> = (0..2)
        .map(|l| payload(100 + l, per_layer as usize))
        .collect();
    let addrs: Vec<(u64, u64)> = tensors
        .iter_mut()
        .map(|t| (t.as_mut_ptr() as u64, per_layer))
        .collect();
    // SAFETY: the child only calls pause() until it is killed; it touches no locks.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        loop {
            // SAFETY: pause is async-signal-safe.
            unsafe { libc::pause() };
        }
    }
    // Parent: forget our copy's contents so every check reads the child's memory.
    for t in tensors.iter_mut() {
        t.fill(0);
    }
    let mem = Arc::new(ProcessMemory::new(pid, addrs));
    let read_block = |id: u64| cwm::device::read_block(&layout, mem.as_ref(), id).unwrap();
    let before: Vec<Vec<u8>> = (0..4).map(read_block).collect();
    assert!(before[0].iter().any(|&b| b != 0));
    let eng = Engine::new(layout.clone(), mem.clone(), "m", None).unwrap();
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let tokens: Vec<u32> = (0..60).collect();
    freeze(
        &store,
        &eng,
        FreezeRequest {
            window: "remote".into(),
            session: "s".into(),
            tokens,
            block_ids: vec![0, 1, 2, 3],
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap();
    thaw(
        &store,
        &eng,
        &ThawRequest {
            prefix: false,
            first_block: 0,
            window: "remote".into(),
            block_ids: vec![12, 13, 14, 15],
            expect_tokens: None,
            salt: None,
        },
        &PipelineConfig::default(),
        &ThawOptions::default(),
    )
    .unwrap();
    for i in 0..4 {
        assert_eq!(read_block(12 + i as u64), before[i], "block {i}");
    }
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    // The engine is gone: a freeze fails with INTERRUPTED and leaves no window.
    let err = freeze(
        &store,
        &eng,
        FreezeRequest {
            window: "gone".into(),
            session: "s".into(),
            tokens: (500..516).collect(),
            block_ids: vec![5],
            ..Default::default()
        },
        &PipelineConfig::default(),
        &FreezeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "INTERRUPTED", "{err}");
    assert!(store.get("gone").is_err());
}
