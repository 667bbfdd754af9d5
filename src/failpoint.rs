//! Failpoints: named places in the write path where a test can inject a fault. Compiled only
//! with the cargo feature `failpoints` (off by default): without it the `fail_point!` sites
//! expand to nothing, so release builds carry none.
//!
//! Set them with [`set`] in-process, or for a child process through the environment:
//! `CWM_FAILPOINTS="block-write=error;fdatasync=panic"` (read once, at the first site reached).
//!
//! Sites: `block-write`, `manifest-write`, `meta-write` (catalog commit), `tombstone-write`,
//! `fdatasync`, `compaction-copy`, `segment-rotate`, `segment-unlink` (compaction deleting a
//! segment), `segment-raise-limit` (the header rewrite raising a reused file's record limit;
//! reached only once a file is reused, so tests/failpoints.rs checks it on its own),
//! `checkpoint-write` (a segment checkpoint; its failure fails no operation, so
//! it is not in [`SITES`]: tests/failpoints.rs checks it on its own), `segment-seal` (the
//! background part of a rotation's seal, once the segment's records are written: `error`
//! leaves its sealed length unrecorded, `delay` holds it unsealed half a second longer —
//! for `cwm torture` to land kills there; not in [`SITES`] either), and `catalog-rewrite`
//! (scrub about to write a damaged catalog record again; for `delay`, to race it).
//! Actions: `error` (the operation fails with a typed
//! I/O error), `short-write` (part of the bytes reach the file, then the operation fails),
//! `panic`, and `delay` (the site waits half a second, then goes on as if not armed: a slow
//! device — unless the site was armed with `error` or `short-write` meanwhile, which then
//! fires: a fault landing after other work ran inside the delay). A site fires every time it
//! is reached until cleared ([`set_after`]: after letting
//! a number of hits pass).
//!
//! Also here: an injected wall-clock skew for stored timestamps (`CWM_CLOCK_SKEW_MS`, EC-042).

/// What an armed failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fail with an I/O error (EIO).
    Error,
    /// Write part of the bytes, then fail with an I/O error.
    ShortWrite,
    /// Panic.
    Panic,
    /// Wait [`DELAY`], then go on as if not armed (a slow device).
    Delay,
}

/// How long a `delay` failpoint waits.
pub const DELAY: std::time::Duration = std::time::Duration::from_millis(500);

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Self::Error),
            "short-write" => Ok(Self::ShortWrite),
            "panic" => Ok(Self::Panic),
            "delay" => Ok(Self::Delay),
            o => Err(format!(
                "unknown failpoint action {o:?}: use error, short-write, panic or delay"
            )),
        }
    }
}

/// Every failpoint site.
pub const SITES: [&str; 8] = [
    "block-write",
    "manifest-write",
    "meta-write",
    "tombstone-write",
    "fdatasync",
    "compaction-copy",
    "segment-rotate",
    "segment-unlink",
];

/// The I/O error an injected fault answers.
#[must_use]
pub fn injected(site: &str) -> std::io::Error {
    std::io::Error::other(format!("injected fault at failpoint {site} (EIO)"))
}

#[cfg(feature = "failpoints")]
mod registry {
    use super::Action;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// Armed sites: the action, and how many hits still pass before it fires.
    type Armed = HashMap<String, (Action, u32)>;

    fn map() -> &'static Mutex<Armed> {
        static M: OnceLock<Mutex<Armed>> = OnceLock::new();
        M.get_or_init(|| {
            let mut m = HashMap::new();
            if let Ok(spec) = std::env::var("CWM_FAILPOINTS") {
                for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
                    if let Some((name, action)) = item.split_once('=') {
                        if let Ok(a) = action.trim().parse() {
                            m.insert(name.trim().to_string(), (a, 0));
                        }
                    }
                }
            }
            Mutex::new(m)
        })
    }

    /// Arms (`Some`) or clears (`None`) failpoint `name`.
    pub fn set(name: &str, action: Option<Action>) {
        let mut m = map()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match action {
            Some(a) => m.insert(name.to_string(), (a, 0)),
            None => m.remove(name),
        };
    }

    /// Arms failpoint `name` to let its next `pass` hits go on as if not armed, then fire
    /// `action` at every hit after them (a fault in the middle of an operation).
    pub fn set_after(name: &str, pass: u32, action: Action) {
        map()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), (action, pass));
    }

    /// Clears every failpoint.
    pub fn clear() {
        map()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// The action armed at `name`, if any.
    pub fn hit(name: &str) -> Option<Action> {
        let a = {
            let mut m = map()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match m.get_mut(name) {
                Some((_, pass)) if *pass > 0 => {
                    *pass -= 1;
                    None
                }
                Some((a, _)) => Some(*a),
                None => None,
            }
        };
        match a {
            Some(Action::Panic) => panic!("failpoint {name}: injected panic"),
            Some(Action::Delay) => {
                std::thread::sleep(super::DELAY);
                // Re-armed meanwhile with a fault (a test landing other work inside the
                // delay, then failing the delayed operation): that fault fires now.
                let m = map()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match m.get(name) {
                    Some((a @ (Action::Error | Action::ShortWrite), 0)) => Some(*a),
                    _ => None,
                }
            }
            a => a,
        }
    }
}

#[cfg(feature = "failpoints")]
pub use registry::{clear, hit, set, set_after};

/// Runs `$body` with the armed action (`Error` or `ShortWrite`; `Panic` panics inside, `Delay`
/// waits inside and runs nothing) when
/// failpoint `$name` is armed. Expands to nothing without the `failpoints` feature.
#[macro_export]
macro_rules! fail_point {
    ($name:expr, $a:ident => $body:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if let Some($a) = $crate::failpoint::hit($name) {
                $body
            }
        }
    };
}

/// Wall-clock skew injected into the timestamps cwm stores (EC-042 tests; `failpoints` builds
/// only): milliseconds added to every stored "now". Set in-process with [`set_clock_skew_ms`],
/// or for a child process through `CWM_CLOCK_SKEW_MS`. Ordering never depends on these
/// timestamps (sequence numbers do that), which is what the skew tests show.
#[cfg(feature = "failpoints")]
mod skew {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Once;

    static SKEW: AtomicI64 = AtomicI64::new(0);
    static FROM_ENV: Once = Once::new();

    /// The injected skew.
    pub fn clock_skew_ms() -> i64 {
        FROM_ENV.call_once(|| {
            if let Some(v) = std::env::var("CWM_CLOCK_SKEW_MS")
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
            {
                SKEW.store(v, Ordering::SeqCst);
            }
        });
        SKEW.load(Ordering::SeqCst)
    }

    /// Sets the skew for this process.
    pub fn set_clock_skew_ms(ms: i64) {
        FROM_ENV.call_once(|| {});
        SKEW.store(ms, Ordering::SeqCst);
    }
}

#[cfg(feature = "failpoints")]
pub use skew::{clock_skew_ms, set_clock_skew_ms};

/// No skew outside `failpoints` builds.
#[cfg(not(feature = "failpoints"))]
#[inline]
#[must_use]
pub fn clock_skew_ms() -> i64 {
    0
}
