//! Progress of long commands (demo, fsck, compaction, scrub, bench): an `indicatif` bar on a
//! terminal; elsewhere (logs, CI) one plain line when a stage ends, and one every
//! [`PLAIN_EVERY`] while it runs.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain-line progress report repeats while a stage runs.
pub(crate) const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Where progress goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// An `indicatif` bar on stderr.
    Bar,
    /// Plain lines on stderr.
    Lines,
    /// Nothing (the command prints JSON, or was asked to be quiet).
    Off,
}

impl Mode {
    /// A bar when stderr is a terminal, plain lines otherwise; nothing when `quiet`.
    pub(crate) fn detect(quiet: bool) -> Mode {
        if quiet {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

struct Stage {
    name: String,
    bar: Option<ProgressBar>,
    last_line: Instant,
    done: u64,
    total: u64,
}

/// The progress of a command that runs in named stages, each counting `done` of `total`
/// `unit`s. Safe to update from several threads.
pub(crate) struct Progress {
    mode: Mode,
    unit: &'static str,
    stage: Mutex<Option<Stage>>,
}

impl Progress {
    /// Progress counted in `unit` (e.g. "windows", "blocks").
    pub(crate) fn new(mode: Mode, unit: &'static str) -> Progress {
        Progress {
            mode,
            unit,
            stage: Mutex::new(None),
        }
    }

    /// Reports `done` of `total` in `stage`; a new stage name ends the previous stage.
    /// `extra` is shown beside the count (e.g. bytes copied).
    pub(crate) fn update(&self, stage: &str, done: u64, total: u64, extra: &str) {
        if self.mode == Mode::Off {
            return;
        }
        let mut g = self.stage.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|s| s.name != stage) {
            if let Some(s) = g.take() {
                self.end(s);
            }
        }
        let s = g.get_or_insert_with(|| self.begin(stage, total));
        s.done = done;
        s.total = total;
        match &s.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                b.set_message(extra.to_string());
            }
            None if done < total && s.last_line.elapsed() >= PLAIN_EVERY => {
                s.last_line = Instant::now();
                eprintln!("{}", self.line(&s.name, done, total, extra));
            }
            None => {}
        }
        if done >= total && total > 0 {
            if let Some(s) = g.take() {
                self.end_with(s, extra);
            }
        }
    }

    /// Ends the current stage (if any).
    pub(crate) fn finish(&self) {
        let mut g = self.stage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.take() {
            self.end(s);
        }
    }

    fn begin(&self, name: &str, total: u64) -> Stage {
        let bar = (self.mode == Mode::Bar).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(&format!(
                "  {{prefix:<12}} [{{bar:30}}] {{pos}}/{{len}} {} {{msg}} ({{elapsed}}, eta {{eta}})",
                self.unit
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>-");
            b.set_style(style);
            b.set_prefix(name.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Stage {
            name: name.to_string(),
            bar,
            last_line: Instant::now(),
            done: 0,
            total,
        }
    }

    /// A plain progress line: `  stage: done/total unit extra`.
    fn line(&self, stage: &str, done: u64, total: u64, extra: &str) -> String {
        let count = format!("{done}/{total}");
        let parts = [count.as_str(), self.unit, extra];
        let rest: Vec<&str> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        format!("  {stage}: {}", rest.join(" "))
    }

    fn end(&self, s: Stage) {
        self.end_with(s, "");
    }

    fn end_with(&self, s: Stage, extra: &str) {
        match s.bar {
            Some(b) => b.finish(),
            None => eprintln!("{}", self.line(&s.name, s.done, s.total, extra)),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_end_when_complete_or_replaced() {
        let p = Progress::new(Mode::Lines, "windows");
        p.update("verifying", 1, 3, "");
        assert!(p.stage.lock().unwrap().is_some());
        p.update("verifying", 3, 3, "");
        assert!(p.stage.lock().unwrap().is_none(), "a complete stage ends");
        p.update("rewriting", 0, 2, "");
        p.update("re-verifying", 1, 2, "");
        let g = p.stage.lock().unwrap();
        assert_eq!(g.as_ref().map(|s| s.name.as_str()), Some("re-verifying"));
    }

    #[test]
    fn plain_lines_have_no_empty_parts() {
        let p = Progress::new(Mode::Lines, "");
        assert_eq!(p.line("rewriting", 1, 2, ""), "  rewriting: 1/2");
        let p = Progress::new(Mode::Lines, "segments");
        assert_eq!(
            p.line("compacting", 1, 2, "3.0 MiB copied"),
            "  compacting: 1/2 segments 3.0 MiB copied"
        );
    }

    #[test]
    fn off_keeps_no_state() {
        let p = Progress::new(Mode::Off, "windows");
        p.update("verifying", 1, 3, "");
        assert!(p.stage.lock().unwrap().is_none());
    }
}
