//! A plugin written outside the workspace, against trellis-sdk only, swaps in through the
//! released binary: core is not rebuilt.

use std::process::Command;

use trellis_tests::*;

#[test]
fn out_of_tree_plugin_builds_alone_and_runs_through_the_existing_binary() {
    let binary = trellis_bin();
    let built_at = std::fs::metadata(&binary).unwrap().modified().unwrap();

    let project = workspace_root().join("examples/third_party_plugin");
    // The workspace's target directory and dev profile, so tch is not compiled a second time.
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(project.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(workspace_root().join("target"))
        .env("CARGO_PROFILE_DEV_OPT_LEVEL", "1")
        .current_dir(&project)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the out-of-tree plugin does not build on its own"
    );
    let lion = workspace_root().join("target/debug/liblion_optimizer.so");

    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "[[plugin]]\nname = \"lion-optimizer\"\npath = \"{}\"\n\n[[plugin]]\nname = \"trellis-metrics\"\npath = \"{}\"\n",
        lion.display(),
        plugin("trellis-metrics").display()
    );
    std::fs::write(dir.path().join("plugins.toml"), manifest).unwrap();
    let config = small_config("")
        .replace(
            "use = \"sgd\"\nlr = 0.05\nmomentum = 0.9",
            "use = \"lion\"\nlr = 1e-3\nbeta2 = 0.99",
        )
        .replace("[[metrics]]\nuse = \"loss\"\n", "");
    std::fs::write(dir.path().join("run.toml"), config).unwrap();

    let out = trellis(dir.path(), &["run", "run.toml", "--out", "out", "--quiet"]);
    assert_ok(&out);
    let records = metrics(&dir.path().join("out"));
    assert_eq!(records.len(), 2);
    assert!(
        records[1]["train_loss"].as_f64().unwrap() < records[0]["train_loss"].as_f64().unwrap()
    );
    let plugins = std::fs::read_to_string(dir.path().join("out/plugins.json")).unwrap();
    assert!(plugins.contains("optimizer lion"), "{plugins}");

    let listed = trellis(dir.path(), &["plugins"]);
    assert_ok(&listed);
    assert!(stdout(&listed).contains("lion") && stdout(&listed).contains("lion-optimizer"));

    let still = std::fs::metadata(&binary).unwrap().modified().unwrap();
    assert_eq!(built_at, still, "the trellis binary was rebuilt");
}
