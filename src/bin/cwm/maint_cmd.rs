//! Maintenance subcommands: fsck (check and repair), compaction, and the torture tools.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::progress::{Mode, Progress};
use crate::{print_json, ClientArgs};

/// `cwm torture --damage`: the exhaustive damage sweep.
pub(crate) fn damage(
    seed: u64,
    data_dir: Option<PathBuf>,
    windows: usize,
    stride: usize,
) -> ExitCode {
    let cfg = cwm::damage::DamageConfig {
        windows,
        seed,
        stride,
        dir: data_dir,
        ..Default::default()
    };
    match cwm::damage::run(&cfg) {
        Ok(s) => {
            println!(
                    "damage sweep: files={} pages={} cases={} windows_checked={} partial={} lost={} resurrected={} reverted={} wrong_bytes={} unreported={} refused_opens={} stale_pages={}",
                    s.files, s.pages, s.cases, s.windows_checked, s.partial_windows, s.lost,
                    s.resurrected, s.reverted, s.wrong_bytes, s.unreported, s.refused_opens, s.stale_pages
                );
            for f in &s.failures {
                eprintln!("  {f}");
            }
            if s.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("cwm: torture --damage: {e}");
            ExitCode::from(1)
        }
    }
}

/// `cwm torture`: kill -9 torture of a child `cwm serve`.
pub(crate) fn torture(
    seconds: u64,
    cycles: u64,
    seed: u64,
    data_dir: Option<PathBuf>,
    kill_max_ms: u64,
) -> ExitCode {
    let cfg = crate::tools::torture::TortureConfig {
        seconds,
        max_cycles: cycles,
        seed,
        data_dir,
        kill_max_ms,
    };
    match crate::tools::torture::run(&cfg) {
        Ok(s) => {
            println!(
                "torture: cycles={} kills={} windows_verified={} violations={}",
                s.cycles, s.kills, s.windows_verified, s.violations
            );
            eprintln!(
                    "torture: kills during recovery={} freezes acknowledged={} deletes acknowledged={} compactions={} evictions seen={} pins acknowledged={} unpins acknowledged={} TTLs acknowledged={} expiries seen={} cut-off retries replayed={} (recovered from the window={}) reused segments seen={} unsealed older segments seen={}",
                    s.kills_in_recovery, s.freezes_acked, s.deletes_acked, s.compactions, s.evictions_seen, s.pins_acked, s.unpins_acked, s.ttls_acked, s.expiries_seen, s.retries_replayed, s.retries_recovered, s.reused_segments_seen, s.unsealed_older_seen
                );
            if s.violations == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("cwm: torture: {e}");
            ExitCode::from(1)
        }
    }
}

/// `cwm fsck DIR`: check a stopped store.
pub(crate) fn fsck(data_dir: &std::path::Path, json: bool) -> ExitCode {
    let bar = Progress::new(Mode::detect(json), "windows");
    let progress =
        |done: usize, total: usize| bar.update("verifying", done as u64, total as u64, "");
    let checked = cwm::fsck::check(cwm::store::StoreConfig::new(data_dir), &progress);
    bar.finish();
    match checked {
        Ok(r) => {
            if json {
                print_json(&r);
            } else {
                println!("{:<32} {:>8} {:>8}  STATUS", "WINDOW", "BLOCKS", "INTACT");
                for w in &r.windows {
                    println!(
                        "{:<32} {:>8} {:>8}  {}{}",
                        w.name,
                        w.blocks,
                        w.intact_blocks,
                        w.status,
                        w.detail
                            .as_deref()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default()
                    );
                }
                for l in &r.lost {
                    println!(
                        "{l:<32} {:>8} {:>8}  a block record was lost to damage (thaws up to it)",
                        "-", "-"
                    );
                }
                for (seg, from, to, why) in &r.recovery.damaged_regions {
                    println!("damaged: segment {seg} bytes {from}..{to}: {why}");
                }
                for p in &r.log_problems {
                    println!(
                        "damaged: segment {} offset {}: {}",
                        p.segment, p.offset, p.what
                    );
                }
                println!(
                        "{} windows, {:.1} MiB verified in {:.2} s; torn tails cut: {}, damaged regions: {}, log problems: {}",
                        r.windows.len(),
                        r.bytes_verified as f64 / 1048576.0,
                        r.seconds,
                        r.recovery.torn_tails.len(),
                        r.recovery.damaged_regions.len(),
                        r.log_problems.len()
                    );
            }
            if r.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(5)
            }
        }
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::from(if e.code() == cwm::ErrorCode::Busy {
                4
            } else {
                1
            })
        }
    }
}

pub(crate) fn fsck_repair(data_dir: &std::path::Path, json: bool, segment_size: u64) -> ExitCode {
    let bar = Progress::new(Mode::detect(json), "");
    let progress =
        |stage: &str, done: usize, total: usize| bar.update(stage, done as u64, total as u64, "");
    let mut cfg = cwm::store::StoreConfig::new(data_dir);
    cfg.segment_size = segment_size;
    let repaired = cwm::fsck::repair(cfg, &progress);
    bar.finish();
    match repaired {
        Ok(r) => {
            if json {
                print_json(&r);
            } else {
                if r.changes.is_empty() {
                    println!("nothing to repair");
                }
                for c in &r.changes {
                    println!("{c}");
                }
                println!(
                    "after repair: {} windows ok, {}",
                    r.after.windows.iter().filter(|w| w.status == "ok").count(),
                    if r.after.clean() {
                        "clean"
                    } else {
                        "STILL NOT CLEAN"
                    }
                );
            }
            if r.after.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(5)
            }
        }
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::from(if e.code() == cwm::ErrorCode::Busy {
                4
            } else {
                1
            })
        }
    }
}

pub(crate) fn compact_cmd(
    data_dir: Option<PathBuf>,
    live_ratio: f64,
    rate: u64,
    c: &ClientArgs,
) -> ExitCode {
    let progress = Progress::new(Mode::detect(c.json), "segments");
    let bar = |done: u64, total: u64, bytes: u64| {
        let copied = format!("{:.1} MiB copied", bytes as f64 / 1048576.0);
        progress.update("compacting", done, total, &copied);
    };
    let opts = cwm::store::CompactOptions {
        live_ratio,
        rate,
        ..Default::default()
    };
    let report = if let Some(dir) = data_dir {
        let (store, _) = match cwm::store::Store::open(cwm::store::StoreConfig::new(&dir)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cwm: {e}");
                return ExitCode::from(if e.code() == cwm::ErrorCode::Busy {
                    4
                } else {
                    1
                });
            }
        };
        match store.compact(&opts, &mut |p| {
            bar(
                p.segments_done as u64,
                p.segments_total as u64,
                p.bytes_copied,
            )
        }) {
            Ok(r) => serde_json::json!({"ok": true, "report": r}),
            Err(e) => {
                eprintln!("cwm: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let req = serde_json::json!({"op": "compact", "live_ratio": live_ratio, "rate": rate});
        let n = |v: &serde_json::Value, k: &str| {
            v.pointer(k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        let on_progress = |v: &serde_json::Value| {
            bar(
                n(v, "/progress/segments_done"),
                n(v, "/progress/segments_total"),
                n(v, "/progress/bytes_copied"),
            );
        };
        match crate::client_cmd::client_call_progress(c, req, &on_progress) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("cwm: {e}");
                return ExitCode::from(1);
            }
        }
    };
    progress.finish();
    let code = cwm::control::client::exit_code(&report);
    if c.json {
        println!("{report}");
    } else if code == 0 {
        let r = &report["report"];
        let removed: Vec<String> = r["segments_removed"]
            .as_array()
            .into_iter()
            .flatten()
            .map(ToString::to_string)
            .collect();
        println!(
            "compacted: {}, {:.1} MiB copied, {:.1} MiB given back in {:.2} s",
            match removed.len() {
                0 => "no segment deleted".to_string(),
                n => format!("{n} segment(s) deleted ({})", removed.join(", ")),
            },
            r["bytes_copied"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["bytes_reclaimed"].as_f64().unwrap_or(0.0) / 1048576.0,
            r["seconds"].as_f64().unwrap_or(0.0)
        );
    } else {
        eprintln!(
            "cwm: {}",
            report["error"]["message"]
                .as_str()
                .unwrap_or("compaction failed")
        );
    }
    ExitCode::from(code as u8)
}
