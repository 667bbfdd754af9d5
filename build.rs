//! Build script: compiles kernels/copy.cu into a fatbin (sm_80, sm_90 and compute_90 PTX) when
//! nvcc is present (or named by $NVCC), and tells the crate to embed it (cfg `cwm_fatbin`).
//! Without nvcc nothing happens here: the kernel source is embedded and compiled at run time
//! with NVRTC. The crate builds, and every CPU test passes, with no CUDA at all.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/copy.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo::rustc-check-cfg=cfg(cwm_fatbin)");
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        return;
    };
    let out = PathBuf::from(out_dir).join("copy.fatbin");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-gencode",
            "arch=compute_90,code=[sm_90,compute_90]",
            "-o",
        ])
        .arg(&out)
        .arg("kernels/copy.cu")
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-cfg=cwm_fatbin"),
        Ok(s) => println!(
            "cargo:warning=nvcc failed ({s}); the kernel will be compiled with NVRTC at run time"
        ),
        Err(_) => {} // no nvcc: NVRTC at run time
    }
}
