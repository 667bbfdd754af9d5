//! Segment files as recovery finds them: opening them, reading their header (page 0, or its
//! copy in page 1), telling a newest segment whose creation crashed (no header, no record) from
//! one whose header was lost, and setting aside, for `cwm fsck --repair`, the segments whose
//! header is invalid.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::io::{self, AlignedBuf, IoEngine};
use crate::store::error::StoreError;
use crate::store::format::{HeaderError, SegmentHeader, PAGE};
use crate::store::segment;

/// Opens a segment file for reading (O_DIRECT where possible); returns it and its length.
pub(super) fn open_segment_file(path: &Path) -> Result<(File, u64), StoreError> {
    let (file, _) =
        io::open_direct(path, false).map_err(|e| StoreError::from_fs("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| StoreError::from_fs("stat", path, e))?
        .len();
    Ok((file, len))
}

/// For a segment whose header pages read as zeros: does its first record page (page 1 in
/// format 1, page 2 in format 2: both are looked at) hold anything? Only a segment that does
/// not is a crash while creating it.
pub(super) fn holds_records(
    engine: &dyn IoEngine,
    file: &File,
    file_len: u64,
    path: &Path,
    page: &mut AlignedBuf,
) -> Result<bool, StoreError> {
    for at in [PAGE, 2 * PAGE] {
        if file_len < at + PAGE {
            break;
        }
        engine
            .read_exact_at(file.as_raw_fd(), at, page)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        if page.iter().any(|&b| b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A segment header (or why none decodes) and the damaged header page, if any.
pub(super) type HeaderRead = (
    Result<SegmentHeader, HeaderError>,
    Option<(u64, u64, String)>,
);

/// Reads a segment's header: page 0, or its copy in page 1 when page 0 does not verify
/// (segment version 2). Also returns the damaged header page, if one of two is damaged.
pub(super) fn read_segment_header(
    engine: &dyn IoEngine,
    file: &File,
    file_len: u64,
    path: &Path,
    page: &mut AlignedBuf,
) -> Result<HeaderRead, StoreError> {
    if file_len == 0 {
        return Ok((Err(HeaderError::Empty), None));
    }
    if file_len < PAGE {
        return Ok((Err(HeaderError::Truncated), None));
    }
    let mut read = |at: u64| -> Result<Result<SegmentHeader, HeaderError>, StoreError> {
        if file_len < at + PAGE {
            return Ok(Err(HeaderError::Truncated));
        }
        engine
            .read_exact_at(file.as_raw_fd(), at, page)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        // The rest of a header page is zero (from segment format 2 on, checked).
        Ok(SegmentHeader::decode(page).and_then(|h| {
            if h.version >= 2 && page[SegmentHeader::LEN..].iter().any(|&b| b != 0) {
                Err(HeaderError::Field(
                    "non-zero bytes after the segment header",
                ))
            } else {
                Ok(h)
            }
        }))
    };
    let first = read(0)?;
    match first {
        Ok(h) if h.version < 2 => Ok((Ok(h), None)),
        Ok(h) => {
            // A version 2 header has its copy in page 1.
            let damage = match read(PAGE)? {
                Ok(c) if c == h => None,
                // A crash between the two writes of a seal or of a raise of the record limit
                // (page 0 first): the copy still holds the header as it was (no sealed
                // length, the lower limit — which covers every record: room past it is only
                // handed out once both copies are synced). No damage; the copy is written
                // again.
                Ok(c) if earlier_copy(&c, &h) => {
                    h.encode(page);
                    let healed = engine
                        .write_all_at(file.as_raw_fd(), PAGE, page)
                        .and_then(|()| engine.fdatasync(file.as_raw_fd()));
                    if let Err(e) = healed {
                        crate::log::warn(&format!(
                            "{}: rewriting the sealed header copy failed: {e}",
                            path.display()
                        ));
                    }
                    None
                }
                Ok(_) => Some((PAGE, 2 * PAGE, "segment header copy differs".to_string())),
                Err(e) => Some((PAGE, 2 * PAGE, format!("segment header copy: {e}"))),
            };
            Ok((Ok(h), damage))
        }
        Err(e0) => match read(PAGE)? {
            Ok(c) if c.version >= 2 => {
                Ok((Ok(c), Some((0, PAGE, format!("segment header: {e0}")))))
            }
            Ok(_) | Err(_) => Ok((Err(e0), None)),
        },
    }
}

/// True when `c` (page 1) is `h` (page 0) as it was before a seal or a raise of the record
/// limit that was cut short after page 0: no sealed length, and a lower, non-zero record limit
/// where `h` has one.
fn earlier_copy(c: &SegmentHeader, h: &SegmentHeader) -> bool {
    c.sealed_len == 0
        && (c.record_limit == 0) == (h.record_limit == 0)
        && c.record_limit <= h.record_limit
        && SegmentHeader {
            sealed_len: 0,
            record_limit: c.record_limit,
            ..*h
        } == *c
}

/// The highest segment id any file of `dir` names (`segment-<id>.<anything>`), 0 if none.
pub(super) fn highest_named_id(dir: &Path) -> Result<u64, StoreError> {
    let mut max = 0;
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::from_fs("list", dir, e))? {
        let e = e.map_err(|e| StoreError::from_fs("list", dir, e))?;
        let name = e.file_name();
        if let Some((id, _)) = name.to_str().and_then(segment::parse_name) {
            max = max.max(id);
        }
    }
    Ok(max)
}

/// The ids of the segment files in `dir`, in order.
pub(super) fn segment_ids(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| StoreError::from_fs("list", dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment::parse_file_name(&e.file_name().to_string_lossy()))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Renames every segment file of `dir` whose header is invalid (or names another segment) to
/// `<file>.damaged`, out of the log, so the store opens without it (`cwm fsck --repair`; the
/// windows with records there become incomplete and are deleted by the repair). The newest
/// segment with a zeroed header and no record is left to recovery, which removes it (a crash
/// while creating it). Returns what was set aside: (file, why).
pub(crate) fn set_aside_invalid_segments(dir: &Path) -> Result<Vec<(String, String)>, StoreError> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| StoreError::from_fs("list", dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment::parse_file_name(e.file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    let engine = io::psync::PsyncEngine::new();
    let mut page = AlignedBuf::zeroed(PAGE as usize);
    let mut out = Vec::new();
    for (n, &id) in ids.iter().enumerate() {
        let path = dir.join(segment::file_name(id));
        let (file, file_len) = open_segment_file(&path)?;
        // The same verdict recovery reaches (read_segment_header), so that what repair keeps
        // always opens.
        let (header, _) = read_segment_header(&engine, &file, file_len, &path, &mut page)?;
        let why = match header {
            Ok(h) if h.segment_id == id => continue,
            Ok(h) => format!("it has the header of segment {}", h.segment_id),
            Err(HeaderError::Empty) if n + 1 == ids.len() => {
                // Recovery removes it if no record follows (a crash while creating it).
                if !holds_records(&engine, &file, file_len, &path, &mut page)? {
                    continue;
                }
                "its header pages are zeroed but it holds records".to_string()
            }
            Err(e) => format!("invalid header: {e}"),
        };
        drop(file);
        let aside = dir.join(format!("{}.damaged", segment::file_name(id)));
        std::fs::rename(&path, &aside).map_err(|e| StoreError::from_fs("rename", &path, e))?;
        io::sync_dir(dir).map_err(|e| StoreError::from_fs("sync directory of", dir, e))?;
        out.push((aside.display().to_string(), why));
    }
    Ok(out)
}
