//! A thaw fed as a window's blocks arrive from the shared tier (a pull or fill): the thaw's
//! checks run before the first block is fetched, and each verified batch is scattered into the
//! engine while the next one is fetched and written to the local log, so a thaw of a window
//! this instance did not hold costs about what its fetch costs instead of the fetch plus a
//! read-back.
//!
//! Only an optimisation: whenever the stream cannot restore the whole range itself (some
//! blocks were held locally and not fetched, the fetch stopped early, a check failed, the
//! scatter failed, the requester left, the deadline passed), [`StreamThaw::finish`] says so
//! and the caller runs the ordinary [`thaw`](super::thaw) on the committed window, which
//! rewrites every destination block and reports as it always does.

use std::time::{Duration, Instant};

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
    /// The explicit time limit, else one scaled to the window at `gbps`.
    limit: Option<Duration>,
    gbps: f64,
    t0: Instant,
    run: Option<Run>,
}

/// A stream under way: the checked request and how far it got.
struct Run {
    name: String,
    c: Checked,
    deadline: Instant,
    /// Blocks of the range scattered so far.
    done: usize,
    /// The stream stopped before the end (why, for the log).
    broken: Option<String>,
    scatter_secs: f64,
}

impl<'a> StreamThaw<'a> {
    /// A thaw of `req` into `eng`, fed by a fetch. `limit`: the request's own time limit;
    /// without one, twice the window's bytes at `gbps` (30 s to 5 min, as a thaw's).
    #[must_use]
    pub fn new(
        eng: &'a Engine,
        req: &'a ThawRequest,
        cfg: &'a PipelineConfig,
        cancel: Option<Cancel>,
        limit: Option<Duration>,
        gbps: f64,
    ) -> Self {
        Self {
            eng,
            req,
            cfg,
            cancel,
            limit,
            gbps,
            t0: Instant::now(),
            run: None,
        }
    }

    /// The report of a thaw that restored the whole range as it arrived; `None`: it did not
    /// (see the module doc), and the caller thaws the committed window the ordinary way.
    #[must_use]
    pub fn finish(self) -> Option<ThawReport> {
        let r = self.run?;
        if let Some(why) = &r.broken {
            crate::log::warn(&format!(
                "thaw of {:?} as it arrived stopped ({why}); thawing the stored window instead",
                r.name
            ));
            return None;
        }
        if r.done != r.c.n {
            return None;
        }
        let n = r.c.n as u64;
        Some(ThawReport {
            window: r.name,
            num_blocks: n,
            blocks_restored: n,
            tokens_restored: r.c.total_tokens,
            tokens_to_recompute: 0,
            bytes: r.c.window_bytes,
            blocks_from_tier: 0,
            blocks_streamed: n,
            permuted: r.c.compat == Compat::Permute,
            corruption: None,
            tier_corruption: None,
            loaded_secs: self.t0.elapsed().as_secs_f64(),
            read_secs: 0.0,
            // Verified by the fetch, against the manifest's checksums or each value's own.
            verify_secs: 0.0,
            scatter_secs: r.scatter_secs,
        })
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
        // Every block of the range must come from the fetch, in order.
        let first = self.req.first_block;
        let from = fetched.partition_point(|&i| i < first);
        let all = fetched
            .get(from..from + c.n)
            .is_some_and(|r| r.iter().enumerate().all(|(j, &i)| i == first + j));
        if !all {
            return;
        }
        let limit = self
            .limit
            .unwrap_or_else(|| super::thaw_timeout(c.window_bytes, self.gbps));
        self.run = Some(Run {
            name: spec.name.clone(),
            c,
            deadline: Instant::now() + limit,
            done: 0,
            broken: None,
            scatter_secs: 0.0,
        });
    }

    fn blocks(&mut self, blocks: &[(usize, &[u8])]) {
        let Some(r) = self.run.as_mut() else { return };
        if r.broken.is_some() || r.done == r.c.n {
            return;
        }
        let first = self.req.first_block;
        let mut pls: Vec<&[u8]> = Vec::with_capacity(blocks.len());
        for &(i, p) in blocks.iter().filter(|(i, _)| *i >= first) {
            if r.done + pls.len() == r.c.n {
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
        let to = r.done + pls.len();
        if let Err(e) = device::scatter(
            &self.eng.layout,
            &r.c.wl,
            r.c.compat,
            self.eng.mem.as_ref(),
            &self.req.block_ids[r.done..to],
            &pls,
            self.cfg.threads,
        ) {
            r.broken = Some(format!("scatter: {e}"));
            return;
        }
        r.scatter_secs += ts.elapsed().as_secs_f64();
        r.done = to;
    }
}
