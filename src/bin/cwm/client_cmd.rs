//! The client subcommands: one request to the daemon each, printed as a table or JSON.

use std::process::ExitCode;

use crate::progress::{Mode, Progress};
use crate::ClientArgs;

/// The header row of a window table.
fn header() -> String {
    format!(
        "{:<32} {:>4} {:>9} {:>7} {:>10} {:<8} {:>9} {:>6} {:>9} SESSION",
        "WINDOW", "VER", "TOKENS", "BLOCKS", "MIB", "CLASS", "TTL", "HITS", "LAST USE"
    )
}

/// Seconds as a short duration: 45s, 12m, 3h, 2d.
fn ago(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `cwm ls`.
pub(crate) fn ls(c: &ClientArgs) -> ExitCode {
    client(c, serde_json::json!({"op": "list"}), |v| {
        println!("{}", header());
        for w in v["windows"].as_array().into_iter().flatten() {
            println!("{}", window_row(w));
        }
    })
}

/// `cwm ls --remote`: the windows published in the shared tier.
pub(crate) fn ls_remote(c: &ClientArgs) -> ExitCode {
    client(c, serde_json::json!({"op": "remote.list"}), |v| {
        println!(
            "{:<32} {:>4} {:>9} {:>7} {:>10} ERROR",
            "WINDOW", "GEN", "TOKENS", "BLOCKS", "MIB"
        );
        for w in v["windows"].as_array().into_iter().flatten() {
            let n = |k: &str| w[k].as_u64().unwrap_or(0);
            println!(
                "{:<32} {:>4} {:>9} {:>7} {:>10.1} {}",
                w["name"].as_str().unwrap_or(""),
                n("generation"),
                n("tokens"),
                n("blocks"),
                n("bytes") as f64 / 1_048_576.0,
                w["error"]
                    .as_str()
                    .or((w["expired"] == true).then_some("expired (TTL passed)"))
                    .unwrap_or("")
            );
        }
    })
}

/// `cwm scrub --remote`: published windows whose blocks the shared tier lost.
pub(crate) fn scrub_remote(c: &ClientArgs) -> ExitCode {
    client(c, serde_json::json!({"op": "remote.scrub"}), |v| {
        for w in v["windows"].as_array().into_iter().flatten() {
            let detail = match (&w["first_missing"], w["detail"].as_str()) {
                (_, Some(d)) => d.to_string(),
                (serde_json::Value::Number(i), None) => format!(
                    "{} of {} blocks gone, the first is block {i}",
                    w["missing"], w["blocks"]
                ),
                _ => String::new(),
            };
            println!(
                "{:<32} gen {:<4} {:<8} {}",
                w["name"].as_str().unwrap_or(""),
                w["generation"],
                w["status"].as_str().unwrap_or(""),
                detail
            );
        }
        println!("{} problems in the shared tier", v["problems"]);
    })
}

/// `cwm stat NAME`.
pub(crate) fn stat(name: &str, c: &ClientArgs) -> ExitCode {
    client(c, serde_json::json!({"op": "stat", "window": name}), |v| {
        println!("{}\n{}", header(), window_row(&v["window"]));
    })
}

/// `cwm push NAME`: publishes a stored window to the shared tier.
pub(crate) fn push(name: &str, replace: bool, generation: Option<u64>, c: &ClientArgs) -> ExitCode {
    let mut req = serde_json::json!({"op": "push", "window": name, "replace": replace});
    if let Some(g) = generation {
        req["expected_generation"] = g.into();
    }
    client(c, req, |v| {
        let p = &v["push"];
        println!(
            "pushed {} as generation {}: {} blocks, {} written ({} bytes in the window)",
            p["name"].as_str().unwrap_or(""),
            p["generation"],
            p["blocks"],
            p["written"],
            p["bytes"]
        );
    })
}

/// `cwm pull NAME`: stores a window of the shared tier locally.
pub(crate) fn pull(name: &str, replace: bool, c: &ClientArgs) -> ExitCode {
    let req = serde_json::json!({"op": "pull", "window": name, "replace": replace});
    client(c, req, |v| {
        let p = &v["pull"];
        println!(
            "pulled {} generation {} as version {}: {} blocks, {} fetched ({} bytes)",
            p["name"].as_str().unwrap_or(""),
            p["generation"],
            p["version"],
            p["blocks"],
            p["fetched"],
            p["bytes"]
        );
    })
}

/// `cwm rm --cascade SESSION`.
pub(crate) fn rm_session(name: &str, c: &ClientArgs) -> ExitCode {
    client(
        c,
        serde_json::json!({"op": "session.delete", "session": name, "cascade": true}),
        |v| {
            println!(
                "deleted session {} and windows {}",
                v["session"].as_str().unwrap_or(""),
                v["windows_deleted"]
            );
        },
    )
}

/// `cwm rm NAME`.
pub(crate) fn rm(name: &str, c: &ClientArgs) -> ExitCode {
    client(
        c,
        serde_json::json!({"op": "delete", "window": name}),
        |v| {
            println!(
                "deleted {} v{}",
                v["deleted"]["name"].as_str().unwrap_or(""),
                v["deleted"]["version"]
            );
        },
    )
}

/// `cwm freeze`: `req` is the freeze request the flags make.
pub(crate) fn freeze(req: serde_json::Value, c: &ClientArgs) -> ExitCode {
    client(c, req, |v| {
        println!(
            "froze {} v{}: {} tokens, {} blocks, {:.1} MiB",
            v["window"]["name"].as_str().unwrap_or(""),
            v["window"]["version"],
            v["window"]["num_tokens"],
            v["window"]["num_blocks"],
            v["window"]["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    })
}

/// `cwm thaw`.
pub(crate) fn thaw(
    window: String,
    session: Option<String>,
    engine: Option<String>,
    block_ids: Option<Vec<u64>>,
    salt: Option<String>,
    c: &ClientArgs,
) -> ExitCode {
    let mut req = serde_json::json!({"op": "thaw", "window": window, "salt": salt});
    if let Some(s) = session {
        req["session"] = s.into();
    }
    if let Some(e) = engine {
        req["engine"] = e.into();
    }
    if let Some(b) = block_ids {
        req["block_ids"] = b.into();
    }
    client(c, req, |v| {
        let r = &v["report"];
        println!(
            "thawed {}: {} of {} blocks, {} tokens restored, {} to recompute{}",
            r["window"].as_str().unwrap_or(""),
            r["blocks_restored"],
            r["num_blocks"],
            r["tokens_restored"],
            r["tokens_to_recompute"],
            r["corruption"]
                .as_str()
                .map(|c| format!(" (corruption: {c})"))
                .unwrap_or_default()
        );
    })
}

/// `cwm scrub`.
pub(crate) fn scrub(rate: u64, c: &ClientArgs) -> ExitCode {
    let bar = Progress::new(Mode::detect(c.json), "windows");
    let on_progress = |v: &serde_json::Value| {
        let n = |k: &str| {
            v.pointer(k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        bar.update(
            "scrubbing",
            n("/progress/windows_done"),
            n("/progress/windows_total"),
            "",
        );
    };
    let answer = client_call_progress(
        c,
        serde_json::json!({"op": "scrub", "rate": rate}),
        &on_progress,
    );
    bar.finish();
    answer_with(c, answer, |v| {
        for w in v["windows"].as_array().into_iter().flatten() {
            println!(
                "{:<32} {:<8} {}",
                w["name"].as_str().unwrap_or(""),
                w["status"].as_str().unwrap_or(""),
                w["detail"].as_str().unwrap_or("")
            );
        }
        println!(
            "{} problems; {:.1} MiB verified",
            v["problems"],
            v["bytes_verified"].as_f64().unwrap_or(0.0) / 1048576.0
        );
    })
}

/// `cwm health`.
pub(crate) fn health(c: &ClientArgs) -> ExitCode {
    client(c, serde_json::json!({"op": "health"}), |v| {
        println!(
            "{}: {} windows, {} bytes used, io engine {}",
            v["status"].as_str().unwrap_or("ok"),
            v["windows"],
            v["used_bytes"],
            v["io_engine"].as_str().unwrap_or("")
        );
        // EC-051: what is known to be damaged, and what to do (the daemon is up and
        // serving, so the exit status stays 0).
        let problems = v["integrity"]["problems"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for p in &problems {
            println!(
                "  damaged ({}): {}",
                p["source"].as_str().unwrap_or(""),
                p["what"].as_str().unwrap_or("")
            );
        }
        if let Some(r) = v["integrity"]["recovery"].as_str() {
            println!("  what to do: {r}");
        }
    })
}

/// `cwm metrics`.
pub(crate) fn metrics(c: &ClientArgs) -> ExitCode {
    if c.json {
        // One JSON object: every sample's series (name and labels, as in the text format)
        // to its value.
        return match client_call(c, serde_json::json!({"op": "metrics"})) {
            Ok(v) if cwm::control::client::exit_code(&v) == 0 => {
                println!("{}", metrics_json(v["text"].as_str().unwrap_or("")));
                ExitCode::SUCCESS
            }
            Ok(v) => {
                eprintln!("cwm: {}", v["error"]);
                ExitCode::from(cwm::control::client::exit_code(&v) as u8)
            }
            Err(e) => {
                eprintln!("cwm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    client(c, serde_json::json!({"op": "metrics"}), |v| {
        print!("{}", v["text"].as_str().unwrap_or(""));
    })
}

/// The samples of a Prometheus/OpenMetrics text exposition as `{series: value}`.
fn metrics_json(text: &str) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        if let Some((series, value)) = line.rsplit_once(' ') {
            let v = value.parse::<f64>().map_or_else(
                |_| serde_json::Value::String(value.to_string()),
                serde_json::Value::from,
            );
            out.insert(series.to_string(), v);
        }
    }
    serde_json::Value::Object(out)
}

pub(crate) fn client_call(
    c: &ClientArgs,
    req: serde_json::Value,
) -> Result<serde_json::Value, String> {
    client_call_progress(c, req, &|_| {})
}

/// Sends `req` and returns its final response line; `on_progress` sees every line before it.
pub(crate) fn client_call_progress(
    c: &ClientArgs,
    mut req: serde_json::Value,
    on_progress: &dyn Fn(&serde_json::Value),
) -> Result<serde_json::Value, String> {
    let mut cl = cwm::control::client::Client::connect(&c.socket).map_err(|e| {
        format!(
            "cannot reach cwm at {}: {e} (is `cwm serve` running?)",
            c.socket.display()
        )
    })?;
    if req.get("id").is_none() {
        req["id"] = serde_json::json!(1);
    }
    cl.send_raw(req.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    loop {
        let v = cl.read_line().map_err(|e| e.to_string())?;
        if v["final"].as_bool() == Some(true) {
            return Ok(v);
        }
        on_progress(&v);
    }
}

pub(crate) fn client(
    c: &ClientArgs,
    req: serde_json::Value,
    table: impl Fn(&serde_json::Value),
) -> ExitCode {
    answer_with(c, client_call(c, req), table)
}

/// Prints a final answer: as JSON, through `table`, or its error; the exit code says which.
pub(crate) fn answer_with(
    c: &ClientArgs,
    answer: Result<serde_json::Value, String>,
    table: impl Fn(&serde_json::Value),
) -> ExitCode {
    match answer {
        Ok(v) => {
            let code = cwm::control::client::exit_code(&v);
            if c.json {
                println!("{v}");
            } else if code == 0 {
                table(&v);
            } else {
                eprintln!(
                    "cwm: {}: {}",
                    v.pointer("/error/code")
                        .and_then(|x| x.as_str())
                        .unwrap_or("ERROR"),
                    v.pointer("/error/message")
                        .and_then(|x| x.as_str())
                        .unwrap_or("")
                );
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::from(1)
        }
    }
}

pub(crate) fn window_row(w: &serde_json::Value) -> String {
    let now = cwm::clock::now_unix_ms();
    let ttl = w["expires_unix_ms"]
        .as_i64()
        .map_or_else(|| "-".to_string(), |e| ago((e - now) / 1000));
    let last = w["last_use_unix_ms"].as_i64().map_or_else(
        || "-".to_string(),
        |t| format!("{} ago", ago((now - t) / 1000)),
    );
    format!(
        "{:<32} {:>4} {:>9} {:>7} {:>10.1} {:<8} {:>9} {:>6} {:>9} {}",
        w["name"].as_str().unwrap_or(""),
        // Value's Display ignores widths: format the numbers themselves.
        w["version"].as_u64().unwrap_or(0),
        w["num_tokens"].as_u64().unwrap_or(0),
        w["num_blocks"].as_u64().unwrap_or(0),
        w["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        w["class"].as_str().unwrap_or("-"),
        ttl,
        w["hits"].as_u64().unwrap_or(0),
        last,
        w["session"].as_str().unwrap_or("")
    )
}

/// `cwm pin NAME`, `cwm unpin NAME`, `cwm ttl NAME SECONDS`.
pub(crate) fn retain(op: &str, name: &str, seconds: Option<u64>, c: &ClientArgs) -> ExitCode {
    let mut req = serde_json::json!({"op": op, "window": name});
    if let Some(s) = seconds {
        req["seconds"] = s.into();
    }
    client(c, req, |v| {
        println!("{}\n{}", header(), window_row(&v["window"]));
    })
}
