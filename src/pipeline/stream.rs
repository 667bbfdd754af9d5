//! A thaw fed as a window's blocks arrive from the shared tier (a pull or fill): the thaw's
//! checks run before the first block is fetched, and each verified batch is scattered into the
//! engine while the next one is fetched and written to the local log, so a thaw of a window
//! this instance did not hold costs about what its fetch costs instead of the fetch plus a
//! read-back.
//!
//! The range's first blocks may be held locally already (a shared system prompt, an earlier
//! turn): only the rest is fetched and streamed, and the caller restores that local prefix
//! with an ordinary thaw of it once the window is committed ([`Streamed`]).
//!
//! Only an optimisation: whenever the stream cannot restore its part itself (local blocks
//! that are not a prefix of the range, the fetch stopped early, a check failed, the scatter
//! failed, the requester left, the deadline passed), [`StreamThaw::finish`] says so and the
//! caller runs the ordinary [`thaw`](super::thaw) on the committed window, which rewrites
//! every destination block and reports as it always does.

use std::time::Instant;

use super::thaw::{Checked, WindowView};
use super::{Cancel, Engine, PipelineConfig, ThawReport, ThawRequest};
use crate::device;
use crate::layout::Compat;
use crate::remote::BlockSink;
use crate::store::WindowSpec;

/// A thaw into the engine of a window being fetched (see the module doc); a [`BlockSink`]
/// for [`crate::remote::pull_window_since`] and [`crate::remote::fill_prefix`].
pub struct StreamThaw<'a> {
    eng: &'a Engine,
    req: &'a ThawRequest,
    cfg: &'a PipelineConfig,
    cancel: Option<Cancel>,
    /// The request's own deadline, else one scaled to the window at `gbps` (from the first
    /// block).
    deadline: Option<Instant>,
    gbps: f64,
    t0: Instant,
    run: Option<Run>,
}

/// A stream under way: the checked request and how far it got.
struct Run {
    name: String,
    c: Checked,
    deadline: Instant,
    /// Blocks at the start of the range held locally (not fetched, not streamed).
    local: usize,
    /// Blocks of the range scattered so far (after the local ones).
    done: usize,
    /// The stream stopped before the end (why, for the log).
    broken: Option<String>,
    scatter_secs: f64,
}

impl<'a> StreamThaw<'a> {
    /// A thaw of `req` into `eng`, fed by a fetch. `deadline`: the request's own (its
    /// `timeout_ms` from its start); without one, twice the window's bytes at `gbps` (30 s to
    /// 5 min, as a thaw's) from the first block.
    #[must_use]
    pub fn new(
        eng: &'a Engine,
        req: &'a ThawRequest,
        cfg: &'a PipelineConfig,
        cancel: Option<Cancel>,
        deadline: Option<Instant>,
        gbps: f64,
    ) -> Self {
        Self {
            eng,
            req,
            cfg,
            cancel,
            deadline,
            gbps,
            t0: Instant::now(),
            run: None,
        }
    }

    /// What the stream restored: every block of the range but a locally held prefix of it;
    /// `None`: it did not (see the module doc), and the caller thaws the committed window
    /// the ordinary way.
    #[must_use]
    pub fn finish(self) -> Option<Streamed> {
        let r = self.run?;
        if let Some(why) = &r.broken {
            crate::log::warn(&format!(
                "thaw of {:?} as it arrived stopped ({why}); thawing the stored window instead",
                r.name
            ));
            return None;
        }
        if r.local + r.done != r.c.n {
            return None;
        }
        let n = r.c.n as u64;
        let report = ThawReport {
            window: r.name,
            num_blocks: n,
            blocks_restored: n,
            tokens_restored: r.c.total_tokens,
            tokens_to_recompute: 0,
            bytes: r.c.window_bytes,
            blocks_from_tier: 0,
            blocks_streamed: r.done as u64,
            permuted: r.c.compat == Compat::Permute,
            corruption: None,
            tier_corruption: None,
            loaded_secs: self.t0.elapsed().as_secs_f64(),
            read_secs: 0.0,
            // Verified by the fetch, against the manifest's checksums or each value's own.
            verify_secs: 0.0,
            scatter_secs: r.scatter_secs,
        };
        Some(Streamed {
            report,
            local: r.local,
        })
    }
}

/// What a thaw as it arrives restored: the range's blocks after its first `local` ones,
/// which the instance held already and the caller restores with [`Streamed::local_request`]
/// once the window is committed.
#[derive(Debug)]
pub struct Streamed {
    /// The report of the whole range, as if the local prefix were restored too.
    pub report: ThawReport,
    /// Blocks at the start of the range that were not fetched.
    pub local: usize,
}

impl Streamed {
    /// The ordinary thaw of the local prefix of `req`'s range (`None`: there is none).
    #[must_use]
    pub fn local_request(&self, req: &ThawRequest) -> Option<ThawRequest> {
        (self.local > 0).then(|| ThawRequest {
            window: req.window.clone(),
            block_ids: req.block_ids[..self.local].to_vec(),
            expect_tokens: req.expect_tokens.clone(),
            prefix: true,
            first_block: req.first_block,
            salt: req.salt.clone(),
        })
    }

    /// The report of the whole range given that of the local prefix's thaw: when it did not
    /// restore all of the prefix (a corrupt block), the range is restored only that far
    /// and the rest is the engine's to recompute (the streamed blocks after it are claimed
    /// by no report).
    #[must_use]
    pub fn merge(self, p: ThawReport) -> ThawReport {
        let mut r = self.report;
        r.blocks_from_tier = p.blocks_from_tier;
        r.read_secs = p.read_secs;
        r.verify_secs = p.verify_secs;
        r.scatter_secs += p.scatter_secs;
        r.tier_corruption = p.tier_corruption;
        r.loaded_secs = r.loaded_secs.max(p.loaded_secs);
        if p.blocks_restored < self.local as u64 {
            r.tokens_to_recompute = r.tokens_restored.saturating_sub(p.tokens_restored);
            r.blocks_restored = p.blocks_restored;
            r.tokens_restored = p.tokens_restored;
            r.bytes = p.bytes;
            // What is claimed is the local thaw's alone, and so is its time: the fetch's would
            // otherwise feed the thaw-speed estimate lookups decide by.
            r.loaded_secs = p.loaded_secs;
            r.blocks_streamed = 0;
            r.corruption = p.corruption;
        }
        r
    }
}

impl BlockSink for StreamThaw<'_> {
    fn begin(&mut self, spec: &WindowSpec, fetched: &[usize]) {
        self.run = None;
        let view = WindowView {
            name: &spec.name,
            layout: &spec.layout,
            namespace: &spec.namespace,
            tokens: &spec.tokens,
            num_blocks: spec.blocks.len(),
        };
        // A failed check fails the ordinary thaw that follows the same way.
        let Ok(c) = Checked::new(self.eng, self.req, self.cfg, None, &view) else {
            return;
        };
        // The blocks of the range the fetch brings must be all of it after a local prefix.
        let (first, end) = (self.req.first_block, self.req.first_block + c.n);
        let from = fetched.partition_point(|&i| i < first);
        let to = fetched.partition_point(|&i| i < end);
        let local = c.n - (to - from);
        let suffix = fetched[from..to]
            .iter()
            .enumerate()
            .all(|(j, &i)| i == first + local + j);
        if !suffix || local == c.n {
            return;
        }
        let deadline = self
            .deadline
            .unwrap_or_else(|| Instant::now() + super::thaw_timeout(c.window_bytes, self.gbps));
        self.run = Some(Run {
            name: spec.name.clone(),
            c,
            deadline,
            local,
            done: 0,
            broken: None,
            scatter_secs: 0.0,
        });
    }

    fn blocks(&mut self, blocks: &[(usize, &[u8])]) {
        let Some(r) = self.run.as_mut() else { return };
        if r.broken.is_some() || r.local + r.done == r.c.n {
            return;
        }
        let first = self.req.first_block + r.local;
        let mut pls: Vec<&[u8]> = Vec::with_capacity(blocks.len());
        for &(i, p) in blocks.iter().filter(|(i, _)| *i >= first) {
            if r.local + r.done + pls.len() == r.c.n {
                break;
            }
            if i != first + r.done + pls.len() {
                r.broken = Some(format!("block {i} arrived out of order"));
                return;
            }
            pls.push(p);
        }
        if pls.is_empty() {
            return;
        }
        if self.cancel.as_ref().is_some_and(|c| (c.0)()) {
            r.broken = Some("the requester left".into());
            return;
        }
        if Instant::now() >= r.deadline {
            r.broken = Some("past its deadline".into());
            return;
        }
        let ts = Instant::now();
        let (from, to) = (r.local + r.done, r.local + r.done + pls.len());
        if let Err(e) = scatter(
            self.eng,
            self.cfg,
            &r.c,
            &self.req.block_ids[from..to],
            &pls,
        ) {
            r.broken = Some(format!("scatter: {e}"));
            return;
        }
        r.scatter_secs += ts.elapsed().as_secs_f64();
        r.done += pls.len();
    }

    /// A layout upgrade scatters each batch through a transposed copy of it.
    fn scratch_batches(&self) -> u64 {
        u64::from(
            self.run
                .as_ref()
                .is_some_and(|r| r.c.compat == Compat::Permute),
        )
    }
}

/// Scatters `pls` (fetched payloads, in ordinary memory) into blocks `ids`. A memory that
/// scatters ordinary memory slowly (a GPU: pageable copies region by region) gets them
/// through the engine's registered staging pool instead — one host copy, then the same
/// scatter a thaw from the log makes.
fn scatter(
    eng: &Engine,
    cfg: &PipelineConfig,
    c: &Checked,
    ids: &[u64],
    pls: &[&[u8]],
) -> Result<(), device::DeviceError> {
    let mem = eng.mem.as_ref();
    let pool = eng
        .staging()
        .filter(|p| mem.scatter_prefers_staging() && pls.iter().all(|x| x.len() <= p.slot_len()));
    let Some(pool) = pool else {
        return device::scatter(&eng.layout, &c.wl, c.compat, mem, ids, pls, cfg.threads);
    };
    let step = pool.max_set();
    for (ids, pls) in ids.chunks(step).zip(pls.chunks(step)) {
        let mut set = pool.take(pls.len());
        let mut slots = set.slices();
        for (s, p) in slots.iter_mut().zip(pls) {
            s[..p.len()].copy_from_slice(p);
        }
        let staged: Vec<&[u8]> = slots.iter().zip(pls).map(|(s, p)| &s[..p.len()]).collect();
        device::scatter(&eng.layout, &c.wl, c.compat, mem, ids, &staged, cfg.threads)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::device::{KvMemory, Region};
    use crate::layout::{Dtype, Layout};
    use crate::pipeline::synthetic::Synthetic;
    use crate::store::{BlockDesc, Replace, Retention};

    /// A memory standing in for a GPU's (delegating to a host one): it asks for staged
    /// sources and counts the scatters whose every source lies in the region registered with
    /// it, and those that do not.
    struct LikeADevice {
        inner: Arc<dyn KvMemory>,
        region: Mutex<Option<(usize, usize)>>,
        staged: AtomicUsize,
        unstaged: AtomicUsize,
    }

    impl KvMemory for LikeADevice {
        fn tensor_sizes(&self) -> Vec<u64> {
            self.inner.tensor_sizes()
        }
        fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
            self.inner.read(regions, dst)
        }
        fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
            self.inner.write(regions, src)
        }
        fn register_staging(&self, ptr: *mut u8, len: usize) -> bool {
            if let Ok(mut r) = self.region.lock() {
                *r = Some((ptr as usize, len));
            }
            true
        }
        fn scatter_prefers_staging(&self) -> bool {
            true
        }
        fn scatter_blocks(
            &self,
            _: &Layout,
            _: &Layout,
            _: Compat,
            _: &[u64],
            payloads: &[&[u8]],
        ) -> Option<Result<(), DeviceError>> {
            let r = self.region.lock().ok().and_then(|r| *r);
            let inside = r.is_some_and(|(at, len)| {
                payloads.iter().all(|p| {
                    let a = p.as_ptr() as usize;
                    a >= at && a + p.len() <= at + len
                })
            });
            let n = if inside { &self.staged } else { &self.unstaged };
            n.fetch_add(1, SeqCst);
            None // copied by `write`, as a memory without a kernel is
        }
    }

    type DeviceError = crate::device::DeviceError;

    fn spec(eng: &Engine, n: usize) -> WindowSpec {
        let bs = eng.layout.block_size as usize;
        WindowSpec {
            name: "w".into(),
            session: "w".into(),
            namespace: eng.namespace_with(None, &eng.layout).label(),
            layout: eng.layout.to_json(),
            tokens: (0..(n * bs) as u32).collect(),
            blocks: (0..n)
                .map(|i| BlockDesc {
                    key: i as u128 + 1,
                    len: eng.layout.block_bytes(),
                })
                .collect(),
            replace: Replace::No,
            retention: Retention::default(),
            origin: None,
        }
    }

    #[test]
    fn blocks_reach_a_device_through_its_staging_and_gaps_fall_back() {
        let layout = Layout::flash_2nbhd(2, 16, 16, 2, 64, Dtype::Bf16);
        let syn = Synthetic::new(layout.clone(), "m", 7).expect("engine");
        let mem = Arc::new(LikeADevice {
            inner: syn.engine.mem.clone(),
            region: Mutex::new(None),
            staged: AtomicUsize::new(0),
            unstaged: AtomicUsize::new(0),
        });
        let eng = Engine::new(layout.clone(), mem.clone(), "m", None).expect("engine");
        let cfg = PipelineConfig {
            staging_bytes: 1 << 20,
            ..Default::default()
        };
        let io = crate::io::build_engine(crate::io::EngineKind::Psync, 8);
        eng.prepare_staging(&cfg, io.as_ref()).expect("staging");
        let n = 5;
        let bb = layout.block_bytes() as usize;
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| (0..bb).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        let req = ThawRequest {
            window: "w".into(),
            block_ids: vec![10, 11, 12, 13, 14],
            ..Default::default()
        };
        let s = spec(&eng, n);
        let all: Vec<usize> = (0..n).collect();

        // In order, in two batches: every block lands, every scatter from the staging.
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&s, &all);
        let pairs: Vec<(usize, &[u8])> = payloads.iter().map(|p| &p[..]).enumerate().collect();
        t.blocks(&pairs[..2]);
        t.blocks(&pairs[2..]);
        let done = t.finish().expect("streamed");
        assert_eq!(done.local, 0);
        assert!(done.local_request(&req).is_none());
        let rep = done.report;
        assert_eq!(
            (rep.blocks_restored, rep.blocks_streamed),
            (n as u64, n as u64)
        );
        for (i, p) in payloads.iter().enumerate() {
            let got = crate::device::read_block(&layout, syn.engine.mem.as_ref(), 10 + i as u64);
            assert!(got.expect("read") == *p, "block {i}");
        }
        assert!(mem.staged.load(SeqCst) > 0);
        assert_eq!(mem.unstaged.load(SeqCst), 0);

        // The first two blocks held locally: the other three stream; the caller thaws the
        // two the ordinary way and merges (a corrupt local block ends the range there).
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&s, &[2, 3, 4]);
        t.blocks(&pairs[2..]);
        let done = t.finish().expect("streamed after a local prefix");
        assert_eq!((done.local, done.report.blocks_streamed), (2, 3));
        let local = done.local_request(&req).expect("a local prefix");
        assert_eq!(
            (local.block_ids.clone(), local.prefix),
            (vec![10, 11], true)
        );
        let base = done.report.clone();
        let part = |restored: u64| ThawReport {
            blocks_restored: restored,
            tokens_restored: restored * 16,
            bytes: restored * bb as u64,
            corruption: (restored < 2).then(|| "block 1: bad".to_string()),
            loaded_secs: 1e-6,
            ..base.clone()
        };
        let merged = Streamed {
            report: done.report.clone(),
            local: 2,
        }
        .merge(part(2));
        assert_eq!((merged.blocks_restored, merged.tokens_to_recompute), (5, 0));
        let merged = done.merge(part(1));
        assert_eq!(
            (
                merged.blocks_restored,
                merged.tokens_restored,
                merged.tokens_to_recompute
            ),
            (1, 16, 64)
        );
        assert!(merged.corruption.is_some());
        assert_eq!(
            merged.loaded_secs, 1e-6,
            "the local thaw's time, not the fetch's"
        );

        // Local blocks that are not a prefix, a gap in delivery, a fetch that stopped early,
        // a namespace of another model: no report, the ordinary thaw runs.
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&s, &[0, 1, 3, 4]);
        t.blocks(&[pairs[0], pairs[1], pairs[3], pairs[4]]);
        assert!(t.finish().is_none(), "a block in the middle not fetched");
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&s, &all);
        t.blocks(&[pairs[0], pairs[2]]);
        t.blocks(&pairs[3..]);
        assert!(t.finish().is_none(), "a gap");
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&s, &all);
        t.blocks(&pairs[..3]);
        assert!(t.finish().is_none(), "stopped early");
        let mut other = spec(&eng, n);
        other.namespace = "another-model".into();
        let mut t = StreamThaw::new(&eng, &req, &cfg, None, None, 1.0);
        t.begin(&other, &all);
        t.blocks(&pairs);
        assert!(t.finish().is_none(), "a failed check");
        // A requester gone: stops at once.
        let gone = Cancel(Arc::new(|| true));
        let mut t = StreamThaw::new(&eng, &req, &cfg, Some(gone), None, 1.0);
        t.begin(&s, &all);
        t.blocks(&pairs);
        assert!(t.finish().is_none(), "requester gone");
    }
}
