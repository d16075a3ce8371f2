//! Bad plugin files: truncated copies of a real plugin, foreign libraries, files that are not
//! libraries at all — each pinned or not. Every one is refused with exit code 1 (never a
//! signal), a message saying what is wrong, and the run config, the manifest and a prepared run
//! directory left byte for byte as they were; a pinned file is compared with its pin before
//! anything of it is loaded, and a foreign library's initialisers never run.

use std::path::{Path, PathBuf};
use std::process::Command;

use trellis::plugin_host::sha256_of;
use trellis_tests::*;

/// A temporary directory with `run.toml`, and `out/`, a run directory prepared with a note in it.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("run.toml"), tiny("")).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("out/notes.txt"), "kept as it is\n").unwrap();
    dir
}

/// Writes a manifest whose only entry, `trellis-optim`, is `path`, pinned to `pin` if given.
fn manifest(dir: &Path, path: &Path, pin: Option<&str>) {
    let mut text = format!(
        "[[plugin]]\nname = \"trellis-optim\"\npath = \"{}\"\n",
        path.display()
    );
    if let Some(pin) = pin {
        text.push_str(&format!("sha256 = \"{pin}\"\n"));
    }
    std::fs::write(dir.join("plugins.toml"), text).unwrap();
}

/// `trellis run` and `trellis plugins` with a manifest naming `file` (and, unpinned, `trellis
/// plugins inspect file`) are refused with exit code 1 and `phrase`, leaving the whole
/// directory — run config, manifest, the file itself and `out/` — untouched; returns the
/// messages.
fn refused(dir: &Path, file: &Path, pin: Option<&str>, phrase: &str) -> Vec<String> {
    manifest(dir, file, pin);
    let file = file.to_str().unwrap();
    let mut commands = vec![
        vec!["run", "run.toml", "--out", "out"],
        vec!["plugins", "--manifest", "plugins.toml"],
    ];
    if pin.is_none() {
        commands.push(vec!["plugins", "inspect", file]);
    }
    commands
        .into_iter()
        .map(|args| assert_refused(dir, &args, phrase, dir))
        .collect()
}

/// A copy of the optimizer plugin cut to its first `len` bytes, in `dir`.
fn truncated_copy(dir: &Path, len: usize) -> PathBuf {
    let bytes = std::fs::read(plugin("trellis-optim")).unwrap();
    assert!(bytes.len() > 1_000_000, "the plugin is larger than 1 MB");
    let path = dir.join(format!("libtrellis_optim_{len}.so"));
    std::fs::write(&path, &bytes[..len]).unwrap();
    path
}

fn libz() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libz, to stand in for a foreign library")
}

#[test]
fn truncated_plugins_are_refused_before_loading() {
    for (len, phrase) in [
        (1_000_000, "segment"),
        (100_000, "segment"),
        (
            10,
            "the ELF header needs 64 bytes but the file has 10 bytes",
        ),
    ] {
        let dir = workspace();
        let file = truncated_copy(dir.path(), len);
        for err in refused(dir.path(), &file, None, "the file is truncated") {
            assert!(err.contains(phrase), "{err}");
            let shown = file.canonicalize().unwrap();
            assert!(err.contains(&*shown.to_string_lossy()), "{err}");
            assert!(err.contains("rebuild"), "{err}");
            if len > 64 {
                assert!(
                    err.contains(&format!("but the file has {len} bytes")),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn truncated_plugins_pinned_to_the_original_are_refused_as_pin_mismatches() {
    let original = sha256_of(&plugin("trellis-optim")).unwrap();
    for len in [1_000_000, 100_000, 10] {
        let dir = workspace();
        let file = truncated_copy(dir.path(), len);
        let actual = sha256_of(&file).unwrap();
        for err in refused(
            dir.path(),
            &file,
            Some(&original),
            "does not match its sha256 pin",
        ) {
            assert!(err.contains("plugins.toml:4"), "{err}");
            assert!(
                err.contains(&format!("the file's sha256 is {actual}")),
                "{err}"
            );
        }
    }
}

#[test]
fn a_foreign_library_is_refused_before_loading_pinned_or_not() {
    let libz = libz();
    let pin = sha256_of(&libz).unwrap();
    for pin in [None, Some(pin.as_str()), Some(&*pin.to_uppercase())] {
        let dir = workspace();
        for err in refused(
            dir.path(),
            &libz,
            pin,
            "is not a Trellis plugin: its dynamic symbol table has no TRELLIS_SDK_ABI_VERSION",
        ) {
            assert!(err.contains("refused before loading it"), "{err}");
            assert!(err.contains("plugins.toml:3") || pin.is_none(), "{err}");
        }
    }
}

/// A shared library whose initialiser creates `marker`.
fn library_with_initialiser(dir: &Path, marker: &Path) -> PathBuf {
    let source = dir.join("foreign.c");
    std::fs::write(
        &source,
        format!(
            "#include <stdio.h>\n\
             __attribute__((constructor)) static void mark(void) {{\n\
             \x20   FILE *f = fopen(\"{}\", \"w\");\n\
             \x20   if (f) fclose(f);\n\
             }}\n\
             int foreign_function(void) {{ return 42; }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let library = dir.join("libforeign.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .expect("a C compiler (cc), which also links Rust");
    assert!(out.status.success(), "cc: {}", stderr(&out));
    std::fs::remove_file(&source).unwrap();
    library
}

#[test]
fn a_foreign_librarys_initialisers_never_run() {
    let build = tempfile::tempdir().unwrap();
    let marker = build.path().join("initialised");
    let library = library_with_initialiser(build.path(), &marker);
    // The initialiser does run when the library is loaded.
    let status = Command::new("true")
        .env("LD_PRELOAD", &library)
        .status()
        .unwrap();
    assert!(
        status.success() && marker.exists(),
        "the initialiser did not run"
    );
    std::fs::remove_file(&marker).unwrap();

    let pin = sha256_of(&library).unwrap();
    for pin in [Some(pin.as_str()), None] {
        let dir = workspace();
        refused(dir.path(), &library, pin, "is not a Trellis plugin");
        assert!(
            !marker.exists(),
            "trellis ran the library's initialiser (pin {pin:?})"
        );
    }
}

#[test]
fn files_that_are_not_libraries_are_refused() {
    let dir = workspace();
    let text = dir.path().join("libtext.so");
    std::fs::write(&text, "not a library, whatever its name\n").unwrap();
    let empty = dir.path().join("libempty.so");
    std::fs::write(&empty, "").unwrap();
    let directory = dir.path().join("libdir.so");
    std::fs::create_dir(&directory).unwrap();
    std::fs::write(directory.join("inside"), "x").unwrap();
    for (file, phrase) in [
        (&text, "does not start with the ELF magic bytes"),
        (&empty, "the file is empty, not a shared library"),
        (&directory, "is a directory, not a shared library"),
    ] {
        let errors = refused(dir.path(), file, None, phrase);
        assert!(errors.iter().all(|e| e.contains("not a shared library")));
        // Pinned to the text's own sha256, or to anything: the same refusal or a pin mismatch,
        // never a load.
        if file != &directory {
            let pin = sha256_of(file).unwrap();
            refused(dir.path(), file, Some(&pin), phrase);
            refused(
                dir.path(),
                file,
                Some(&"0".repeat(64)),
                "does not match its sha256 pin",
            );
        } else {
            refused(dir.path(), file, Some(&"0".repeat(64)), phrase);
        }
    }
}

/// The positive case: a pinned plugin loads (from its in-memory copy) and the run records the
/// plugin's own path and the pinned sha256.
#[test]
fn a_pinned_plugin_runs_and_is_recorded_under_its_own_path() {
    let dir = workspace();
    let file = dir.path().join("libtrellis_optim.so");
    std::fs::copy(plugin("trellis-optim"), &file).unwrap();
    let pin = sha256_of(&file).unwrap();
    manifest(dir.path(), &file, Some(&pin));
    let out = trellis(dir.path(), &["run", "run.toml", "--out", "run", "--quiet"]);
    assert_ok(&out);
    let plugins: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("run/plugins.json")).unwrap(),
    )
    .unwrap();
    let text = plugins.to_string();
    assert!(text.contains(&pin), "{text}");
    assert!(
        text.contains(&*file.canonicalize().unwrap().to_string_lossy()),
        "{text}"
    );
    assert!(!text.contains("/proc/self/fd"), "{text}");

    let inspect = trellis(dir.path(), &["plugins", "inspect", "libtrellis_optim.so"]);
    assert_ok(&inspect);
    assert!(
        stdout(&inspect).contains(&format!("sha256   {pin}")),
        "{}",
        stdout(&inspect)
    );
}
