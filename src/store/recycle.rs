//! Files of compacted segments kept for reuse (`segment-<id>.free`, out of the log). A new
//! segment written into one overwrites blocks the file system has allocated and written
//! already: no unwritten extent is converted under the records, so their `fdatasync` flushes
//! the data without a journal commit — on ext4 the difference between a fresh preallocated
//! file and an overwrite is ~1.4× in write throughput (docs/PERFORMANCE.md). A file is reused
//! only once nothing reads it any more: a thaw that opened a window before compaction moved
//! its records holds the old segment (an `Arc`), and keeps reading its bytes until it lets go.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::segment::{self, Segment};

/// A file kept for reuse, and the segment it held (until nothing refers to it, the file is
/// not handed out) with that segment's failed and damaged flags: a reader still holding the
/// segment may find damage in it after it was kept, and then the file is never reused.
struct Free {
    path: PathBuf,
    held: Weak<Segment>,
    bad: [Arc<AtomicBool>; 2],
}

impl Free {
    fn bad(&self) -> bool {
        self.bad.iter().any(|b| b.load(Ordering::SeqCst))
    }
}

/// The files kept for reuse: at most `max`.
pub(crate) struct Recycler {
    max: usize,
    free: Mutex<Vec<Free>>,
}

impl Recycler {
    /// The files kept in `dir` (a crash or a stop left them; no reader holds them), at most
    /// `max` of them; the others are removed.
    pub(crate) fn load(dir: &Path, max: usize) -> Recycler {
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| {
                        let id = segment::parse_free_file_name(e.file_name().to_str()?)?;
                        Some((id, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort_unstable();
        let keep = found.split_off(found.len().saturating_sub(max));
        for (_, path) in found {
            let _ = std::fs::remove_file(path);
        }
        Recycler {
            max,
            free: Mutex::new(
                keep.into_iter()
                    .map(|(_, path)| Free {
                        path,
                        held: Weak::new(),
                        bad: Default::default(),
                    })
                    .collect(),
            ),
        }
    }

    /// Takes `seg`'s file out of the log (compaction found nothing live in it): renamed to a
    /// free file while fewer than `max` are kept and the segment neither failed nor held
    /// damage, else removed.
    /// The caller makes the directory change durable.
    pub(crate) fn retire(&self, dir: &Path, seg: &Arc<Segment>) -> std::io::Result<()> {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bad = seg.failed.load(Ordering::SeqCst) || seg.damaged.load(Ordering::SeqCst);
        if free.len() < self.max && !bad {
            let path = dir.join(segment::free_file_name(seg.id));
            match std::fs::rename(&seg.path, &path) {
                Ok(()) => {
                    // (A new segment's id is above every id a file names: no entry names
                    // this file already.)
                    free.push(Free {
                        path,
                        held: Arc::downgrade(seg),
                        bad: [seg.failed.clone(), seg.damaged.clone()],
                    });
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // Kept out of the pool; removed below.
                Err(_) => {}
            }
        }
        match std::fs::remove_file(&seg.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A free file nothing reads any more, taken out of the pool (the caller reuses it or
    /// removes it). Files whose segment was found damaged (or failed) since they were kept
    /// are removed on the way, once nothing reads them.
    pub(crate) fn take(&self) -> Option<PathBuf> {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        free.retain(|f| {
            let gone = f.held.strong_count() == 0 && f.bad();
            if gone {
                let _ = std::fs::remove_file(&f.path);
            }
            !gone
        });
        let at = free.iter().position(|f| f.held.strong_count() == 0)?;
        Some(free.swap_remove(at).path)
    }

    /// Removes every free file nothing reads (the file system is full: the log comes first).
    /// Returns how many were removed.
    pub(crate) fn drop_free(&self) -> usize {
        let mut n = 0;
        while let Some(path) = self.take() {
            if std::fs::remove_file(path).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Files kept now.
    pub(crate) fn len(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}
