//! EC-042 (clock skew between components), simulated: the wall clock stepped back a day, then
//! forward, between writes (`failpoints` builds inject the skew into every stored timestamp).
//! Stored times follow the skewed clock, but nothing is ordered by them: the newest version of
//! a replaced window wins across a reopen though its timestamp is older, listing follows
//! commit order, the oldest active session is the first opened whatever its timestamp, and
//! durations come from a monotonic clock. Run by scripts/test.sh with `--features failpoints`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::failpoint::set_clock_skew_ms;
use cwm::session::{Registry, SessionError};
use cwm::store::Replace;

const DAY: i64 = 86_400_000;

#[test]
fn ec_042_a_simulated_skew_orders_by_sequence_not_wall_time() {
    let (_, engine) = engines().remove(0);
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = open(tmp.path(), &engine);
    set_clock_skew_ms(0);
    let v1 = put(&store, "w", &keys(1, 2), 4096);
    // The clock steps back a day: the replacement carries an older timestamp.
    set_clock_skew_ms(-DAY);
    let k2 = keys(2, 2);
    let p: Vec<Vec<u8>> = k2.iter().map(|&k| payload(k as u64, 4096)).collect();
    let mut sp = spec("w", &k2, 4096);
    sp.replace = Replace::Any;
    let v2 = store.put_window(sp, &[&p[0], &p[1]]).unwrap();
    assert!(
        v2.created_unix_ms < v1.created_unix_ms - DAY / 2,
        "the skew is in effect"
    );
    // Forward again, past the first write.
    set_clock_skew_ms(DAY);
    let x = put(&store, "x", &keys(3, 1), 4096);
    set_clock_skew_ms(0);
    drop(store);
    let (store, _) = open(tmp.path(), &engine);
    let w = store.get("w").unwrap();
    assert_eq!(
        w.version, 2,
        "the newest write wins, not the newest timestamp"
    );
    assert_eq!(w.created_unix_ms, v2.created_unix_ms);
    check(&store, "w", &k2, 4096);
    let list = store.list().unwrap();
    let seq = |n: &str| list.iter().find(|i| i.name == n).unwrap().seq;
    assert!(seq("x") > seq("w"), "commit order");
    assert_eq!(store.get("x").unwrap().created_unix_ms, x.created_unix_ms);

    // Sessions: the first opened is the oldest, though its clock read later.
    let reg = Registry::new(2);
    set_clock_skew_ms(DAY);
    reg.open("first", None).unwrap();
    set_clock_skew_ms(-DAY);
    reg.open("second", None).unwrap();
    set_clock_skew_ms(0);
    match reg.open("third", None) {
        Err(SessionError::TooMany { oldest, .. }) => assert_eq!(oldest, "first"),
        other => panic!("expected TooMany, got {other:?}"),
    }
    let first = reg.get("first").unwrap();
    let second = reg.get("second").unwrap();
    assert!(first.created_unix_ms > second.created_unix_ms);
    assert!(first.seq < second.seq);
    assert!(
        first.age_secs >= 0.0 && second.age_secs >= 0.0,
        "monotonic durations"
    );
    assert!(
        first.age_secs < 60.0,
        "not a day: durations ignore the wall clock"
    );
}
