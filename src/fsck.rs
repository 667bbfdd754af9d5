//! `cwm fsck`: offline verification of a data directory. Recovery runs first (its report
//! lists torn tails, damaged regions and incomplete windows); then every block of every window
//! is read and both checksums verified. Each window is reported ok, damaged (with its intact
//! prefix) or lost. Repair (dropping what cannot be read) is a later step (issue 6).

use serde::Serialize;

use crate::io::AlignedBuf;
use crate::store::{RecoveryReport, Store, StoreConfig, StoreError};

/// One window's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct WindowCheck {
    /// Window name.
    pub name: String,
    /// `ok`, `damaged` or `lost`.
    pub status: &'static str,
    /// Blocks in the window.
    pub blocks: u64,
    /// Leading blocks that verify.
    pub intact_blocks: u64,
    /// What failed, if anything.
    pub detail: Option<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct FsckReport {
    /// What recovery found.
    pub recovery: RecoveryReport,
    /// Per window.
    pub windows: Vec<WindowCheck>,
    /// Windows whose manifest exists but some block does not (never exposed).
    pub lost: Vec<String>,
    /// Bytes of block payload verified.
    pub bytes_verified: u64,
    /// Seconds spent verifying.
    pub seconds: f64,
}

impl FsckReport {
    /// True when every window verified and recovery found nothing to cut or skip.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.recovery.torn_tails.is_empty()
            && self.recovery.damaged_regions.is_empty()
            && self.recovery.damaged_records.is_empty()
            && self.windows.iter().all(|w| w.status == "ok")
    }
}

/// Verifies `cfg.dir`; `progress(done, total)` is called after each window.
pub fn check(cfg: StoreConfig, progress: &dyn Fn(usize, usize)) -> Result<FsckReport, StoreError> {
    let t = std::time::Instant::now();
    let (store, recovery) = Store::open(cfg)?;
    let names: Vec<String> = store.list()?.into_iter().map(|w| w.name).collect();
    let mut windows = Vec::with_capacity(names.len());
    let mut bytes = 0u64;
    for (i, name) in names.iter().enumerate() {
        let check = match store.open_window(name) {
            Err(e) => WindowCheck {
                name: name.clone(),
                status: "lost",
                blocks: 0,
                intact_blocks: 0,
                detail: Some(e.to_string()),
            },
            Ok(r) => {
                let n = r.num_blocks();
                let mut buf = AlignedBuf::zeroed(r.record_len(0) as usize);
                let mut bad = None;
                for b in 0..n {
                    if buf.len() < r.record_len(b) as usize {
                        buf = AlignedBuf::zeroed(r.record_len(b) as usize);
                    }
                    match store.read_blocks(&r, b, &mut [&mut buf[..]]) {
                        Ok(()) => bytes += r.manifest.blocks[b].len,
                        Err(e) => {
                            bad = Some((b, e.to_string()));
                            break;
                        }
                    }
                }
                match bad {
                    None => WindowCheck {
                        name: name.clone(),
                        status: "ok",
                        blocks: n as u64,
                        intact_blocks: n as u64,
                        detail: None,
                    },
                    Some((b, d)) => WindowCheck {
                        name: name.clone(),
                        status: "damaged",
                        blocks: n as u64,
                        intact_blocks: b as u64,
                        detail: Some(d),
                    },
                }
            }
        };
        windows.push(check);
        progress(i + 1, names.len());
    }
    Ok(FsckReport {
        lost: recovery.incomplete_windows.clone(),
        recovery,
        windows,
        bytes_verified: bytes,
        seconds: t.elapsed().as_secs_f64(),
    })
}
