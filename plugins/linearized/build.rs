//! Compiles the forward-mode AD shim against the libtorch that torch-sys links: the headers of
//! `$LIBTORCH` (set by the workspace's `.cargo/config.toml`), the same C++ ABI as the wheel.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/forward_ad.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "LIBTORCH is not set: run ./scripts/setup.sh, which installs libtorch and points \
             .cargo/config.toml at it"
            )
        });
    let include = libtorch.join("include");
    if !include.join("torch/csrc/autograd/forward_grad.h").exists() {
        panic!(
            "{} has no torch/csrc/autograd/forward_grad.h: LIBTORCH must be a full libtorch \
             (the torch wheel's directory) with its C++ headers",
            include.display()
        );
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/forward_ad.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("trellis_forward_ad");
}
