//! The `cwm` command line. `main` parses the command and hands it to the file that owns it:
//! `serve` (the daemon's configuration and start), `client_cmd` (one request to a running
//! daemon), `maint_cmd` (fsck, compaction, torture), `bench_cmd` (benchmarks, gpu-check).
//! The tools in `tools/` use the library through `cwm::` like any other user.

#![deny(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_cmd;
mod client_cmd;
mod maint_cmd;
mod progress;
mod serve;
mod tools;

use bench_cmd::BenchCmd;
use serve::ServeArgs;

/// cwm — Context Window Manager: durable, verifiable KV-cache windows for vLLM.
#[derive(Parser)]
#[command(name = "cwm", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a synthetic window into a temporary data dir, reopen, thaw and verify it.
    Demo(tools::demo::DemoArgs),
    /// Benchmarks against ceilings measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Draw saved benchmark reports (`cwm bench … --json`, gpu-check JSON) as one SVG.
    Plot {
        /// Report files (JSON).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The SVG file to write.
        #[arg(long, value_name = "FILE.svg")]
        out: PathBuf,
    },
    /// Run the sidecar daemon on a Unix socket (foreground; SIGTERM/SIGINT stop it cleanly).
    Serve(Box<ServeArgs>),
    /// List windows.
    Ls {
        /// The windows published in the shared tier instead (serve --remote).
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Show one window.
    Stat {
        /// Window name.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Publish a stored window to the shared tier (serve --remote), for other instances.
    Push {
        /// Window name.
        name: String,
        /// Replace whatever version the tier holds (default: the name must be new there).
        #[arg(long, conflicts_with = "expected_generation")]
        replace: bool,
        /// Replace only the tier's version of this generation.
        #[arg(long)]
        expected_generation: Option<u64>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Store a window of the shared tier locally (every block verified against its manifest).
    Pull {
        /// Window name.
        name: String,
        /// Replace a local window of that name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Pin a window: never evicted, no expiry.
    Pin {
        /// Window name.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Unpin a window: evictable under the capacity budget like unnamed data (expiry kept).
    Unpin {
        /// Window name.
        name: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Set a window's TTL: it expires SECONDS from now (0: never).
    Ttl {
        /// Window name.
        name: String,
        /// Seconds from now (0 removes the TTL).
        seconds: u64,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Delete a window.
    Rm {
        /// Window name (with --cascade: a session name).
        name: String,
        /// NAME is a session: delete it and every window frozen from it.
        #[arg(long)]
        cascade: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Freeze a session into a window: the blocks --engine holds (--tokens, --block-ids), or
    /// what the session holds as its engine last reported (`session.state`).
    Freeze {
        /// Session.
        #[arg(long)]
        session: String,
        /// Window name.
        #[arg(long)]
        window: String,
        /// The registered engine holding the KV (needed unless the session's engine reported
        /// what it holds with `session.state`).
        #[arg(long)]
        engine: Option<String>,
        /// With --engine: the session's token ids, comma-separated.
        #[arg(long, value_delimiter = ',', requires = "engine")]
        tokens: Option<Vec<u32>>,
        /// With --engine: the engine's block ids holding those tokens, in order.
        #[arg(long, value_delimiter = ',', requires = "tokens")]
        block_ids: Option<Vec<u64>>,
        /// Replace an existing window of that name.
        #[arg(long)]
        replace: bool,
        /// The request's namespace salt (a LoRA adapter, a tenant: docs/PROTOCOL.md).
        #[arg(long)]
        salt: Option<String>,
        /// pinned (never evicted; the default) or unnamed (evictable under the budget).
        #[arg(long, default_value = "pinned")]
        class: String,
        /// Seconds until the window expires (gone for every reader, then tombstoned).
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Thaw a window into the blocks a session's engine allocated (or into --block-ids).
    Thaw {
        /// Window name.
        window: String,
        /// Session to thaw into.
        #[arg(long)]
        session: Option<String>,
        /// Engine (default: the session's).
        #[arg(long)]
        engine: Option<String>,
        /// Destination block ids, comma-separated (default: the session's).
        #[arg(long, value_delimiter = ',')]
        block_ids: Option<Vec<u64>>,
        /// The namespace salt the window was frozen with.
        #[arg(long)]
        salt: Option<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Verify a data directory offline (the daemon must not be running on it).
    Fsck {
        /// Data directory.
        #[arg(long, env = "CWM_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Repair: set aside segments that cannot be opened, delete windows that cannot be
        /// read (tombstones), rewrite segments holding damage, and print exactly what changed.
        #[arg(long)]
        repair: bool,
        /// Size of the segments repair writes (the daemon's --segment-size).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        segment_size: u64,
    },
    /// Reclaim space: copy live records out of sparse segments and delete them. Offline with
    /// --data-dir, else through the daemon's socket.
    Compact {
        /// Data directory (offline; the daemon must not be running on it).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Compact segments whose live fraction is below this (1.0: any garbage).
        #[arg(long, default_value_t = 0.5)]
        live_ratio: f64,
        /// Most bytes copied per second (0: unlimited), e.g. 200MiB.
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Ask the daemon to read and verify every window now (one scrub pass).
    Scrub {
        /// Most bytes read per second (0: unlimited).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        rate: u64,
        /// Check the shared tier instead: which published windows lost blocks there.
        #[arg(long)]
        remote: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Crash torture: run `cwm serve`, drive random freezes/thaws/deletes/compactions, SIGKILL
    /// it at random moments, restart, and verify everything acknowledged.
    Torture {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop after this many restart cycles (0: only --seconds bounds the run).
        #[arg(long, default_value_t = 0)]
        cycles: u64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Data directory (default: a fresh temporary one).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Kills land at most this many ms after an op phase starts.
        #[arg(long, default_value_t = 150)]
        kill_max_ms: u64,
        /// Instead of kills: the damage sweep. Builds a directory of --windows windows, then
        /// zeroes, randomises and bit-flips every 4 KiB page of every file in turn, reopening
        /// and checking that nothing is lost, resurrected or reverted and the damage reported.
        #[arg(long)]
        damage: bool,
        /// Windows of the damage sweep.
        #[arg(long, default_value_t = 56)]
        windows: usize,
        /// Damage every n-th page only (damage sweep).
        #[arg(long, default_value_t = 1)]
        stride: usize,
    },
    /// Ask the daemon whether it is healthy.
    Health(ClientArgs),
    /// Print the daemon's Prometheus metrics (`--json`: one object, series to value).
    Metrics(ClientArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (cwm.1 and one per subcommand, cwm-serve.1, …) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// The Rust half of scripts/gpu-check.sh (CUDA IPC import, freeze/thaw, measurements).
    GpuCheck {
        /// `run` (freeze + thaw for a bit-exact check) or `bench` (measurements).
        mode: String,
        /// Spec file written by scripts/gpu_check.py.
        #[arg(long)]
        spec: PathBuf,
        /// Directory for the store and raw-disk files.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("cwm.sock"),
        None => PathBuf::from("/run/cwm/cwm.sock"),
    }
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Socket of the daemon.
    #[arg(long, env = "CWM_SOCKET", default_value_os_t = default_socket())]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses `123`, `4KiB`, `2MiB`, `2GiB`, `1G`, `512M` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cwm: cannot encode JSON: {e}"),
    }
}

/// `cwm.1` and `cwm-SUB.1` for every subcommand, into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<(), String> {
    use clap::CommandFactory;
    let err = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(err)?;
    let cmd = Cli::command();
    let mut pages = vec![("cwm".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        pages.push((format!("cwm-{}", sub.get_name()), sub.clone()));
    }
    for (name, c) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(c)
            .title(name.to_uppercase())
            .render(&mut out)
            .map_err(err)?;
        std::fs::write(dir.join(format!("{name}.1")), out).map_err(err)?;
    }
    Ok(())
}

/// Exit status of a command that returns a result: 0, or 1 with the message on stderr.
fn finish(res: Result<(), String>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cwm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.cmd {
        Cmd::Serve(a) => {
            let empty = clap::ArgMatches::default();
            finish(serve::serve(
                *a,
                matches.subcommand_matches("serve").unwrap_or(&empty),
            ))
        }
        Cmd::Ls { remote: false, c } => client_cmd::ls(&c),
        Cmd::Ls { remote: true, c } => client_cmd::ls_remote(&c),
        Cmd::Stat { name, c } => client_cmd::stat(&name, &c),
        Cmd::Push {
            name,
            replace,
            expected_generation,
            c,
        } => client_cmd::push(&name, replace, expected_generation, &c),
        Cmd::Pull { name, replace, c } => client_cmd::pull(&name, replace, &c),
        Cmd::Pin { name, c } => client_cmd::retain("pin", &name, None, &c),
        Cmd::Unpin { name, c } => client_cmd::retain("unpin", &name, None, &c),
        Cmd::Ttl { name, seconds, c } => client_cmd::retain("ttl", &name, Some(seconds), &c),
        Cmd::Rm {
            name,
            cascade: true,
            c,
        } => client_cmd::rm_session(&name, &c),
        Cmd::Rm {
            name,
            cascade: false,
            c,
        } => client_cmd::rm(&name, &c),
        Cmd::Freeze {
            session,
            window,
            engine,
            tokens,
            block_ids,
            replace,
            salt,
            class,
            ttl,
            c,
        } => {
            let mut req = serde_json::json!({"op": "freeze", "session": session,
                "window": window, "replace": replace, "salt": salt, "class": class, "ttl": ttl});
            if let Some(e) = engine {
                req["engine"] = e.into();
            }
            if let (Some(t), Some(b)) = (tokens, block_ids) {
                req["tokens"] = t.into();
                req["block_ids"] = b.into();
            }
            client_cmd::freeze(req, &c)
        }
        Cmd::Thaw {
            window,
            session,
            engine,
            block_ids,
            salt,
            c,
        } => client_cmd::thaw(window, session, engine, block_ids, salt, &c),
        Cmd::Scrub {
            remote: true, c, ..
        } => client_cmd::scrub_remote(&c),
        Cmd::Scrub { rate, c, .. } => client_cmd::scrub(rate, &c),
        Cmd::Health(c) => client_cmd::health(&c),
        Cmd::Metrics(c) => client_cmd::metrics(&c),
        Cmd::Fsck {
            data_dir,
            json,
            repair: true,
            segment_size,
        } => maint_cmd::fsck_repair(&data_dir, json, segment_size),
        Cmd::Fsck {
            data_dir,
            json,
            repair: false,
            ..
        } => maint_cmd::fsck(&data_dir, json),
        Cmd::Compact {
            data_dir,
            live_ratio,
            rate,
            c,
        } => maint_cmd::compact_cmd(data_dir, live_ratio, rate, &c),
        Cmd::Torture {
            damage: true,
            seed,
            data_dir,
            windows,
            stride,
            ..
        } => maint_cmd::damage(seed, data_dir, windows, stride),
        Cmd::Torture {
            seconds,
            cycles,
            seed,
            data_dir,
            kill_max_ms,
            ..
        } => maint_cmd::torture(seconds, cycles, seed, data_dir, kill_max_ms),
        Cmd::Demo(a) => finish(tools::demo::run(&a)),
        Cmd::GpuCheck { mode, spec, dir } => finish(bench_cmd::gpu_check(&mode, &spec, dir)),
        Cmd::Bench(b) => finish(bench_cmd::run(b)),
        Cmd::Plot { reports, out } => finish(bench_cmd::plot(&reports, &out)),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "cwm", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Man { dir } => finish(write_man_pages(&dir)),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("").is_err());
    }
}
