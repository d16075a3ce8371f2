//! How `trellis` (and core's tests and benches) link libtorch.
//!
//! - rpath: torch-sys links libtorch dynamically but gives the final binary no rpath, so
//!   `trellis` would need LD_LIBRARY_PATH. Point the rpath at the libtorch torch-sys was built
//!   against.
//! - CUDA: torch-sys asks for `-ltorch_cuda`, but nothing calls into it directly, so a linker
//!   that defaults to `--as-needed` (Debian's and Ubuntu's do) drops it, and libtorch then sees
//!   no GPU (`tch::Cuda::is_available()` is false on a machine that has one). Keep it.
fn main() {
    // The speed bench links the optimizer and metric plugins statically to compare them with
    // their dylibs. Both crates carry the same exported plugin entry points (`export_plugin!`),
    // which the bench never calls, so the linker may keep either copy.
    println!("cargo:rustc-link-arg-benches=-Wl,--allow-multiple-definition");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
