//! The CUDA tests ask libtorch in-process whether it sees a GPU, which it only can when
//! libtorch_cuda is loaded; as in core/build.rs, keep the linker from dropping it.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        return;
    };
    if std::path::Path::new(&libtorch)
        .join("lib/libtorch_cuda.so")
        .exists()
    {
        println!("cargo:rustc-link-arg-tests=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
