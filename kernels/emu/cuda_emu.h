// CPU emulation of the CUDA built-ins kernels/copy.cu uses, so that the tests can run the real
// kernel source on a machine without a GPU (tests/kernel_emulation.rs compiles emu.cpp, which
// includes this file and ../copy.cu, with the host C++ compiler).
//
// A launch runs every CTA and, inside it, every thread one after another. That is exact for
// cwm_copy / cwm_copy_l2 (their threads share nothing), and for cwm_scatter_bulk (one thread
// per CTA works). The bulk-copy primitives are emulated adversarially, so that an ordering
// mistake in the kernel shows up as a fault instead of passing by luck:
//   - a load poisons its shared memory when issued and delivers its bytes only when the
//     kernel's wait on its barrier succeeds (the latest a consumer may rely on them);
//   - a store reads shared memory only when the kernel waits for its reads, and writes global
//     memory only when it waits for completion (the latest they may);
//   - a load into shared memory a pending store still reads or a pending load still fills, a
//     store from shared memory whose load was not waited for, a wait on a barrier phase that
//     no load will complete (a hang on the GPU), a CTA ending with loads or stores in flight,
//     and a bulk copy that is empty, over one chunk or not 16-byte aligned each set a fault
//     code that the launch returns.
// Only one launch may run at a time in a process (the state is global).

#include <cstdint>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct uint4 {
    unsigned x, y, z, w;
};

static uint3 threadIdx, blockIdx, blockDim, gridDim;

static inline int atomicExch(int* p, int v)
{
    int old = *p;
    *p = v;
    return old;
}

// Emulation faults (the launch returns 100 + the first one).
enum EmuFault {
    EMU_OK = 0,
    EMU_REFILL_BEFORE_READ = 1,  // a load into shared memory a pending copy still uses
    EMU_DEADLOCK = 2,            // waited on a barrier phase no issued load completes
    EMU_IN_FLIGHT_AT_EXIT = 3,   // a CTA ended before its loads were waited for or its
                                 // stores completed
    EMU_BAD_COPY = 4,            // an empty, over-long or misaligned bulk copy
    EMU_STORE_BEFORE_WAIT = 5,   // a store from shared memory its load has not delivered
};
static int emu_fault = EMU_OK;

static inline void emu_set_fault(int f)
{
    if (emu_fault == EMU_OK) emu_fault = f;
}

static inline bool emu_overlap(const unsigned char* a, unsigned an, const unsigned char* b,
                               unsigned bn)
{
    return a < b + bn && b < a + an;
}

static inline void emu_check_copy(unsigned long long global, const unsigned char* shared,
                                  unsigned n)
{
    if (n == 0 || n > 8192 || n % 16 || global % 16 || (unsigned long long)shared % 16)
        emu_set_fault(EMU_BAD_COPY);
}

struct EmuLoad {
    const unsigned long long* bar;
    unsigned char* buf;
    std::vector<unsigned char> bytes;  // what the load will deliver
};
static std::vector<EmuLoad> emu_loads;

struct EmuStore {
    unsigned long long dst;
    const unsigned char* buf;
    unsigned n;
    std::vector<unsigned char> read;  // the bytes, once read from shared memory
    bool has_read;
};
static std::vector<EmuStore> emu_stores;

#define CWM_BULK 1

static inline void bar_init(unsigned long long* bar)
{
    *bar = 0;  // completed phases
}

static inline void bulk_load(unsigned char* buf, unsigned long long* bar, unsigned long long src,
                             unsigned n)
{
    emu_check_copy(src, buf, n);
    for (const EmuStore& s : emu_stores)
        if (!s.has_read && emu_overlap(buf, n, s.buf, s.n)) emu_set_fault(EMU_REFILL_BEFORE_READ);
    for (const EmuLoad& l : emu_loads)
        if (emu_overlap(buf, n, l.buf, (unsigned)l.bytes.size()))
            emu_set_fault(EMU_REFILL_BEFORE_READ);
    const unsigned char* from = (const unsigned char*)src;
    emu_loads.push_back(EmuLoad{bar, buf, std::vector<unsigned char>(from, from + n)});
    std::memset(buf, 0xA5, n);  // not there until waited for
    *bar += 1;                  // one arrival with its bytes: the phase completes
}

static inline bool bar_try_wait(unsigned long long* bar, unsigned parity)
{
    // The phase with this parity has completed iff the current (incomplete) phase has the
    // other parity. Nothing completes later in the emulation, so a false answer would spin
    // forever: report it and let the kernel go on.
    if ((*bar & 1) == (parity & 1)) {
        emu_set_fault(EMU_DEADLOCK);
        return true;
    }
    for (size_t i = 0; i < emu_loads.size();) {
        if (emu_loads[i].bar == bar) {
            std::memcpy(emu_loads[i].buf, emu_loads[i].bytes.data(), emu_loads[i].bytes.size());
            emu_loads.erase(emu_loads.begin() + (long)i);
        } else {
            i++;
        }
    }
    return true;
}

static inline void bulk_store(unsigned long long dst, unsigned char* buf, unsigned n)
{
    emu_check_copy(dst, buf, n);
    for (const EmuLoad& l : emu_loads)
        if (emu_overlap(buf, n, l.buf, (unsigned)l.bytes.size()))
            emu_set_fault(EMU_STORE_BEFORE_WAIT);
    emu_stores.push_back(EmuStore{dst, buf, n, {}, false});
}
static inline void bulk_wait_read()
{
    for (EmuStore& s : emu_stores)
        if (!s.has_read) {
            s.read.assign(s.buf, s.buf + s.n);
            s.has_read = true;
        }
}

static inline void bulk_wait_all()
{
    bulk_wait_read();
    for (EmuStore& s : emu_stores) std::memcpy((void*)s.dst, s.read.data(), s.n);
    emu_stores.clear();
}
