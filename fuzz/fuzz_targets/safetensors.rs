//! The safetensors reader: `trellis::models::read_safetensors` on arbitrary file contents.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!(
        "trellis-fuzz-safetensors-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, data).expect("cannot write the input file");
    if let Ok(tensors) = trellis::models::read_safetensors(&path) {
        // What was read must be usable.
        for (_, t) in &tensors {
            let _ = t
                .to_kind(tch::Kind::Double)
                .sum(tch::Kind::Double)
                .double_value(&[]);
        }
    }
});
