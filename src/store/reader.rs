//! The read side: [`Store::open_window`] reads and verifies a window's manifest and snapshots
//! where its blocks are ([`WindowReader`]); [`Store::read_blocks`] reads block records in one
//! batch and verifies each against the manifest. A block that does not verify (or was lost to
//! damage) ends the window's intact prefix: the window thaws up to it.

use super::error::{poisoned, StoreError};
use super::format::{payload_offset, record_len, RecordKind};
use super::index::Loc;
use super::verify::{verify_image, verify_meta};
use super::{name, name_key, Manifest, Store, WindowInfo};
use crate::io::{AlignedBuf, IoError, Op};

impl Store {
    /// Opens a window for reading: reads and verifies its manifest, snapshots block locations.
    pub fn open_window(&self, name: &str) -> Result<WindowReader, StoreError> {
        let name = name::validate_name(name).map_err(StoreError::Validation)?;
        let (entry, locs) = {
            let st = self.state.read().map_err(poisoned)?;
            let now = crate::clock::now_unix_ms();
            let w = st
                .windows
                .get(&name)
                .filter(|w| !w.expired(now))
                .ok_or_else(|| StoreError::NotFound(name.clone()))?
                .clone();
            // A block lost to damage (None) fails verification when it is read: the window
            // thaws up to it.
            let locs: Vec<Option<Loc>> = w
                .keys
                .iter()
                .map(|k| st.blocks.get(k).and_then(|b| b.loc.clone()))
                .collect();
            (w, locs)
        };
        let mut image = AlignedBuf::zeroed(entry.manifest.len as usize);
        self.engine
            .read_exact_at(entry.manifest.seg.fd(), entry.manifest.offset, &mut image)
            .map_err(|e| match e {
                // The segment ends before a record the index holds (the file was truncated), or
                // the medium cannot return it: the window is damaged, as an unreadable block
                // would make it.
                IoError::Short { op: "read", .. } => StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest cut short (the segment file was truncated?): {e}"),
                },
                IoError::Os { .. } if e.errno() == Some(libc::EIO) => StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest unreadable: {e}"),
                },
                e => StoreError::io(format!("reading the manifest of {name:?}"), e),
            })?;
        let (h, payload) =
            verify_meta(&image, &entry.manifest.seg, RecordKind::Manifest).map_err(|d| {
                StoreError::Corruption {
                    window: name.clone(),
                    block: 0,
                    intact_blocks: 0,
                    detail: format!("manifest: {d}"),
                }
            })?;
        let manifest = Manifest::decode(payload).map_err(|e| StoreError::Corruption {
            window: name.clone(),
            block: 0,
            intact_blocks: 0,
            detail: format!("manifest payload: {e}"),
        })?;
        if h.key != name_key(&name) || manifest.name != name {
            return Err(StoreError::Corruption {
                window: name,
                block: 0,
                intact_blocks: 0,
                detail: "manifest belongs to another window".into(),
            });
        }
        Ok(WindowReader {
            info: entry.info(),
            manifest,
            locs,
        })
    }

    /// Reads blocks `start..start + images.len()` of a window into record images (each at
    /// least `record_len` bytes, 4 KiB-aligned) in one batch, and verifies header and payload
    /// checksums of every one. Payloads are at [`WindowReader::payload`].
    pub fn read_blocks(
        &self,
        r: &WindowReader,
        start: usize,
        images: &mut [&mut [u8]],
    ) -> Result<(), StoreError> {
        let unreadable = self.read_images(r, start, images)?;
        for (i, img) in images.iter().enumerate() {
            match &unreadable {
                Some((k, e)) if *k == i => {
                    return Err(r.corruption(start + i, format!("unreadable: {e}")))
                }
                _ => r.verify(start + i, img)?,
            }
        }
        Ok(())
    }

    /// Reads record images without verifying them: the caller must pass each through
    /// [`WindowReader::verify`] before using its payload (the pipeline verifies on its scatter
    /// threads). Returns the position (in `images`) and error of the first unreadable block.
    pub(crate) fn read_images(
        &self,
        r: &WindowReader,
        start: usize,
        images: &mut [&mut [u8]],
    ) -> Result<Option<(usize, IoError)>, StoreError> {
        let end = start + images.len();
        if end > r.locs.len() {
            return Err(StoreError::Validation(format!(
                "blocks {start}..{end} out of range: window {:?} has {} blocks",
                r.info.name,
                r.locs.len()
            )));
        }
        let mut ops = Vec::with_capacity(images.len());
        for (i, img) in images.iter_mut().enumerate() {
            // A lost block is not read: its verification fails.
            let Some(loc) = &r.locs[start + i] else {
                continue;
            };
            let len = loc.len as usize;
            if img.len() < len {
                return Err(StoreError::Validation(format!(
                    "read buffer of {} bytes for a record of {len}",
                    img.len()
                )));
            }
            ops.push(Op::read(loc.seg.fd(), loc.offset, &mut img[..len]));
        }
        let io_res = self.engine.run(&mut ops);
        drop(ops);
        let Err(e) = io_res else { return Ok(None) };
        // After a failed batch, re-read block by block: the first unreadable block bounds the
        // intact prefix exactly, and no image left over from an earlier use is trusted.
        crate::log::warn(&format!("read error in window {:?}: {e}", r.info.name));
        for (i, img) in images.iter_mut().enumerate() {
            let Some(loc) = &r.locs[start + i] else {
                continue;
            };
            if let Err(e) =
                self.engine
                    .read_exact_at(loc.seg.fd(), loc.offset, &mut img[..loc.len as usize])
            {
                return Ok(Some((i, e)));
            }
        }
        Ok(None)
    }

    /// Reads and verifies a whole window into memory (tests, `cwm demo`, small windows).
    pub fn read_window(&self, name: &str) -> Result<(Manifest, Vec<Vec<u8>>), StoreError> {
        let r = self.open_window(name)?;
        let mut out = Vec::with_capacity(r.locs.len());
        for i in 0..r.locs.len() {
            let mut img = AlignedBuf::zeroed(r.record_len(i) as usize);
            self.read_blocks(&r, i, &mut [&mut img[..]])?;
            out.push(r.payload(i, &img).to_vec());
        }
        Ok((r.manifest, out))
    }
}

/// A window opened for reading: its verified manifest and where its blocks are.
pub struct WindowReader {
    /// Catalog entry.
    pub info: WindowInfo,
    /// The verified manifest.
    pub manifest: Manifest,
    locs: Vec<Option<Loc>>,
}

impl WindowReader {
    /// Number of blocks.
    #[must_use]
    pub fn num_blocks(&self) -> usize {
        self.locs.len()
    }

    /// Drops the window's first `k` blocks (and the `k * block_size` tokens they hold) from
    /// this reader: block `i` of the reader is then block `k + i` of the window (a thaw of a
    /// range whose start the engine already holds).
    pub fn skip_blocks(&mut self, k: usize, block_size: usize) {
        let k = k.min(self.locs.len());
        self.locs.drain(..k);
        self.manifest.blocks.drain(..k);
        let t = (k * block_size).min(self.manifest.tokens.len());
        self.manifest.tokens.drain(..t);
    }

    /// Bytes of the record image of block `i` (what a read buffer must hold).
    #[must_use]
    pub fn record_len(&self, i: usize) -> u64 {
        record_len(self.manifest.blocks[i].len)
    }

    /// Verifies the record image of block `b`: header checksum (with the segment generation),
    /// kind, segment, key, length and checksum against the manifest, payload xxh3.
    pub fn verify(&self, b: usize, image: &[u8]) -> Result<(), StoreError> {
        let want = self
            .manifest
            .blocks
            .get(b)
            .ok_or_else(|| StoreError::Validation(format!("block {b} out of range")))?;
        let Some(loc) = &self.locs[b] else {
            return Err(self.corruption(
                b,
                "the block's record was lost to damage (reported when the store was opened)".into(),
            ));
        };
        let res = verify_image(image, &loc.seg, RecordKind::Block).and_then(|(h, _)| {
            if h.key != want.key {
                Err("block key differs from the manifest's".to_string())
            } else if h.payload_len != want.len || h.payload_xxh3 != want.checksum {
                Err("block length or checksum differs from the manifest's".to_string())
            } else {
                Ok(())
            }
        });
        res.map_err(|d| {
            // Its file is never written into again (once compaction empties it).
            loc.seg
                .damaged
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.corruption(b, d)
        })
    }

    /// The CORRUPTION error for block `b`.
    #[must_use]
    pub fn corruption(&self, b: usize, detail: String) -> StoreError {
        StoreError::Corruption {
            window: self.info.name.clone(),
            block: b,
            intact_blocks: b,
            detail,
        }
    }

    /// The payload of block `i` inside a verified record image.
    #[must_use]
    pub fn payload<'b>(&self, i: usize, image: &'b [u8]) -> &'b [u8] {
        let len = self.manifest.blocks[i].len;
        let po = payload_offset(len);
        &image[po..po + len as usize]
    }
}
