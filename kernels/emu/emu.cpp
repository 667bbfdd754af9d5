// The kernels of ../copy.cu built for the CPU (see cuda_emu.h), behind one C entry point.
#include "cuda_emu.h"

// Mutants the tests must catch (CWM_EMU_MUTANT): 1 drops the wait for the stores' reads
// before a stage is refilled, 2 waits on the other barrier parity, 3 stores a stage without
// waiting for its load.
#if defined(CWM_EMU_MUTANT) && CWM_EMU_MUTANT == 1
#define bulk_wait_read() ((void)0)
#elif defined(CWM_EMU_MUTANT) && CWM_EMU_MUTANT == 2
static inline bool emu_wrong_parity(unsigned long long* bar, unsigned parity)
{
    return bar_try_wait(bar, parity ^ 1u);
}
#define bar_try_wait emu_wrong_parity
#elif defined(CWM_EMU_MUTANT) && CWM_EMU_MUTANT == 3
#define bar_try_wait(bar, parity) ((void)(bar), (void)(parity), true)
#endif

#include "../copy.cu"

// Runs kernel `entry` (0 cwm_copy, 1 cwm_copy_l2, 2 cwm_scatter_bulk) on a grid of `grid`
// CTAs of `threads` threads with the kernel's own parameters. Returns the kernel's *err
// (0 ok, 1 out-of-range id, 2 bulk not compiled) or 100 + an emulation fault.
extern "C" int cwm_emu_launch(int entry, unsigned grid, unsigned threads, const Piece* pieces,
                              int npieces, const u64* ids, const u64* slots, int nblocks,
                              u64 num_blocks, int scatter, u64 outer, u64 inner)
{
    int err = 0;
    emu_fault = EMU_OK;
    emu_stores.clear();
    emu_loads.clear();
    gridDim = {grid, 1, 1};
    blockDim = {threads, 1, 1};
    for (unsigned b = 0; b < grid; b++) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < threads; t++) {
            threadIdx = {t, 0, 0};
            switch (entry) {
            case 0:
                cwm_copy(pieces, npieces, ids, slots, nblocks, num_blocks, scatter, outer, inner,
                         &err);
                break;
            case 1:
                cwm_copy_l2(pieces, npieces, ids, slots, nblocks, num_blocks, scatter, outer,
                            inner, &err);
                break;
            default:
                cwm_scatter_bulk(pieces, npieces, ids, slots, nblocks, num_blocks, scatter,
                                 outer, inner, &err);
                break;
            }
        }
        if (!emu_stores.empty() || !emu_loads.empty()) {
            emu_set_fault(EMU_IN_FLIGHT_AT_EXIT);
            emu_stores.clear();
            emu_loads.clear();
        }
    }
    return emu_fault != EMU_OK ? 100 + emu_fault : err;
}
