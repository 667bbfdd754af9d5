//! Verification of stored bytes. [`verify_image`] checks one record image read from a segment
//! (header checksum with the segment's generation, kind, payload checksum, zero padding);
//! [`check_meta`] and its views do so for each copy of a metadata record. [`Store::verify_log`]
//! is a full verification of the log: every record of every segment, live or garbage, and the
//! segment header copies. Damage that no window reads (a dead record, a padding byte, one of
//! two header copies) is found and reported too.

use std::sync::Arc;

use super::error::{poisoned, StoreError};
use super::format::{
    self, copies, payload_offset, record_len, RecordHeader, RecordKind, SegmentHeader, PAGE,
    SEGMENT_HEADER_LEN,
};
use super::recovery::scan::scan;
use super::segment::Segment;
use super::Store;
use crate::checksum::payload_checksum;
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
        // Rotations' seals still under way rewrite header pages and truncate tails.
        self.wait_checkpoints();
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
            let mut hdrs = Vec::with_capacity(pages as usize);
            for p in 0..pages {
                let h = engine
                    .read_exact_at(seg.fd(), p * PAGE, &mut page)
                    .ok()
                    .and_then(|()| SegmentHeader::decode(&page).ok())
                    .filter(|h| {
                        h.segment_id == seg.id
                            && h.generation == seg.generation
                            && (h.version < 2 || page[SegmentHeader::LEN..].iter().all(|&b| b == 0))
                    });
                match h {
                    Some(h) => hdrs.push(h),
                    None => bad(p * PAGE, "segment header copy does not verify".into()),
                }
            }
            // Both verify but say different things (an open rewrites a copy a crash left
            // behind, so after it the two are equal).
            if let [a, b] = hdrs[..] {
                if a != b {
                    bad(
                        PAGE,
                        format!(
                            "segment header copies differ: sealed length {} / {}, record limit \
                             {} / {}",
                            a.sealed_len, b.sealed_len, a.record_limit, b.record_limit
                        ),
                    );
                }
            }
            let (recs, frontier, torn, damaged) =
                scan(engine, &seg, seg.frontier(), seg.first_record, 0)?;
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
                } else if copies(r.h.kind) == 2 && r.len < 2 * record_len(r.h.payload_len) {
                    bad(r.offset, format!("{:?} record has one copy only", r.h.kind));
                }
            }
        }
        Ok(out)
    }
}

/// What [`check_meta`] found: the first good copy (or why none is), and a bad copy's fault.
pub(crate) type MetaCheck<'a> = (Result<(RecordHeader, &'a [u8]), String>, Option<String>);

/// Verifies each copy a metadata record image holds (two, or the one recovery found intact)
/// exactly once. Returns the first copy that verifies (header, payload) or why none does, and
/// why a copy does not verify, if one does not.
pub(crate) fn check_meta<'a>(image: &'a [u8], seg: &Segment, kind: RecordKind) -> MetaCheck<'a> {
    match verify_image(image, seg, kind) {
        Ok((h, p)) => {
            let one = record_len(h.payload_len) as usize;
            let bad = (format::copies(kind) == 2 && image.len() >= 2 * one)
                .then(|| verify_image(&image[one..2 * one], seg, kind).err())
                .flatten()
                .map(|e| format!("copy at +{one}: {e}"));
            (Ok((h, p)), bad)
        }
        Err(e0) => {
            // The second copy starts half-way when the image holds two of them.
            let half = image.len() / 2;
            let second = (format::copies(kind) == 2 && half > 0 && half % PAGE as usize == 0)
                .then(|| verify_image(&image[half..], seg, kind).ok())
                .flatten()
                .filter(|(h, _)| h.ditto && record_len(h.payload_len) as usize == half);
            let bad = format!("copy at +0: {e0}");
            (second.ok_or_else(|| e0.clone()), Some(bad))
        }
    }
}

/// The first copy of a metadata record image that verifies: its header and payload.
pub(crate) fn verify_meta<'a>(
    image: &'a [u8],
    seg: &Segment,
    kind: RecordKind,
) -> Result<(RecordHeader, &'a [u8]), String> {
    check_meta(image, seg, kind).0
}

/// Verifies every copy a metadata record image holds: `Err` says which fails and why.
pub(crate) fn verify_copies(image: &[u8], seg: &Segment, kind: RecordKind) -> Result<(), String> {
    match check_meta(image, seg, kind) {
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        (Ok(_), None) => Ok(()),
    }
}

/// Verifies a record image read from `seg`: header checksum (with the segment's generation),
/// kind, and payload checksum. Returns the header and the payload.
pub(crate) fn verify_image<'a>(
    image: &'a [u8],
    seg: &Segment,
    kind: RecordKind,
) -> Result<(RecordHeader, &'a [u8]), String> {
    let h = RecordHeader::decode(image, seg.generation).map_err(|e| format!("header: {e}"))?;
    if h.kind != kind {
        return Err(format!("expected a {kind:?} record, found {:?}", h.kind));
    }
    if h.segment_id != seg.id {
        return Err("record belongs to another segment".into());
    }
    let po = payload_offset(h.payload_len);
    let end = po + h.payload_len as usize;
    if end > image.len() {
        return Err("record longer than the bytes read".into());
    }
    let payload = &image[po..end];
    if payload_checksum(payload) != h.payload_xxh3 {
        return Err("payload checksum mismatch".into());
    }
    // The bytes no checksum covers (after the header in a header page, after the payload up
    // to the record's end) are written as zeros (from segment format 2 on): anything else is
    // damage, reported rather than ignored.
    if seg.first_record >= SEGMENT_HEADER_LEN {
        let rl = (record_len(h.payload_len) as usize).min(image.len());
        let header_pad = format::RECORD_HEADER_LEN..po.min(PAGE as usize);
        if image[header_pad]
            .iter()
            .chain(&image[end.min(rl)..rl])
            .any(|&b| b != 0)
        {
            return Err("non-zero padding".into());
        }
    }
    Ok((h, payload))
}
