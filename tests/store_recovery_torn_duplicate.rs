//! Two freezes that run at once may both write a record of one block. When the one that is
//! not committed leaves a torn copy behind (its write failed part-way while other records
//! followed, so it could not be cut back; or a crash tore it), that copy's header is whole —
//! the same key, length and checksum as the intact copy the committed window referred to.
//! The open must resolve the window's block to a copy whose bytes verify, not to the newest
//! header: the window reads back bit-exactly after the reopen. (Found by the concurrent
//! random-failpoint test: a short block write beside a committing freeze of the same block.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

const LEN: u64 = 64 << 10;

#[test]
fn a_torn_copy_written_after_the_committed_one_does_not_shadow_it() {
    for (ename, engine) in engines() {
        for checkpoints in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            let mut cfg = config(&dir);
            cfg.use_checkpoints = checkpoints;
            let key = 7u128;
            {
                let (store, _) =
                    cwm::store::Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
                // b writes the block first and commits; a writes its own copy after b's (both
                // began before either was committed), then gives up.
                let mut a = store.begin_window(spec("a", &[key, 8], LEN)).unwrap();
                let mut b = store.begin_window(spec("b", &[key], LEN)).unwrap();
                write_block(&mut b, 0, key as u64, LEN);
                write_block(&mut a, 0, key as u64, LEN);
                b.commit().unwrap();
                drop(a);
                check(&store, "b", &[key], LEN);
            }
            // Tear a's copy (the second of the two identical records): its payload's last
            // page zeroed, its header left whole.
            let seg = segments(&dir).into_iter().next().unwrap();
            let bytes = std::fs::read(&seg).unwrap();
            let p = payload(key as u64, LEN as usize);
            let copies: Vec<usize> = (0..bytes.len() / 4096)
                .map(|i| i * 4096)
                .filter(|&o| bytes.len() >= o + p.len() && bytes[o..o + 64] == p[..64])
                .collect();
            assert_eq!(copies.len(), 2, "{ename}: payload copies at {copies:?}");
            zero(&seg, (copies[1] + p.len() - 4096) as u64, 4096);
            let (store, rep) =
                cwm::store::Store::open_with_engine(cfg.clone(), engine.clone()).unwrap();
            assert!(rep.incomplete_windows.is_empty(), "{ename}: {rep:?}");
            check(&store, "b", &[key], LEN);
            assert_eq!(
                store.check_invariants().unwrap(),
                Vec::<String>::new(),
                "{ename}"
            );
        }
    }
}
