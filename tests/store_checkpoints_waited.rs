//! `Store::wait_checkpoints` returns only once every checkpoint started in the background is
//! written — also those of segments sealed one right after another, while earlier
//! checkpoints are still being written (a daemon's drain relies on it before it stops).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::Store;

const SEALS: u128 = 24;

#[test]
fn every_background_checkpoint_is_written_when_the_wait_returns() {
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (store, _) = Store::open_with_engine(config(&dir), engine.clone()).unwrap();
        // A segment of many one-page records (a long checkpoint to write), sealed, then
        // small windows sealed one right after another: the long checkpoint is still being
        // written when the next ones start.
        for i in 0..SEALS {
            let n = if i == 0 { 16 } else { 1 };
            for j in 0..if i == 0 { 60 } else { 1 } {
                put(
                    &store,
                    &format!("w{i}-{j}"),
                    &keys(1000 * (i + 1) + 20 * j, n),
                    1000,
                );
            }
            store.seal_active().unwrap();
        }
        store.wait_checkpoints();
        // Every segment is sealed (the last seal started no new one).
        let sealed = files_ending(&dir, ".log");
        assert!(sealed >= SEALS as usize, "{ename}: {sealed} segments");
        assert_eq!(
            files_ending(&dir, ".ckpt"),
            sealed,
            "{ename}: checkpoints missing when the wait returned"
        );
        assert_eq!(
            files_ending(&dir, ".tmp"),
            0,
            "{ename}: one still being written"
        );
        drop(store);
        let (store, rep) = Store::open_with_engine(config(&dir), engine.clone()).unwrap();
        assert_eq!(rep.checkpointed_segments, sealed as u64, "{ename}: {rep:?}");
        check(&store, "w0-59", &keys(1000 + 20 * 59, 16), 1000);
        check(&store, "w1-0", &keys(2000, 1), 1000);
    }
}
