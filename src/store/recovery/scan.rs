//! Walking the records of one segment: record headers only (metadata payloads are read by the
//! caller), damaged regions skipped and reported, a torn tail told from the clean end of the
//! log. Used by recovery, compaction and [`Store::verify_log`](crate::store::Store::verify_log).

use crate::io::{AlignedBuf, IoEngine};
use crate::store::error::StoreError;
use crate::store::format::{self, record_len, HeaderError, RecordHeader, PAGE};
use crate::store::segment::Segment;

/// A record found by [`scan`]: its header, where it starts, its length (both copies of a
/// metadata record whose copies were both found).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rec {
    /// Its header (of the first copy found).
    pub h: RecordHeader,
    /// Offset in the segment.
    pub offset: u64,
    /// Bytes, both copies of a metadata record included.
    pub len: u64,
}

/// Bytes read at a time while records are small.
const SCAN_WINDOW: usize = 256 * 1024;

/// What [`scan`] found: the records, the frontier (where appends may resume), the torn tail
/// (offset, why) and the damaged regions (from, to, why).
pub(in crate::store) type Scan = (
    Vec<Rec>,
    u64,
    Option<(u64, String)>,
    Vec<(u64, u64, String)>,
);

/// Walks the record headers of one segment from `start` (the first record, or the end of what a
/// checkpoint covers; `last_seq`: the highest sequence number before it, 0 at the first
/// record). Reads 256 KiB windows while records are small and
/// single header pages once they are large, so the cost follows the number of records.
///
/// An invalid or all-zero header page followed, later in the segment, by a valid record of the
/// segment (a higher sequence number) is a damaged region: it is skipped and reported. Only
/// when nothing valid follows is it the end of the log (all zero: clean; otherwise a torn
/// tail — except in a segment written into a reused file, whose earlier bytes follow its
/// records: there a page no header of this generation decodes from, and that does not name
/// this segment, is the clean end). Such a segment is read only up to its record limit. The second copy of a metadata record is merged into its first (one [`Rec`] covering
/// both); a copy whose twin is damaged stands alone. A jump in the sequence numbers of the
/// records written into the segment that no damaged region explains is reported as a region
/// too (records are never skipped silently).
pub(in crate::store) fn scan(
    engine: &dyn IoEngine,
    seg: &Segment,
    file_len: u64,
    start: u64,
    last_seq: u64,
) -> Result<Scan, StoreError> {
    let mut recs: Vec<Rec> = Vec::new();
    let mut buf = AlignedBuf::zeroed(SCAN_WINDOW);
    let (mut win_start, mut win_len) = (0u64, 0u64);
    let mut off = start;
    let mut last_seq = last_seq;
    let mut big = false;
    let mut damaged: Vec<(u64, u64, String)> = Vec::new();
    // A damaged region was skipped since the last record written in order (it explains a
    // jump in sequence numbers).
    let mut explained = false;
    // A segment written into a reused file holds records only below its record limit; past
    // them lie the file's earlier bytes (another generation: no header of them validates).
    let limit = seg.limit();
    let end = if limit == 0 {
        file_len.min(seg.size)
    } else {
        file_len.min(seg.size).min(limit)
    };
    let torn = loop {
        if off + PAGE > end {
            break None;
        }
        if !(off >= win_start && off + PAGE <= win_start + win_len) {
            let want = if big {
                PAGE
            } else {
                (end - off).min(SCAN_WINDOW as u64) & !(PAGE - 1)
            };
            engine
                .read_exact_at(seg.fd(), off, &mut buf[..want as usize])
                .map_err(|e| StoreError::io(format!("scanning {}", seg.path.display()), e))?;
            win_start = off;
            win_len = want;
        }
        let at = (off - win_start) as usize;
        let decoded = RecordHeader::decode(&buf[at..at + PAGE as usize], seg.generation);
        if let (Ok(h), Some(prev)) = (&decoded, recs.last_mut()) {
            if is_second_copy(prev, h, off) {
                prev.len += record_len(h.payload_len);
                off += record_len(h.payload_len);
                continue;
            }
        }
        // Bytes of a reused file's earlier use: no header of this segment decodes from them,
        // nor does the page name this segment (a torn header of it does).
        let foreign =
            decoded.is_err() && !format::names_segment(&buf[at..at + PAGE as usize], seg.id);
        let bad = match decoded {
            // Zeros: the clean end of the log, unless valid records follow (a hole).
            Err(HeaderError::Empty) if buf[at..at + PAGE as usize].iter().all(|&b| b == 0) => {
                Err(None)
            }
            Err(HeaderError::Empty) => Err(Some(
                "a page with zeros where a header belongs and bytes after them".to_string(),
            )),
            Err(e) => Err(Some(e.to_string())),
            Ok(h) if h.segment_id != seg.id => Err(Some("record of another segment".to_string())),
            // A compaction copy keeps its original's sequence number, out of append order.
            Ok(h) if !h.copied && h.seq <= last_seq => {
                Err(Some("sequence number does not increase".to_string()))
            }
            Ok(h) if off + record_len(h.payload_len) > end => {
                Err(Some("record runs past the end of the segment".to_string()))
            }
            Ok(h) => Ok(h),
        };
        let h = match bad {
            Ok(h) => h,
            Err(why) => {
                // A torn tail or the clean end, or damage in the middle? Look for a later
                // valid record.
                match find_next(engine, seg, off + PAGE, end, last_seq)? {
                    Next::At(next) => {
                        let why = why.unwrap_or_else(|| {
                            "zeroed page(s) followed by valid records".to_string()
                        });
                        damaged.push((off, next, why));
                        explained = true;
                        off = next;
                        win_len = 0;
                        continue;
                    }
                    // Zeros to the end: the clean end of the log.
                    Next::Nothing if why.is_none() => break None,
                    // In a reused file, bytes that are no record of this generation up to the
                    // limit are what its earlier use left: the clean end too.
                    Next::Nothing | Next::Garbage if limit != 0 && foreign => break None,
                    // Bytes that are no record follow zeros: a torn write, or damage.
                    Next::Nothing | Next::Garbage => {
                        break Some((
                            off,
                            why.unwrap_or_else(|| {
                                "zeroed page followed by bytes that are no record".to_string()
                            }),
                        ))
                    }
                }
            }
        };
        let len = record_len(h.payload_len);
        if !h.copied {
            if last_seq != 0 && h.seq > last_seq + 1 && !explained {
                let from = recs.last().map_or(start, |r| r.offset + r.len);
                damaged.push((
                    from,
                    off,
                    format!(
                        "sequence gap: records {}..={} are missing",
                        last_seq + 1,
                        h.seq - 1
                    ),
                ));
            }
            last_seq = h.seq;
            explained = false;
        }
        recs.push(Rec {
            h,
            offset: off,
            len,
        });
        off += len;
        big = len > 16 * PAGE;
    };
    let frontier = match &torn {
        Some((o, _)) => *o,
        None => off.min(end.max(seg.first_record)),
    };
    // The log ends right after the first copy of a metadata record: its second copy was torn
    // off (or zeroed). The first copy is kept; the loss is reported.
    let torn = torn.or_else(|| {
        recs.last()
            .filter(|r| {
                format::copies(r.h.kind) == 2
                    && !r.h.ditto
                    && r.len == record_len(r.h.payload_len)
                    && r.offset + r.len == frontier
            })
            .map(|r| {
                (
                    frontier,
                    format!(
                        "the second copy of the {:?} record at {} is missing",
                        r.h.kind, r.offset
                    ),
                )
            })
    });
    Ok((recs, frontier, torn, damaged))
}

/// True when `h`, found at `off`, is the second copy of the metadata record `prev` that ends
/// right there.
fn is_second_copy(prev: &Rec, h: &RecordHeader, off: u64) -> bool {
    h.ditto
        && !prev.h.ditto
        && prev.offset + prev.len == off
        && prev.len == record_len(prev.h.payload_len)
        && prev.h.kind == h.kind
        && prev.h.seq == h.seq
        && prev.h.key == h.key
        && prev.h.payload_len == h.payload_len
        && prev.h.payload_xxh3 == h.payload_xxh3
        && prev.h.copied == h.copied
}

/// Finds the next page at or after `from` holding a valid record header of this segment with a
/// sequence number above `last_seq`. Skips holes (never-written preallocated space) with
/// `SEEK_DATA`, so a torn tail followed by unwritten space costs little to rule out.
fn find_next(
    engine: &dyn IoEngine,
    seg: &Segment,
    from: u64,
    end: u64,
    last_seq: u64,
) -> Result<Next, StoreError> {
    let mut buf = AlignedBuf::zeroed(SCAN_WINDOW);
    let mut off = from;
    let mut garbage = false;
    while off + PAGE <= end {
        // SAFETY: lseek on an owned descriptor; no memory is passed.
        let data = unsafe { libc::lseek(seg.fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `off`
        }
        let data = (data as u64) & !(PAGE - 1);
        if data > off {
            off = data;
            continue;
        }
        let want = (end - off).min(SCAN_WINDOW as u64) & !(PAGE - 1);
        if want == 0 {
            break;
        }
        engine
            .read_exact_at(seg.fd(), off, &mut buf[..want as usize])
            .map_err(|e| StoreError::io(format!("scanning {}", seg.path.display()), e))?;
        for p in 0..(want / PAGE) {
            let at = (p * PAGE) as usize;
            if let Ok(h) = RecordHeader::decode(&buf[at..at + PAGE as usize], seg.generation) {
                let o = off + p * PAGE;
                if h.segment_id == seg.id
                    && (h.copied || h.seq > last_seq)
                    && o + record_len(h.payload_len) <= end
                {
                    return Ok(Next::At(o));
                }
            }
        }
        garbage = garbage || buf[..want as usize].iter().any(|&b| b != 0);
        off += want;
    }
    Ok(if garbage {
        Next::Garbage
    } else {
        Next::Nothing
    })
}

/// What follows an invalid or empty header page.
enum Next {
    /// A valid record at this offset.
    At(u64),
    /// No valid record, but bytes that are not zero.
    Garbage,
    /// Zeros (or nothing) to the end.
    Nothing,
}
