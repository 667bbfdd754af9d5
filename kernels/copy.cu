// cwm gather/scatter kernel (compiled at run time with NVRTC; see src/device/cuda.rs).
//
// One work item = (block b, piece p). Gather copies piece p of engine block ids[b] from device
// memory into the staging slot of block b (mapped pinned host memory, zero-copy over PCIe);
// scatter copies it back into block ids[b], transposing [outer][inner][row] into
// [inner][outer][row] when the piece's `perm` is set (a layout upgrade, NHD <-> HND).
// CTAs walk work items in a grid-stride loop, threads walk 16-byte vectors (coalesced); any
// piece whose addresses, length or row are not multiples of 16 bytes is copied byte by byte.
// Every block id is checked against num_blocks: an out-of-range id copies nothing and sets
// *err (the host checks ids before launch too).

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

extern "C" __global__ void cwm_copy(const Piece* __restrict__ pieces, int npieces,
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
                    uint4 a = s[i], b = s[i + step], c = s[i + 2 * step], e = s[i + 3 * step];
                    d[i] = a;
                    d[i + step] = b;
                    d[i + 2 * step] = c;
                    d[i + 3 * step] = e;
                }
                for (; i < n; i += step) d[i] = s[i];
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
