//! `Store::list_page` (what the `list` op pages with): windows in name order, `offset` and
//! `limit` applied after the session filter, the total counting every match, expired windows
//! neither listed nor counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;

use cwm::store::{Class, Retention, Store, StoreConfig};

fn names(p: &[cwm::store::WindowInfo]) -> Vec<&str> {
    p.iter().map(|w| w.name.as_str()).collect()
}

#[test]
fn pages_filter_and_count_like_the_list_op() {
    let (_, engine) = engines().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = Store::open_with_engine(StoreConfig::new(tmp.path()), engine).unwrap();
    for i in 1..=10u128 {
        let mut s = spec(&format!("w{i:02}"), &keys(i * 10, 1), 4096);
        s.session = if i % 2 == 1 { "s-a" } else { "s-b" }.into();
        let p = payload(i as u64, 4096);
        store.put_window(s, &[&p]).unwrap();
    }
    // One more in session s-a that expires at once: never listed, never counted.
    let mut s = spec("w00", &keys(999, 1), 4096);
    s.session = "s-a".into();
    s.retention = Retention {
        class: Class::Unnamed,
        expires_unix_ms: Some(cwm::store::now_unix_ms() + 20),
    };
    store.put_window(s, &[&payload(999, 4096)]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(60));

    let (p, total) = store.list_page(0, 3, None).unwrap();
    assert_eq!((names(&p), total), (vec!["w01", "w02", "w03"], 10));
    let (p, total) = store.list_page(3, 3, None).unwrap();
    assert_eq!((names(&p), total), (vec!["w04", "w05", "w06"], 10));
    let (p, total) = store.list_page(9, 5, None).unwrap();
    assert_eq!((names(&p), total), (vec!["w10"], 10));
    let (p, total) = store.list_page(10, 5, None).unwrap();
    assert_eq!((names(&p), total), (Vec::<&str>::new(), 10));
    let (p, total) = store.list_page(0, 0, None).unwrap();
    assert_eq!((p.len(), total), (0, 10));

    let (p, total) = store.list_page(0, 100, Some("s-a")).unwrap();
    assert_eq!(
        (names(&p), total),
        (vec!["w01", "w03", "w05", "w07", "w09"], 5)
    );
    let (p, total) = store.list_page(2, 2, Some("s-b")).unwrap();
    assert_eq!((names(&p), total), (vec!["w06", "w08"], 5));
    let (p, total) = store.list_page(0, 10, Some("s-none")).unwrap();
    assert_eq!((p.len(), total), (0, 0));
    // The same windows as `list`.
    let all: Vec<String> = store.list().unwrap().into_iter().map(|w| w.name).collect();
    let (p, _) = store.list_page(0, 100, None).unwrap();
    assert_eq!(
        names(&p),
        all.iter().map(String::as_str).collect::<Vec<_>>()
    );
}
