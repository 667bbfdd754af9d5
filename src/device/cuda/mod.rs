//! The CUDA backend: a KV cache in another process's GPU memory, imported with CUDA IPC
//! (`cuIpcOpenMemHandle` on the allocation base, plus an offset per tensor), gathered and
//! scattered by the kernel in `kernels/copy.cu` straight between GPU memory and the staging
//! pool, which is page-locked and mapped into the device (`cuMemHostRegister`, zero-copy over
//! PCIe). libcuda and libnvrtc are loaded at run time: without libcuda the backend reports
//! itself unavailable with one message; without libnvrtc it falls back to copy-engine
//! `cuMemcpy` per piece (correct, slower).
//!
//! Map (every public item is re-exported here, so paths stay `device::cuda::X`):
//!
//! - `plan`: pure-CPU launch planning: [`ScatterPath`], [`KernelPiece`], [`LaunchPlan`],
//!   [`gather_plan`], [`scatter_plan`], the piece table and launch geometry. No CUDA calls;
//!   tests/kernel_emulation.rs runs these plans on the CPU.
//! - `kernels`: the kernel source ([`KERNEL_SOURCE`]) and nvcc fatbin, NVRTC compilation
//!   ([`compile_cubin`]) and loading a module's entry points.
//! - `context`: [`Cuda`], the device context with its stream, loaded kernels and argument
//!   buffer; kernel launches and copy-engine batch copies; [`available`].
//! - `memory`: [`CudaMemory`] (IPC tensor import, [`IpcTensor`]), page-locked host regions
//!   mapped into the device, and the [`KvMemory`](crate::device::KvMemory) implementation.

mod context;
mod kernels;
mod memory;
mod plan;

pub use context::{available, has_batch_copy, unavailable_reason, Cuda};
pub use kernels::{compile_cubin, KERNEL_FATBIN, KERNEL_SOURCE};
pub use memory::{CudaMemory, IpcTensor};
pub use plan::{
    gather_plan, launch_geometry, perm_dims, piece_table, scatter_plan, KernelPiece, LaunchPlan,
    ScatterPath, DEFAULT_GRID, THREADS,
};

#[cfg(test)]
mod tests {
    use cudarc::driver::sys as cu;

    use super::context::check;
    use super::*;
    use crate::device::KvMemory;
    use crate::layout::{Compat, Dtype, Layout};

    /// Runs with `--ignored` on a machine with a GPU; shown as ignored everywhere else (the
    /// cross-process checks live in scripts/gpu-check.sh).
    #[test]
    #[ignore = "needs a GPU: run with --ignored there; scripts/gpu-check.sh covers IPC and layouts"]
    fn kernels_bit_exact_on_a_gpu() {
        use crate::device::{gather, read_block, scatter};
        let cuda = Cuda::new(0).expect("a GPU");
        assert!(cuda.has_kernel(), "{:?}", cuda.kernel_error);
        let l = Layout::flash_2nbhd(2, 32, 16, 2, 64, Dtype::Bf16);
        let size = 2 * 32 * 4096u64;
        let mut ptrs = Vec::new();
        for t in 0..2u64 {
            let mut d: cu::CUdeviceptr = 0;
            let mut host = vec![0u8; size as usize];
            crate::prng::fill_random(&mut host, 7 + t);
            // SAFETY: allocation and a copy of `size` bytes into it.
            unsafe {
                let _g = cuda.lock().expect("ctx");
                check("alloc", cu::cuMemAlloc_v2(&mut d, size as usize)).expect("alloc");
                check(
                    "copy",
                    cu::cuMemcpyHtoD_v2(d, host.as_ptr().cast(), size as usize),
                )
                .expect("copy");
            }
            ptrs.push((d, size));
        }
        let mem = CudaMemory::from_device_ptrs(cuda, &ptrs);
        let pool = crate::staging::StagingPool::new(8 << 20, 4096 + l.block_bytes() as usize, None)
            .expect("pool");
        assert!(mem.register_staging(pool.region_ptr(), pool.bytes() as usize));
        let want: Vec<Vec<u8>> = [3u64, 9, 20]
            .iter()
            .map(|&b| read_block(&l, &mem, b).expect("read"))
            .collect();
        let mut set = pool.take(3);
        let mut slots = set.slices();
        let mut pls: Vec<&mut [u8]> = slots
            .iter_mut()
            .map(|s| &mut s[4096..4096 + l.block_bytes() as usize])
            .collect();
        gather(&l, &mem, &[3, 9, 20], &mut pls, 1, None).expect("gather");
        for (p, w) in pls.iter().zip(&want) {
            assert_eq!(&p[..], &w[..]);
        }
        let srcs: Vec<&[u8]> = pls.iter().map(|p| &p[..]).collect();
        scatter(&l, &l, Compat::Same, &mem, &[30, 0, 12], &srcs, 1).expect("scatter");
        for (b, w) in [30u64, 0, 12].iter().zip(&want) {
            assert_eq!(&read_block(&l, &mem, *b).expect("read")[..], &w[..]);
        }
        assert!(gather(&l, &mem, &[32], &mut pls[..1], 1, None).is_err());
    }
}
