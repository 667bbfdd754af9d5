//! `GET /metrics` for Prometheus: the content type follows the Accept header (OpenMetrics,
//! ending `# EOF`, for Prometheus; text 0.0.4 without it otherwise), a client that connects and
//! says nothing does not hold up the next scrape, and every series an alert reads is there
//! from the start: build info, edge cases and concurrency at zero, utilization of both tiers
//! (the disk's against the file system when no --capacity is set).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::daemon::*;

use std::io::{Read, Write};
use std::net::TcpStream;

fn get(port: u16, accept: Option<&str>) -> (String, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_negotiate_their_format_serve_scrapes_concurrently_and_start_at_zero() {
    let port = common::daemon::free_loopback_port();
    let addr = format!("127.0.0.1:{port}");
    let f = fixture(&["--metrics-addr", &addr]);
    // A client that connects and never sends its request.
    let mut stalled = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    let (head, body) = get(
        port,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    // Served while the stalled client is still waiting for its answer.
    stalled.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        stalled.read(&mut b).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the scrape waited for the stalled client"
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let version = env!("CARGO_PKG_VERSION");
    for series in [
        format!("cwm_build_info{{version=\"{version}\"}} 1"),
        "cwm_edge_case_total{edge_case_id=\"EC-020\",outcome=\"refused\"} 0".to_string(),
        "cwm_edge_case_total{edge_case_id=\"EC-002\",outcome=\"coalesced\"} 0".to_string(),
        "cwm_concurrent_operations{operation_type=\"thaw\"} 0".to_string(),
        "cwm_storage_utilization_ratio{tier=\"cpu\"} 0".to_string(),
    ] {
        assert!(body.contains(&series), "{series} missing:\n{body}");
    }
    let disk = body
        .lines()
        .find_map(|l| l.strip_prefix("cwm_storage_utilization_ratio{tier=\"disk\"} "))
        .unwrap();
    let disk: f64 = disk.parse().unwrap();
    assert!(
        disk > 0.0 && disk <= 1.0,
        "disk utilization {disk} without --capacity"
    );
    // No OpenMetrics in Accept: Prometheus text 0.0.4.
    let (head, body) = get(port, None);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    assert!(body.contains("cwm_requests_total"), "{body}");
    drop(f);
}
