//! Group commit: callers that need a segment's written records durable at the same time share
//! one `fdatasync`. A caller needs a sync that *starts* after it arrives (one already running
//! may have begun before its writes completed), so it waits for the running one to end, and then
//! either a later sync covered it or it runs one itself for everyone waiting by then. At most
//! one `fdatasync` of a segment runs at a time; under 16 concurrent freezes (each syncing its
//! blocks, then its manifest) most callers ride on another's.

use std::sync::{Condvar, Mutex, MutexGuard};

/// The syncs of one segment: see the module documentation.
#[derive(Default)]
pub(crate) struct SyncGroup {
    state: Mutex<Gens>,
    done: Condvar,
}

/// Syncs are numbered in the order they start; only one runs at a time, so they end in that
/// order too.
#[derive(Default)]
struct Gens {
    /// Number of the last sync started.
    started: u64,
    /// Number of the last sync ended.
    ended: u64,
    /// A sync is running.
    running: bool,
    /// Number of the first sync that failed.
    first_failed: Option<u64>,
    /// Callers waiting for the running sync to end.
    waiting: u64,
}

impl SyncGroup {
    /// Makes every write completed before this call durable: runs `sync` (as the one caller
    /// doing it for the group) or waits for a sync another caller started after this call
    /// began. When that sync failed, a caller that did not run it gets `failed()`.
    pub(crate) fn run<E>(
        &self,
        sync: impl FnOnce() -> Result<(), E>,
        failed: impl FnOnce() -> E,
    ) -> Result<(), E> {
        let Ok(mut g) = self.state.lock() else {
            // Poisoned (a panic while the state was held, which nothing does): sync alone.
            return sync();
        };
        // The first sync to start after now covers this caller.
        let target = g.started + 1;
        while g.running {
            g.waiting += 1;
            g = match self.done.wait(g) {
                Ok(g) => g,
                Err(_) => return sync(),
            };
            g.waiting -= 1;
        }
        if g.ended >= target {
            return match g.first_failed {
                Some(f) if f <= target => Err(failed()),
                _ => Ok(()),
            };
        }
        g.started += 1;
        g.running = true;
        let gen = g.started;
        drop(g);
        let ending = Ending { group: self, gen };
        let res = sync();
        ending.end(res.is_err());
        res
    }

    fn lock(&self) -> Option<MutexGuard<'_, Gens>> {
        self.state.lock().ok()
    }
}

/// Ends a running sync, also when its caller unwinds (waiters are never left waiting).
struct Ending<'a> {
    group: &'a SyncGroup,
    gen: u64,
}

impl Ending<'_> {
    fn end(self, failed: bool) {
        if failed {
            if let Some(mut g) = self.group.lock() {
                g.first_failed.get_or_insert(self.gen);
            }
        }
        // Drop ends it.
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if let Some(mut g) = self.group.lock() {
            if std::thread::panicking() {
                g.first_failed.get_or_insert(self.gen);
            }
            g.running = false;
            g.ended = self.gen;
            self.group.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SyncGroup;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_lone_caller_runs_its_sync() {
        let g = SyncGroup::default();
        let n = AtomicU64::new(0);
        for _ in 0..3 {
            g.run(
                || {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), ()>(())
                },
                || (),
            )
            .unwrap_or(());
        }
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn callers_waiting_behind_a_running_sync_share_the_next_one() {
        let g = Arc::new(SyncGroup::default());
        let calls = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        // The first caller's sync blocks until released; eight more arrive meanwhile.
        let first = {
            let (g, calls, rx) = (g.clone(), calls.clone(), rx.clone());
            std::thread::spawn(move || {
                g.run(
                    || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _ = rx.lock().map(|r| r.recv());
                        Ok::<(), ()>(())
                    },
                    || (),
                )
            })
        };
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let others: Vec<_> = (0..8)
            .map(|_| {
                let (g, calls) = (g.clone(), calls.clone());
                std::thread::spawn(move || {
                    g.run(
                        || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            Ok::<(), ()>(())
                        },
                        || (),
                    )
                })
            })
            .collect();
        while g.lock().map_or(0, |s| s.waiting) < 8 {
            std::thread::yield_now();
        }
        tx.send(()).unwrap_or(());
        assert_eq!(first.join().ok(), Some(Ok(())));
        for o in others {
            assert_eq!(o.join().ok(), Some(Ok(())));
        }
        // The first sync, then one for the eight that waited behind it.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_sync_fails_every_caller_it_was_to_cover() {
        let g = Arc::new(SyncGroup::default());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(AtomicU64::new(0));
        // A first sync runs (and succeeds) while two callers arrive: the next sync is theirs,
        // and it fails.
        let leader = {
            let (g, started) = (g.clone(), started.clone());
            std::thread::spawn(move || {
                g.run(
                    || {
                        started.store(1, Ordering::SeqCst);
                        let _ = rx.recv();
                        Ok::<(), &str>(())
                    },
                    || "shared",
                )
            })
        };
        while started.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || g.run(|| Err::<(), &str>("eio"), || "shared"))
            })
            .collect();
        while g.lock().map_or(0, |s| s.waiting) < 2 {
            std::thread::yield_now();
        }
        tx.send(()).unwrap_or(());
        assert_eq!(leader.join().ok(), Some(Ok(())));
        // Whichever ran the failed sync gets its error, the other the shared one: neither is
        // told its writes are durable.
        let mut got: Vec<_> = waiters.into_iter().map(|w| w.join().ok()).collect();
        got.sort();
        assert_eq!(got, vec![Some(Err("eio")), Some(Err("shared"))]);
    }
}
