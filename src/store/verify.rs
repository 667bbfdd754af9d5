//! A full verification of the log: every record of every segment, live or garbage, and the
//! segment header copies. Damage that no window reads (a dead record, a padding byte, one of
//! two header copies) is found and reported too.

use std::sync::Arc;

use super::format::{copies, SegmentHeader, PAGE, SEGMENT_HEADER_LEN};
use super::recovery::scan;
use super::segment::Segment;
use super::{poisoned, verify_copies, verify_image, Store, StoreError};
use crate::io::AlignedBuf;

/// One problem [`Store::verify_log`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogProblem {
    /// Segment id.
    pub segment: u64,
    /// Offset of the damaged record or region.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

impl Store {
    /// Reads every record of every segment (up to its frontier) and the segment header pages,
    /// and verifies each: header and payload checksums, zero padding, both copies of metadata
    /// records, header copies equal. Cost: one read of the whole log. Returns the problems.
    /// Meant for a store nothing appends to meanwhile (`cwm fsck`, the damage sweep): a record
    /// being appended could read as torn.
    pub fn verify_log(&self) -> Result<Vec<LogProblem>, StoreError> {
        let segs: Vec<Arc<Segment>> = {
            let st = self.state.read().map_err(poisoned)?;
            st.segments.values().cloned().collect()
        };
        let mut out = Vec::new();
        let engine = self.engine.as_ref();
        for seg in segs {
            let mut bad = |offset: u64, what: String| {
                out.push(LogProblem {
                    segment: seg.id,
                    offset,
                    what,
                })
            };
            // Header pages (format 2 keeps two equal copies).
            let pages = if seg.first_record >= SEGMENT_HEADER_LEN {
                2
            } else {
                1
            };
            let mut page = AlignedBuf::zeroed(PAGE as usize);
            for p in 0..pages {
                let ok = engine
                    .read_exact_at(seg.fd(), p * PAGE, &mut page)
                    .ok()
                    .and_then(|()| SegmentHeader::decode(&page).ok())
                    .is_some_and(|h| {
                        h.segment_id == seg.id
                            && h.generation == seg.generation
                            && (h.version < 2 || page[SegmentHeader::LEN..].iter().all(|&b| b == 0))
                    });
                if !ok {
                    bad(p * PAGE, "segment header copy does not verify".into());
                }
            }
            let (recs, frontier, torn, damaged) = scan(engine, &seg, seg.frontier())?;
            for (from, to, why) in damaged {
                bad(from, format!("damaged region up to {to}: {why}"));
            }
            if let Some((off, why)) = torn {
                bad(off, format!("invalid record at the end of the log: {why}"));
            }
            if frontier < seg.frontier() {
                bad(
                    frontier,
                    format!("records end at {frontier}, the index at {}", seg.frontier()),
                );
            }
            for r in recs {
                let mut img = AlignedBuf::zeroed(r.len as usize);
                let res = match engine.read_exact_at(seg.fd(), r.offset, &mut img) {
                    Err(e) => Err(format!("unreadable: {e}")),
                    Ok(()) if copies(r.h.kind) == 2 => verify_copies(&img, &seg, r.h.kind),
                    Ok(()) => verify_image(&img, &seg, r.h.kind).map(|_| ()),
                };
                if let Err(why) = res {
                    bad(r.offset, format!("{:?} record: {why}", r.h.kind));
                } else if copies(r.h.kind) == 2
                    && r.len < 2 * super::format::record_len(r.h.payload_len)
                {
                    bad(r.offset, format!("{:?} record has one copy only", r.h.kind));
                }
            }
        }
        Ok(out)
    }
}
