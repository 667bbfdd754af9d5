//! Tools built on the library: benchmarks, the GPU check, crash torture, plots and the demo.

pub(crate) mod bench;
pub(crate) mod demo;
pub(crate) mod gpucheck;
pub(crate) mod plot;
pub(crate) mod remote_bench;
pub(crate) mod torture;
pub(crate) mod trace;
