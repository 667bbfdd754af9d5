//! The data directory's `LOCK` file: one process at a time opens a data directory (an
//! exclusive `flock`, held as long as the store is open); it holds the holder's pid, which
//! the refusal names.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::error::StoreError;

/// Takes an exclusive lock on `dir/LOCK` and writes our pid into it.
pub(super) fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("LOCK");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::from_fs("open", &path, e))?;
    // SAFETY: flock on an owned descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        return Err(StoreError::Locked {
            dir: dir.to_path_buf(),
            pid: s.trim().parse().unwrap_or(0),
        });
    }
    let _ = f.set_len(0);
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}
