//! Block keys: xxh3-128 chained over (namespace, parent key, the block's token ids).
//! Namespace = model id + layout fingerprint + optional cache salt. Keys are stable across
//! restarts and processes and independent of vLLM's own (randomly seeded) block hashes; equal
//! prefixes give equal keys, so the store deduplicates them. A trailing partial block gets a key
//! too (its token count is hashed with its tokens).

use xxhash_rust::xxh3::xxh3_128;

/// The namespace keys are computed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Model id (e.g. the model path or name the engine serves).
    pub model: String,
    /// Layout fingerprint ([`crate::layout::Layout::fingerprint`]).
    pub layout_fingerprint: u64,
    /// Optional cache salt (tenant isolation).
    pub salt: Option<String>,
}

impl Namespace {
    /// The 128-bit root the first block's key chains from.
    #[must_use]
    pub fn root(&self) -> u128 {
        let mut b = Vec::with_capacity(self.model.len() + 32);
        b.extend_from_slice(b"cwm-ns-v1\0");
        b.extend_from_slice(&(self.model.len() as u64).to_le_bytes());
        b.extend_from_slice(self.model.as_bytes());
        b.extend_from_slice(&self.layout_fingerprint.to_le_bytes());
        match &self.salt {
            Some(s) => {
                b.push(1);
                b.extend_from_slice(s.as_bytes());
            }
            None => b.push(0),
        }
        xxh3_128(&b)
    }

    /// Human-readable form stored in manifests.
    #[must_use]
    pub fn label(&self) -> String {
        format!(
            "{}#{:016x}{}",
            self.model,
            self.layout_fingerprint,
            self.salt
                .as_deref()
                .map(|s| format!("#{s}"))
                .unwrap_or_default()
        )
    }
}

/// Key of one block given its parent's key (the namespace root for block 0).
#[must_use]
pub fn block_key(parent: u128, tokens: &[u32]) -> u128 {
    let mut b = Vec::with_capacity(24 + tokens.len() * 4);
    b.extend_from_slice(&parent.to_le_bytes());
    b.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_128(&b)
}

/// Keys of every block of a token sequence, `block_size` tokens per block, the last block
/// possibly partial.
#[must_use]
pub fn block_keys(ns: &Namespace, tokens: &[u32], block_size: u32) -> Vec<u128> {
    let mut parent = ns.root();
    tokens
        .chunks(block_size.max(1) as usize)
        .map(|c| {
            parent = block_key(parent, c);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(salt: Option<&str>) -> Namespace {
        Namespace {
            model: "llama".into(),
            layout_fingerprint: 7,
            salt: salt.map(Into::into),
        }
    }

    #[test]
    fn shared_prefixes_share_keys_and_chain() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999; // differs in block 1 (16..32)
        let ka = block_keys(&ns(None), &a, 16);
        let kb = block_keys(&ns(None), &b, 16);
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[0], kb[0]);
        assert_ne!(ka[1], kb[1]);
        // Chained: block 2 differs too although its tokens are equal.
        assert_ne!(ka[2], kb[2]);
        // The partial last block's key depends on its token count.
        let shorter = block_keys(&ns(None), &a[..39], 16);
        assert_eq!(shorter[..2], ka[..2]);
        assert_ne!(shorter[2], ka[2]);
    }

    #[test]
    fn namespace_separates() {
        let t: Vec<u32> = (0..16).collect();
        assert_ne!(
            block_keys(&ns(None), &t, 16),
            block_keys(&ns(Some("x")), &t, 16)
        );
        let mut other = ns(None);
        other.layout_fingerprint = 8;
        assert_ne!(block_keys(&ns(None), &t, 16), block_keys(&other, &t, 16));
    }
}
