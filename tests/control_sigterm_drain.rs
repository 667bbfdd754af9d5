//! SIGTERM while a freeze is between `captured` and `durable` (the engine already has its
//! blocks back, so cwm holds the only copy): the daemon finishes it before exiting — the
//! client gets `durable` and the window is there after a restart, bit-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{fixture_n, register_req_n, start};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

#[test]
fn sigterm_lets_a_captured_freeze_become_durable() {
    let n = 240u64; // fits in the capture share of the fixture's 8 MiB staging
    let mut f = fixture_n(&["--max-line", "1048576"], 256);
    let l = Layout::flash_2nbhd(2, 256, 16, 2, 64, Dtype::Bf16);
    let want: Vec<Vec<u8>> = (0..n)
        .map(|b| cwm::device::read_block(&l, &f.mem, b).unwrap())
        .collect();
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let tokens: Vec<u32> = (0..16 * n as u32).collect();
    c.send_raw(
        json!({"op": "freeze", "engine": "e1", "window": "w", "tokens": tokens,
            "block_ids": (0..n).collect::<Vec<u64>>()})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let first = c.read_line().unwrap();
    assert_eq!(first["status"], "captured", "{first}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(f.daemon.child.id() as i32, libc::SIGTERM) };
    let last = c.read_line().unwrap();
    assert_eq!(last["status"], "durable", "{last}");
    let st = f.daemon.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    // After a restart the window is there, whole.
    let p = f.tmp.path().to_path_buf();
    f.daemon = start(
        &p.join("data"),
        &p.join("cwm.sock"),
        &p.join("shm"),
        &["--max-line", "1048576"],
    );
    let mut c = Client::connect(&f.daemon.socket).unwrap();
    let mut reg = register_req_n(&f.paths, 256);
    reg["engine"] = json!("e1");
    assert_eq!(c.call_final(reg).unwrap()["ok"], true);
    let dst: Vec<u64> = (0..n).collect();
    for t in 0..2 {
        f.mem.fill_random(t, 77).unwrap();
    }
    let v = c
        .call_final(json!({"op": "thaw", "engine": "e1", "window": "w", "block_ids": dst}))
        .unwrap();
    assert_eq!(v["status"], "loaded", "{v}");
    for b in 0..n {
        assert_eq!(
            cwm::device::read_block(&l, &f.mem, b).unwrap(),
            want[b as usize]
        );
    }
}
