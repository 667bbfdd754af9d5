//! An engine that registers after another went away (vLLM restarted: a new connection-scoped
//! registration under a new name) takes the idle staging pool instead of pinning a new one:
//! ten restarts hold one pool, not ten, and the reused pool moves bytes correctly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::{code, fixture, register_req};

use cwm::control::client::Client;
use cwm::layout::{Dtype, Layout};
use serde_json::json;

#[test]
fn engines_that_come_back_reuse_the_staging_pool() {
    let f = fixture(&[]);
    let l = Layout::flash_2nbhd(2, 64, 16, 2, 64, Dtype::Bf16);
    let mut admin = Client::connect(&f.daemon.socket).unwrap();
    let pools =
        |c: &mut Client| c.call_final(json!({"op": "health"})).unwrap()["staging_pools"].clone();
    let one = pools(&mut admin);
    let tokens: Vec<u32> = (0..64).collect();
    for restart in 0..10 {
        let mut c = Client::connect(&f.daemon.socket).unwrap();
        let mut reg = register_req(&f.paths);
        reg["engine"] = json!(format!("vllm-{restart}"));
        reg["scope"] = json!("connection");
        assert_eq!(code(&c.call_final(reg).unwrap()), "OK");
        let w = format!("w{restart}");
        let v = c
            .call_final(json!({"op": "freeze", "engine": format!("vllm-{restart}"),
                "window": w, "tokens": tokens, "block_ids": [0, 1, 2, 3]}))
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
        let dst = [40u64, 41, 42, 43];
        let v = c
            .call_final(json!({"op": "thaw", "engine": format!("vllm-{restart}"),
                "window": w, "block_ids": dst}))
            .unwrap();
        assert_eq!(code(&v), "OK", "{v}");
        for (i, &b) in dst.iter().enumerate() {
            assert_eq!(
                cwm::device::read_block(&l, &f.mem, b).unwrap(),
                cwm::device::read_block(&l, &f.mem, i as u64).unwrap()
            );
        }
        drop(c); // the engine goes with its connection
                 // Unregistration happens on the daemon's connection thread: wait for it.
        let t = std::time::Instant::now();
        while admin.call_final(json!({"op": "health"})).unwrap()["engines"] != 1 {
            assert!(t.elapsed().as_secs() < 10, "engine not unregistered");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    // The fixture's own engine holds one pool; all the restarts shared one more.
    assert_eq!(pools(&mut admin), json!(one.as_u64().unwrap() + 1));
}
