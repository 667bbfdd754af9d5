//! Deterministic pseudo-random generators for test data, benchmarks and the torture tools
//! (never for anything secret).

/// Fills `buf` with a fast deterministic pseudo-random sequence (xorshift64*).
pub fn fill_random(buf: &mut [u8], seed: u64) {
    fill_random_stream(buf, &mut (seed | 1));
}

/// [`fill_random`] from generator state `x` (nonzero), left where the next call continues the
/// same sequence: buffers of a multiple of 8 bytes filled one after another hold what one
/// `fill_random` of them all would.
pub fn fill_random_stream(buf: &mut [u8], x: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A small deterministic generator (splitmix64) for the torture and damage
/// workloads.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[expect(
        clippy::should_implement_trait,
        reason = "an infinite generator, not an Iterator"
    )]
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}
