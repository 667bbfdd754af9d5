//! cwm — Context Window Manager.
//!
//! A sidecar beside a vLLM server that freezes a conversation's KV cache into a durable,
//! checksummed block log under a name (a *window*) and thaws it back later.
//!
//! Where a byte goes: `device` (the engine's KV cache) → `pipeline` (gather, checksum) →
//! [`store`] (records, manifests, commit protocol) → [`io`] (io_uring or pread/pwrite, O_DIRECT)
//! → the segment files; and back the same way on thaw.

pub mod bench;
pub mod checksum;
pub mod clock;
pub mod control;
pub mod damage;
pub mod decision;
pub mod device;
pub mod failpoint;
pub mod fsck;
pub mod gpucheck;
pub mod io;
pub mod keys;
pub mod layout;
pub mod log;
pub mod pipeline;
pub mod prng;
pub mod session;
pub mod staging;
pub mod store;
pub mod tier;
pub mod torture;
