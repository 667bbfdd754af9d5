//! The copy kernels: the CUDA C source of `kernels/copy.cu` (embedded), the nvcc fatbin when
//! the build had nvcc, NVRTC compilation, and loading a module's entry points.

use std::ffi::{c_void, CString};

use cudarc::driver::sys as cu;

/// The kernel source, embedded for NVRTC.
pub const KERNEL_SOURCE: &str = include_str!("../../../kernels/copy.cu");

/// The kernel compiled by nvcc at build time (sm_80, sm_90, compute_90 PTX), when nvcc was
/// there; otherwise NVRTC compiles [`KERNEL_SOURCE`] at first use.
#[cfg(cwm_fatbin)]
pub const KERNEL_FATBIN: Option<&[u8]> =
    Some(include_bytes!(concat!(env!("OUT_DIR"), "/copy.fatbin")));
/// The kernel compiled by nvcc at build time; `None`: this build had no nvcc.
#[cfg(not(cwm_fatbin))]
pub const KERNEL_FATBIN: Option<&[u8]> = None;

/// The module's entry points (`None`: not in this build or not for this GPU).
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    /// The loaded module (unloaded when the context drops).
    pub(super) module: cu::CUmodule,
    /// `cwm_copy`, always present.
    pub(super) copy: cu::CUfunction,
    /// `cwm_copy_l2`.
    pub(super) l2: Option<cu::CUfunction>,
    /// `cwm_scatter_bulk`, only where compiled for sm_90 or newer.
    pub(super) bulk: Option<cu::CUfunction>,
}

/// Loads the kernels: the nvcc fatbin when this build has one, else NVRTC's PTX for this
/// GPU's architecture (so sm_90 code such as the bulk scatter is compiled in), else PTX
/// for NVRTC's default architecture.
pub(super) fn load_kernel(cc: (i32, i32)) -> Result<Kernels, String> {
    if let Some(fatbin) = KERNEL_FATBIN {
        // The driver expects an 8-byte-aligned image; include_bytes! guarantees 1.
        let mut aligned = vec![0u64; fatbin.len().div_ceil(8)];
        for (i, b) in fatbin.iter().enumerate() {
            aligned[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        // The fatbin holds sm_90 code, which an sm_90+ GPU runs.
        match module_kernels(aligned.as_ptr().cast(), cc.0 >= 9) {
            Ok(k) => return Ok(k),
            Err(e) => crate::log::warn(&format!(
                "embedded kernel fatbin did not load on this GPU ({e}); trying NVRTC"
            )),
        }
    }
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc could not be loaded".into());
    }
    // The GPU's own architecture, or the newest one NVRTC knows below it (a GPU newer
    // than this NVRTC); NVRTC's default when it cannot say.
    let want = cc.0 * 10 + cc.1;
    let arch = nvrtc_archs()
        .into_iter()
        .filter(|&a| a <= want)
        .max()
        .or((want > 0).then_some(want));
    let ptx = match arch {
        Some(a) => cudarc::nvrtc::compile_ptx_with_opts(
            KERNEL_SOURCE,
            cudarc::nvrtc::CompileOptions {
                options: vec![format!("--gpu-architecture=compute_{a}")],
                ..Default::default()
            },
        ),
        None => cudarc::nvrtc::compile_ptx(KERNEL_SOURCE),
    }
    .map_err(|e| format!("NVRTC ({arch:?}): {e:?}"))?;
    let src = CString::new(ptx.to_src()).map_err(|e| e.to_string())?;
    // The bulk kernel has a body only when compiled for sm_90 or newer.
    module_kernels(src.as_ptr().cast(), arch.is_some_and(|a| a >= 90))
}

/// Loads a module image (fatbin or NUL-terminated PTX) and looks its entry points up.
fn module_kernels(image: *const c_void, bulk: bool) -> Result<Kernels, String> {
    let mut module: cu::CUmodule = std::ptr::null_mut();
    // SAFETY: `image` is a fatbin or NUL-terminated PTX image that outlives the call;
    // out-pointers are valid.
    let r = unsafe { cu::cuModuleLoadData(&mut module, image) };
    if r != cu::CUresult::CUDA_SUCCESS {
        return Err(format!("cuModuleLoadData: {r:?}"));
    }
    let get = |name: &std::ffi::CStr| -> Option<cu::CUfunction> {
        let mut f: cu::CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module, a NUL-terminated name, a valid out-pointer.
        let r = unsafe { cu::cuModuleGetFunction(&mut f, module, name.as_ptr()) };
        (r == cu::CUresult::CUDA_SUCCESS).then_some(f)
    };
    let Some(copy) = get(c"cwm_copy") else {
        // SAFETY: the module loaded above; nothing of it is in use.
        unsafe {
            let _ = cu::cuModuleUnload(module);
        }
        return Err("cuModuleGetFunction(cwm_copy) failed".into());
    };
    Ok(Kernels {
        module,
        copy,
        l2: get(c"cwm_copy_l2"),
        // Only where it was compiled for sm_90 or newer (elsewhere its body says so).
        bulk: bulk.then(|| get(c"cwm_scatter_bulk")).flatten(),
    })
}

/// The virtual architectures this NVRTC compiles for, as 10 × major + minor (empty when it
/// cannot say).
fn nvrtc_archs() -> Vec<i32> {
    use cudarc::nvrtc::sys as rt;
    let mut n: i32 = 0;
    // SAFETY: plain NVRTC queries with valid out-pointers; the list is sized by the count.
    unsafe {
        if !rt::is_culib_present()
            || rt::nvrtcGetNumSupportedArchs(&mut n) != rt::nvrtcResult::NVRTC_SUCCESS
            || n <= 0
        {
            return Vec::new();
        }
        let mut v = vec![0i32; n as usize];
        if rt::nvrtcGetSupportedArchs(v.as_mut_ptr()) != rt::nvrtcResult::NVRTC_SUCCESS {
            return Vec::new();
        }
        v
    }
}

/// Compiles CUDA C `src` with NVRTC into a CUBIN for `arch` (e.g. `sm_90`), which also runs
/// ptxas over the result (inline PTX included). Needs libnvrtc only — no GPU, no driver — so
/// the CPU test suite checks that every kernel compiles for every architecture cwm targets.
pub fn compile_cubin(src: &str, arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys as rt;
    // SAFETY: only tries to dlopen the library.
    if !unsafe { rt::is_culib_present() } {
        return Err("libnvrtc could not be loaded".into());
    }
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "-default-device".into(),
    ]
    .into_iter()
    .map(|o| CString::new(o).map_err(|e| e.to_string()))
    .collect::<Result<_, _>>()?;
    let optp: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: rt::nvrtcProgram = std::ptr::null_mut();
    let ok = rt::nvrtcResult::NVRTC_SUCCESS;
    // SAFETY: NUL-terminated source and options that outlive the calls; `prog` is created
    // here, read through NVRTC's own size queries into buffers of those sizes, and destroyed
    // on every path.
    unsafe {
        let r = rt::nvrtcCreateProgram(
            &mut prog,
            csrc.as_ptr(),
            c"cwm.cu".as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != ok {
            return Err(format!("nvrtcCreateProgram: {r:?}"));
        }
        let out = (|| {
            let r = rt::nvrtcCompileProgram(prog, optp.len() as i32, optp.as_ptr());
            if r != ok {
                let mut n = 0usize;
                let mut log = Vec::new();
                if rt::nvrtcGetProgramLogSize(prog, &mut n) == ok {
                    log = vec![0u8; n];
                    let _ = rt::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast());
                }
                let log = String::from_utf8_lossy(&log);
                return Err(format!(
                    "NVRTC ({arch}): {r:?}: {}",
                    log.trim_end_matches('\0')
                ));
            }
            let mut n = 0usize;
            let r = rt::nvrtcGetCUBINSize(prog, &mut n);
            if r != ok {
                return Err(format!("nvrtcGetCUBINSize: {r:?}"));
            }
            let mut bin = vec![0u8; n];
            let r = rt::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast());
            if r != ok {
                return Err(format!("nvrtcGetCUBIN: {r:?}"));
            }
            Ok(bin)
        })();
        let _ = rt::nvrtcDestroyProgram(&mut prog);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_source_is_embedded() {
        assert!(KERNEL_SOURCE.contains("cwm_copy"));
    }

    #[test]
    fn nvrtc_compiles_the_kernels_for_every_target() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!(
                "skipped: no libnvrtc (scripts/test.sh puts the vLLM venv's on LD_LIBRARY_PATH)"
            );
            return;
        }
        let archs = nvrtc_archs();
        assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
        for arch in ["sm_80", "sm_90"] {
            let bin = compile_cubin(KERNEL_SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&bin[..4], b"\x7fELF", "{arch}: a CUBIN is an ELF image");
        }
        // The PTX the runtime loads for an sm_90 GPU has the bulk and hinted copies; an sm_80
        // build compiles the bulk kernel's body out.
        let ptx = |arch: &str| {
            cudarc::nvrtc::compile_ptx_with_opts(
                KERNEL_SOURCE,
                cudarc::nvrtc::CompileOptions {
                    options: vec![format!("--gpu-architecture={arch}")],
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{arch}: {e:?}"))
            .to_src()
        };
        let p90 = ptx("compute_90");
        assert!(
            p90.contains("cp.async.bulk.shared::cluster.global"),
            "bulk loads"
        );
        assert!(
            p90.contains("cp.async.bulk.global.shared::cta"),
            "bulk stores"
        );
        assert!(p90.contains("L2::256B"), "hinted loads");
        for entry in ["cwm_copy", "cwm_copy_l2", "cwm_scatter_bulk"] {
            assert!(p90.contains(&format!(".entry {entry}(")), "{entry}");
        }
        assert!(!ptx("compute_80").contains("cp.async.bulk"));
        // An architecture without the hint or the bulk copies still builds every entry point
        // (cwm_copy must load whatever NVRTC falls back to).
        let p75 = ptx("compute_75");
        assert!(!p75.contains("L2::256B") && p75.contains(".entry cwm_copy("));
        let e = compile_cubin("__global__ void k() { nope; }", "sm_90").expect_err("bad source");
        assert!(
            e.contains("nope"),
            "the compiler log reaches the error: {e}"
        );
    }
}
