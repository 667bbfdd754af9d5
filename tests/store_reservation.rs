//! EC-020 for windows captured before they are written: `Store::reserve` promises log room
//! for every record such a window could need, other writers cannot take it, the window's own
//! writer can, and a window whose bound does not fit gets no reservation (its freeze streams
//! and `begin_window` decides exactly). Room comes back on commit and on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use cwm::store::format::record_len;
use cwm::store::WindowWriter;

const LEN: u64 = 64 << 10;

fn write_all(mut w: WindowWriter<'_>, keys: &[u128]) -> cwm::store::WindowInfo {
    for (i, &k) in keys.iter().enumerate() {
        if !w.needs_write(i) {
            continue;
        }
        write_block(&mut w, i, k as u64, LEN);
    }
    w.commit().unwrap()
}

#[test]
fn ec_020_c_reserved_room_is_kept_for_the_captured_window() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    put(&store, "base", &keys(1, 4), LEN);
    let used = store.stats().unwrap().used_bytes;
    let (kb, kc) = (keys(2, 8), keys(3, 4));
    let r = store.reserve(&spec("b", &kb, LEN)).unwrap().expect("room");
    let rb = r.bytes();
    assert!(
        rb > 8 * record_len(LEN),
        "every block and the manifest: {rb}"
    );
    assert_eq!(store.stats().unwrap().reserved_bytes, rb);
    // Window c would fit in what is free, but not beside b's reservation.
    store.set_capacity(used + rb + 3 * record_len(LEN));
    let e = store.put_window(spec("c", &kc, LEN), &[]).unwrap_err();
    assert_eq!(e.code(), "VALIDATION", "payload count checked first: {e}");
    let payloads: Vec<Vec<u8>> = kc
        .iter()
        .map(|&k| payload(k as u64, LEN as usize))
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    let e = store.put_window(spec("c", &kc, LEN), &refs).unwrap_err();
    assert_eq!(e.code(), "QUOTA_EXCEEDED", "{e}");
    // b's own writer gets its room.
    write_all(r.begin(spec("b", &kb, LEN)).unwrap(), &kb);
    check(&store, "b", &kb, LEN);
    assert_eq!(
        store.stats().unwrap().reserved_bytes,
        0,
        "released at commit"
    );
    // A writer that takes no reservation (a catalog record) eats into a reserved window's
    // room: the window, told `captured` on its strength, still gets it.
    let k2 = keys(7, 2);
    store.set_capacity(u64::MAX);
    let r2 = store.reserve(&spec("b2", &k2, LEN)).unwrap().expect("room");
    store.set_capacity(store.stats().unwrap().used_bytes + r2.bytes());
    store.put_meta(42, &[7u8; 20_000]).unwrap(); // 24 KiB: more than the bound's slack
    write_all(r2.begin(spec("b2", &k2, LEN)).unwrap(), &k2);
    check(&store, "b2", &k2, LEN);
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
    store.set_capacity(u64::MAX);
    // Refusals are still errors, and come before any reservation.
    let e = store.reserve(&spec("b", &kb, LEN)).err().expect("exists");
    assert_eq!(e.code(), "ALREADY_EXISTS");
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
    // A bound that does not fit: no reservation (the freeze streams instead).
    store.set_capacity(store.stats().unwrap().used_bytes + record_len(LEN));
    assert!(store
        .reserve(&spec("d", &keys(4, 2), LEN))
        .unwrap()
        .is_none());
    // Dropped unused: the room comes back.
    store.set_capacity(u64::MAX);
    let r = store
        .reserve(&spec("e", &keys(5, 2), LEN))
        .unwrap()
        .expect("room");
    assert!(store.stats().unwrap().reserved_bytes > 0);
    drop(r);
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
    // A writer dropped without commit gives its hold back too.
    let w = store.begin_window(spec("f", &keys(6, 2), LEN)).unwrap();
    assert!(store.stats().unwrap().reserved_bytes > 0);
    drop(w);
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
}

/// A writer's promised room shrinks as its records are appended (they count in `used` from
/// then on): while a large freeze is being written, `used + reserved` is what the log will
/// hold, not that plus the records already written — which refused concurrent freezes with
/// QUOTA_EXCEEDED that had room and made eviction free space nobody needed.
#[test]
fn written_records_leave_the_writers_promise() {
    let (_, io) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &io);
    let kb = keys(2, 8);
    let mut w = store.begin_window(spec("b", &kb, LEN)).unwrap();
    let promised = store.stats().unwrap().reserved_bytes;
    assert!(promised >= 8 * record_len(LEN), "{promised}");
    for (i, &k) in kb.iter().enumerate() {
        write_block(&mut w, i, k as u64, LEN);
    }
    let s = store.stats().unwrap();
    assert!(
        s.reserved_bytes < record_len(LEN),
        "only the manifest (and rotations) still promised: {} of {promised}",
        s.reserved_bytes
    );
    // Room for 3 more blocks beside b's records and its manifest: a freeze of 3 fits.
    store.set_capacity(s.used_bytes + s.reserved_bytes + 4 * record_len(LEN) + (64 << 10));
    put(&store, "c", &keys(3, 3), LEN);
    w.commit().unwrap();
    assert_eq!(store.stats().unwrap().reserved_bytes, 0);
    check(&store, "b", &kb, LEN);
    check(&store, "c", &keys(3, 3), LEN);
}
