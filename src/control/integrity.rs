//! What the daemon knows about the integrity of its log (EC-051): damage found when the store
//! was opened (records that failed their checksums, damaged regions skipped, windows missing a
//! block), by scrubs, and by thaws. `health` reports it (`status: "degraded"`) with what to
//! do; the log itself is the only database, so nothing else can be corrupt.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};

use crate::store::RecoveryReport;

/// Problems kept for `health` (the newest; `total` counts all).
const KEEP: usize = 64;

/// What an operator does about damage.
pub const RECOVERY: &str = "a damaged window still thaws its intact prefix (the engine \
recomputes the rest), every other window is unaffected; with the daemon stopped, `cwm fsck \
--data-dir DIR` lists the damage and `cwm fsck --repair --data-dir DIR` removes it (damage \
found at start is reported until a start finds none); what scrubs and thaws found is cleared \
by the next clean scrub (`scrub` op, or the background scrubber) once the damaged windows are \
deleted or repaired";

/// One problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Who found it: `open`, `scrub` or `thaw`.
    pub source: &'static str,
    /// What it is.
    pub what: String,
    /// When it was found (seconds since the Unix epoch).
    pub at_unix: u64,
}

#[derive(Default)]
struct State {
    problems: VecDeque<Problem>,
    total: u64,
}

/// The integrity record of one daemon.
#[derive(Default)]
pub struct Integrity {
    state: Mutex<State>,
    /// The walk of the checkpointed segments after the open is under way (`health` says so:
    /// damage it finds is reported when it ends).
    verifying: std::sync::atomic::AtomicBool,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Integrity {
    /// Records what opening the store found. Torn tails are not damage (a crash leaves one;
    /// the writes they held were never acknowledged).
    pub fn opened(&self, r: &RecoveryReport) {
        for (seg, off) in &r.damaged_records {
            self.record(
                "open",
                format!(
                    "a window manifest or tombstone in segment {seg} at offset {off} failed its \
                     checksum: a window may be missing, or a deleted one back"
                ),
            );
        }
        for (seg, from, to, why) in &r.damaged_regions {
            self.record(
                "open",
                format!("segment {seg} bytes {from}..{to} are damaged ({why}) and were skipped"),
            );
        }
        for name in &r.incomplete_windows {
            self.record(
                "open",
                format!(
                    "window {name:?} lost a block record to damage: it thaws up to that block \
                     (a freeze holding the block writes it again)"
                ),
            );
        }
        for (seg, off, why) in &r.torn_tails {
            // A crash leaves a torn tail too; only one that cost a record copy is damage.
            if why.contains("second copy") {
                self.record(
                    "open",
                    format!("segment {seg} at offset {off}: {why} (written again)"),
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a problem found by `source`.
    pub fn record(&self, source: &'static str, what: String) {
        let mut s = self.lock();
        s.total += 1;
        if s.problems.len() == KEEP {
            s.problems.pop_front();
        }
        s.problems.push_back(Problem {
            source,
            what,
            at_unix: now(),
        });
    }

    /// A whole scrub pass's findings replace what scrubs and thaws found before: a clean pass
    /// verified every window and catalog record, so that damage is gone (deleted, repaired).
    /// Thaw findings made after the pass started are kept, and so is damage found at start:
    /// it lies in bytes no window references any more, which a scrub does not read (the next
    /// start finds it again unless `cwm fsck --repair` removed it).
    pub fn scrubbed(&self, started_unix: u64, found: Vec<String>) {
        let mut s = self.lock();
        s.problems
            .retain(|p| p.source == "open" || (p.source == "thaw" && p.at_unix >= started_unix));
        let at = now();
        for what in found {
            s.total += 1;
            if s.problems.len() == KEEP {
                s.problems.pop_front();
            }
            s.problems.push_back(Problem {
                source: "scrub",
                what,
                at_unix: at,
            });
        }
    }

    /// Whether nothing is known to be damaged.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.lock().problems.is_empty()
    }

    /// Problems known now.
    #[must_use]
    pub fn problems(&self) -> usize {
        self.lock().problems.len()
    }

    /// The `integrity` object of `health`.
    #[must_use]
    pub fn report(&self) -> Value {
        let s = self.lock();
        let ok = s.problems.is_empty();
        json!({
            "ok": ok,
            "verifying_checkpoints": self.verifying(),
            "problems": s.problems,
            "problems_total": s.total,
            "recovery": if ok { Value::Null } else { Value::from(RECOVERY) },
        })
    }

    /// Marks the walk of the checkpointed segments after the open as under way, or done.
    pub fn set_verifying(&self, on: bool) {
        self.verifying
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the walk of the checkpointed segments after the open is under way.
    #[must_use]
    pub fn verifying(&self) -> bool {
        self.verifying.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Seconds since the Unix epoch, for [`Integrity::scrubbed`].
    #[must_use]
    pub fn now() -> u64 {
        now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_damage_stays_scrub_and_thaw_findings_clear_on_a_clean_scrub() {
        let r = RecoveryReport {
            damaged_records: vec![(3, 8192)],
            damaged_regions: vec![(4, 4096, 12288, "bad header".into())],
            incomplete_windows: vec!["w".into()],
            torn_tails: vec![(5, 4096, "torn".into())],
            ..Default::default()
        };
        let i = Integrity::default();
        i.opened(&r);
        assert!(!i.ok());
        let v = i.report();
        assert_eq!(
            v["problems"].as_array().map(Vec::len),
            Some(3),
            "torn tails are not damage"
        );
        assert!(v["recovery"].as_str().is_some_and(|s| s.contains("fsck")));
        let t = Integrity::now();
        i.scrubbed(t, vec![]);
        assert_eq!(
            i.report()["problems"].as_array().map(Vec::len),
            Some(3),
            "open damage stays"
        );
        let i = Integrity::default();
        i.scrubbed(t, vec!["window \"x\" is damaged".into()]);
        assert_eq!(i.report()["problems"][0]["source"], "scrub");
        i.record("thaw", "block 3 of \"y\" is corrupt".into());
        i.scrubbed(t.saturating_sub(10), vec![]);
        assert!(!i.ok(), "a thaw's finding after the scrub started stays");
        i.scrubbed(Integrity::now() + 1, vec![]);
        assert!(i.ok());
        assert_eq!(i.report()["recovery"], Value::Null);
        assert_eq!(i.report()["problems_total"], 2);
        for k in 0..100 {
            i.record("thaw", format!("{k}"));
        }
        assert_eq!(i.report()["problems"].as_array().map(Vec::len), Some(KEEP));
    }
}
