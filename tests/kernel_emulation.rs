//! The CUDA kernels of kernels/copy.cu, run on the CPU. kernels/emu/emu.cpp compiles the real
//! kernel source with the host C++ compiler under an emulation of the CUDA built-ins (every
//! CTA and thread in turn; the bulk-copy primitives emulated adversarially, see
//! kernels/emu/cuda_emu.h). A `KvMemory` launches it exactly as the CUDA backend does (the
//! same `gather_plan` / `scatter_plan`: piece table, permutation dims, path choice, launch
//! geometry), and every result is compared bit for bit with the host copy path: every layout,
//! every kernel entry point, grid caps and thread counts, layout upgrades (permutation),
//! misaligned buffers, pieces of every length around the bulk chunk size, out-of-range ids.
//! Mutants of the bulk kernel (a stage refilled before its store read it, a wrong barrier
//! parity) show that the emulation catches the ordering mistakes a GPU would only show as
//! rare corruption or a hang.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::kv::every_layout;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use common::kv::tensor_sizes;
use cwm::device::cuda::{gather_plan, scatter_plan, KernelPiece, LaunchPlan, ScatterPath};
use cwm::device::{gather, read_block, scatter, DeviceError, KvMemory, Region};
use cwm::layout::{Compat, CrossOrder, Dtype, Inner, Layout, Piece, PieceKind};

type LaunchFn = unsafe extern "C" fn(
    i32,
    u32,
    u32,
    *const KernelPiece,
    i32,
    *const u64,
    *const u64,
    i32,
    u64,
    i32,
    u64,
    u64,
) -> i32;

/// Which build of the kernels: the real one, or a mutant that must be caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Build {
    Real,
    /// `cwm_scatter_bulk` without its wait for the stores' reads before refilling a stage.
    NoWaitRead,
    /// `cwm_scatter_bulk` waiting on the wrong barrier parity.
    WrongParity,
    /// `cwm_scatter_bulk` storing a stage without waiting for its load.
    NoWait,
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Compiles (once per build) and loads the emulated kernels.
fn emulator(build: Build) -> LaunchFn {
    static BUILDS: Mutex<Option<HashMap<Build, usize>>> = Mutex::new(None);
    let mut g = BUILDS.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    if let Some(&f) = map.get(&build) {
        // SAFETY: the value was produced from a `LaunchFn` below.
        return unsafe { std::mem::transmute::<usize, LaunchFn>(f) };
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cwm-kernel-emu-{build:?}.so"));
    let mutant = match build {
        Build::Real => 0,
        Build::NoWaitRead => 1,
        Build::WrongParity => 2,
        Build::NoWait => 3,
    };
    // Built under a name of this process, then renamed: another test process never loads a
    // half-written library.
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let cxx = compiler();
    let res = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC"])
        .arg(format!("-DCWM_EMU_MUTANT={mutant}"))
        .arg("-o")
        .arg(&tmp)
        .arg(root.join("kernels/emu/emu.cpp"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the kernel emulation needs a C++ compiler ({cxx:?}: {e}); install g++ or set CXX"
            )
        });
    assert!(
        res.status.success(),
        "compiling kernels/emu/emu.cpp failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    std::fs::rename(&tmp, &out).unwrap();
    let path = std::ffi::CString::new(out.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of the library just built (its initialisers only set up statics); the
    // handle is never closed, so the symbol stays valid for the process.
    let f = unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!h.is_null(), "dlopen {out:?} failed");
        let sym = libc::dlsym(h, c"cwm_emu_launch".as_ptr());
        assert!(!sym.is_null(), "cwm_emu_launch missing");
        sym as usize
    };
    map.insert(build, f);
    // SAFETY: `cwm_emu_launch` has exactly the `LaunchFn` signature (kernels/emu/emu.cpp).
    unsafe { std::mem::transmute::<usize, LaunchFn>(f) }
}

/// The emulation's state is global: one launch at a time.
static LAUNCH: Mutex<()> = Mutex::new(());

/// Runs `plan` the way `Cuda::launch` does; returns the kernel's error word.
fn launch(
    build: Build,
    plan: &LaunchPlan,
    ids: &[u64],
    slots: &[u64],
    num_blocks: u64,
    geometry: (u32, u32),
) -> i32 {
    if plan.check(ids, slots).is_err() {
        return -1;
    }
    let f = emulator(build);
    let entry = match plan.path {
        ScatterPath::Kernel => 0,
        ScatterPath::L2Hint => 1,
        ScatterPath::Bulk => 2,
        ScatterPath::CopyEngine => panic!("the copy-engine path runs no kernel"),
    };
    let (grid, threads) = plan.geometry(ids.len(), geometry);
    let _g = LAUNCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: every piece, id and slot describes memory owned by the caller for the whole
    // call (tensors of an `EmuMemory`, payload slices), and the lengths match the slices.
    unsafe {
        f(
            entry,
            grid,
            threads,
            plan.pieces.as_ptr(),
            plan.pieces.len() as i32,
            ids.as_ptr(),
            slots.as_ptr(),
            ids.len() as i32,
            num_blocks,
            i32::from(plan.scatter),
            plan.dims.0,
            plan.dims.1,
        )
    }
}

/// KV tensors in host memory; with `kernel`, whole-block gathers and scatters run the
/// emulated kernels (like `CudaMemory`), without it the host copy path (the reference).
struct EmuMemory {
    tensors: Mutex<Vec<Vec<u128>>>,
    sizes: Vec<u64>,
    /// Bytes added to every tensor's base address (misalignment).
    skew: usize,
    kernel: Option<Kernel>,
    /// The path the last scatter took.
    taken: Mutex<Option<ScatterPath>>,
}

#[derive(Clone, Copy)]
struct Kernel {
    want: ScatterPath,
    geometry: (u32, u32),
    build: Build,
}

impl EmuMemory {
    fn new(layout: &Layout, skew: usize, kernel: Option<Kernel>, seed: u64) -> Self {
        let sizes = tensor_sizes(layout);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        // The same logical bytes whatever the skew.
        let tensors = sizes
            .iter()
            .map(|&s| {
                let mut v = vec![0u128; (s as usize + skew).div_ceil(16)];
                // SAFETY: the vector holds at least `skew + s` bytes.
                let b = unsafe {
                    std::slice::from_raw_parts_mut(
                        (v.as_mut_ptr() as *mut u8).add(skew),
                        s as usize,
                    )
                };
                for c in b.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
                }
                v
            })
            .collect();
        Self {
            tensors: Mutex::new(tensors),
            sizes,
            skew,
            kernel,
            taken: Mutex::new(None),
        }
    }

    fn ptrs(&self, t: &mut [Vec<u128>]) -> Vec<u64> {
        t.iter_mut()
            .map(|v| v.as_mut_ptr() as u64 + self.skew as u64)
            .collect()
    }

    /// Every tensor's bytes.
    fn bytes(&self) -> Vec<Vec<u8>> {
        let mut t = self.tensors.lock().unwrap();
        let ptrs = self.ptrs(&mut t);
        ptrs.iter()
            .zip(&self.sizes)
            .map(|(&p, &s)| {
                // SAFETY: each tensor holds `skew + size` bytes from its vector's start.
                unsafe { std::slice::from_raw_parts(p as *const u8, s as usize) }.to_vec()
            })
            .collect()
    }

    fn region_ptr(&self, ptrs: &[u64], r: &Region) -> Result<*mut u8, DeviceError> {
        let size = *self
            .sizes
            .get(r.tensor as usize)
            .ok_or_else(|| DeviceError::Validation("no such tensor".into()))?;
        if r.offset + r.len > size {
            return Err(DeviceError::Validation("region out of bounds".into()));
        }
        Ok((ptrs[r.tensor as usize] + r.offset) as *mut u8)
    }

    fn result(code: i32) -> Result<(), DeviceError> {
        match code {
            0 => Ok(()),
            1 => Err(DeviceError::Validation(
                "the kernel saw an out-of-range block id".into(),
            )),
            c => Err(DeviceError::Os(format!("kernel error word {c}"))),
        }
    }
}

impl KvMemory for EmuMemory {
    fn tensor_sizes(&self) -> Vec<u64> {
        self.sizes.clone()
    }

    fn read(&self, regions: &[Region], dst: &mut [&mut [u8]]) -> Result<(), DeviceError> {
        let mut t = self.tensors.lock().unwrap();
        let ptrs = self.ptrs(&mut t);
        for (r, d) in regions.iter().zip(dst.iter_mut()) {
            let p = self.region_ptr(&ptrs, r)?;
            // SAFETY: the region is inside its tensor (checked) and `d` has `r.len` bytes.
            d.copy_from_slice(unsafe { std::slice::from_raw_parts(p, r.len as usize) });
        }
        Ok(())
    }

    fn write(&self, regions: &[Region], src: &[&[u8]]) -> Result<(), DeviceError> {
        let mut t = self.tensors.lock().unwrap();
        let ptrs = self.ptrs(&mut t);
        for (r, s) in regions.iter().zip(src) {
            let p = self.region_ptr(&ptrs, r)?;
            // SAFETY: as in `read`; the tensors are locked.
            unsafe { std::slice::from_raw_parts_mut(p, r.len as usize) }.copy_from_slice(s);
        }
        Ok(())
    }

    fn gather_blocks(
        &self,
        layout: &Layout,
        ids: &[u64],
        payloads: &mut [&mut [u8]],
    ) -> Option<Result<(), DeviceError>> {
        let k = self.kernel?;
        let mut t = self.tensors.lock().unwrap();
        let plan = gather_plan(layout, &self.ptrs(&mut t));
        let slots: Vec<u64> = payloads.iter_mut().map(|p| p.as_mut_ptr() as u64).collect();
        Some(Self::result(launch(
            k.build,
            &plan,
            ids,
            &slots,
            layout.num_blocks,
            k.geometry,
        )))
    }

    fn scatter_blocks(
        &self,
        engine: &Layout,
        window: &Layout,
        compat: Compat,
        ids: &[u64],
        payloads: &[&[u8]],
    ) -> Option<Result<(), DeviceError>> {
        let k = self.kernel?;
        let mut t = self.tensors.lock().unwrap();
        let slots: Vec<u64> = payloads.iter().map(|p| p.as_ptr() as u64).collect();
        // The emulation has every kernel entry point, no copy engine.
        let plan = scatter_plan(
            engine,
            window,
            compat,
            &self.ptrs(&mut t),
            &slots,
            k.want,
            |p| p != ScatterPath::CopyEngine,
        );
        *self.taken.lock().unwrap() = Some(plan.path);
        Some(Self::result(launch(
            k.build,
            &plan,
            ids,
            &slots,
            engine.num_blocks,
            k.geometry,
        )))
    }
}

fn layouts(blocks: u64) -> Vec<Layout> {
    let mut v = every_layout(blocks);
    // Llama-3.1-8B's per-layer page (8 KV heads of 128, 16 tokens): 32 KiB pieces, four bulk
    // chunks each.
    v.push(Layout::flash_2nbhd(2, blocks, 16, 8, 128, Dtype::Bf16));
    v
}

/// Payload buffers for `n` blocks of `bb` bytes, each slot starting `skew` bytes past a
/// 16-byte boundary.
fn slots(n: usize, bb: usize, skew: usize) -> Vec<Vec<u128>> {
    (0..n)
        .map(|_| vec![0u128; (bb + skew).div_ceil(16)])
        .collect()
}

fn views(bufs: &mut [Vec<u128>], bb: usize, skew: usize) -> Vec<&mut [u8]> {
    bufs.iter_mut()
        .map(|v| {
            // SAFETY: each buffer holds at least `skew + bb` bytes; u8 has no alignment.
            unsafe { std::slice::from_raw_parts_mut((v.as_mut_ptr() as *mut u8).add(skew), bb) }
        })
        .collect()
}

struct Case {
    want: ScatterPath,
    geometry: (u32, u32),
    skew: usize,
    build: Build,
}

/// Gathers `from` and scatters into `to` through the emulated kernels and through the host
/// path; both must leave the same payloads and the same tensors. Returns the scatter path.
fn round_trip(engine: &Layout, window: &Layout, c: &Case, from: &[u64], to: &[u64]) -> ScatterPath {
    let what = format!(
        "{} <- {} {:?} {:?} skew {}",
        engine.name, window.name, c.want, c.geometry, c.skew
    );
    let compat = engine.compat(window).unwrap();
    let kernel = Kernel {
        want: c.want,
        geometry: c.geometry,
        build: c.build,
    };
    // The window's bytes come from a memory of the window's layout (its payload order).
    let src = EmuMemory::new(window, c.skew, Some(kernel), 7);
    let src_ref = EmuMemory::new(window, 0, None, 7);
    let bb = window.block_bytes() as usize;
    let mut a = slots(from.len(), bb, c.skew);
    let mut b = slots(from.len(), bb, 0);
    let mut pa = views(&mut a, bb, c.skew);
    let mut pb = views(&mut b, bb, 0);
    gather(window, &src, from, &mut pa, 1, None).expect(&what);
    gather(window, &src_ref, from, &mut pb, 1, None).unwrap();
    for ((x, y), id) in pa.iter().zip(&pb).zip(from) {
        assert!(x[..] == y[..], "{what}: gathered block {id} differs");
        assert!(
            x[..] == read_block(window, &src_ref, *id).unwrap()[..],
            "{what}"
        );
    }
    let dst = EmuMemory::new(engine, c.skew, Some(kernel), 99);
    let dst_ref = EmuMemory::new(engine, 0, None, 99);
    let sa: Vec<&[u8]> = pa.iter().map(|p| &p[..]).collect();
    let sb: Vec<&[u8]> = pb.iter().map(|p| &p[..]).collect();
    scatter(engine, window, compat, &dst, to, &sa, 1).expect(&what);
    scatter(engine, window, compat, &dst_ref, to, &sb, 1).unwrap();
    let (x, y) = (dst.bytes(), dst_ref.bytes());
    for (t, (x, y)) in x.iter().zip(&y).enumerate() {
        if x != y {
            let at = x.iter().zip(y).position(|(p, q)| p != q).unwrap();
            panic!("{what}: tensor {t} differs from the host path at byte {at}");
        }
    }
    let taken = *dst.taken.lock().unwrap();
    taken.expect("the scatter ran a kernel")
}

const FROM: [u64; 7] = [3, 17, 0, 31, 8, 9, 22];
const TO: [u64; 7] = [30, 1, 12, 5, 31, 0, 19];

#[test]
fn every_layout_and_entry_point_matches_the_host_path() {
    for layout in layouts(32) {
        for want in [ScatterPath::Kernel, ScatterPath::L2Hint, ScatterPath::Bulk] {
            for geometry in [(1, 32), (3, 64), (16, 512), (64, 1024)] {
                let c = Case {
                    want,
                    geometry,
                    skew: 0,
                    build: Build::Real,
                };
                let taken = round_trip(&layout, &layout, &c, &FROM, &TO);
                assert_eq!(
                    taken, want,
                    "{}: aligned buffers take the path asked for",
                    layout.name
                );
            }
        }
    }
}

#[test]
fn layout_upgrades_permute_like_the_host_path() {
    let d = Dtype::Bf16;
    let pairs = [
        (CrossOrder::Lbhnc, CrossOrder::Lbnhc),
        (CrossOrder::Lbnhc, CrossOrder::Blhnc),
        (CrossOrder::Blnhc, CrossOrder::Lbhnc),
    ];
    // 64-channel heads (16-byte rows: vector path) and 3-channel heads (6-byte rows: the
    // byte-by-byte path).
    for head in [64u32, 3] {
        for (e, w) in pairs {
            let engine = Layout::cross_layer(e, 2, 32, 16, 4, head, d);
            let window = Layout::cross_layer(w, 2, 32, 16, 4, head, d);
            assert_eq!(engine.compat(&window).unwrap(), Compat::Permute);
            for want in [ScatterPath::Kernel, ScatterPath::L2Hint, ScatterPath::Bulk] {
                let c = Case {
                    want,
                    geometry: (5, 128),
                    skew: 0,
                    build: Build::Real,
                };
                let taken = round_trip(&engine, &window, &c, &FROM, &TO);
                let expect = if want == ScatterPath::Bulk {
                    ScatterPath::Kernel // bulk copies cannot transpose
                } else {
                    want
                };
                assert_eq!(taken, expect, "{head} {e:?} <- {w:?}");
            }
        }
    }
}

#[test]
fn misaligned_buffers_take_the_byte_path_and_stay_exact() {
    for layout in layouts(32) {
        for skew in [4usize, 8] {
            for want in [ScatterPath::Kernel, ScatterPath::Bulk] {
                let c = Case {
                    want,
                    geometry: (16, 512),
                    skew,
                    build: Build::Real,
                };
                let taken = round_trip(&layout, &layout, &c, &FROM, &TO);
                assert_eq!(taken, ScatterPath::Kernel, "bulk needs 16-byte alignment");
            }
        }
    }
}

/// Opaque pages (vLLM's CPU layout) of awkward lengths: one byte, a vector, just under, at
/// and over one bulk chunk (8 KiB), several chunks plus a tail, and a length that is no
/// multiple of 16 (every piece of such a block then goes byte by byte).
#[test]
fn pieces_of_every_length_around_the_bulk_chunk() {
    for lens in [
        vec![16u64, 8176, 8192, 8208, 5 * 8192 + 48, 11 * 8192],
        vec![4096, 100, 1, 8192 * 2 + 16],
    ] {
        let mut pieces = Vec::new();
        let mut off = 0u64;
        let stride: u64 = lens.iter().map(|l| l.next_multiple_of(16)).sum();
        for (i, &len) in lens.iter().enumerate() {
            pieces.push(Piece {
                layer: i as u32,
                kind: PieceKind::Kv,
                tensor: 0,
                offset: off,
                block_stride: stride,
                len,
            });
            off += len.next_multiple_of(16);
        }
        let n = lens.len() as u32;
        let l = Layout::from_pieces(
            "opaque",
            n,
            32,
            16,
            1,
            8,
            Dtype::Bf16,
            Inner::Opaque,
            pieces,
        )
        .unwrap();
        let aligned = lens.iter().all(|l| l % 16 == 0);
        // Grids of 1 and 2 CTAs walk many chunks each: every stage is reused and the barrier
        // parity flips many times.
        for geometry in [(1, 32), (2, 32), (7, 256), (64, 512)] {
            for want in [ScatterPath::Kernel, ScatterPath::Bulk] {
                let c = Case {
                    want,
                    geometry,
                    skew: 0,
                    build: Build::Real,
                };
                let taken = round_trip(&l, &l, &c, &FROM, &TO);
                let expect = if aligned { want } else { ScatterPath::Kernel };
                assert_eq!(taken, expect, "{lens:?}");
            }
        }
    }
}

/// The kernels check ids themselves (the host checks before launch too): an out-of-range id
/// copies nothing and is reported; the other blocks are still copied.
#[test]
fn out_of_range_ids_are_reported_and_touch_nothing() {
    let l = Layout::flash_2nbhd(2, 16, 16, 8, 128, Dtype::Bf16);
    let bb = l.block_bytes() as usize;
    let ids = [2u64, 16, 5, u64::MAX];
    for want in [ScatterPath::Kernel, ScatterPath::L2Hint, ScatterPath::Bulk] {
        let mem = EmuMemory::new(&l, 0, None, 3);
        let before = mem.bytes();
        let mut t = mem.tensors.lock().unwrap();
        let ptrs = mem.ptrs(&mut t);
        drop(t);
        let mut bufs = slots(ids.len(), bb, 0);
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(0x0101_0101_0101_0101_0101_0101_0101_0101 * (i as u128 + 1));
        }
        let pay: Vec<u64> = bufs.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
        // Gather: the bad ids' slots keep their bytes.
        let g = gather_plan(&l, &ptrs);
        assert_eq!(
            launch(Build::Real, &g, &ids, &pay, l.num_blocks, (4, 128)),
            1
        );
        let v = views(&mut bufs, bb, 0);
        assert!(v[0][..] == read_block(&l, &mem, 2).unwrap()[..]);
        assert!(v[2][..] == read_block(&l, &mem, 5).unwrap()[..]);
        assert!(v[1].iter().all(|&x| x == 2) && v[3].iter().all(|&x| x == 4));
        // Scatter other bytes: only blocks 2 and 5 change.
        drop(v);
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(0x0101_0101_0101_0101_0101_0101_0101_0101 * (i as u128 + 7));
        }
        let v = views(&mut bufs, bb, 0);
        let s = scatter_plan(&l, &l, Compat::Same, &ptrs, &pay, want, |_| true);
        assert_eq!(s.path, want);
        assert_eq!(
            launch(Build::Real, &s, &ids, &pay, l.num_blocks, (4, 128)),
            1,
            "{want:?}"
        );
        let reference = EmuMemory::new(&l, 0, None, 3);
        scatter(
            &l,
            &l,
            Compat::Same,
            &reference,
            &[2, 5],
            &[&v[0][..], &v[2][..]],
            1,
        )
        .unwrap();
        assert!(
            mem.bytes() == reference.bytes(),
            "{want:?}: only valid ids are written"
        );
        assert!(mem.bytes() != before);
    }
}

/// What the kernel cannot check is refused before launch: a permuted piece that is not
/// outer × inner rows (its transpose would write past it), a slot count unlike the ids'.
#[test]
fn plans_the_kernel_would_overrun_are_refused() {
    let a = Layout::cross_layer(CrossOrder::Lbhnc, 2, 8, 16, 4, 64, Dtype::Bf16);
    let b = Layout::cross_layer(CrossOrder::Blnhc, 2, 8, 16, 4, 64, Dtype::Bf16);
    let mut plan = scatter_plan(
        &b,
        &a,
        Compat::Permute,
        &[0],
        &[0],
        ScatterPath::Kernel,
        |_| true,
    );
    assert!(plan.check(&[1], &[0]).is_ok());
    assert!(plan.check(&[1, 2], &[0]).is_err(), "one slot per id");
    plan.pieces[1].len -= plan.pieces[1].row;
    assert!(plan.check(&[1], &[0]).is_err(), "a row short");
    plan.pieces[1].len += plan.pieces[1].row;
    plan.pieces[1].row = 0;
    assert!(plan.check(&[1], &[0]).is_err(), "no row size");
}

/// The emulation is strict enough to catch the bulk kernel's ordering mistakes: without the
/// wait for its stores' reads it refills a stage still being read; with the wrong parity it
/// would wait for a phase that never completes (a hang on the GPU); without the wait for a
/// load it stores what shared memory held before the load arrived.
#[test]
fn mutant_bulk_kernels_are_caught() {
    let l = Layout::flash_2nbhd(2, 32, 16, 8, 128, Dtype::Bf16);
    for (build, fault) in [
        (Build::NoWaitRead, 101),
        (Build::WrongParity, 102),
        (Build::NoWait, 105),
    ] {
        let mem = EmuMemory::new(&l, 0, None, 3);
        let mut t = mem.tensors.lock().unwrap();
        let ptrs = mem.ptrs(&mut t);
        drop(t);
        let mut bufs = slots(FROM.len(), l.block_bytes() as usize, 0);
        let pay: Vec<u64> = bufs.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
        let s = scatter_plan(&l, &l, Compat::Same, &ptrs, &pay, ScatterPath::Bulk, |_| {
            true
        });
        assert_eq!(s.path, ScatterPath::Bulk);
        assert_eq!(
            launch(build, &s, &TO, &pay, l.num_blocks, (2, 32)),
            fault,
            "{build:?}"
        );
        assert_eq!(launch(Build::Real, &s, &TO, &pay, l.num_blocks, (2, 32)), 0);
    }
}
