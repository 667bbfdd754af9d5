//! The io_uring engine: one dedicated thread owns the ring and is fed batches through a
//! crossbeam channel. Callers block until their whole batch has finished. Short transfers are
//! resubmitted for the remainder; a transfer of zero bytes is an error. An idle ring thread
//! blocks on the channel; it never spins.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use io_uring::{opcode, types, IoUring};

use super::{AlignedBuf, IoEngine, IoError, Op, OpBuf};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fsync,
}

/// An op with its buffer as a raw pointer, for the ring thread.
struct RawOp {
    kind: Kind,
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    offset: u64,
    start_offset: u64,
    wanted: usize,
    fixed: Option<u16>,
}

struct Batch {
    ops: Vec<RawOp>,
    done: Sender<Result<(), IoError>>,
}

// SAFETY: the pointers in a Batch refer to buffers the submitting thread keeps borrowed (and
// alive) until it receives the batch's completion; only the ring thread touches them meanwhile.
unsafe impl Send for Batch {}

struct BatchState {
    batch: Batch,
    remaining: usize,
    error: Option<IoError>,
}

/// Fixed-buffer regions registered with the ring (kept alive here while registered).
#[derive(Default)]
struct Fixed {
    regions: Vec<Arc<AlignedBuf>>,
}

/// io_uring engine; see the module docs.
pub struct UringEngine {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    fixed: Arc<Mutex<Fixed>>,
    queue_depth: u32,
}

enum Msg {
    Batch(Batch),
    Register(Arc<AlignedBuf>, Sender<bool>),
}

// SAFETY: see `Batch`; `Register` carries an Arc that is Send on its own.
unsafe impl Send for Msg {}

impl UringEngine {
    /// Sets up a ring with `queue_depth` entries and starts its thread.
    pub fn new(queue_depth: u32) -> std::io::Result<Self> {
        let qd = queue_depth.clamp(1, 4096);
        let ring = IoUring::builder().build(qd)?;
        let (tx, rx) = unbounded::<Msg>();
        let fixed = Arc::new(Mutex::new(Fixed::default()));
        let thread = std::thread::Builder::new()
            .name("cwm-uring".into())
            .spawn(move || ring_thread(ring, rx, qd as usize))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            fixed,
            queue_depth: qd,
        })
    }

    /// The queue depth the ring was built with.
    #[must_use]
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    fn fixed_index(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let fixed = self.fixed.lock().ok()?;
        fixed
            .regions
            .iter()
            .position(|r| {
                let start = r.as_ptr() as usize;
                let p = ptr as usize;
                p >= start && p + len <= start + r.len()
            })?
            .try_into()
            .ok()
    }

    fn submit(&self, ops: Vec<RawOp>) -> Result<(), IoError> {
        let tx = self.tx.as_ref().ok_or(IoError::EngineGone)?;
        let (dtx, drx) = bounded(1);
        tx.send(Msg::Batch(Batch { ops, done: dtx }))
            .map_err(|_| IoError::EngineGone)?;
        drx.recv().map_err(|_| IoError::EngineGone)?
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn run(&self, ops: &mut [Op<'_>]) -> Result<(), IoError> {
        let raw: Vec<RawOp> = ops
            .iter_mut()
            .map(|op| {
                let (kind, ptr, len) = match &mut op.buf {
                    OpBuf::Write(b) => (Kind::Write, b.as_ptr().cast_mut(), b.len()),
                    OpBuf::Read(b) => (Kind::Read, b.as_mut_ptr(), b.len()),
                };
                RawOp {
                    kind,
                    fd: op.fd,
                    ptr,
                    len,
                    offset: op.offset,
                    start_offset: op.offset,
                    wanted: len,
                    fixed: self.fixed_index(ptr, len),
                }
            })
            .collect();
        if raw.is_empty() {
            return Ok(());
        }
        // The borrow of `ops` lasts until `submit` returns, which happens only after the ring
        // thread has finished with every pointer.
        self.submit(raw)
    }

    fn fdatasync(&self, fd: RawFd) -> Result<(), IoError> {
        self.submit(vec![RawOp {
            kind: Kind::Fsync,
            fd,
            ptr: std::ptr::null_mut(),
            len: 0,
            offset: 0,
            start_offset: 0,
            wanted: 0,
            fixed: None,
        }])
    }

    fn register_fixed(&self, region: Arc<AlignedBuf>) -> bool {
        let Some(tx) = self.tx.as_ref() else {
            return false;
        };
        // The list is locked across the ring thread's registration, so that its order (the
        // fixed-buffer indexes ops name) is the order of the kernel's table even when two
        // engines register at once.
        let Ok(mut f) = self.fixed.lock() else {
            return false;
        };
        let (rtx, rrx) = bounded(1);
        if tx.send(Msg::Register(region.clone(), rtx)).is_err() {
            return false;
        }
        let ok = rrx.recv().unwrap_or(false);
        if ok {
            f.regions.push(region);
        }
        ok
    }
}

fn ring_thread(ring: IoUring, rx: Receiver<Msg>, qd: usize) {
    RingThread {
        registered: Vec::new(),
        queue: VecDeque::new(),
        batches: HashMap::new(),
        rx,
        ring,
        next_id: 0,
        inflight: 0,
    }
    .run(qd);
}

/// What the ring thread owns. Fields drop in declaration order: the registered regions, the
/// queue and the batches first, then the channel, the ring last.
struct RingThread {
    /// Every region registered as a fixed buffer, in the ring's table order.
    registered: Vec<Arc<AlignedBuf>>,
    /// (batch, op) waiting for room in the submission queue, or to be resubmitted.
    queue: VecDeque<(u32, u32)>,
    /// Batches with ops not yet finished, by id.
    batches: HashMap<u32, BatchState>,
    rx: Receiver<Msg>,
    ring: IoUring,
    next_id: u32,
    /// Entries submitted whose completion has not been reaped.
    inflight: usize,
}

impl RingThread {
    /// Takes messages (blocking only when nothing is queued or in flight), submits what fits
    /// in `qd` entries, waits for completions and accounts them, until the channel is closed
    /// and nothing is left, or the ring cannot be entered.
    fn run(mut self, qd: usize) {
        let mut open = true;
        loop {
            if self.inflight == 0 && self.queue.is_empty() {
                if !open {
                    break;
                }
                match self.rx.recv() {
                    Ok(m) => self.accept(m),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.accept(m),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.push_queued(qd);
            if self.inflight == 0 {
                continue;
            }
            if let Err(e) = self.enter() {
                self.fail_everything(&e);
                return;
            }
            self.reap();
        }
    }

    fn accept(&mut self, msg: Msg) {
        match msg {
            Msg::Batch(b) => self.accept_batch(b),
            Msg::Register(region, reply) => self.register(region, reply),
        }
    }

    /// Queues every op of a new batch.
    fn accept_batch(&mut self, b: Batch) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        for i in 0..b.ops.len() {
            self.queue.push_back((id, i as u32));
        }
        let remaining = b.ops.len();
        self.batches.insert(
            id,
            BatchState {
                batch: b,
                remaining,
                error: None,
            },
        );
    }

    /// Adds `region` to the ring's fixed buffers and answers whether the kernel took it.
    fn register(&mut self, region: Arc<AlignedBuf>, reply: Sender<bool>) {
        // Registering replaces the whole table, so pass every region registered so far.
        // Only possible while nothing is in flight; callers register at set-up time.
        self.registered.push(region);
        let iovecs = |regs: &[Arc<AlignedBuf>]| -> Vec<libc::iovec> {
            regs.iter()
                .map(|r| libc::iovec {
                    iov_base: r.as_ptr() as *mut libc::c_void,
                    iov_len: r.len(),
                })
                .collect()
        };
        let ring = &mut self.ring;
        let _ = ring.submitter().unregister_buffers();
        // SAFETY: every iovec points into an AlignedBuf kept alive by `registered` (and by
        // the engine's own list) for as long as the ring exists.
        let ok = unsafe { ring.submitter().register_buffers(&iovecs(&self.registered)) }.is_ok();
        if !ok {
            // (Over 1 GiB, or RLIMIT_MEMLOCK reached.) The earlier regions stay
            // registered: their engines' fixed I/O must keep working.
            self.registered.pop();
            if !self.registered.is_empty() {
                // SAFETY: as above, for the regions registered before.
                let _ = unsafe { ring.submitter().register_buffers(&iovecs(&self.registered)) };
            }
        }
        let _ = reply.send(ok);
    }

    /// Moves queued ops into the submission queue while fewer than `qd` are in flight.
    fn push_queued(&mut self, qd: usize) {
        while self.inflight < qd {
            let Some((bid, oi)) = self.queue.pop_front() else {
                break;
            };
            let Some(state) = self.batches.get(&bid) else {
                continue;
            };
            let entry = sqe(&state.batch.ops[oi as usize])
                .user_data((u64::from(bid) << 32) | u64::from(oi));
            // SAFETY: the buffer stays valid until the batch completes (see `Batch`), and the
            // queue has room: at most `qd` entries are ever in flight in a ring of `qd` entries.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.queue.push_front((bid, oi));
                break;
            }
            self.inflight += 1;
        }
    }

    /// Submits and waits for at least one completion. Interruptions, a busy ring and
    /// transient shortages are not errors (nothing was submitted: the entries stay queued);
    /// any other error means the ring cannot be entered.
    fn enter(&mut self) -> std::io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            // Transient (memory pressure): nothing was submitted, the entries stay queued.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOMEM)) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The ring cannot be entered (`e`). Operations already submitted still own their
    /// callers' buffers: wait until the kernel has completed every one (it posts completions
    /// without being entered), then fail everything still pending.
    fn fail_everything(&mut self, e: &std::io::Error) {
        while self.inflight > 0 {
            let n = self.ring.completion().count();
            self.inflight = self.inflight.saturating_sub(n);
            if self.inflight > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        for (_, st) in self.batches.drain() {
            let _ = st.batch.done.send(Err(IoError::Os {
                op: "io_uring_enter",
                offset: 0,
                source: std::io::Error::new(e.kind(), e.to_string()),
            }));
        }
    }

    /// Accounts every completion the ring holds.
    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            self.complete(ud, res);
        }
    }

    /// One completion: an error is kept for its batch (EINTR and EAGAIN are resubmitted), a
    /// transfer of zero bytes is a short-transfer error, a short one is resubmitted for the
    /// remainder; a batch whose last op has finished is answered.
    fn complete(&mut self, ud: u64, res: i32) {
        self.inflight -= 1;
        let bid = (ud >> 32) as u32;
        let oi = (ud & 0xffff_ffff) as usize;
        let Some(state) = self.batches.get_mut(&bid) else {
            return;
        };
        let op = &mut state.batch.ops[oi];
        let opname = match op.kind {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Fsync => "fdatasync",
        };
        let mut finished = true;
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                self.queue.push_front((bid, oi as u32));
                finished = false;
            } else {
                state.error.get_or_insert(IoError::Os {
                    op: opname,
                    offset: op.offset,
                    source: std::io::Error::from_raw_os_error(-res),
                });
            }
        } else if op.kind != Kind::Fsync {
            let n = res as usize;
            if n == 0 {
                state.error.get_or_insert(IoError::Short {
                    op: opname,
                    offset: op.start_offset,
                    done: (op.wanted - op.len) as u64,
                    wanted: op.wanted as u64,
                });
            } else if n < op.len {
                // Short transfer: continue with the remainder.
                // SAFETY: n < len, so the advanced pointer stays inside the buffer.
                op.ptr = unsafe { op.ptr.add(n) };
                op.len -= n;
                op.offset += n as u64;
                self.queue.push_front((bid, oi as u32));
                finished = false;
            }
        }
        if finished {
            state.remaining -= 1;
            if state.remaining == 0 {
                if let Some(st) = self.batches.remove(&bid) {
                    let _ = st.batch.done.send(st.error.map_or(Ok(()), Err));
                }
            }
        }
    }
}

/// The submission entry for `op`'s next transfer (at most 4 GiB − 4 KiB of it), or its
/// fdatasync.
fn sqe(op: &RawOp) -> io_uring::squeue::Entry {
    let fd = types::Fd(op.fd);
    let len = op.len.min(u32::MAX as usize & !4095) as u32;
    match (op.kind, op.fixed) {
        (Kind::Write, Some(idx)) => opcode::WriteFixed::new(fd, op.ptr, len, idx)
            .offset(op.offset)
            .build(),
        (Kind::Write, None) => opcode::Write::new(fd, op.ptr, len)
            .offset(op.offset)
            .build(),
        (Kind::Read, Some(idx)) => opcode::ReadFixed::new(fd, op.ptr, len, idx)
            .offset(op.offset)
            .build(),
        (Kind::Read, None) => opcode::Read::new(fd, op.ptr, len).offset(op.offset).build(),
        (Kind::Fsync, _) => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{open_direct, IoEngine};

    #[test]
    fn fixed_buffer_path_writes_and_reads_with_short_transfer_handling() {
        let Ok(eng) = UringEngine::new(8) else {
            eprintln!("SKIPPED: io_uring unavailable here");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (f, _) = open_direct(&dir.path().join("x"), true).expect("open");
        let mut region = AlignedBuf::zeroed(64 * 1024);
        crate::prng::fill_random(&mut region, 3);
        let expect = region.to_vec();
        let region = Arc::new(region);
        let fixed = eng.register_fixed(region.clone());
        eprintln!("fixed buffers registered: {fixed}");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        eng.run(&mut [
            Op::write(fd, 0, &region[..32 * 1024]),
            Op::write(fd, 32 * 1024, &region[32 * 1024..]),
        ])
        .expect("write");
        eng.fdatasync(fd).expect("sync");
        let mut back = AlignedBuf::zeroed(64 * 1024);
        eng.read_exact_at(fd, 0, &mut back).expect("read");
        assert_eq!(&back[..], &expect[..]);
        // Reading past the end of the file is a short read: reported, never success.
        let mut past = AlignedBuf::zeroed(8192);
        let err = eng
            .read_exact_at(fd, 60 * 1024, &mut past)
            .expect_err("short read");
        assert!(matches!(err, IoError::Short { done: 4096, .. }), "{err}");
    }

    /// A registration the kernel refuses (a buffer over 1 GiB) leaves the regions registered
    /// before it in place: their fixed I/O still runs, through the same indexes.
    #[test]
    fn a_refused_registration_keeps_the_earlier_ones() {
        let Ok(eng) = UringEngine::new(8) else {
            eprintln!("SKIPPED: io_uring unavailable here");
            return;
        };
        let mut a = AlignedBuf::zeroed(64 * 1024);
        crate::prng::fill_random(&mut a, 5);
        let a = Arc::new(a);
        if !eng.register_fixed(a.clone()) {
            eprintln!("SKIPPED: fixed buffers unavailable here (RLIMIT_MEMLOCK?)");
            return;
        }
        let huge = Arc::new(AlignedBuf::zeroed((1 << 30) + 4096));
        assert!(
            !eng.register_fixed(huge),
            "the kernel takes fixed buffers up to 1 GiB"
        );
        assert_eq!(eng.fixed_index(a.as_ptr(), a.len()), Some(0));
        let dir = tempfile::tempdir().expect("tempdir");
        let (f, _) = open_direct(&dir.path().join("x"), true).expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        eng.run(&mut [Op::write(fd, 0, &a[..])])
            .expect("fixed write after a refusal");
        let mut back = AlignedBuf::zeroed(64 * 1024);
        eng.read_exact_at(fd, 0, &mut back).expect("read");
        assert_eq!(&back[..], &a[..]);
    }
}
