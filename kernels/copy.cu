// cwm gather/scatter kernel (compiled at run time with NVRTC; see src/device/cuda/kernels.rs).
//
// One work item = (block b, piece p). Gather copies piece p of engine block ids[b] from device
// memory into the staging slot of block b (mapped pinned host memory, zero-copy over PCIe);
// scatter copies it back into block ids[b], transposing [outer][inner][row] into
// [inner][outer][row] when the piece's `perm` is set (a layout upgrade, NHD <-> HND).
// CTAs walk work items in a grid-stride loop, threads walk 16-byte vectors (coalesced); any
// piece whose addresses, length or row are not multiples of 16 bytes is copied byte by byte.
// Every block id is checked against num_blocks: an out-of-range id copies nothing and sets
// *err (the host checks ids before launch too).
//
// Three entry points share one parameter list (the host picks one per scatter, CWM_SCATTER):
//   cwm_copy          the kernel above (gather and scatter);
//   cwm_copy_l2       the same, its 16-byte loads asking L2 for 256-byte prefetches
//                     (ld.global.nc.L2::256B): fewer, larger PCIe reads of mapped host memory;
//   cwm_scatter_bulk  sm_90+: one thread per CTA streams each piece host -> shared memory ->
//                     device with bulk-async copies (cp.async.bulk, the TMA engine), five
//                     8 KiB stages in flight (40 KiB of the 48 KiB static shared memory
//                     allows); no GPU memory beyond the CTA's shared memory.
//                     Scatter only, no permutation, 16-byte-aligned pieces (the host checks).

typedef unsigned long long u64;

struct Piece {
    u64 base;    // device address of block 0's piece
    u64 stride;  // bytes between consecutive blocks' pieces
    u64 len;     // bytes of the piece
    u64 off;     // offset of the piece inside a block's payload
    u64 row;     // bytes of one (head, token) row, for permutation
    int perm;    // transpose on scatter
    int pad;
};

template <int HINT>
__device__ __forceinline__ uint4 ld16(const uint4* p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (HINT) {
        uint4 v;
        asm volatile("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
        return v;
    }
#endif
    return *p;
}

template <int HINT>
__device__ __forceinline__ void copy_body(const Piece* __restrict__ pieces, int npieces,
                                          const u64* __restrict__ ids,
                                          const u64* __restrict__ slots, int nblocks,
                                          u64 num_blocks, int scatter, u64 outer, u64 inner,
                                          int* err)
{
    long long items = (long long)nblocks * (long long)npieces;
    for (long long it = blockIdx.x; it < items; it += gridDim.x) {
        int b = (int)(it / npieces);
        int p = (int)(it % npieces);
        u64 id = ids[b];
        if (id >= num_blocks) {
            if (threadIdx.x == 0) atomicExch(err, 1);
            continue;
        }
        Piece pc = pieces[p];
        unsigned char* dev = (unsigned char*)(pc.base + id * pc.stride);
        unsigned char* host = (unsigned char*)(slots[b] + pc.off);
        const unsigned char* src = scatter ? host : dev;
        unsigned char* dst = scatter ? dev : host;
        u64 len = pc.len;
        bool perm = scatter && pc.perm;
        u64 mis = ((u64)src) | ((u64)dst) | len | (perm ? pc.row : 0);
        if ((mis & 15) == 0) {
            const uint4* s = (const uint4*)src;
            uint4* d = (uint4*)dst;
            u64 n = len / 16;
            if (!perm) {
                // Four independent 16-byte loads in flight per thread before any store:
                // reads across PCIe (scatter) are latency-bound.
                u64 step = blockDim.x;
                u64 i = threadIdx.x;
                for (; i + 3 * step < n; i += 4 * step) {
                    uint4 a = ld16<HINT>(s + i), b = ld16<HINT>(s + i + step),
                          c = ld16<HINT>(s + i + 2 * step), e = ld16<HINT>(s + i + 3 * step);
                    d[i] = a;
                    d[i + step] = b;
                    d[i + 2 * step] = c;
                    d[i + 3 * step] = e;
                }
                for (; i < n; i += step) d[i] = ld16<HINT>(s + i);
            } else {
                u64 rv = pc.row / 16;
                for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
                    u64 r = i / rv, w = i % rv;
                    u64 o = r / inner, in = r % inner;
                    d[(in * outer + o) * rv + w] = s[i];
                }
            }
        } else {
            for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
                u64 j = i;
                if (perm) {
                    u64 r = i / pc.row, w = i % pc.row;
                    u64 o = r / inner, in = r % inner;
                    j = (in * outer + o) * pc.row + w;
                }
                dst[j] = src[i];
            }
        }
    }
}

#define CWM_PARAMS                                                                        \
    const Piece *__restrict__ pieces, int npieces, const u64 *__restrict__ ids,           \
        const u64 *__restrict__ slots, int nblocks, u64 num_blocks, int scatter, u64 outer, \
        u64 inner, int *err

extern "C" __global__ void cwm_copy(CWM_PARAMS)
{
    copy_body<0>(pieces, npieces, ids, slots, nblocks, num_blocks, scatter, outer, inner, err);
}

extern "C" __global__ void cwm_copy_l2(CWM_PARAMS)
{
    copy_body<1>(pieces, npieces, ids, slots, nblocks, num_blocks, scatter, outer, inner, err);
}

#define BULK_CHUNK 8192
#define BULK_STAGES 5

// Walks this CTA's (block, piece) items in grid-stride order, BULK_CHUNK bytes at a time;
// flags out-of-range ids in *err when err is not null.
struct Cursor {
    long long it;
    u64 off;
};

__device__ __forceinline__ bool next_chunk(Cursor& c, const Piece* __restrict__ pieces,
                                           int npieces, const u64* __restrict__ ids,
                                           const u64* __restrict__ slots, long long items,
                                           u64 num_blocks, int* err, u64& src, u64& dst,
                                           unsigned& n)
{
    while (c.it < items) {
        int b = (int)(c.it / npieces);
        int p = (int)(c.it % npieces);
        u64 id = ids[b];
        if (id >= num_blocks) {
            if (err) atomicExch(err, 1);
        } else {
            Piece pc = pieces[p];
            if (c.off < pc.len) {
                u64 left = pc.len - c.off;
                n = (unsigned)(left < BULK_CHUNK ? left : BULK_CHUNK);
                src = slots[b] + pc.off + c.off;
                dst = pc.base + id * pc.stride + c.off;
                c.off += n;
                return true;
            }
        }
        c.it += gridDim.x;
        c.off = 0;
    }
    return false;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CWM_BULK 1
// The bulk-copy primitives the kernel below is written in (kernels/emu/cuda_emu.h gives the
// CPU emulation the tests run them under, with the same contracts).

__device__ __forceinline__ unsigned smem(const void* p)
{
    return (unsigned)__cvta_generic_to_shared(p);
}

// Arms barrier `bar` for one arrival; the initialisation is made visible to the bulk-copy
// (async) proxy.
__device__ __forceinline__ void bar_init(u64* bar)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Starts a bulk-async copy of `n` bytes from global `src` into shared `buf`; barrier `bar`
// completes its current phase when they have arrived.
__device__ __forceinline__ void bulk_load(unsigned char* buf, u64* bar, u64 src, unsigned n)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(bar)),
                 "r"(n)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(smem(buf)), "l"(src), "r"(n), "r"(smem(bar))
        : "memory");
}

// True once the phase of `bar` with this parity has completed.
__device__ __forceinline__ bool bar_try_wait(u64* bar, unsigned parity)
{
    unsigned ready;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(ready)
        : "r"(smem(bar)), "r"(parity)
        : "memory");
    return ready != 0;
}

// Starts a bulk-async copy of `n` bytes from shared `buf` to global `dst` (its own group).
__device__ __forceinline__ void bulk_store(u64 dst, unsigned char* buf, unsigned n)
{
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
                 "r"(smem(buf)), "r"(n)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Waits until every store started so far has read its shared memory.
__device__ __forceinline__ void bulk_wait_read()
{
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// Waits until every store started so far is complete in global memory.
__device__ __forceinline__ void bulk_wait_all()
{
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
#endif

extern "C" __global__ void cwm_scatter_bulk(CWM_PARAMS)
{
#if defined(CWM_BULK)
    __shared__ __align__(128) unsigned char buf[BULK_STAGES][BULK_CHUNK];
    __shared__ __align__(8) u64 bar[BULK_STAGES];
    if (threadIdx.x != 0) return;
    const long long items = (long long)nblocks * (long long)npieces;
    for (int k = 0; k < BULK_STAGES; k++) bar_init(&bar[k]);
    Cursor ld = {(long long)blockIdx.x, 0}, st = ld;
    u64 src, dst;
    unsigned n;
    long long issued = 0, done = 0;
    // Loads are issued BULK_STAGES ahead of the stores.
    while (issued < BULK_STAGES &&
           next_chunk(ld, pieces, npieces, ids, slots, items, num_blocks, err, src, dst, n)) {
        int k = (int)(issued % BULK_STAGES);
        bulk_load(buf[k], &bar[k], src, n);
        issued++;
    }
    // The store cursor walks the same chunks; the load cursor already flagged bad ids.
    while (next_chunk(st, pieces, npieces, ids, slots, items, num_blocks, nullptr, src, dst,
                      n)) {
        int k = (int)(done % BULK_STAGES);
        unsigned parity = (unsigned)((done / BULK_STAGES) & 1);
        while (!bar_try_wait(&bar[k], parity)) {
        }
        bulk_store(dst, buf[k], n);
        done++;
        u64 lsrc, ldst;
        unsigned ln;
        if (next_chunk(ld, pieces, npieces, ids, slots, items, num_blocks, err, lsrc, ldst,
                       ln)) {
            // Stage k is refilled once the store just issued has read it.
            bulk_wait_read();
            bulk_load(buf[k], &bar[k], lsrc, ln);
            issued++;
        }
    }
    // Every store complete (not only read from shared memory) before the CTA ends.
    bulk_wait_all();
#else
    // Compiled for an architecture without bulk copies: copy nothing, and say so (*err = 2),
    // so that a launch of this build can never pass for a scatter.
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicExch(err, 2);
#endif
}
