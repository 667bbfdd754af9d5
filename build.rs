//! Build script. The CUDA kernels in `kernels/` are embedded as source for NVRTC at run time
//! (the CUDA backend arrives in a later change); nothing here needs a CUDA toolchain.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
