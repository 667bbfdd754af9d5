//! Shared tier: names are insert-only and versions fenced. N instances publishing one new name:
//! exactly one wins; N replacing one generation: exactly one wins, the rest
//! CONCURRENT_MODIFICATION; a writer whose lease expired (another took the name since) is
//! fenced and overwrites nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use cwm::error::ErrorCode;
use cwm::remote::{Expect, Remote, RemoteConfig, RemoteError};

fn manifest(tag: u8) -> Vec<u8> {
    vec![tag; 200]
}

#[test]
fn one_publisher_wins_each_race_and_a_stale_lease_holder_is_fenced() {
    let cluster = common::redis::Cluster::start(3, 0);
    let cfg = RemoteConfig {
        nodes: cluster.urls(),
        ..Default::default()
    };
    let n = 8;
    let race = |expect: Expect| -> Vec<Result<u64, ErrorCode>> {
        let barrier = Arc::new(Barrier::new(n));
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let (cfg, barrier) = (cfg.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let r = Remote::connect(cfg).unwrap();
                    let t = r.token("shared").unwrap();
                    barrier.wait();
                    r.publish("shared", &manifest(i as u8), expect, t)
                        .map(|h| h.generation)
                        .map_err(|e| e.code())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    // Insert-only: one of 8 new-name publishes wins (whichever token order they ran in, the
    // losers are refused: ALREADY_EXISTS, or fenced when a higher token already published).
    let out = race(Expect::New);
    assert_eq!(out.iter().filter(|r| *r == &Ok(1)).count(), 1, "{out:?}");
    for r in out.iter().filter(|r| r.is_err()) {
        assert!(
            matches!(
                r,
                Err(ErrorCode::AlreadyExists | ErrorCode::ConcurrentModification)
            ),
            "{out:?}"
        );
    }
    // Replace at generation 1: one wins (generation 2), every other is refused.
    let out = race(Expect::Generation(1));
    assert_eq!(out.iter().filter(|r| *r == &Ok(2)).count(), 1, "{out:?}");
    assert_eq!(out.iter().filter(|r| r.is_err()).count(), n - 1, "{out:?}");
    for r in out.iter().filter(|r| r.is_err()) {
        assert_eq!(r, &Err(ErrorCode::ConcurrentModification), "{out:?}");
    }
    let r = Remote::connect(cfg.clone()).unwrap();
    let (head, winner) = r.manifest("shared").unwrap();
    assert_eq!(head.generation, 2);
    assert_eq!(winner.len(), 200);

    // Leases: A holds the lock; B is refused while it lasts; A stalls past its lease (as a
    // paused process would), B takes the name and publishes; A's late publish is fenced.
    let lease = Duration::from_millis(300);
    let a = r.lock("chat", lease).unwrap();
    let e = r.lock("chat", lease).expect_err("held");
    assert_eq!(e.code(), ErrorCode::Busy);
    assert!(r.renew("chat", a, lease).unwrap(), "the holder renews");
    std::thread::sleep(lease + Duration::from_millis(200));
    assert!(
        !r.renew("chat", a, lease).unwrap(),
        "an expired lease is not renewed"
    );
    let b = r.lock("chat", lease).unwrap();
    assert!(b > a);
    r.publish("chat", &manifest(0xb), Expect::New, b).unwrap();
    match r.publish("chat", &manifest(0xa), Expect::Any, a) {
        Err(RemoteError::Fenced { token, highest, .. }) => assert_eq!((token, highest), (a, b)),
        other => panic!("expected FENCED, got {other:?}"),
    }
    assert!(
        !r.unlock("chat", a).unwrap(),
        "A's release leaves B's lease alone"
    );
    assert!(r.unlock("chat", b).unwrap());
    let (head, m) = r.manifest("chat").unwrap();
    assert_eq!(
        (head.generation, head.token, m[0]),
        (1, b, 0xb),
        "nothing overwritten"
    );
}
