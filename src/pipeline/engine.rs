//! An engine's registered KV cache: its layout, its memory, its key namespace and its
//! staging pool.

use std::sync::Arc;

use super::{memory_available, PipelineConfig, PipelineError};
use crate::device::KvMemory;
use crate::io::IoEngine;
use crate::keys::{block_keys, Namespace};
use crate::layout::Layout;
use crate::staging::StagingPool;
use crate::store::format::record_len;

/// An engine's registered KV cache.
pub struct Engine {
    /// Its layout.
    pub layout: Layout,
    /// Its memory.
    pub mem: Arc<dyn KvMemory>,
    /// Model id (part of the key namespace).
    pub model: String,
    /// Optional cache salt.
    pub salt: Option<String>,
    staging: std::sync::OnceLock<Arc<StagingPool>>,
    staging_mapped: std::sync::atomic::AtomicBool,
}

impl Engine {
    /// Registers a KV cache: the layout is checked against the memory's tensor sizes.
    pub fn new(
        layout: Layout,
        mem: Arc<dyn KvMemory>,
        model: impl Into<String>,
        salt: Option<String>,
    ) -> Result<Self, PipelineError> {
        layout.validate(&mem.tensor_sizes())?;
        Ok(Self {
            layout,
            mem,
            model: model.into(),
            salt,
            staging: std::sync::OnceLock::new(),
            staging_mapped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The namespace of this engine's keys.
    #[must_use]
    pub fn namespace(&self) -> Namespace {
        self.namespace_with(None, &self.layout)
    }

    /// The namespace of a request's keys: the engine's, with the request's own salt (a LoRA
    /// adapter, a tenant's cache salt, multimodal inputs: whatever makes the same tokens'
    /// KV differ) and the given layout's fingerprint.
    #[must_use]
    pub fn namespace_with(&self, salt: Option<&str>, layout: &Layout) -> Namespace {
        Namespace {
            model: self.model.clone(),
            layout_fingerprint: layout.fingerprint(),
            salt: match (self.salt.as_deref(), salt) {
                (e, None) => e.map(str::to_string),
                (e, Some(r)) => Some(format!("{}#req:{r}", e.unwrap_or_default())),
            },
        }
    }

    /// The engine's staging pool, if a freeze or thaw has allocated it.
    #[must_use]
    pub fn staging(&self) -> Option<&Arc<StagingPool>> {
        self.staging.get()
    }

    /// Allocates (and maps into the device) the staging pool now, so the first freeze or thaw
    /// does not pay for it; a daemon calls this when an engine registers.
    pub fn prepare_staging(
        &self,
        cfg: &PipelineConfig,
        io: &dyn IoEngine,
    ) -> Result<(), PipelineError> {
        self.staging_pool(cfg, io).map(|_| ())
    }

    /// Whether `pool` is the staging pool this engine would allocate under `cfg`.
    #[must_use]
    pub fn fits_staging(&self, pool: &StagingPool, cfg: &PipelineConfig) -> bool {
        pool.is_sized_for(
            cfg.staging_bytes,
            record_len(self.layout.block_bytes()) as usize,
        )
    }

    /// Takes `pool` (an idle pool an engine that went away left behind, one that
    /// [`Engine::fits_staging`]) as this engine's staging, instead of allocating and pinning
    /// a new one: false when this engine has one already.
    pub fn adopt_staging(&self, pool: Arc<StagingPool>) -> bool {
        self.install_staging(pool).1
    }

    /// Makes `pool` this engine's staging unless it has one already (then that one is
    /// returned, and false), mapping it into the KV memory's device.
    fn install_staging(&self, pool: Arc<StagingPool>) -> (&Arc<StagingPool>, bool) {
        let mut won = false;
        let pool = self.staging.get_or_init(|| {
            won = true;
            pool
        });
        if won
            && self
                .mem
                .register_staging(pool.region_ptr(), pool.bytes() as usize)
        {
            self.staging_mapped
                .store(true, std::sync::atomic::Ordering::SeqCst);
            crate::log::info(&format!(
                "staging pool of {} MiB registered with the KV memory's device",
                pool.bytes() >> 20
            ));
        }
        (pool, won)
    }

    /// The staging pool, allocated on first use (`bytes`, slots of one block record image)
    /// and registered with `io` as fixed buffers.
    pub(super) fn staging_pool(
        &self,
        cfg: &PipelineConfig,
        io: &dyn IoEngine,
    ) -> Result<&Arc<StagingPool>, PipelineError> {
        let bytes = cfg.staging_bytes;
        if let Some(p) = self.staging.get() {
            return Ok(p);
        }
        let slot = record_len(self.layout.block_bytes()) as usize;
        let pool = StagingPool::new(bytes, slot, cfg.fixed_buffers.then_some(io)).ok_or(
            PipelineError::InsufficientMemory {
                needed: bytes,
                available: memory_available(),
            },
        )?;
        Ok(self.install_staging(pool).0)
    }

    /// Keys of a token sequence in this engine's namespace.
    #[must_use]
    pub fn keys(&self, tokens: &[u32]) -> Vec<u128> {
        self.keys_with(tokens, None)
    }

    /// Keys of a token sequence in a request's namespace ([`Engine::namespace_with`]).
    #[must_use]
    pub fn keys_with(&self, tokens: &[u32], salt: Option<&str>) -> Vec<u128> {
        block_keys(
            &self.namespace_with(salt, &self.layout),
            tokens,
            self.layout.block_size,
        )
    }
}
