//! A manifest is appended only once every block record handed out before it is written
//! (docs/FORMAT.md, "Room handed out and never written"): that is what lets recovery call
//! unwritten room after the last metadata record a torn tail and anything before it damage.
//! Freeze A's block write is held in the engine after its room was handed out; freeze B,
//! started meanwhile, commits — with a block of its own, or with only blocks the store holds
//! (its commit appends nothing but the manifest): its manifest must wait for A's write.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cwm::io::fault::{FaultEngine, FaultPlan};
use cwm::io::IoEngine;
use cwm::store::Store;

const LEN: u64 = 64 << 10;

/// Freeze A's block write is held; freeze B (blocks `b_keys`) commits meanwhile: B's commit
/// must not return before A's write is let go, and both windows survive a reopen.
fn b_waits_for_a(b_keys: &[u128]) {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let fe = Arc::new(FaultEngine::new(engine.clone()));
        let dyn_fe: Arc<dyn IoEngine> = fe.clone();
        let (store, _) = Store::open_with_engine(config(tmp.path()), dyn_fe).unwrap();
        // A first window creates the segment (its header write would otherwise be the held
        // write, under the appender lock).
        put(&store, "first", &keys(3, 1), LEN);
        // The next write op (A's block) is held until released.
        fe.set_plan(FaultPlan {
            hold_write: Some(0),
            ..Default::default()
        });
        let released = AtomicBool::new(false);
        let b_done_while_held = AtomicBool::new(false);
        std::thread::scope(|s| {
            let a = s.spawn(|| {
                let mut w = store.begin_window(spec("a", &keys(1, 1), LEN)).unwrap();
                write_block(&mut w, 0, keys(1, 1)[0] as u64, LEN);
                w.commit().unwrap();
            });
            let t = Instant::now();
            while !fe.holding() {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{name}: A never wrote"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let b = s.spawn(|| {
                put(&store, "b", b_keys, LEN);
                // B's commit returned: A's held write must have been let go by then.
                if !released.load(Ordering::SeqCst) {
                    b_done_while_held.store(true, Ordering::SeqCst);
                }
            });
            // Give B every chance to (wrongly) finish while A's write is held; a correct
            // store keeps it waiting however long this is.
            let t = Instant::now();
            while !b.is_finished() && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
            released.store(true, Ordering::SeqCst);
            fe.release();
            b.join().unwrap();
            a.join().unwrap();
        });
        assert!(
            !b_done_while_held.load(Ordering::SeqCst),
            "{name}: B's manifest was appended while A's handed-out block was unwritten"
        );
        check(&store, "a", &keys(1, 1), LEN);
        check(&store, "b", b_keys, LEN);
        drop(store);
        let (store, rep) = Store::open_with_engine(config(tmp.path()), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{name}: {rep:?}");
        check(&store, "a", &keys(1, 1), LEN);
        check(&store, "b", b_keys, LEN);
    }
}

#[test]
fn a_commit_waits_for_block_records_handed_out_before_its_manifest() {
    b_waits_for_a(&keys(2, 1));
}

/// Also when B wrote no block at all (every block deduplicated against "first"): its commit
/// appends nothing but the manifest, which must still wait — the waiting belongs to the
/// metadata append itself, not to a block append before it.
#[test]
fn a_commit_of_only_deduplicated_blocks_still_waits_for_earlier_block_records() {
    b_waits_for_a(&keys(3, 1));
}
