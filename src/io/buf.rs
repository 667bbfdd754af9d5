//! 4 KiB-aligned heap buffers: what O_DIRECT reads and writes, and what the io_uring engine
//! registers as fixed buffers.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment (and length granularity) of every buffer handed to the disk.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`].
#[must_use]
pub const fn align_up(n: u64) -> u64 {
    (n + (ALIGN as u64 - 1)) & !(ALIGN as u64 - 1)
}

/// An owned, zero-initialised, 4 KiB-aligned byte buffer whose length is a multiple of 4 KiB.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes rounded up to a multiple of 4 KiB, zeroed.
    ///
    /// # Panics
    /// Only when the allocator fails (like `Vec`), or when `len` is absurdly large.
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        let len = align_up(len.max(1) as u64) as usize;
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len >= 4096).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// Like [`AlignedBuf::zeroed`] but returns `None` instead of aborting when memory is short.
    #[must_use]
    pub fn try_zeroed(len: usize) -> Option<Self> {
        let len = align_up(len.max(1) as u64) as usize;
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(raw).map(|ptr| Self { ptr, len })
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("buffer of {len} bytes cannot be laid out"),
        }
    }

    /// Length in bytes (a multiple of 4 KiB).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: buffers hold at least one page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Raw pointer to the first byte.
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the first byte.
    #[must_use]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len initialised bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
    }
}
