//! The run config reader: `LoadedConfig::load` on arbitrary file contents.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path =
        std::env::temp_dir().join(format!("trellis-fuzz-config-{}.toml", std::process::id()));
    std::fs::write(&path, data).expect("cannot write the input file");
    // Ok or Err are both fine; a panic or a hang is the bug.
    let _ = trellis::config::LoadedConfig::load(&path, &[]);
});
