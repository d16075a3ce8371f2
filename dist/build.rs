//! Compiles the c10d shim (csrc/c10d.cpp) against the libtorch that torch-sys links: the headers
//! of `$LIBTORCH` (set by the workspace's `.cargo/config.toml`), the same C++ ABI as the wheel.
//!
//! ProcessGroupGloo.hpp includes Gloo's own headers, which the wheel lacks; `./scripts/setup.sh`
//! unpacks Debian's libgloo-dev and links its include directory as `.gloo-include` in the
//! checkout (`TRELLIS_GLOO_INCLUDE` overrides it). Only types that ProcessGroupGloo.hpp holds
//! behind pointers come from them; every Gloo function that runs is the wheel's own.
//!
//! ProcessGroupNCCL is compiled in when the wheel is a CUDA build and the headers it needs are at
//! hand (see `nccl_includes`); otherwise the shim's NCCL entry point returns an error saying so.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=TRELLIS_GLOO_INCLUDE");
    let libtorch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "LIBTORCH is not set: run ./scripts/setup.sh, which installs libtorch and points \
                 .cargo/config.toml at it"
            )
        });
    let include = libtorch.join("include");
    if !include
        .join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
        .exists()
    {
        panic!(
            "{} has no torch/csrc/distributed/c10d/ProcessGroupGloo.hpp: LIBTORCH must be a full \
             libtorch (the torch wheel's directory) with its C++ headers",
            include.display()
        );
    }
    let gloo = gloo_include();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // The wheel is built with both; the c10d headers hide their classes without them.
        .define("USE_C10D_GLOO", None)
        .warnings(false);

    let lib = libtorch.join("lib");
    let nccl = nccl_includes(&libtorch);
    if let Some(dirs) = &nccl {
        build.define("USE_C10D_NCCL", None);
        build.define("TRELLIS_DIST_NCCL", None);
        for dir in dirs {
            build.include(dir);
        }
    }
    build.compile("trellis_c10d");

    // The shim calls into these directly (torch-sys links them too, but after this library on
    // the link line only if it is asked to; naming them here does not depend on that order).
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

fn gloo_include() -> PathBuf {
    let dir = std::env::var_os("TRELLIS_GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(".gloo-include")
        });
    println!("cargo:rerun-if-changed={}", dir.display());
    if !dir.join("gloo/rendezvous/store.h").exists() {
        panic!(
            "Gloo's headers are missing ({} has no gloo/rendezvous/store.h): run \
             ./scripts/setup.sh, which unpacks Debian's libgloo-dev into its cache and links it \
             as .gloo-include (or set TRELLIS_GLOO_INCLUDE to a directory holding gloo/)",
            dir.display()
        );
    }
    dir
}

/// The include directories for ProcessGroupNCCL.hpp, when the wheel is a CUDA build and all of
/// its headers are at hand: the wheel's `nvidia/` packages (CUDA runtime, cuBLAS, cuSPARSE,
/// cuSOLVER, NCCL; one package for the toolkit in cu13 wheels, one per library in cu12 ones), then
/// the CUDA runtime's own dependencies the wheel lacks (crt/, CCCL's nv/target), which
/// `./scripts/setup.sh` links as `.cuda-include` or a CUDA toolkit at `$CUDA_HOME` provides.
fn nccl_includes(libtorch: &Path) -> Option<Vec<PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let package_includes = |root: PathBuf| -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok().map(|entry| entry.path().join("include")))
            .filter(|dir| dir.is_dir())
            .collect();
        dirs.sort();
        dirs
    };
    let extra = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".cuda-include");
    println!("cargo:rerun-if-changed={}", extra.display());
    let mut dirs = package_includes(libtorch.join("../nvidia"));
    dirs.extend(package_includes(extra));
    if let Some(cuda) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(cuda).join("include"));
    }
    let missing: Vec<&str> = [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_defines.h",
        "nv/target",
    ]
    .into_iter()
    .filter(|header| !dirs.iter().any(|dir| dir.join(header).exists()))
    .collect();
    if missing.is_empty() {
        Some(dirs)
    } else {
        println!(
            "cargo:warning=trellis-dist: libtorch_cuda is there but {} not found: building \
             without NCCL (./scripts/setup.sh installs the CUDA headers the wheel lacks)",
            missing.join(", ")
        );
        None
    }
}
