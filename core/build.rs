//! torch-sys links libtorch dynamically but gives the final binary no rpath, so `trellis` would
//! need LD_LIBRARY_PATH. Point the rpath at the libtorch torch-sys was built against.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
