//! cwm — Context Window Manager.
//!
//! A sidecar beside a vLLM server that freezes a conversation's KV cache into a durable,
//! checksummed block log under a name (a *window*) and thaws it back later.
//!
//! The layers, each using only those below it:
//!
//! | layer | modules |
//! | --- | --- |
//! | daemon | [`control`] (the Unix-socket server, its ops, metrics), [`session`] |
//! | data path | [`pipeline`] (freeze, thaw, [`Engine`]), [`tier`] (RAM tier), [`staging`] |
//! | engine memory | [`device`] (host and CUDA backends), [`layout`] (where a block's bytes are) |
//! | shared tier | [`remote`] (Redis Cluster: verified blocks, fenced manifests, leases) |
//! | durable log | [`store`] (records, manifests, commit, recovery, compaction), [`fsck`] |
//! | I/O | [`io`] (io_uring or pread/pwrite, O_DIRECT) |
//! | shared | [`error`] (wire codes), [`checksum`], [`keys`], [`log`], [`prng`], [`failpoint`], [`damage`] |
//!
//! Where a byte goes on freeze: the engine's KV memory ([`device`], placed by [`layout`]) →
//! [`pipeline`] (gather into staging, [`checksum`]) → [`store`] (block records, manifest,
//! commit) → [`io`] → the segment files; and back the same way on thaw. The command-line
//! tools (`cwm bench`, `gpu-check`, `torture`, `demo`) live in the binary and use this crate
//! like any other user.
//!
//! ```
//! use std::sync::Arc;
//! use cwm::layout::{Dtype, Layout};
//! use cwm::pipeline::synthetic::Synthetic;
//! use cwm::{freeze, thaw, FreezeOptions, FreezeRequest, PipelineConfig, Store, StoreConfig};
//! use cwm::{ThawOptions, ThawRequest};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let (store, _recovery) = Store::open(StoreConfig::new(dir.path()))?;
//! // A synthetic engine: 2 layers, 8 blocks of 16 tokens, 2 KV heads of 64, bf16.
//! let engine = Synthetic::new(Layout::flash_n2bhd(2, 8, 16, 2, 64, Dtype::Bf16), "demo", 1)?;
//! let cfg = PipelineConfig { staging_bytes: 1 << 20, ..Default::default() };
//! let tokens: Vec<u32> = (0..40).collect(); // 3 blocks
//! let report = freeze(
//!     &store,
//!     &engine.engine,
//!     FreezeRequest { window: "chat-1".into(), tokens, block_ids: vec![0, 1, 2], ..Default::default() },
//!     &cfg,
//!     &FreezeOptions::default(),
//! )?;
//! assert_eq!(report.info.num_blocks, 3);
//! // Later (after a restart, say): into other blocks of the engine.
//! let req = ThawRequest { window: "chat-1".into(), block_ids: vec![5, 6, 7], ..Default::default() };
//! let thawed = thaw(&store, &engine.engine, &req, &cfg, &ThawOptions::default())?;
//! assert_eq!(thawed.tokens_restored, 40);
//! assert_eq!(engine.block(0)?, engine.block(5)?);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]
#![deny(clippy::too_many_lines)]

pub mod checksum;
pub mod clock;
pub mod control;
pub mod damage;
pub(crate) mod decision;
pub mod device;
pub mod error;
pub mod failpoint;
pub mod fsck;
pub mod io;
pub mod keys;
pub mod layout;
pub mod log;
pub mod meminfo;
pub mod pipeline;
pub mod prng;
pub mod remote;
pub mod session;
pub mod staging;
pub mod store;
pub mod tier;

pub use control::{ServeConfig, Server};
pub use error::ErrorCode;
pub use pipeline::{
    freeze, thaw, Engine, FreezeOptions, FreezeReport, FreezeRequest, PipelineConfig,
    PipelineError, ThawOptions, ThawReport, ThawRequest,
};
pub use store::{Store, StoreConfig, StoreError};
