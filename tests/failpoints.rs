//! Failpoints (feature `failpoints`) at every write-path site — block write, manifest write,
//! catalog (meta) write, tombstone write (an eviction's), fdatasync, compaction copy, segment
//! rotation, segment unlink — with every action (error, short write, panic). After the fault
//! and a reopen, nothing partial is visible, every window committed before reads back
//! bit-exactly (the unnamed window a failed eviction chose included), a deleted window stays
//! deleted, the catalog keeps its last committed value, the index is consistent, and the log
//! accepts new windows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]
mod common;
use common::*;

use cwm::failpoint::{self, Action};
use cwm::store::{CompactOptions, Store, StoreConfig};

const LEN: u64 = 64 << 10;

/// Failpoints are process-wide: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 1 << 20;
    c
}

/// a, x, b fill most of segment 1, c spans segments 1 and 2; x is then deleted (garbage in a sealed
/// segment, for compaction); catalog key 5 holds "old".
fn base(store: &Store) {
    put(store, "a", &keys(1, 4), LEN);
    put(store, "x", &keys(2, 4), LEN);
    put(store, "b", &keys(3, 4), LEN);
    put(store, "c", &keys(4, 4), LEN);
    store.delete_window("x", None).unwrap();
    store.put_meta(5, b"old").unwrap();
    // An evictable window (what the tombstone-write site's eviction chooses).
    let k = keys(6, 2);
    let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
    let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
    let mut s = spec("u", &k, LEN);
    s.retention.class = cwm::store::Class::Unnamed;
    store.put_window(s, &refs).unwrap();
}

fn expect_base(store: &Store, what: &str) {
    let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
    assert_eq!(names, vec!["a", "b", "c", "u"], "{what}");
    check(store, "u", &keys(6, 2), LEN);
    check(store, "a", &keys(1, 4), LEN);
    check(store, "b", &keys(3, 4), LEN);
    check(store, "c", &keys(4, 4), LEN);
    assert_eq!(store.meta().unwrap(), vec![(5, b"old".to_vec())], "{what}");
    assert_eq!(
        store.check_invariants().unwrap(),
        Vec::<String>::new(),
        "{what}"
    );
}

/// The operation that reaches `site`.
fn poke(store: &Store, site: &str) -> Result<(), String> {
    match site {
        "meta-write" => store.put_meta(5, b"new").map_err(|e| e.to_string()),
        // Eviction down to nothing: its tombstone for the unnamed window fails.
        "tombstone-write" => store
            .evict(cwm::store::EvictionPolicy::Lru, 0, 1 << 30)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "compaction-copy" | "segment-unlink" => store
            .compact(
                &CompactOptions {
                    live_ratio: 1.0,
                    ..Default::default()
                },
                &mut |_| {},
            )
            .map(|_| ())
            .map_err(|e| e.to_string()),
        // 14 blocks of 64 KiB do not fit in the second segment: the write rotates to a new segment.
        _ => {
            let k = keys(9, 14);
            let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
            let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
            store
                .put_window(spec("new", &k, LEN), &refs)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

#[test]
fn every_site_and_action_leaves_committed_state_intact() {
    let _serial = serial();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |i| {
        if !i.to_string().contains("injected panic") {
            default(i);
        }
    }));
    for (ename, engine) in engines() {
        for site in failpoint::SITES {
            for action in [Action::Error, Action::ShortWrite, Action::Panic] {
                let what = format!("{ename} {site} {action:?}");
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path().join("d");
                {
                    let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                    base(&store);
                    failpoint::set(site, Some(action));
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        poke(&store, site)
                    }));
                    failpoint::clear();
                    match (action, r) {
                        (Action::Panic, Err(_)) => {}
                        (Action::Panic, Ok(r)) => panic!("{what}: no panic ({r:?})"),
                        (_, Ok(Err(e))) => {
                            assert!(e.contains("failpoint") || e.contains("I/O"), "{what}: {e}");
                            // In-process, the failed operation left nothing visible.
                            if site != "compaction-copy" && site != "segment-unlink" {
                                assert!(store.get("new").is_err(), "{what}");
                            }
                            // The eviction whose tombstone failed evicted nothing.
                            assert!(store.get("u").is_ok(), "{what}");
                        }
                        (_, Ok(Ok(()))) => panic!("{what}: the fault did not surface"),
                        (_, Err(_)) => panic!("{what}: unexpected panic"),
                    }
                    // A compaction retried in the same process after a failed unlink must not
                    // drop tombstones the file left on disk still needs.
                    if site == "segment-unlink" && action != Action::Panic {
                        assert_eq!(poke(&store, site), Ok(()), "{what}: retry");
                    }
                }
                // Reopen: only what was committed before is there, whole.
                let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone())
                    .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
                assert!(rep.incomplete_windows.is_empty(), "{what}: {rep:?}");
                expect_base(&store, &what);
                // The log takes new windows after the fault, and they survive a reopen.
                assert_eq!(poke(&store, "block-write"), Ok(()), "{what}");
                drop(store);
                let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                check(&store, "new", &keys(9, 14), LEN);
                check(&store, "a", &keys(1, 4), LEN);
                assert_eq!(
                    store.check_invariants().unwrap(),
                    Vec::<String>::new(),
                    "{what}"
                );
            }
        }
    }
    let _ = std::panic::take_hook();
}

/// A compaction whose unlink of a segment fails keeps that segment in its index, so a retry
/// does not drop the tombstone that still shadows the segment's manifest: segment 1 holds a
/// deleted window's manifest (all garbage), segment 2 its tombstone among live data.
#[test]
fn a_failed_segment_unlink_keeps_the_tombstones_it_needs() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            put(&store, "w", &keys(1, 1), LEN);
            put(&store, "g1", &keys(2, 10), LEN);
            store.delete_window("g1", None).unwrap();
            store.seal_active().unwrap();
            store.delete_window("w", None).unwrap();
            put(&store, "live", &keys(3, 10), LEN);
            put(&store, "g2", &keys(4, 2), LEN);
            store.delete_window("g2", None).unwrap();
            store.seal_active().unwrap();
            failpoint::set("segment-unlink", Some(Action::Error));
            let r = poke(&store, "segment-unlink");
            failpoint::clear();
            assert!(r.is_err(), "{ename}: {r:?}");
            assert_eq!(poke(&store, "segment-unlink"), Ok(()), "{ename}: retry");
        }
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert_eq!(
            store.get("w").unwrap_err().code(),
            "NOT_FOUND",
            "{ename}: the deleted window came back"
        );
        check(&store, "live", &keys(3, 10), LEN);
    }
}

/// A checkpoint that fails to be written (an I/O error, or half a temporary file as a crash
/// mid-write leaves) costs the next open a scan, nothing else: every window is there, the
/// unfinished file is removed, and the next clean stop writes the checkpoints.
#[test]
fn a_failed_checkpoint_write_costs_only_a_scan() {
    let _serial = serial();
    for (ename, engine) in engines() {
        for action in [Action::Error, Action::ShortWrite] {
            let what = format!("{ename} {action:?}");
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            failpoint::set("checkpoint-write", Some(action));
            {
                let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                // 1 MiB segments: several are sealed (each checkpoint fails in the background),
                // and the active one's fails at the stop.
                for i in 0..6u128 {
                    put(&store, &format!("w{i}"), &keys(i + 1, 4), LEN);
                }
            }
            failpoint::clear();
            assert_eq!(files_ending(&dir, ".ckpt"), 0, "{what}");
            let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            assert_eq!(rep.checkpointed_segments, 0, "{what}: {rep:?}");
            assert!(rep.ignored_checkpoints.is_empty(), "{what}: {rep:?}");
            for i in 0..6u128 {
                check(&store, &format!("w{i}"), &keys(i + 1, 4), LEN);
            }
            assert_eq!(
                files_ending(&dir, ".tmp"),
                0,
                "{what}: unfinished checkpoints left"
            );
            let segments = rep.segments;
            drop(store);
            let (_, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            assert_eq!(rep.checkpointed_segments, segments, "{what}: {rep:?}");
        }
    }
}

/// A checkpoint that is slow to write (the `delay` action) is still waited for — by
/// `wait_checkpoints`, and by the clean stop — when later segments are sealed and
/// checkpointed while it is being written.
#[test]
fn a_slow_checkpoint_is_still_waited_for() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        put(&store, "slow", &keys(1, 2), LEN);
        failpoint::set("checkpoint-write", Some(Action::Delay));
        store.seal_active().unwrap();
        // The first checkpoint is inside its delay; the next ones are not delayed.
        std::thread::sleep(failpoint::DELAY / 5);
        failpoint::clear();
        for i in 0..3u128 {
            put(&store, &format!("fast{i}"), &keys(10 + i, 1), LEN);
            store.seal_active().unwrap();
        }
        store.wait_checkpoints();
        assert_eq!(files_ending(&dir, ".ckpt"), 4, "{ename}: not waited for");
        assert_eq!(files_ending(&dir, ".tmp"), 0, "{ename}");
    }
}

/// A segment compacted away while its checkpoint is still being written in the background
/// (sealed a moment before): the checkpoint, written after compaction removed it, finds the
/// log file gone and removes itself, so no checkpoint of a segment that left the log is left
/// behind (it would name a file that is gone, or kept for reuse under another id).
#[test]
fn a_segment_compacted_while_its_checkpoint_is_written_leaves_no_checkpoint_behind() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        put(&store, "gone", &keys(1, 2), LEN);
        put(&store, "kept", &keys(5, 2), LEN);
        store.delete_window("gone", None).unwrap();
        failpoint::set("checkpoint-write", Some(Action::Delay));
        store.seal_active().unwrap();
        // The checkpoint of the sealed segment is inside its delay.
        std::thread::sleep(failpoint::DELAY / 5);
        failpoint::clear();
        let rep = compact_everything(&store);
        assert_eq!(rep.segments_removed.len(), 1, "{ename}: {rep:?}");
        store.wait_checkpoints();
        assert_eq!(
            files_ending(&dir, ".ckpt"),
            0,
            "{ename}: a checkpoint was left behind"
        );
        drop(store);
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(rep.damaged_regions.is_empty(), "{ename}: {rep:?}");
        check(&store, "kept", &keys(5, 2), LEN);
    }
}

/// The bytes of a write that failed are given back: after a failed freeze (an I/O error or
/// a short write of a block, of its manifest, or a failed sync), the store counts as used
/// exactly what a reopen finds in its segments; a failed block write leaves nothing counted.
/// (After a failed manifest write the freeze's blocks stay, unnamed, until compaction.)
#[test]
fn a_failed_write_gives_its_bytes_back() {
    let _serial = serial();
    for (ename, engine) in engines() {
        for site in ["block-write", "manifest-write", "fdatasync"] {
            for action in [Action::Error, Action::ShortWrite] {
                let what = format!("{ename} {site} {action:?}");
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path().join("d");
                let used = {
                    let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                    put(&store, "a", &keys(1, 4), LEN);
                    let before = store.used_bytes();
                    failpoint::set(site, Some(action));
                    // Four blocks, in the segment of "a" (no rotation).
                    let k = keys(2, 4);
                    let p: Vec<Vec<u8>> =
                        k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
                    let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
                    let r = store.put_window(spec("new", &k, LEN), &refs);
                    failpoint::clear();
                    assert!(r.is_err(), "{what}: the fault did not surface");
                    let used = store.used_bytes();
                    if site == "block-write" {
                        assert_eq!(used, before, "{what}: the failed bytes still count");
                    }
                    used
                };
                let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                assert_eq!(
                    store.used_bytes(),
                    used,
                    "{what}: a reopen counts otherwise"
                );
                check(&store, "a", &keys(1, 4), LEN);
            }
        }
    }
}

/// An eviction deletes its victims in one batch: their tombstones are written, then synced
/// once. When that sync fails, none is deleted — in memory and after a reopen every victim is
/// there and reads back — and the next pass evicts them all.
#[test]
fn an_eviction_batch_whose_sync_fails_deletes_none() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let names = ["u1", "u2", "u3"];
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            put(&store, "pinned", &keys(1, 2), LEN);
            for (i, n) in names.iter().enumerate() {
                let k = keys(10 + i as u128, 2);
                let p: Vec<Vec<u8>> = k.iter().map(|&x| payload(x as u64, LEN as usize)).collect();
                let refs: Vec<&[u8]> = p.iter().map(|v| &v[..]).collect();
                let mut s = spec(n, &k, LEN);
                s.retention.class = cwm::store::Class::Unnamed;
                store.put_window(s, &refs).unwrap();
            }
            failpoint::set("fdatasync", Some(Action::Error));
            let r = store.evict(cwm::store::EvictionPolicy::Fifo, 0, 1 << 30);
            failpoint::clear();
            assert!(r.is_err(), "{ename}: {r:?}");
            for (i, n) in names.iter().enumerate() {
                check(&store, n, &keys(10 + i as u128, 2), LEN);
            }
            assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
        }
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        for (i, n) in names.iter().enumerate() {
            check(&store, n, &keys(10 + i as u128, 2), LEN);
        }
        let rep = store
            .evict(cwm::store::EvictionPolicy::Fifo, 0, 1 << 30)
            .unwrap();
        assert_eq!(rep.evicted, names, "{ename}");
        check(&store, "pinned", &keys(1, 2), LEN);
        assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
    }
}

/// A commit whose manifest names a stored record another writer held (a deduplication
/// against it) keeps that record indexed until the manifest is published, even when the other
/// writer gives up meanwhile: without that, the window was published over the committing
/// writer's own copy of the block under the stored record's checksum — acknowledged durable,
/// then unreadable (CORRUPTION) wherever the two copies' bytes differ, as two gathers of one
/// block may on a GPU. The manifest write is slowed (`delay`) so the other writer gives up
/// while it runs.
#[test]
fn a_commit_keeps_the_stored_record_it_names_while_another_writer_gives_up() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(tmp.path())).unwrap().0;
    let k = 0x5eed_u128;
    // W will write its own copy of K (bytes of seed 1): K is not stored when it begins.
    let mut w = store.begin_window(spec("w", &[k], LEN)).unwrap();
    assert!(w.needs_write(0));
    write_block(&mut w, 0, 1, LEN);
    // C stores K with other bytes; W2 deduplicates against it (holds it); C goes.
    put(&store, "c", &[k], LEN);
    let w2 = store.begin_window(spec("w2", &[k], LEN)).unwrap();
    assert!(!w2.needs_write(0));
    store.delete_window("c", None).unwrap();
    failpoint::set("manifest-write", Some(Action::Delay));
    std::thread::scope(|s| {
        let commit = s.spawn(|| w.commit());
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(w2);
        commit.join().unwrap().unwrap();
    });
    failpoint::set("manifest-write", None);
    // The manifest names C's record (deduplication prefers the stored one), and that record
    // is what the window resolves to.
    let (_, blocks) = store.read_window("w").unwrap();
    assert!(blocks[0] == payload(k as u64, LEN as usize), "C's bytes");
    assert!(store.check_invariants().unwrap().is_empty());
    drop(store);
    let (store, _) = Store::open(cfg(tmp.path())).unwrap();
    let (_, blocks) = store.read_window("w").unwrap();
    assert!(
        blocks[0] == payload(k as u64, LEN as usize),
        "after a reopen"
    );
}

/// Scrub writes a catalog record that no longer verifies again from memory, but only while
/// it is still the newest record of its key: a record of the key written meanwhile (a pin,
/// a TTL, a session's new state) must stay the newest. The rewrite is slowed (`delay` at
/// `catalog-rewrite`, after scrub decided the record is current) while another thread writes
/// the key; the newer value is what the store holds, then and after a reopen.
#[test]
fn a_scrub_rewrite_never_supersedes_a_newer_catalog_record() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let record: &[u8] = b"retention of window w: unnamed, no ttl";
    let newer: &[u8] = b"retention of window w: pinned";
    let store = Store::open(cfg(tmp.path())).unwrap().0;
    store.put_meta(9, record).unwrap();
    // Rot the second copy of the record: scrub finds it and writes the record again.
    let seg = segments(tmp.path())[0].clone();
    let data = std::fs::read(&seg).unwrap();
    let at = data
        .windows(record.len())
        .rposition(|w| w == record)
        .unwrap() as u64;
    flip_bit(&seg, at + 3, 2);
    failpoint::set("catalog-rewrite", Some(Action::Delay));
    std::thread::scope(|s| {
        let scrub = s.spawn(|| store.scrub_catalog());
        std::thread::sleep(std::time::Duration::from_millis(150));
        store.put_meta(9, newer).unwrap();
        assert_eq!(scrub.join().unwrap().unwrap().rewritten, 1);
    });
    failpoint::set("catalog-rewrite", None);
    assert_eq!(store.meta().unwrap(), vec![(9, newer.to_vec())]);
    drop(store);
    let (store, _) = Store::open(cfg(tmp.path())).unwrap();
    assert_eq!(
        store.meta().unwrap(),
        vec![(9, newer.to_vec())],
        "after a reopen"
    );
}

/// A reused segment file whose record limit cannot be raised (its header rewrite fails) takes
/// no more records: the freeze's records go to a new file, and nothing committed is lost.
#[test]
fn a_failed_raise_of_the_record_limit_moves_the_freeze_to_a_new_file() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let mut c = cfg(&dir);
        c.limit_step = 64 << 10;
        c.recycle_segments = 4;
        {
            let (store, _) = Store::open_with_engine(c.clone(), engine.clone()).unwrap();
            put(&store, "g", &keys(2, 4), LEN);
            store.delete_window("g", None).unwrap();
            store.seal_active().unwrap();
            put(&store, "a", &keys(1, 2), LEN);
            // Segment 1 holds nothing live: compaction keeps its file for reuse.
            assert_eq!(poke(&store, "compaction-copy"), Ok(()), "{ename}");
            assert_eq!(store.stats().unwrap().free_segment_files, 1, "{ename}");
            // The next freeze rotates into it; its first block passes the first limit. (A file
            // is reused only once nothing holds its old segment: background seals and
            // checkpoints are waited for first, or a loaded machine rotates into a new file.)
            store.seal_active().unwrap();
            store.wait_checkpoints();
            failpoint::set("segment-raise-limit", Some(Action::Error));
            let r = poke(&store, "block-write");
            failpoint::clear();
            assert_eq!(r, Ok(()), "{ename}");
            let st = store.stats().unwrap();
            // The reused file took what fit under its first limit and stays good (no freeze
            // in flight in it fails); it was ended as a full segment is: its length recorded
            // in its header. The rest went to a new file.
            let reused = st
                .segments
                .iter()
                .find(|s| !s.failed && s.record_limit != 0)
                .unwrap_or_else(|| panic!("{ename}: {:?}", st.segments));
            assert!(
                reused.frontier <= reused.record_limit,
                "{ename}: {reused:?}"
            );
            assert!(
                st.segments
                    .iter()
                    .any(|s| s.id > reused.id && s.record_limit == 0),
                "{ename}: {:?}",
                st.segments
            );
            let f = dir.join(format!("segment-{:010}.log", reused.id));
            let b = std::fs::read(&f).unwrap();
            let h = cwm::store::format::SegmentHeader::decode(&b[..4096]).unwrap();
            assert_eq!(h.sealed_len, reused.frontier, "{ename}");
            check(&store, "new", &keys(9, 14), LEN);
        }
        let (store, rep) = Store::open_with_engine(c, engine.clone()).unwrap();
        assert!(rep.incomplete_windows.is_empty(), "{ename}: {rep:?}");
        check(&store, "a", &keys(1, 2), LEN);
        check(&store, "new", &keys(9, 14), LEN);
        assert!(
            store.get("g").is_err(),
            "{ename}: the deleted window came back"
        );
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{ename}"
        );
    }
}

/// A rotation's seal whose sealed length never reached the header (`segment-seal` error: as if
/// the header rewrite failed, or a crash came first) leaves older segments unsealed behind the
/// newest; the next open finds them whole — no damage, no torn tail — and records their sealed
/// lengths.
#[test]
fn a_seal_left_unrecorded_is_recorded_at_the_next_open() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let sealed_lens = |dir: &std::path::Path| -> Vec<u64> {
            segments(dir)
                .iter()
                .map(|p| {
                    let b = std::fs::read(p).unwrap();
                    cwm::store::format::SegmentHeader::decode(&b[..4096])
                        .unwrap()
                        .sealed_len
                })
                .collect()
        };
        failpoint::set("segment-seal", Some(Action::Error));
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            for i in 0..8u128 {
                put(&store, &format!("w{i}"), &keys(i + 1, 8), LEN);
            }
        }
        failpoint::clear();
        let before = sealed_lens(&dir);
        assert!(before.len() >= 3, "{ename}: {before:?}");
        assert!(before.iter().all(|&l| l == 0), "{ename}: {before:?}");
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{ename}: {rep:?}"
        );
        for i in 0..8u128 {
            check(&store, &format!("w{i}"), &keys(i + 1, 8), LEN);
        }
        drop(store);
        let after = sealed_lens(&dir);
        let (newest, older) = after.split_last().unwrap();
        assert!(older.iter().all(|&l| l > 0), "{ename}: {after:?}");
        assert_eq!(*newest, 0, "{ename}: the append segment stays open");
        let (_, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{ename}: {rep:?}"
        );
    }
}

/// After a fault: the index is consistent and, once the background seals and checkpoints are
/// done, the whole log verifies.
fn consistent_and_verified(store: &Store, what: &str) {
    assert_eq!(
        store.check_invariants().unwrap(),
        Vec::<String>::new(),
        "{what}"
    );
    store.wait_checkpoints();
    assert!(store.verify_log().unwrap().is_empty(), "{what}");
}

/// An eviction pass whose tombstones cross a segment rotation, failing at each of its
/// tombstone writes (and syncs) in turn: the tombstones written before the failure in a segment that has
/// since rotated (and is being sealed in the background) are never cut back — that segment's
/// batch is synced and its windows evicted before the hand-out that rotates — so whatever
/// the pass evicted stays evicted after a reopen, the rest read back, and the log verifies
/// clean. (Cutting back the rotated segment raced its seal: the sealed length recorded over
/// a file cut shorter.)
#[test]
fn an_eviction_failing_after_a_rotation_keeps_the_rotated_segment_whole() {
    let _serial = serial();
    let names =
        |s: &Store| -> Vec<String> { s.list().unwrap().into_iter().map(|w| w.name).collect() };
    for (ename, engine) in engines() {
        for (site, pass) in (0..8)
            .map(|p| ("tombstone-write", p))
            .chain((0..6).map(|p| ("fdatasync", p)))
        {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            let before = {
                let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                put(&store, "pinned", &keys(1, 2), 4096);
                for i in 0..200u128 {
                    let k = keys(i + 10, 1);
                    let p = payload(k[0] as u64, 4096);
                    let mut s = spec(&format!("u{i}"), &k, 4096);
                    s.retention.class = cwm::store::Class::Unnamed;
                    store.put_window(s, &[&p[..]]).unwrap();
                }
                failpoint::set_after(site, pass, Action::Error);
                let r = store.evict(cwm::store::EvictionPolicy::Lru, 0, 1 << 30);
                failpoint::clear();
                let what = format!("{ename}, failing after {pass} hits of {site}: {r:?}");
                consistent_and_verified(&store, &what);
                names(&store)
            };
            let what = format!("{ename}, failing after {pass} hits of {site}");
            let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            assert!(rep.damaged_regions.is_empty(), "{what}: {rep:?}");
            assert_eq!(names(&store), before, "{what}");
            for n in &before {
                if let Some(i) = n.strip_prefix('u') {
                    let i: u128 = i.parse().unwrap();
                    check(&store, n, &keys(i + 10, 1), 4096);
                }
            }
            check(&store, "pinned", &keys(1, 2), 4096);
            assert!(store.verify_log().unwrap().is_empty(), "{what}");
            let rep = store
                .evict(cwm::store::EvictionPolicy::Lru, 0, 1 << 30)
                .unwrap();
            assert_eq!(rep.evicted.len(), before.len() - 1, "{what}");
            assert_eq!(names(&store), vec!["pinned"], "{what}");
        }
    }
}

/// The catalog's batched deletion (idempotency outcomes expiring) across a segment rotation,
/// failing at a deletion record's write or at a sync: the deletions of the segment rotated
/// away are synced and applied before the append that rotates, so a failure cuts back only
/// the new segment's records — the catalog in memory is what a reopen finds, and nothing is
/// reported damaged.
#[test]
fn a_catalog_deletion_failing_after_a_rotation_keeps_the_rotated_segment_whole() {
    let _serial = serial();
    let all: Vec<u128> = (0..300).collect();
    for (ename, engine) in engines() {
        for (site, pass) in [0, 60, 120, 180, 240, 299]
            .map(|p| ("meta-write", p))
            .into_iter()
            .chain([0, 1].map(|p| ("fdatasync", p)))
        {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("d");
            let what = format!("{ename}, failing after {pass} hits of {site}");
            let before = {
                let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
                for &k in &all {
                    store.put_meta(k, format!("v{k}").as_bytes()).unwrap();
                }
                failpoint::set_after(site, pass, Action::Error);
                let r = store.delete_metas_if(&all, |_, _| true);
                failpoint::clear();
                assert!(r.is_err(), "{what}: {r:?}");
                consistent_and_verified(&store, &what);
                store.meta().unwrap()
            };
            assert!(!before.is_empty(), "{what}");
            let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            assert!(rep.damaged_regions.is_empty(), "{what}: {rep:?}");
            assert_eq!(store.meta().unwrap(), before, "{what}");
            assert!(store.verify_log().unwrap().is_empty(), "{what}");
            assert_eq!(
                store.delete_metas_if(&all, |_, _| true).unwrap(),
                before.len(),
                "{what}"
            );
            assert!(store.meta().unwrap().is_empty(), "{what}");
        }
    }
}

/// A window deleted while compaction moves its manifest: compaction copies records without
/// the appender lock, so its repoint can land between the delete's snapshot of the window
/// and the delete taking it out of the index. The live bytes released must be those of the
/// manifest where it is now — released from the snapshot's segment, the copy's segment kept
/// counting a manifest nothing referred to (and the original's was taken twice). Both writes
/// are slowed (`delay`) so the repoint lands while the tombstone is written.
#[test]
fn a_window_deleted_while_compaction_moves_its_manifest_keeps_live_bytes_right() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        base(&store);
        failpoint::set("compaction-copy", Some(Action::Delay));
        failpoint::set("tombstone-write", Some(Action::Delay));
        std::thread::scope(|s| {
            let c = s.spawn(|| {
                store
                    .compact(
                        &CompactOptions {
                            live_ratio: 1.0,
                            ..Default::default()
                        },
                        &mut |_| {},
                    )
                    .unwrap()
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            store.delete_window("a", None).unwrap();
            c.join().unwrap();
        });
        failpoint::clear();
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{ename}"
        );
        drop(store);
        let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert_eq!(names, vec!["b", "c", "u"], "{ename}");
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{ename}"
        );
    }
}

/// A freeze's block write fails part-way (a short write) after another freeze's records were
/// handed out behind it, so its bytes cannot be cut back: its header page is zeroed instead.
/// Both freezes wrote a record of the same block, and the other one commits; the torn copy's
/// header would otherwise be whole and name the same key, length and checksum as the
/// committed copy. After the reopen the committed window reads back bit-exactly, the zeroed
/// record is reported as a damaged region, and no header is left at the torn copy.
#[test]
fn a_failed_block_write_that_cannot_be_cut_back_leaves_no_header_behind() {
    let _serial = serial();
    for (ename, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let key = 7u128;
        {
            let (store, _) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
            put(&store, "base", &keys(1, 2), LEN);
            let mut a = store.begin_window(spec("a", &[key], LEN)).unwrap();
            let mut b = store.begin_window(spec("b", &[key], LEN)).unwrap();
            // a's write waits in the `delay` (its room handed out); b's record is handed out
            // and written behind it, b commits (its manifest waits for a's write); then the
            // site is re-armed and a's write fails short.
            failpoint::set("block-write", Some(Action::Delay));
            std::thread::scope(|s| {
                let ta = s.spawn(|| {
                    let mut img = block_image(key as u64, LEN);
                    a.write_blocks(&mut [cwm::store::BlockImage {
                        index: 0,
                        image: &mut img[..],
                        checksum: None,
                    }])
                });
                std::thread::sleep(std::time::Duration::from_millis(100));
                failpoint::clear();
                write_block(&mut b, 0, key as u64, LEN);
                let tb = s.spawn(|| b.commit());
                std::thread::sleep(std::time::Duration::from_millis(100));
                failpoint::set("block-write", Some(Action::ShortWrite));
                assert!(ta.join().unwrap().is_err(), "{ename}: a's write failed");
                failpoint::clear();
                tb.join().unwrap().unwrap();
            });
            drop(a);
            check(&store, "b", &[key], LEN);
        }
        // The torn copy (a's, handed out first): its payload's first pages reached the file,
        // its header page is zeros.
        let seg = segments(&dir).into_iter().next().unwrap();
        let bytes = std::fs::read(&seg).unwrap();
        let p = payload(key as u64, LEN as usize);
        let copies: Vec<usize> = (1..bytes.len() / 4096)
            .map(|i| i * 4096)
            .filter(|&o| bytes.len() >= o + 64 && bytes[o..o + 64] == p[..64])
            .collect();
        assert_eq!(copies.len(), 2, "{ename}: payload copies at {copies:?}");
        assert!(
            bytes[copies[0] - 4096..copies[0]].iter().all(|&x| x == 0),
            "{ename}: the failed copy's header page is not zeroed"
        );
        let (store, rep) = Store::open_with_engine(cfg(&dir), engine.clone()).unwrap();
        assert!(!rep.damaged_regions.is_empty(), "{ename}: {rep:?}");
        let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
        assert_eq!(names, vec!["b", "base"], "{ename}");
        check(&store, "b", &[key], LEN);
        check(&store, "base", &keys(1, 2), LEN);
        assert_eq!(
            store.check_invariants().unwrap(),
            Vec::<String>::new(),
            "{ename}"
        );
        put(&store, "after", &keys(9, 2), LEN);
        check(&store, "after", &keys(9, 2), LEN);
    }
}
