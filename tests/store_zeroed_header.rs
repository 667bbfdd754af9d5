//! A segment header is kept twice (pages 0 and 1): one zeroed copy is reported and costs
//! nothing. A newest segment whose header pages both read as zeros is removed at open only
//! when nothing was ever appended to it (a crash while creating it); one that holds records
//! lost its header some other way and is never deleted: the open fails and names fsck, whose
//! repair renames the segment out of the log (kept as `.damaged`) so the store opens again.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

#[test]
fn a_zeroed_header_over_records_fails_the_open_and_deletes_nothing() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = open(dir, &engine);
            put(&store, "w", &keys(1, 3), 8192);
        }
        let seg = segments(dir)[0].clone();
        // One copy zeroed: the other is used, and the damage reported.
        for copy in [0usize, 4096] {
            let mut one = std::fs::read(&seg).unwrap();
            one[copy..copy + 4096].fill(0);
            std::fs::write(&seg, &one).unwrap();
            let (store, report) = open(dir, &engine);
            check(&store, "w", &keys(1, 3), 8192);
            assert_eq!(report.damaged_regions.len(), 1, "{name} {copy}: {report:?}");
            assert_eq!(report.damaged_regions[0].1, copy as u64);
            drop(store);
            // Put the copy back from its twin.
            let (a, b) = one.split_at_mut(4096);
            if copy == 0 {
                a.copy_from_slice(&b[..4096]);
            } else {
                b[..4096].copy_from_slice(a);
            }
            std::fs::write(&seg, &one).unwrap();
        }
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[..64].fill(0);
        bytes[4096..4096 + 64].fill(0);
        std::fs::write(&seg, &bytes).unwrap();
        let err = cwm::store::Store::open_with_engine(config(dir), engine.clone())
            .err()
            .expect("refused");
        assert_eq!(err.code(), "CORRUPTION", "{name}: {err}");
        assert!(err.to_string().contains("fsck"), "{err}");
        assert!(seg.exists(), "{name}: the segment was deleted");
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "untouched");
        // The way out the error names: fsck --repair sets the segment aside, then it opens.
        let rep = cwm::fsck::repair(config(dir), &|_, _, _| {}).unwrap();
        assert!(format!("{rep:?}").contains("set aside"), "{rep:?}");
        let aside = seg.with_extension("log.damaged");
        assert_eq!(std::fs::read(&aside).unwrap(), bytes, "kept for inspection");
        let (store, _) = open(dir, &engine);
        assert_eq!(store.get("w").unwrap_err().code(), "NOT_FOUND");
    }
}

#[test]
fn a_zeroed_header_over_nothing_is_a_crash_at_creation_and_goes() {
    for (name, engine) in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (store, _) = open(dir, &engine);
            put(&store, "w", &keys(1, 3), 8192);
        }
        // The next segment: created (preallocated) but its header never arrived.
        let last = segments(dir).pop().unwrap();
        let id: u64 = last.file_name().unwrap().to_str().unwrap()
            ["segment-".len().."segment-".len() + 10]
            .parse()
            .unwrap();
        let next = dir.join(format!("segment-{:010}.log", id + 1));
        let f = std::fs::File::create(&next).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        assert_eq!(segments(dir).len(), 2, "{name}: {:?}", segments(dir));
        let (store, report) = open(dir, &engine);
        assert_eq!(report.removed_empty_segments, vec![id + 1], "{name}");
        assert!(!next.exists());
        check(&store, "w", &keys(1, 3), 8192);
    }
}
