//! Shared tier over TLS (`rediss://`): a real 3-master Redis Cluster serving only TLS (client
//! port, cluster bus and replication), with a CA made by openssl for the test. A window pushed
//! by one instance is pulled bit-exact by another and its announcement reaches a listener, all
//! through TLS with a client certificate; a node the given CA does not vouch for, a client
//! without a certificate where one is required, a plain connection to a TLS port, and
//! configurations that would silently fall back to plain text are refused. Through the daemon:
//! the `--remote-tls-*` flags publish and list windows, and a wrong CA degrades the tier (the
//! health report names the certificate) while local freezes go on.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::time::Duration;

use cwm::control::client::Client;
use cwm::error::ErrorCode;
use cwm::remote::{pull_window, push_window, Expect, Remote, RemoteConfig, RemoteTls};
use cwm::store::Replace;
use serde_json::json;

fn config(urls: Vec<String>, tls: RemoteTls) -> RemoteConfig {
    RemoteConfig {
        nodes: urls,
        tls,
        max_value: 8 << 10,
        timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

fn full(pki: &common::redis::Pki) -> RemoteTls {
    RemoteTls {
        ca: Some(pki.read("ca.crt")),
        client: Some((pki.read("client.crt"), pki.read("client.key"))),
    }
}

#[test]
fn windows_cross_instances_over_tls_and_untrusted_or_plain_connections_are_refused() {
    let pki = common::redis::Pki::new();
    let cluster = common::redis::Cluster::start_tls(3, &pki, true);
    let urls = cluster.urls();
    assert!(urls.iter().all(|u| u.starts_with("rediss://")));
    let (_, engine) = common::engines().remove(0);
    let len = 20_000u64;
    let keys: Vec<u128> = (1..=6u128).map(|i| i * 0x2_0000_0003).collect();

    let ra = Remote::connect(config(urls.clone(), full(&pki))).expect("connect A over TLS");
    let rb = Remote::connect(config(urls.clone(), full(&pki))).expect("connect B over TLS");
    // B listens for announcements on its own TLS connection to a seed node.
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = std::thread::spawn(move || {
        let mut waited = 0;
        rb.listen(1, Duration::from_millis(200), |got| match got {
            Some(keys) => {
                let _ = tx.send(keys);
                false
            }
            None => {
                waited += 1;
                waited < 100
            }
        })
        .map(|()| rb)
    });
    std::thread::sleep(Duration::from_millis(300));

    let a_dir = tempfile::tempdir().unwrap();
    {
        let (a, _) = common::open(a_dir.path(), &engine);
        common::put(&a, "chat-tls", &keys, len);
        // The listener may subscribe after the first publish: publish until it has heard one.
        let p = push_window(&a, &ra, "chat-tls", Some(Expect::New)).expect("push over TLS");
        assert_eq!((p.generation, p.blocks, p.written), (1, 6, 6));
        let mut heard = rx.recv_timeout(Duration::from_secs(1)).ok();
        for i in 0..20 {
            if heard.is_some() {
                break;
            }
            let name = format!("again-{i}");
            common::put(&a, &name, &keys[..1], len);
            push_window(&a, &ra, &name, Some(Expect::New)).expect("push");
            heard = rx.recv_timeout(Duration::from_secs(1)).ok();
        }
        let heard = heard.expect("an announcement over the TLS subscription");
        assert!(
            heard.is_empty() || heard.iter().all(|k| keys.contains(k)),
            "{heard:?}"
        );
    }
    let rb = listener.join().unwrap().expect("listen over TLS");
    drop(a_dir);
    let b_dir = tempfile::tempdir().unwrap();
    let (b, _) = common::open(b_dir.path(), &engine);
    let r = pull_window(&b, &rb, "chat-tls", Replace::No).expect("pull over TLS");
    assert_eq!((r.generation, r.blocks, r.fetched), (1, 6, 6));
    common::check(&b, "chat-tls", &keys, len);

    // A CA that did not sign the nodes' certificate: refused, naming the certificate.
    let other = common::redis::Pki::new();
    let e = Remote::connect(config(
        urls.clone(),
        RemoteTls {
            ca: Some(other.read("ca.crt")),
            client: Some((pki.read("client.crt"), pki.read("client.key"))),
        },
    ))
    .err()
    .expect("an untrusted node must be refused");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // No CA given: the system's trust store does not know the test CA either.
    let e = Remote::connect(config(urls.clone(), RemoteTls::default()))
        .err()
        .expect("the system trust store does not vouch for the test CA");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // The nodes require a client certificate: without one the handshake fails.
    assert!(Remote::connect(config(
        urls.clone(),
        RemoteTls {
            ca: Some(pki.read("ca.crt")),
            client: None,
        },
    ))
    .is_err());
    // Plain text to a TLS port: refused (no answer a client could mistake for success).
    let plain: Vec<String> = urls
        .iter()
        .map(|u| u.replacen("rediss://", "redis://", 1))
        .collect();
    assert!(Remote::connect(config(plain.clone(), RemoteTls::default())).is_err());
    // Configurations that would quietly go plain: TLS files with redis:// nodes, and a mix.
    let e = Remote::connect(config(plain.clone(), full(&pki)))
        .err()
        .expect("TLS files with plain nodes");
    assert_eq!(e.code(), ErrorCode::Validation, "{e}");
    let mixed = vec![urls[0].clone(), plain[1].clone()];
    let e = Remote::connect(config(mixed, full(&pki)))
        .err()
        .expect("mixed schemes");
    assert_eq!(e.code(), ErrorCode::Validation, "{e}");
}

#[test]
fn the_daemon_publishes_over_tls_and_a_wrong_ca_degrades_only_the_tier() {
    let pki = common::redis::Pki::new();
    let cluster = common::redis::Cluster::start_tls(3, &pki, true);
    let urls = cluster.urls().join(",");
    let p = |f: &str| pki.path(f).to_string_lossy().into_owned();
    let tls_args = [
        "--remote-tls-ca-file",
        &p("ca.crt"),
        "--remote-tls-cert-file",
        &p("client.crt"),
        "--remote-tls-key-file",
        &p("client.key"),
    ];
    let mut a_args = vec!["--remote", &urls, "--remote-write", "sync"];
    a_args.extend(tls_args);
    let a = fixture(&a_args);
    let mut b_args = vec!["--remote", &urls];
    b_args.extend(tls_args);
    let b = fixture(&b_args);
    let mut ca = Client::connect(&a.daemon.socket).unwrap();
    let tokens: Vec<u32> = (0..48).collect();
    let r = ca
        .call_final(
            json!({"op": "freeze", "engine": "e1", "session": "s", "window": "w-tls",
            "tokens": tokens, "block_ids": [0, 1, 2]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "{r}");
    assert_eq!(
        r["remote"]["generation"], 1,
        "published before the answer: {r}"
    );
    assert_eq!(r["remote"]["written"], 3, "{r}");
    let o = cli(&b.daemon.socket, &["ls", "--remote", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["windows"][0]["name"], "w-tls", "{v}");
    assert_eq!(v["windows"][0]["blocks"], 3, "{v}");

    // A daemon trusting another CA: the tier is degraded and says why; local freezes go on.
    let other = common::redis::Pki::new();
    let bad_ca = other.path("ca.crt").to_string_lossy().into_owned();
    let c = fixture(&[
        "--remote",
        &urls,
        "--remote-write",
        "sync",
        "--remote-timeout-ms",
        "500",
        "--remote-tls-ca-file",
        &bad_ca,
        "--remote-tls-cert-file",
        &p("client.crt"),
        "--remote-tls-key-file",
        &p("client.key"),
    ]);
    let mut cc = Client::connect(&c.daemon.socket).unwrap();
    let r = cc
        .call_final(
            json!({"op": "freeze", "engine": "e1", "session": "s", "window": "local-only",
            "tokens": (0..32).collect::<Vec<u32>>(), "block_ids": [0, 1]}),
        )
        .unwrap();
    assert_eq!(code(&r), "OK", "the local freeze stands: {r}");
    assert!(
        r["remote"]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("certificate"),
        "the publish failed, saying why: {r}"
    );
    let h = cc.call_final(json!({"op": "health"})).unwrap();
    assert_eq!(h["remote"]["status"], "degraded", "{h}");
    assert!(
        h["remote"]["error"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("certificate"),
        "{h}"
    );

    // A client certificate without its key is refused at start, naming both flags.
    let tmp = tempfile::tempdir().unwrap();
    let o = common::daemon::daemon_command()
        .args([
            "serve",
            "--remote",
            &urls,
            "--remote-tls-cert-file",
            &p("client.crt"),
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--remote-tls-key-file"), "{err}");
}
