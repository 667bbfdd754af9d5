//! Compaction keeps the files of the segments it empties (`segment-<id>.free`, at most
//! `recycle_segments`) and new segments are written into them: an overwrite of allocated blocks
//! instead of filling a fresh preallocated file. Such a file holds its earlier use's records
//! past the new ones (another generation: none validates) and a record limit in its header
//! bounds what recovery reads of them. What users rely on: the old windows never come back,
//! the new ones are all there after a clean stop and after a crash — even in strict recovery,
//! the stale bytes being no torn tail — a thaw reading a compacted segment keeps its bytes
//! until it lets go, and one damaged page below the limit still loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use cwm::io::{AlignedBuf, IoEngine};
use cwm::store::{RecoveryMode, Replace, Store, StoreConfig, StoreError, WindowReader};

const LEN: u64 = 12 << 10;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 64 << 10;
    c.recycle_segments = 4;
    // Raised every 16 KiB: a segment's records pass its limit several times.
    c.limit_step = 16 << 10;
    c
}

fn open(dir: &Path, engine: &Arc<dyn IoEngine>) -> Store {
    Store::open_with_engine(cfg(dir), engine.clone()).unwrap().0
}

fn files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

fn write_at(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// The segment id a `segment-<id>.<anything>` file names.
fn id_of(p: &Path) -> Option<u64> {
    let n = p.file_name()?.to_str()?;
    n.strip_prefix("segment-")?.split('.').next()?.parse().ok()
}

/// The newest segment: (id, record limit).
fn newest(store: &Store) -> (u64, u64) {
    store
        .stats()
        .unwrap()
        .segments
        .iter()
        .max_by_key(|s| s.id)
        .map(|s| (s.id, s.record_limit))
        .unwrap()
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// Six windows of three blocks (one segment each), deleted; an anchor window in the segment
/// after them; compaction empties their segments and keeps four files. Returns the inodes of
/// the free files.
fn free_four(store: &Store, dir: &Path) -> Vec<u64> {
    for i in 0..6u128 {
        put(store, &format!("old{i}"), &keys(100 + i, 3), LEN);
    }
    for i in 0..6 {
        store.delete_window(&format!("old{i}"), None).unwrap();
    }
    put(store, "anchor", &keys(99, 3), LEN);
    compact_everything(store);
    // A kept file is reused once nothing holds its old segment: a background seal or
    // checkpoint still finishing would (on a loaded machine) send the next segment to a new
    // file.
    store.wait_checkpoints();
    let free = files(dir, "free");
    assert_eq!(free.len(), 4, "{free:?}");
    assert_eq!(store.stats().unwrap().free_segment_files, 4);
    free.iter().map(|p| inode(p)).collect()
}

fn check_new(store: &Store, n: u128) {
    for i in 0..n {
        check(store, &format!("new{i}"), &keys(200 + i, 2), LEN);
    }
    check(store, "anchor", &keys(99, 3), LEN);
    let names: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
    assert!(
        names.iter().all(|n| !n.starts_with("old")),
        "a deleted window came back: {names:?}"
    );
}

#[test]
fn new_segments_are_written_into_compacted_segments_files_and_reopen_clean() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        let freed = free_four(&store, dir);
        // Two blocks each: a segment holds one such window, and the old records' last pages
        // are left past it.
        for i in 0..3u128 {
            put(&store, &format!("new{i}"), &keys(200 + i, 2), LEN);
        }
        let reused: Vec<u64> = store
            .stats()
            .unwrap()
            .segments
            .iter()
            .filter(|s| s.record_limit != 0)
            .map(|s| s.id)
            .collect();
        assert!(reused.len() >= 3, "{engine_name}: {reused:?}");
        for id in &reused {
            let f = dir.join(format!("segment-{id:010}.log"));
            assert!(
                freed.contains(&inode(&f)),
                "{engine_name}: {f:?} is a new file"
            );
        }
        check_new(&store, 3);
        drop(store);
        // A clean stop, then a full scan in strict mode: the bytes left over from the files'
        // earlier use are neither damage nor a torn tail.
        let mut c = cfg(dir);
        c.recovery = RecoveryMode::Strict;
        c.use_checkpoints = false;
        let (store, rep) = Store::open_with_engine(c.clone(), engine.clone()).unwrap();
        assert!(
            rep.torn_tails.is_empty() && rep.damaged_regions.is_empty(),
            "{engine_name}: {rep:?}"
        );
        check_new(&store, 3);
        assert!(store.verify_log().unwrap().is_empty(), "{engine_name}");
        put(&store, "new3", &keys(203, 2), LEN);
        drop(store);
        // After a crash (no checkpoint of the active segment), strict again.
        as_after_kill(dir);
        let (store, rep) = Store::open_with_engine(c, engine.clone()).unwrap();
        assert!(
            rep.torn_tails.is_empty() && rep.damaged_regions.is_empty(),
            "{engine_name}: {rep:?}"
        );
        check_new(&store, 4);
    }
}

/// A store that keeps one file for reuse.
fn keeping_one(dir: &Path, engine: &Arc<dyn IoEngine>) -> Store {
    let mut c = cfg(dir);
    c.recycle_segments = 1;
    Store::open_with_engine(c, engine.clone()).unwrap().0
}

/// Every block of `reader`, read into fresh buffers (and verified).
fn read_all(store: &Store, reader: &WindowReader) -> Result<Vec<AlignedBuf>, StoreError> {
    let mut bufs: Vec<AlignedBuf> = (0..reader.num_blocks())
        .map(|i| AlignedBuf::zeroed(reader.record_len(i) as usize))
        .collect();
    let mut imgs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    store.read_blocks(reader, 0, &mut imgs)?;
    drop(imgs);
    Ok(bufs)
}

#[test]
fn a_file_is_not_written_again_while_a_reader_holds_its_segment() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = keeping_one(dir, &engine);
        // "kept" and "gone" share segment 1; the anchor fills segment 2.
        put(&store, "kept", &keys(1, 1), LEN);
        put(&store, "gone", &keys(2, 1), LEN);
        put(&store, "anchor", &keys(99, 3), LEN);
        // A thaw of "kept" opens it (its records' segment is held) before compaction moves it.
        let reader = store.open_window("kept").unwrap();
        store.delete_window("gone", None).unwrap();
        compact_everything(&store);
        let free = files(dir, "free");
        assert_eq!(free.len(), 1, "{engine_name}: {free:?}");
        let held = inode(&free[0]);
        // New segments meanwhile go into new files: the held one is not handed out.
        for i in 0..3u128 {
            put(&store, &format!("new{i}"), &keys(200 + i, 3), LEN);
        }
        for s in files(dir, "log") {
            assert_ne!(
                inode(&s),
                held,
                "{engine_name}: {s:?} reuses a file still read"
            );
        }
        let bufs = read_all(&store, &reader).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(
                reader.payload(i, b),
                &payload(keys(1, 1)[i] as u64, LEN as usize)[..],
                "{engine_name}: block {i}"
            );
        }
        // Once the reader lets go (and the background seals and checkpoints), the file is
        // written again.
        drop(reader);
        store.wait_checkpoints();
        for i in 3..6u128 {
            put(&store, &format!("new{i}"), &keys(200 + i, 3), LEN);
        }
        assert!(
            files(dir, "log").iter().any(|s| inode(s) == held),
            "{engine_name}: the freed file was never reused"
        );
        check(&store, "kept", &keys(1, 1), LEN);
    }
}

/// A thaw that opened a window before compaction keeps reading its compacted segment; when
/// that read finds the segment's bytes damaged, the file (kept for reuse meanwhile) is never
/// written into again — it is removed once the reader lets go, and the next segment goes into
/// a new file.
#[test]
fn a_kept_file_found_damaged_by_a_late_reader_is_not_reused() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = keeping_one(dir, &engine);
        put(&store, "read", &keys(1, 1), LEN);
        put(&store, "anchor", &keys(99, 3), LEN);
        let reader = store.open_window("read").unwrap();
        store.delete_window("read", None).unwrap();
        compact_everything(&store);
        let free = files(dir, "free");
        assert_eq!(free.len(), 1, "{engine_name}: {free:?}");
        // The medium damages the block's payload; the late reader finds it.
        flip_bit(&free[0], 8192 + 4096 + 100, 3);
        let err = read_all(&store, &reader).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{engine_name}: {err}");
        drop(reader);
        store.wait_checkpoints();
        for i in 0..3u128 {
            put(&store, &format!("new{i}"), &keys(200 + i, 3), LEN);
        }
        assert!(
            files(dir, "free").is_empty(),
            "{engine_name}: the damaged file is still kept"
        );
        let stats = store.stats().unwrap();
        assert!(
            stats.segments.iter().all(|s| s.record_limit == 0),
            "{engine_name}: a segment went into the damaged file: {:?}",
            stats.segments
        );
        check(&store, "anchor", &keys(99, 3), LEN);
    }
}

#[test]
fn a_zeroed_page_below_the_limit_of_a_reused_segment_loses_nothing() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        free_four(&store, dir);
        // Two windows into the reused active segment, a block of the first zeroed: the second
        // window (written after it) is found past the hole, not taken for stale bytes.
        put(&store, "new0", &keys(200, 1), LEN);
        put(&store, "new1", &keys(201, 1), LEN);
        let active = newest(&store);
        assert_ne!(active.1, 0, "{engine_name}: the active segment is reused");
        drop(store);
        as_after_kill(dir);
        let seg = dir.join(format!("segment-{:010}.log", active.0));
        // The first record (new0's block) starts after the two header pages.
        zero(&seg, 8192, 4096);
        let (store, rep) = Store::open_with_engine(cfg(dir), engine.clone()).unwrap();
        assert_eq!(rep.damaged_regions.len(), 1, "{engine_name}: {rep:?}");
        assert!(rep.torn_tails.is_empty(), "{engine_name}: {rep:?}");
        check(&store, "new1", &keys(201, 1), LEN);
        assert!(store.list().unwrap().iter().any(|w| w.name == "new0"));
    }
}

#[test]
fn a_copy_left_with_the_lower_limit_by_a_crash_is_no_damage() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        free_four(&store, dir);
        put(&store, "new0", &keys(200, 3), LEN);
        let (id, limit) = newest(&store);
        assert!(
            limit > 8192 + (16 << 10),
            "{engine_name}: the limit was raised: {limit}"
        );
        drop(store);
        as_after_kill(dir);
        // Page 1 as it was before the last raise (a crash between the two header writes).
        let seg = dir.join(format!("segment-{id:010}.log"));
        let bytes = std::fs::read(&seg).unwrap();
        let h = cwm::store::format::SegmentHeader::decode(&bytes[..4096]).unwrap();
        let lower = cwm::store::format::SegmentHeader {
            record_limit: h.record_limit - 4096,
            ..h
        };
        let mut page = vec![0u8; 4096];
        lower.encode(&mut page);
        write_at(&seg, 4096, &page);
        let (store, rep) = Store::open_with_engine(cfg(dir), engine.clone()).unwrap();
        assert!(
            rep.damaged_regions.is_empty() && rep.torn_tails.is_empty(),
            "{engine_name}: {rep:?}"
        );
        check(&store, "new0", &keys(200, 3), LEN);
        drop(store);
        // The copy was written again.
        let bytes = std::fs::read(&seg).unwrap();
        assert_eq!(bytes[..4096], bytes[4096..8192], "{engine_name}");
    }
}

#[test]
fn a_replace_into_a_reused_file_keeps_the_newest_version_after_a_crash() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        put(&store, "w", &keys(1, 3), LEN);
        free_four(&store, dir);
        let v2 = keys(2, 3);
        let payloads: Vec<Vec<u8>> = v2
            .iter()
            .map(|&k| payload(k as u64, LEN as usize))
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        let mut s = spec("w", &v2, LEN);
        s.replace = Replace::Any;
        let info = store.put_window(s, &refs).unwrap();
        drop(store);
        as_after_kill(dir);
        let store = open(dir, &engine);
        let w = store
            .list()
            .unwrap()
            .into_iter()
            .find(|w| w.name == "w")
            .unwrap();
        assert_eq!(w.version, info.version, "{engine_name}");
        check(&store, "w", &v2, LEN);
    }
}

#[test]
fn a_torn_last_header_in_a_reused_file_is_a_torn_tail_not_its_end() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        free_four(&store, dir);
        put(&store, "new0", &keys(200, 1), LEN);
        // A freeze in flight at the crash: one block record written, never committed.
        let wk = keys(300, 1);
        let mut w = store.begin_window(spec("w", &wk, LEN)).unwrap();
        write_block(&mut w, 0, wk[0] as u64, LEN);
        drop(w);
        let id = newest(&store).0;
        drop(store);
        as_after_kill(dir);
        let seg = dir.join(format!("segment-{id:010}.log"));
        let b = std::fs::read(&seg).unwrap();
        let last = *record_pages(&seg)
            .iter()
            .rfind(|&&o| cwm::store::format::names_segment(&b[o as usize..o as usize + 4096], id))
            .unwrap();
        // Its header torn (one bit of the sequence number): it still names this segment.
        flip_bit(&seg, last + 8, 0);
        let (store, rep) = Store::open_with_engine(cfg(dir), engine.clone()).unwrap();
        assert_eq!(rep.torn_tails.len(), 1, "{engine_name}: {rep:?}");
        assert_eq!(rep.torn_tails[0].1, last, "{engine_name}: {rep:?}");
        check(&store, "new0", &keys(200, 1), LEN);
    }
}

#[test]
fn segment_ids_are_never_reused_when_the_newest_segments_are_compacted_away() {
    for (engine_name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let store = open(dir, &engine);
        for i in 0..3u128 {
            put(&store, &format!("old{i}"), &keys(100 + i, 3), LEN);
            store.delete_window(&format!("old{i}"), None).unwrap();
        }
        // Seal and compact until the newest segments are gone too (their tombstones shadow
        // nothing any more).
        for _ in 0..3 {
            store.seal_active().unwrap();
            compact_everything(&store);
        }
        drop(store);
        let named = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| id_of(&e.unwrap().path()))
            .max()
            .unwrap();
        let newest_log = files(dir, "log")
            .iter()
            .filter_map(|p| id_of(p))
            .max()
            .unwrap_or(0);
        assert!(
            newest_log < named,
            "{engine_name}: a free file names the highest id"
        );
        let store = open(dir, &engine);
        put(&store, "new0", &keys(200, 2), LEN);
        let ids: Vec<u64> = store
            .stats()
            .unwrap()
            .segments
            .iter()
            .map(|s| s.id)
            .collect();
        assert!(
            ids.iter().filter(|&&i| i > newest_log).all(|&i| i > named),
            "{engine_name}: a new segment took an id a file already names: {ids:?}, {named}"
        );
        check(&store, "new0", &keys(200, 2), LEN);
    }
}
