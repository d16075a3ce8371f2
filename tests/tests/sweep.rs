//! `trellis sweep` and `trellis report` end to end on one small grid: a sweep killed with
//! `kill -9` (parent and runs at once) and re-run ends with every run equal to running it alone;
//! the Slurm script runs exactly its task's line; the report's numbers are the runs' own; the
//! logging sinks read back.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use trellis_tests::*;

/// Four seeds of a small MLP run, long enough (a few seconds) to be killed in the middle.
fn config() -> String {
    let extra = "\n[[metrics]]\nuse = \"accuracy\"\n\n[[metrics]]\nuse = \"loss\"\nevery = 3\n\n\
                 [log]\nsinks = [\"csv\", \"tensorboard\"]\n";
    tiny(extra)
        .replace("train_size = 200", "train_size = 3000")
        .replace("epochs = 1", "epochs = 4")
        .replace("hidden = [32]", "hidden = [256, 256]")
        .replace(
            "device = \"cpu\"",
            "device = \"cpu\"\nkeep = \"best\"\nbest_metric = \"top1\"",
        )
}

const SWEEP: &str = "config = \"run.toml\"\n\n[grid]\n\"train.seed\" = [0, 1, 2, 3]\n";
const IDS: [&str; 4] = ["000-0", "001-1", "002-2", "003-3"];

fn state(run: &Path) -> String {
    std::fs::read_to_string(run.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["state"].as_str().map(String::from))
        .unwrap_or_default()
}

fn model(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
}

#[test]
fn a_killed_sweep_resumes_to_its_runs_alone_and_slurm_and_report_agree() {
    let (dir, _) = setup(&config());
    let d = dir.path();
    std::fs::write(d.join("sweep.toml"), SWEEP).unwrap();
    let sweep_args = [
        "sweep",
        "sweep.toml",
        "--out",
        "sw",
        "--jobs",
        "2",
        "--threads",
        "2",
        "--quiet",
    ];

    // The expansion: one line per seed, in the grid's order, each with its own directory.
    let mut child = Command::new(trellis_bin())
        .args(sweep_args)
        .current_dir(d)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sw = d.join("sw");
    let start = Instant::now();
    while !IDS.iter().any(|id| state(&sw.join(id)) == "checkpointed") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no run checkpointed"
        );
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    // kill -9 of the sweep and of its runs at once (they share its process group).
    let pgid = child.id() as i32;
    // (procps' kill takes a negative pid, a process group, only after `--`.)
    assert!(Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap()
        .success());
    use std::os::unix::process::ExitStatusExt;
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the sweep was killed: {status:?}");
    assert!(
        IDS.iter().any(|id| state(&sw.join(id)) != "finished"),
        "the kill left something to do: {:?}",
        IDS.map(|id| state(&sw.join(id)))
    );
    let tsv = std::fs::read_to_string(sw.join("runs.tsv")).unwrap();
    let lines: Vec<&str> = tsv.lines().skip(1).collect();
    assert_eq!(lines.len(), 4, "{tsv}");
    let mut dirs = std::collections::BTreeSet::new();
    for (line, id) in lines.iter().zip(IDS) {
        let cells: Vec<&str> = line.split('\t').collect();
        assert_eq!(cells[0], id, "{tsv}");
        assert!(
            cells[2].ends_with(&format!("train.seed={}", &id[4..])),
            "{tsv}"
        );
        assert_eq!(
            cells[4], "1",
            "two jobs of the two threads: one each\n{tsv}"
        );
        dirs.insert(cells[3].to_string());
    }
    assert_eq!(dirs.len(), 4, "two runs never share a directory\n{tsv}");

    // The same command again finishes what is left.
    let again = trellis(d, &sweep_args);
    assert_ok(&again);
    let tsv = std::fs::read_to_string(sw.join("runs.tsv")).unwrap();
    assert_eq!(tsv.matches("\tfinished").count(), 4, "{tsv}");

    // Every run equals the same run alone, on its thread count.
    for (seed, id) in IDS.iter().enumerate() {
        let alone = format!("alone{seed}");
        assert_ok(&trellis(
            d,
            &[
                "run",
                "run.toml",
                "--set",
                &format!("train.seed={seed}"),
                "--set",
                "train.threads=1",
                "--out",
                &alone,
                "--quiet",
            ],
        ));
        assert!(
            model(&sw.join(id)) == model(&d.join(&alone)),
            "{id} after the kill differs from the run alone"
        );
    }

    // The Slurm script runs exactly the line of its task.
    assert_ok(&trellis(
        d,
        &["sweep", "sweep.toml", "--out", "slurm", "--emit", "slurm"],
    ));
    let script = d.join("slurm/sweep.sbatch");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("#SBATCH --array=0-3"), "{text}");
    let task = Command::new("bash")
        .arg(&script)
        .current_dir(d)
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_CPUS_PER_TASK", "1")
        .output()
        .unwrap();
    assert_ok(&task);
    let slurm = d.join("slurm");
    assert_eq!(state(&slurm.join("002-2")), "finished");
    for other in ["000-0", "001-1", "003-3"] {
        assert!(!slurm.join(other).exists(), "task 2 ran {other}");
    }
    assert!(model(&slurm.join("002-2")) == model(&d.join("alone2")));
    let missing = Command::new("bash")
        .arg(&script)
        .current_dir(d)
        .env("SLURM_ARRAY_TASK_ID", "9")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));

    // The report: one group (the runs differ only in their seeds), mean ± std by hand.
    let finals: Vec<f64> = IDS
        .iter()
        .map(|id| {
            metrics(&sw.join(id)).last().unwrap()["test"]["top1"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let mean = finals.iter().sum::<f64>() / 4.0;
    let std = (finals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
    let report = trellis(d, &["report", "sw", "--metric", "top1", "--out", "rep"]);
    assert_ok(&report);
    let table = stdout(&report);
    assert!(
        table.contains(&format!("|   4 | {mean:.4} ± {std:.4} |")),
        "expected n = 4 and {mean:.4} ± {std:.4}:\n{table}"
    );
    let md = std::fs::read_to_string(d.join("rep/report.md")).unwrap();
    assert!(md.contains("figures/curve_top1.png"), "{md}");
    let png = std::fs::read(d.join("rep/figures/curve_top1.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let csv = std::fs::read_to_string(d.join("rep/table.csv")).unwrap();
    assert!(csv.starts_with("runs,n,top1\n"), "{csv}");

    // The sinks: TensorBoard's event files hold each epoch's top-1 as metrics.jsonl does (a
    // resumed run adds a file; the steps it trained again appear in both), metrics.csv too.
    let run = sw.join("000-0");
    let records = metrics(&run);
    let mut scalars = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(run.join("tensorboard")).unwrap() {
        let events = trellis::sinks::tensorboard::read_events(&entry.unwrap().path()).unwrap();
        assert_eq!(events.file_version.as_deref(), Some("brain.Event:2"));
        for (step, tag, value) in events.scalars {
            scalars.insert((step, tag), value);
        }
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    for r in &records {
        let epoch = r["epoch"].as_i64().unwrap();
        let top1 = r["test"]["top1"].as_f64().unwrap();
        assert_eq!(
            scalars.get(&(epoch, "test/top1".to_string())),
            Some(&(top1 as f32)),
            "epoch {epoch}"
        );
        assert!(
            csv.lines().any(|l| l.starts_with(&format!("{epoch},"))
                && l.contains(",test/top1,")
                && l.ends_with(&format!(",{top1}"))),
            "epoch {epoch} top1 {top1} in\n{csv}"
        );
    }
    // `every = 3`: the loss metric at epoch 3 and at the last epoch only.
    let with_loss: Vec<i64> = records
        .iter()
        .filter(|r| r["test"].get("loss").is_some())
        .map(|r| r["epoch"].as_i64().unwrap())
        .collect();
    assert_eq!(with_loss, [3, 4]);
    // keep = "best": the epoch of the highest top-1 (the first of equals), its model kept.
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best.json")).unwrap()).unwrap();
    let top1 = |r: &serde_json::Value| r["test"]["top1"].as_f64().unwrap();
    let best_record = records
        .iter()
        .fold(None::<&serde_json::Value>, |b, r| match b {
            Some(b) if top1(b) >= top1(r) => Some(b),
            _ => Some(r),
        })
        .unwrap();
    assert_eq!(best["epoch"], best_record["epoch"], "{best}");
    assert_eq!(best["value"].as_f64(), Some(top1(best_record)));
    assert!(run.join("model_best.safetensors").is_file());
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("epoch 4/4"), "{log}");
    assert!(!log.contains('\x1b'), "no colour codes in train.log");
}

/// The seed's experiments (examples/seed/, full and short): every sweep expands to the runs its
/// header promises, and every run's config loads with its overrides (inherited files, paths and
/// keys), without training.
#[test]
fn the_seed_experiment_sweeps_expand_and_every_run_config_loads() {
    let seed = workspace_root().join("examples/seed");
    for (file, runs) in [
        ("pruning_after_100_sweep.toml", 60),
        ("tempbalance_sweep.toml", 10),
        ("fc_augment_sweep.toml", 18),
        ("kd_sweep.toml", 6),
        ("linearized_sweep.toml", 6),
        ("short/pruning_after_100_sweep.toml", 30),
        ("short/tempbalance_sweep.toml", 10),
        ("short/fc_augment_sweep.toml", 6),
        ("short/kd_sweep.toml", 6),
        ("short/linearized_sweep.toml", 6),
    ] {
        let sweep = trellis::sweep::Sweep::load(&seed.join(file), &[]).unwrap();
        let expanded = sweep.runs();
        assert_eq!(expanded.len(), runs, "{file}");
        let mut configs = std::collections::BTreeSet::new();
        for run in &expanded {
            let cfg = trellis::config::LoadedConfig::load(&run.config, &run.overrides)
                .unwrap_or_else(|e| panic!("{file} {}: {e:#}", run.id));
            configs.insert(format!("{:?}", cfg.config));
        }
        assert_eq!(configs.len(), runs, "{file}: two runs are the same run");
    }
    // The KD student compares with the independent student the sweep trains first, by its id.
    let kd = trellis::sweep::Sweep::load(&seed.join("short/kd_sweep.toml"), &[]).unwrap();
    let student = std::fs::read_to_string(seed.join("short/kd_student.toml")).unwrap();
    assert!(
        student.contains(&format!("/{}/model.safetensors", kd.runs()[0].id)),
        "{}",
        kd.runs()[0].id
    );
}
