//! `trellis plugin new` scaffolds, for every role, an out-of-tree plugin crate that builds on its
//! own, passes its own unit test and (shown for the optimizer) trains through the existing
//! binary as generated.
//!
//! The generated crates are built like `third_party.rs` builds its out-of-tree plugins: on their
//! own, from their directory, into the workspace's target directory, so tch is not compiled a
//! second time (the first build compiles the SDK there once, for every crate outside the
//! workspace; later ones compile only the new crate, a few seconds each).

use std::path::{Path, PathBuf};
use std::process::Command;

use trellis_tests::*;

const ROLES: [&str; 7] = [
    "optimizer",
    "scheduler",
    "pruner",
    "distiller",
    "metric",
    "model",
    "callback",
];

/// `trellis plugin new NAME --role ROLE --dir DIR`, run from elsewhere; returns the crate's
/// directory.
fn scaffold(dir: &Path, name: &str, role: &str) -> PathBuf {
    let elsewhere = tempfile::tempdir().unwrap();
    let d = dir.to_str().unwrap();
    let out = trellis(
        elsewhere.path(),
        &["plugin", "new", name, "--role", role, "--dir", d],
    );
    assert_ok(&out);
    assert!(
        stdout(&out).contains("cargo build --release"),
        "{}",
        stdout(&out)
    );
    dir.join(name)
}

/// The rustflags the workspace builds with: its `.cargo/config.toml`'s (unless RUSTFLAGS
/// overrides them). A crate outside the checkout reads its own `.cargo/config.toml` instead,
/// whose rpath differs; with other flags, sharing the target directory would rebuild tch.
fn workspace_rustflags() -> String {
    if let Ok(flags) = std::env::var("RUSTFLAGS") {
        return flags;
    }
    let config = std::fs::read_to_string(workspace_root().join(".cargo/config.toml")).unwrap();
    let list = &config[config
        .find("rustflags = [")
        .expect("the workspace sets rustflags")..];
    let list = &list[..list.find(']').unwrap()];
    let quoted: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
    quoted.join(" ")
}

/// `cargo ARGS` in a generated crate, into the workspace's target directory (dev profile).
fn cargo(project: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .arg("--quiet")
        .arg("--target-dir")
        .arg(workspace_root().join("target"))
        .env("RUSTFLAGS", workspace_rustflags())
        .current_dir(project)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`cargo {}` fails in the generated {}:\n{}\n{}",
        args.join(" "),
        project.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_role_scaffolds_a_complete_crate() {
    let dir = tempfile::tempdir().unwrap();
    let root = workspace_root();
    let release = |lib: &str| format!("\"{}/target/release/lib{lib}.so\"", root.display());
    for role in ROLES {
        let name = format!("my-{role}-plugin");
        let project = scaffold(dir.path(), &name, role);
        let component = name.replace('-', "_");
        for file in [
            "Cargo.toml",
            "Cargo.lock",
            ".cargo/config.toml",
            "src/lib.rs",
            "plugins.toml",
            "run.toml",
            "README.md",
        ] {
            assert!(project.join(file).is_file(), "{role}: no {file}");
        }
        let cargo = read(&project.join("Cargo.toml"));
        let sdk = format!("path = \"{}/sdk\"", root.display());
        assert!(
            cargo.contains(&sdk) && cargo.contains("[workspace]"),
            "{cargo}"
        );
        let config = read(&project.join(".cargo/config.toml"));
        assert!(
            config.contains(&format!("LIBTORCH = \"{}/.libtorch\"", root.display())),
            "{config}"
        );
        let lib = read(&project.join("src/lib.rs"));
        assert!(lib.contains(&format!("const NAME: &'static str = \"{component}\"")));
        assert!(lib.contains("export_plugin!") && lib.contains("FakeHost"));
        let manifest = read(&project.join("plugins.toml"));
        assert!(manifest.contains(&format!("path = \"target/release/lib{component}.so\"")));
        let needs_optim = role != "optimizer";
        let needs_metrics = role != "metric";
        assert_eq!(manifest.contains(&release("trellis_optim")), needs_optim);
        assert_eq!(
            manifest.contains(&release("trellis_metrics")),
            needs_metrics
        );
        let run = read(&project.join("run.toml"));
        assert!(run.contains(&format!("use = \"{component}\"")), "{run}");
        assert!(read(&project.join("README.md")).contains("cargo test"));
    }
}

#[test]
fn refuses_an_existing_directory_a_bad_name_and_an_unknown_role() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let refused = |args: &[&str]| {
        let mut all = vec!["plugin", "new"];
        all.extend_from_slice(args);
        let err = assert_error(&trellis(d, &all));
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].starts_with("error: "), "{err}");
        assert!(lines[1].trim_start().starts_with("help: "), "{err}");
        err
    };

    std::fs::create_dir_all(d.join("taken/src")).unwrap();
    let err = refused(&["taken", "--role", "metric"]);
    assert!(err.contains("already exists"), "{err}");
    assert!(!d.join("taken/Cargo.toml").exists());
    // An empty directory is taken over.
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_ok(&trellis(d, &["plugin", "new", "empty", "--role", "metric"]));
    assert!(d.join("empty/src/lib.rs").is_file());

    for bad in ["My-Plugin", "2fast", "my plugin", "fn", "tch"] {
        let err = refused(&[bad, "--role", "metric"]);
        assert!(err.contains("is not a valid plugin name"), "{err}");
        assert!(err.contains("my-lr-warmup"), "{err}");
        assert!(!d.join(bad).exists());
    }

    let err = refused(&["lion", "--role", "optimiser"]);
    assert!(err.contains("unknown role `optimiser`"), "{err}");
    for role in ROLES {
        assert!(err.lines().nth(1).unwrap().contains(role), "{err}");
    }
    assert!(!d.join("lion").exists());
}

#[test]
fn a_generated_optimizer_builds_passes_its_test_and_trains() {
    trellis_bin();
    let dir = tempfile::tempdir().unwrap();
    let project = scaffold(dir.path(), "scaffolded-sgd", "optimizer");
    cargo(&project, &["build"]);
    cargo(&project, &["test", "--lib"]);

    // The manifest names release builds; this test trains with the debug ones.
    let built = workspace_root().join("target/debug/libscaffolded_sgd.so");
    let manifest_path = project.join("plugins.toml");
    let mut manifest = read(&manifest_path);
    let own = "\"target/release/libscaffolded_sgd.so\"";
    assert!(manifest.contains(own), "{manifest}");
    manifest = manifest.replace(own, &format!("\"{}\"", built.display()));
    let release = workspace_root().join("target/release/libtrellis_metrics.so");
    let release = format!("\"{}\"", release.display());
    assert!(manifest.contains(&release), "{manifest}");
    manifest = manifest.replace(
        &release,
        &format!("\"{}\"", plugin("trellis-metrics").display()),
    );
    std::fs::write(&manifest_path, manifest).unwrap();

    let out = trellis(&project, &["run", "run.toml", "--out", "out", "--quiet"]);
    assert_ok(&out);
    let records = metrics(&project.join("out"));
    let losses: Vec<f64> = records
        .iter()
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(losses[1] < losses[0], "{losses:?}");
    assert!(records[1]["test"]["top1"].is_number(), "{:?}", records[1]);
    let plugins = read(&project.join("out/plugins.json"));
    assert!(plugins.contains("optimizer scaffolded_sgd"), "{plugins}");
}

#[test]
fn generated_crates_of_the_other_roles_compile_and_pass_their_tests() {
    let dir = tempfile::tempdir().unwrap();
    for role in ROLES.into_iter().filter(|r| *r != "optimizer") {
        let project = scaffold(dir.path(), &format!("scaffolded-{role}"), role);
        cargo(&project, &["test", "--lib"]);
    }
}
