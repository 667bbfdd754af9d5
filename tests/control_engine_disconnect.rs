//! EC-040: the engine goes away during freeze and thaw. The KV cache lives in a forked child's
//! anonymous memory, registered with the daemon by pid and address (process_vm_readv/writev);
//! the child is killed; the freeze and the thaw fail with INTERRUPTED, no partial window is
//! visible, the session keeps its state, and the daemon keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::daemon::*;
use cwm::control::client::Client;
use serde_json::json;

#[test]
fn ec_040_engine_disconnect_during_freeze_and_thaw() {
    let per_layer = 2 * 64 * 4096usize;
    let mut tensors: Vec<Vec<u8>> = (0..2).map(|i| common::payload(50 + i, per_layer)).collect();
    let addrs: Vec<(u64, u64)> = tensors
        .iter_mut()
        .map(|t| (t.as_mut_ptr() as u64, per_layer as u64))
        .collect();
    // SAFETY: the child only calls pause() until it is killed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        loop {
            // SAFETY: async-signal-safe.
            unsafe { libc::pause() };
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let shm = tmp.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let d = start(
        &tmp.path().join("data"),
        &tmp.path().join("cwm.sock"),
        &shm,
        &[],
    );
    let mut c = Client::connect(&d.socket).unwrap();
    let mut reg = register_req(&[]);
    reg["memory"] = json!({"process": {"pid": pid, "tensors": addrs}});
    assert_eq!(code(&c.call_final(reg).unwrap()), "OK");
    let freeze = |c: &mut Client, session: &str, window: &str, base: u32| {
        c.call_final(
            json!({"op": "freeze", "engine": "e1", "session": session, "window": window,
            "tokens": (base..base + 64).collect::<Vec<u32>>(), "block_ids": [1, 2, 3, 4]}),
        )
        .unwrap()
    };
    assert_eq!(code(&freeze(&mut c, "other", "before", 0)), "OK");
    c.call_final(json!({"op": "session.open", "session": "s"}))
        .unwrap();
    // SAFETY: killing and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    // EC-040-a: freeze after the engine died.
    let r = freeze(&mut c, "s", "during", 1000);
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    assert_eq!(
        code(
            &c.call_final(json!({"op": "stat", "window": "during"}))
                .unwrap()
        ),
        "NOT_FOUND"
    );
    let st = c
        .call_final(json!({"op": "session.state", "session": "s"}))
        .unwrap();
    assert_eq!(
        st["session"]["state"], "ACTIVE",
        "session state not preserved: {st}"
    );
    assert_eq!(st["session"]["freezing"], false);
    // EC-040-b: thaw into the dead engine.
    let r = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "before", "block_ids": [10, 11, 12, 13]}))
        .unwrap();
    assert_eq!(code(&r), "INTERRUPTED", "{r}");
    // The window is intact and the daemon serves on.
    assert_eq!(
        c.call_final(json!({"op": "stat", "window": "before"}))
            .unwrap()["window"]["num_blocks"],
        4
    );
    assert_eq!(
        c.call_final(json!({"op": "health"})).unwrap()["status"],
        "ok"
    );
    // The same session can be frozen once an engine is back.
    let (paths, _mem) = engine_files(&shm);
    let mut reg = register_req(&paths);
    reg["engine"] = json!("e1");
    assert_eq!(code(&c.call_final(reg).unwrap()), "OK");
    assert_eq!(code(&freeze(&mut c, "s", "after", 2000)), "OK");
}
