//! `trellis info`: the libtorch this binary runs on and the devices it sees.

use anyhow::Result;

/// `trellis info`: what to check first when a GPU is not used.
pub fn info() -> Result<()> {
    use trellis_sdk::plugin::{LIBTORCH_CUDA, LIBTORCH_VERSION, TCH_VERSION};
    println!("trellis  {}", env!("CARGO_PKG_VERSION"));
    println!(
        "libtorch {LIBTORCH_VERSION} (tch {TCH_VERSION}), {} CPU threads",
        tch::get_num_threads()
    );
    // Linux lists every mapped library in /proc/self/maps.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let cuda_loaded = maps.contains("libtorch_cuda.so");
    let cuda = match (LIBTORCH_CUDA, cuda_loaded) {
        (false, _) => "none: this libtorch is a CPU-only build".to_string(),
        (true, false) => "libtorch_cuda is not loaded, so no GPU can be used\n  help: the linker \
                          dropped it; core/build.rs links it with --no-as-needed, rebuild trellis"
            .to_string(),
        (true, true) => match tch::Cuda::device_count() {
            0 => "libtorch_cuda loaded; no CUDA device visible".to_string(),
            n => format!(
                "libtorch_cuda loaded; {n} device(s), cuDNN {}",
                if tch::Cuda::cudnn_is_available() {
                    "available"
                } else {
                    "not available"
                }
            ),
        },
    };
    println!("cuda     {cuda}");
    Ok(())
}
