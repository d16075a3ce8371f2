//! Records which libtorch this build links, so a plugin can declare it and the host can refuse a
//! plugin built against another libtorch (mixing two libtorch builds in one process crashes).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    let lib = Path::new(&lib);
    let version = libtorch_version(lib).unwrap_or_else(|| "unknown".to_string());
    let cuda = lib.join("libtorch_cuda.so").exists();
    println!("cargo:rustc-env=TRELLIS_LIBTORCH_VERSION={version}");
    println!("cargo:rustc-env=TRELLIS_LIBTORCH_CUDA={cuda}");
}

/// A PyTorch wheel keeps its version in `torch/version.py`; a standalone libtorch in `build-version`.
fn libtorch_version(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("version.py").display()
        );
        let line = text.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string())
}
