//! A fault-injecting engine wrapper: fails the Nth write (optionally after writing part of it),
//! or the Nth `fdatasync`, with a chosen errno. Used by tests to prove that ENOSPC, EIO, torn
//! writes and fsync failures give clean typed errors and never a visible partial window.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{AlignedBuf, IoEngine, IoError, Op, OpBuf};

/// What to break, counted from the moment the plan is set.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    /// Fail the write op with this 0-based index (counting every write op).
    pub fail_write: Option<u64>,
    /// errno of the failing write (e.g. `libc::ENOSPC`, `libc::EIO`).
    pub write_errno: i32,
    /// Before failing, write the first half of that op (a torn write).
    pub torn: bool,
    /// A bad sector: every read whose range covers this file offset fails with `read_errno`.
    pub bad_sector: Option<u64>,
    /// errno of the failing read.
    pub read_errno: i32,
    /// Fail the `fdatasync` with this 0-based index.
    pub fail_fsync: Option<u64>,
    /// errno of the failing `fdatasync`.
    pub fsync_errno: i32,
    /// Keep failing every write after the first failure (a full device) instead of once.
    pub sticky: bool,
    /// Hold the write op with this 0-based index before it reaches the device, until
    /// [`FaultEngine::release`] (a slow write, to order concurrent operations in tests; a
    /// held write gives up waiting after 30 s).
    pub hold_write: Option<u64>,
    /// Hold the `fdatasync` with this 0-based index the same way (then fail it when
    /// `fail_fsync` names it too).
    pub hold_fsync: Option<u64>,
}

/// Wraps an engine and injects the faults of its current [`FaultPlan`].
pub struct FaultEngine {
    inner: Arc<dyn IoEngine>,
    plan: Mutex<FaultPlan>,
    writes: AtomicU64,
    reads: AtomicU64,
    fsyncs: AtomicU64,
    tripped: std::sync::atomic::AtomicBool,
    /// (a write is held now, released)
    hold: Mutex<(bool, bool)>,
    gate: std::sync::Condvar,
}

impl FaultEngine {
    /// Wraps `inner` with no faults planned.
    #[must_use]
    pub fn new(inner: Arc<dyn IoEngine>) -> Self {
        Self {
            inner,
            plan: Mutex::new(FaultPlan::default()),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            tripped: std::sync::atomic::AtomicBool::new(false),
            hold: Mutex::new((false, false)),
            gate: std::sync::Condvar::new(),
        }
    }

    /// Whether the write [`FaultPlan::hold_write`] (or the sync [`FaultPlan::hold_fsync`])
    /// names is being held now.
    #[must_use]
    pub fn holding(&self) -> bool {
        self.hold.lock().is_ok_and(|h| h.0)
    }

    /// Lets the held write (and any later one the plan would hold) go on.
    pub fn release(&self) {
        if let Ok(mut h) = self.hold.lock() {
            h.1 = true;
        }
        self.gate.notify_all();
    }

    fn wait_for_release(&self) {
        let Ok(mut h) = self.hold.lock() else {
            return;
        };
        h.0 = true;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !h.1 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            h = match self.gate.wait_timeout(h, left) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        h.0 = false;
    }

    /// Replaces the plan and resets the counters.
    pub fn set_plan(&self, plan: FaultPlan) {
        if let Ok(mut p) = self.plan.lock() {
            *p = plan;
        }
        self.writes.store(0, Ordering::SeqCst);
        self.reads.store(0, Ordering::SeqCst);
        self.fsyncs.store(0, Ordering::SeqCst);
        self.tripped.store(false, Ordering::SeqCst);
        if let Ok(mut h) = self.hold.lock() {
            *h = (false, false);
        }
    }

    /// Removes every planned fault.
    pub fn clear(&self) {
        self.set_plan(FaultPlan::default());
    }

    /// Write ops seen since the plan was set.
    #[must_use]
    pub fn writes_seen(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn plan(&self) -> FaultPlan {
        self.plan.lock().map(|p| *p).unwrap_or_default()
    }
}

fn injected(op: &'static str, offset: u64, errno: i32) -> IoError {
    IoError::Os {
        op,
        offset,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

impl IoEngine for FaultEngine {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), IoError> {
        let plan = self.plan();
        let mut first = None;
        for op in ops.iter_mut() {
            let is_write = matches!(op.buf, OpBuf::Write(_));
            if let (OpBuf::Read(b), Some(bad)) = (&op.buf, plan.bad_sector) {
                self.reads.fetch_add(1, Ordering::SeqCst);
                if (op.offset..op.offset + b.len() as u64).contains(&bad) {
                    first.get_or_insert(injected("read", op.offset, plan.read_errno));
                    continue;
                }
            }
            if is_write {
                let n = self.writes.fetch_add(1, Ordering::SeqCst);
                if plan.hold_write == Some(n) {
                    self.wait_for_release();
                }
                let fail = plan.fail_write == Some(n)
                    || (plan.sticky && self.tripped.load(Ordering::SeqCst));
                if fail {
                    self.tripped.store(true, Ordering::SeqCst);
                    if plan.torn {
                        if let OpBuf::Write(b) = &op.buf {
                            let half = (b.len() / 2) & !4095;
                            if half > 0 {
                                let _ =
                                    self.inner
                                        .run(&mut [Op::write(op.fd, op.offset, &b[..half])]);
                            }
                        }
                    }
                    first.get_or_insert(injected("write", op.offset, plan.write_errno));
                    continue;
                }
            }
            if let Err(e) = self.inner.run(std::slice::from_mut(op)) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn fdatasync(&self, fd: RawFd) -> Result<(), IoError> {
        let plan = self.plan();
        let n = self.fsyncs.fetch_add(1, Ordering::SeqCst);
        if plan.hold_fsync == Some(n) {
            self.wait_for_release();
        }
        if plan.fail_fsync == Some(n) {
            return Err(injected("fdatasync", 0, plan.fsync_errno));
        }
        self.inner.fdatasync(fd)
    }

    fn register_fixed(&self, region: Arc<AlignedBuf>) -> bool {
        self.inner.register_fixed(region)
    }
}
