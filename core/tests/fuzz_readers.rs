//! Bounded mutation fuzzing of every reader of outside input: the run config (and `--set`
//! overrides), the plugin manifest, the CIFAR-10 binary reader, safetensors files and checkpoint
//! loading. Each test starts from a valid input, applies random mutations from a seeded
//! (deterministic) generator and asserts that the reader returns `Ok` or `Err` without
//! panicking, and without hanging. Longer, coverage-guided runs: `fuzz/` (`cargo +nightly fuzz`).
//!
//! `TRELLIS_FUZZ_SEED` changes the seed and `TRELLIS_FUZZ_SCALE` multiplies the case counts, for
//! a longer local run: `TRELLIS_FUZZ_SCALE=50 cargo test -p trellis --test fuzz_readers`.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use trellis::checkpoint::{self, Record, TrainingState};

/// No single input may take longer than this.
const HANG: Duration = Duration::from_secs(20);

/// SplitMix64: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn seed() -> u64 {
    std::env::var("TRELLIS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7e_1115)
}

fn cases(n: usize) -> usize {
    let scale: usize = std::env::var("TRELLIS_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    n * scale.max(1)
}

const BYTES: &[u8] = &[
    0x00, 0xff, 0x7f, 0x80, 0x01, b'[', b']', b'{', b'}', b'"', b'\'', b'\n', b'=', b'.', b',',
    b'\\', b'-', b'0', b'9', b'#', b' ', b'e',
];

/// Little-endian integers that are often edge cases (header lengths, offsets, counts).
const INTS: &[u64] = &[
    0,
    1,
    7,
    8,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    100_000_000,
];

/// How a mutation may change an input.
#[derive(Clone, Copy)]
enum Mode {
    /// Binary: bytes and integers.
    Binary,
    /// Text: also whole lines from a dictionary.
    Text(&'static [&'static str]),
}

/// Applies 1 to 8 random mutations to `input`. `hot`, when not empty, lists offsets worth
/// hitting more often (label bytes, header fields); `max` bounds growth.
fn mutate(input: &[u8], rng: &mut Rng, mode: Mode, hot: &[usize], max: usize) -> Vec<u8> {
    let mut b = input.to_vec();
    // Half the inputs are one mutation away from valid, to reach the checks after parsing.
    let rounds = if rng.below(2) == 0 {
        1
    } else {
        1 + rng.below(8)
    };
    for _ in 0..rounds {
        let pos = |rng: &mut Rng, len: usize| -> usize {
            if !hot.is_empty() && rng.below(2) == 0 {
                (*rng.pick(hot)).min(len.saturating_sub(1))
            } else {
                rng.below(len.max(1))
            }
        };
        let chunk = |rng: &mut Rng| {
            let big = rng.below(4) == 0;
            1 + rng.below(if big { 4096 } else { 16 })
        };
        match rng.below(if matches!(mode, Mode::Text(_)) { 9 } else { 7 }) {
            0 if !b.is_empty() => {
                let i = pos(rng, b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = pos(rng, b.len());
                b[i] = *rng.pick(BYTES);
            }
            2 => {
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
            3 if !b.is_empty() => {
                // Duplicate a chunk somewhere.
                let start = rng.below(b.len());
                let end = (start + chunk(rng)).min(b.len());
                let piece = b[start..end].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, piece);
            }
            4 if !b.is_empty() => {
                let start = pos(rng, b.len());
                let end = (start + chunk(rng)).min(b.len());
                b.drain(start..end);
            }
            5 => {
                let at = rng.below(b.len() + 1);
                let n = 1 + rng.below(4);
                let ins: Vec<u8> = (0..n).map(|_| *rng.pick(BYTES)).collect();
                b.splice(at..at, ins);
            }
            6 if !b.is_empty() => {
                // An interesting integer, 1/2/4/8 bytes little-endian.
                let width = *rng.pick(&[1usize, 2, 4, 8]);
                let v = rng.pick(INTS).to_le_bytes();
                let i = pos(rng, b.len());
                let end = (i + width).min(b.len());
                b[i..end].copy_from_slice(&v[..end - i]);
            }
            7 | 8 => {
                let Mode::Text(lines) = mode else { continue };
                // Insert (7) or replace (8) a whole line with a valid-looking one.
                let starts: Vec<usize> = std::iter::once(0)
                    .chain(
                        b.iter()
                            .enumerate()
                            .filter(|(_, &c)| c == b'\n')
                            .map(|(i, _)| i + 1),
                    )
                    .collect();
                let at = *rng.pick(&starts);
                let end = if rng.below(9) == 8 || starts.len() < 2 {
                    at
                } else {
                    b[at..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |p| at + p + 1)
                };
                let line = format!("{}\n", rng.pick(lines));
                b.splice(at..end, line.into_bytes());
            }
            _ => {}
        }
        if b.len() > max {
            b.truncate(max);
        }
    }
    b
}

/// Runs `case(i)` for `0..n` on a worker thread; fails on the first panic (the input as
/// `describe` renders it) or when one case runs longer than [`HANG`]. Returns the number of
/// cases that returned `Ok`.
fn drive<F>(name: &str, n: usize, case: F) -> usize
where
    F: FnMut(usize, &Mutex<String>) -> Result<bool, String> + Send + 'static,
{
    let progress = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let (p, c) = (progress.clone(), current.clone());
    let mut case = case;
    let worker = std::thread::spawn(move || -> Result<(usize, usize), String> {
        let mut ok = 0;
        for i in 0..n {
            match catch_unwind(AssertUnwindSafe(|| case(i, &c))) {
                Ok(Ok(true)) => ok += 1,
                Ok(Ok(false)) => {}
                Ok(Err(setup)) => return Err(format!("case {i}: setup failed: {setup}")),
                Err(_) => {
                    let input = c.lock().map(|s| s.clone()).unwrap_or_default();
                    return Err(format!("case {i} panicked on input:\n{input}"));
                }
            }
            p.fetch_add(1, Ordering::Relaxed);
        }
        Ok((n, ok))
    });
    let started = Instant::now();
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let done = progress.load(Ordering::Relaxed);
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > HANG {
            let input = current.lock().map(|s| s.clone()).unwrap_or_default();
            panic!("{name}: case {done} ran over {HANG:?} (hang?) on input:\n{input}");
        }
    }
    match worker.join().expect("the worker's panics are caught") {
        Ok((tried, ok)) => {
            eprintln!(
                "fuzz {name}: {tried} inputs tried ({ok} accepted, {} refused), 0 crashed, {:.1} s",
                tried - ok,
                started.elapsed().as_secs_f64()
            );
            ok
        }
        Err(e) => panic!("fuzz {name}: {e}"),
    }
}

fn show_text(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

fn show_hex(bytes: &[u8]) -> String {
    let head: String = bytes
        .iter()
        .take(4096)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{} bytes: {head}{}",
        bytes.len(),
        if bytes.len() > 4096 { "..." } else { "" }
    )
}

const CONFIG_SEED: &str = r#"plugins = "plugins.toml"

[model]
arch = "resnet18"
width = 0.25

[data]
source = "synthetic"
train_size = 64
test_size = 32
subset = { per_class = 4 }
augment = true

[train]
epochs = 2
batch_size = 16
seed = 0
device = "cpu"
eval_every = 1

[optimizer]
use = "sgd"
lr = 0.1
momentum = 0.9
weight_decay = 5e-4

[schedule]
kind = "cosine"

[pruner]
use = "snip"
density = 0.1

[[metrics]]
use = "accuracy"
top_k = [1, 5]

[[metrics]]
use = "loss"
"#;

const CONFIG_LINES: &[&str] = &[
    "[model]",
    "[data]",
    "[train]",
    "[optimizer]",
    "[schedule]",
    "[pruner]",
    "[[metrics]]",
    "[[distillers]]",
    "[[callbacks]]",
    "[metrics]",
    "arch = \"vgg11\"",
    "arch = \"\"",
    "width = 64",
    "width = 0",
    "width = -1.5",
    "width = nan",
    "width = inf",
    "epochs = 0",
    "epochs = -1",
    "epochs = 18446744073709551615",
    "batch_size = 0",
    "batch_size = 9223372036854775807",
    "threads = 0",
    "seed = -9223372036854775808",
    "lr = nan",
    "lr = -inf",
    "lr = 1e400",
    "density = 0.0",
    "density = 1.5",
    "density = -0.0",
    "top_k = [1, 20]",
    "top_k = []",
    "top_k = [0]",
    "source = \"cifar10\"",
    "source = \"cifar100\"",
    "labels = \"coarse\"",
    "path = \"/nonexistent/dir\"",
    "subset = { per_class = 0 }",
    "subset = { fraction = 2.0 }",
    "subset = { per_class = 1, fraction = 0.5 }",
    "train_size = 0",
    "device = \"cuda:99\"",
    "device = \"mps\"",
    "autocast = \"bf16\"",
    "eval_every = 0",
    "kind = \"step\"",
    "kind = \"nope\"",
    "warmup = 1e308",
    "use = \"\"",
    "use = \"sgd\"",
    "plugins = \"\"",
    "plugins = 5",
    "a.b.c = 1",
    "model.width = 64",
    "'' = 1",
    "\"\\u0000\" = 2",
    "x = {",
    "x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "x = 1979-05-27T07:32:00Z",
    "x = \"\"\"",
    "x = 0x7fffffffffffffff",
];

const OVERRIDES: &[&str] = &[
    "train.epochs=3",
    "optimizer.lr=0.5",
    "model.width=0.5",
    "pruner.use=grasp",
    "metrics.0.top_k=[1]",
    "data.subset={ per_class = 2 }",
    "train.device=\"cpu\"",
];

#[test]
fn fuzz_run_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let extra_seeds = [
        include_str!("../../examples/cifar10_resnet18.toml"),
        include_str!("../../examples/pruning/base.toml"),
        include_str!("../../examples/distill_kd.toml"),
    ];
    // The seeds themselves are valid.
    for text in std::iter::once(CONFIG_SEED).chain(extra_seeds) {
        std::fs::write(&path, text).unwrap();
        if let Err(e) = trellis::config::LoadedConfig::load(&path, &[]) {
            panic!("seed does not load: {e:#}\n{text}");
        }
    }
    let mut rng = Rng(seed());
    drive("run config", cases(2000), move |i, current| {
        let base = if i % 4 == 3 {
            extra_seeds[(i / 4) % extra_seeds.len()]
        } else {
            CONFIG_SEED
        };
        let text = mutate(
            base.as_bytes(),
            &mut rng,
            Mode::Text(CONFIG_LINES),
            &[],
            1 << 16,
        );
        // A quarter of the cases also pass mutated `--set` overrides.
        let overrides: Vec<String> = if i % 4 == 1 {
            (0..1 + rng.below(3))
                .map(|_| {
                    let o = rng.pick(OVERRIDES).as_bytes();
                    String::from_utf8_lossy(&mutate(o, &mut rng, Mode::Binary, &[], 256))
                        .into_owned()
                })
                .collect()
        } else {
            Vec::new()
        };
        *current.lock().unwrap() = format!("{}\n--set {overrides:?}", show_text(&text));
        std::fs::write(&path, &text).map_err(|e| e.to_string())?;
        Ok(trellis::config::LoadedConfig::load(&path, &overrides).is_ok())
    });
}

const MANIFEST_SEED: &str = r#"# Every entry points at a file that does not exist: nothing is ever loaded.
[[plugin]]
name = "trellis-optim"
path = "missing/libtrellis_optim.so"

[[plugin]]
name = "trellis-metrics"
path = "missing/libtrellis_metrics.so"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

const MANIFEST_LINES: &[&str] = &[
    "[[plugin]]",
    "[plugin]",
    "name = \"\"",
    "name = \"trellis-optim\"",
    "path = \"\"",
    "path = \"missing\"",
    "path = \"missing/../missing/x.so\"",
    "path = 5",
    "sha256 = \"\"",
    "sha256 = \"zz\"",
    "sha256 = \"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\"",
    "extra = true",
    "plugin = []",
    "plugin = [{}]",
    "x = {",
];

#[test]
fn fuzz_plugin_manifest() {
    // The manifest lives alone in its directory, so no mutated path can reach a real library
    // (and an unpinned one is refused unless it is a valid ELF shared object).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.toml");
    let mut rng = Rng(seed() ^ 1);
    drive("plugin manifest", cases(2000), move |_, current| {
        let text = mutate(
            MANIFEST_SEED.as_bytes(),
            &mut rng,
            Mode::Text(MANIFEST_LINES),
            &[],
            1 << 16,
        );
        *current.lock().unwrap() = show_text(&text);
        std::fs::write(&path, &text).map_err(|e| e.to_string())?;
        let result = trellis::plugin_host::Registry::load(&path);
        // Only an empty plugin list may succeed: no file it could name exists.
        if let Ok(r) = &result {
            assert!(r.libraries.is_empty(), "loaded a library from {text:?}");
        }
        Ok(result.is_ok())
    });
}

type Named = Vec<(String, Tensor)>;

/// The tensors of a small model and of an optimizer's state, several dtypes.
fn sample_tensors() -> (Named, Named) {
    let model = vec![
        (
            "fc.weight".to_string(),
            Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]),
        ),
        (
            "fc.bias".to_string(),
            Tensor::from_slice(&[0.5f32, -1.0, 2.0]),
        ),
        (
            "bn.num_batches_tracked".to_string(),
            Tensor::from_slice(&[7i64]),
        ),
        (
            "mask".to_string(),
            Tensor::from_slice(&[1u8, 0, 1, 1]).view([2, 2]),
        ),
        (
            "half".to_string(),
            Tensor::from_slice(&[1.0f64, 2.0]).to_kind(Kind::Half),
        ),
    ];
    let state = vec![
        (
            "momentum.fc.weight".to_string(),
            Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu)),
        ),
        ("step".to_string(), Tensor::from_slice(&[3.0f64])),
    ];
    (model, state)
}

/// Offsets in a safetensors file worth mutating more often: the 8-byte header length and every
/// digit, bracket and quote of the JSON header.
fn safetensors_hot(bytes: &[u8]) -> Vec<usize> {
    let n = bytes
        .get(..8)
        .map_or(0, |h| u64::from_le_bytes(h.try_into().unwrap()) as usize);
    let header = bytes.get(8..8 + n).unwrap_or_default();
    let mut hot: Vec<usize> = (0..8).collect();
    hot.extend(
        header
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_ascii_digit() || b"[]{}\",:".contains(c))
            .map(|(i, _)| i + 8),
    );
    hot
}

#[test]
fn fuzz_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let (model, state) = sample_tensors();
    let seeds: Vec<Vec<u8>> = [&model, &state]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = dir.path().join(format!("seed{i}.safetensors"));
            trellis::models::write_safetensors(t, &p).unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect();
    let hots: Vec<Vec<usize>> = seeds.iter().map(|s| safetensors_hot(s)).collect();
    let path = dir.path().join("case.safetensors");
    let mut rng = Rng(seed() ^ 2);
    drive("safetensors", cases(2000), move |i, current| {
        let k = i % seeds.len();
        let bytes = mutate(&seeds[k], &mut rng, Mode::Binary, &hots[k], 1 << 16);
        *current.lock().unwrap() = show_hex(&bytes);
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        Ok(match trellis::models::read_safetensors(&path) {
            Ok(tensors) => {
                // What was read must be usable: touch every element.
                for (_, t) in &tensors {
                    let _ = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                }
                true
            }
            Err(_) => false,
        })
    });
}

const TRAINER_LINES: &[&str] = &[
    "\"format\": 2,",
    "\"epoch\": 18446744073709551616,",
    "\"step\": -1,",
    "\"meta\": {\"optimizer\": 5},",
    "\"meta\": {\"\": \"\"},",
    "\"files\": null,",
    "{",
    "}",
    "\"x\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
];

#[test]
fn fuzz_checkpoint_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let (model, state_tensors) = sample_tensors();
    let mut parts = BTreeMap::new();
    parts.insert(
        "optimizer".to_string(),
        (state_tensors, "{\"lr\":0.1}".to_string()),
    );
    parts.insert("scheduler".to_string(), (Vec::new(), "cosine".to_string()));
    let state = TrainingState {
        epoch: 3,
        step: 42,
        parts,
    };
    let record = checkpoint::write(&good, &model, &state).unwrap();
    let originals: Vec<Vec<u8>> = checkpoint::FILES
        .iter()
        .map(|f| std::fs::read(good.join(&record.dir).join(f)).unwrap())
        .collect();
    let hots: Vec<Vec<usize>> = originals
        .iter()
        .take(2)
        .map(|b| safetensors_hot(b))
        .collect();
    // The original loads.
    checkpoint::load(&good, &record).unwrap();

    let run = dir.path().join("run");
    let ck = run.join(&record.dir);
    std::fs::create_dir_all(&ck).unwrap();
    let mut rng = Rng(seed() ^ 3);
    drive("checkpoint", cases(600), move |i, current| {
        // Mutate one file; the record carries the mutated files' sha256, as if state.json had
        // been written for them, so the parsers behind the hash check are reached.
        let which = i % 3;
        let mut files = originals.clone();
        files[which] = if which == 2 {
            mutate(
                &files[which],
                &mut rng,
                Mode::Text(TRAINER_LINES),
                &[],
                1 << 16,
            )
        } else {
            mutate(&files[which], &mut rng, Mode::Binary, &hots[which], 1 << 16)
        };
        let mut rec = Record {
            files: BTreeMap::new(),
            ..record.clone()
        };
        for (name, bytes) in checkpoint::FILES.iter().zip(&files) {
            let p = ck.join(name);
            std::fs::write(&p, bytes).map_err(|e| e.to_string())?;
            rec.files.insert(
                name.to_string(),
                checkpoint::sha256_of(&p).map_err(|e| e.to_string())?,
            );
        }
        // Now and then the record itself disagrees, or the hash of the mutated file is stale.
        match rng.below(16) {
            0 => rec.epoch = rng.below(8),
            1 => {
                rec.files.remove(*rng.pick(&checkpoint::FILES));
            }
            2 => {
                let name = checkpoint::FILES[which].to_string();
                let stale = record.files[&name].clone();
                rec.files.insert(name, stale);
            }
            _ => {}
        }
        *current.lock().unwrap() = format!(
            "{} mutated ({}), record {rec:?}",
            checkpoint::FILES[which],
            if which == 2 {
                show_text(&files[which])
            } else {
                show_hex(&files[which])
            }
        );
        Ok(match checkpoint::load(&run, &rec) {
            Ok((model_path, _state)) => {
                // The network's file is read by the same reader a resume uses.
                let _ = trellis::models::read_safetensors(&model_path);
                true
            }
            Err(_) => false,
        })
    });
}

const RECORD: usize = 1 + 3 * 32 * 32;
const RECORDS: usize = 10_000;

#[test]
fn fuzz_cifar10_reader() {
    // The public reader insists on the real record count (10,000 per file), so the seed is a
    // full-size data set (30 MB a file; the four other training files are links to one valid
    // file). Pixels are opaque to the reader: mutations aim at label bytes and at the size.
    let dir = tempfile::tempdir().unwrap();
    let valid: Vec<u8> = (0..RECORDS * RECORD)
        .map(|i| {
            if i % RECORD == 0 {
                ((i / RECORD) % 10) as u8
            } else {
                (i * 7 % 251) as u8
            }
        })
        .collect();
    let shared = dir.path().join("valid.bin");
    std::fs::write(&shared, &valid).unwrap();
    let data = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&data).unwrap();
    for name in [
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ] {
        std::os::unix::fs::symlink(&shared, data.join(name)).unwrap();
    }
    let hot: Vec<usize> = (0..RECORDS)
        .map(|r| r * RECORD)
        .chain([valid.len() - 1, valid.len() - RECORD + 1])
        .collect();
    let mut rng = Rng(seed() ^ 4);
    let max = valid.len() + 8192;
    drive("cifar10", cases(40), move |i, current| {
        // Mostly the first training file (its errors stop the read early); every fourth case the
        // test file, read after all five training files.
        let (target, other) = if i % 4 == 3 {
            ("test_batch.bin", "data_batch_1.bin")
        } else {
            ("data_batch_1.bin", "test_batch.bin")
        };
        let bytes = mutate(&valid, &mut rng, Mode::Binary, &hot, max);
        let changed: Vec<usize> = bytes
            .iter()
            .zip(&valid)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(k, _)| k)
            .take(32)
            .collect();
        *current.lock().unwrap() = format!(
            "{target}: {} bytes (valid: {}), first differing offsets {changed:?}",
            bytes.len(),
            valid.len()
        );
        let _ = std::fs::remove_file(data.join(other));
        std::os::unix::fs::symlink(&shared, data.join(other)).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(data.join(target));
        std::fs::write(data.join(target), &bytes).map_err(|e| e.to_string())?;
        Ok(trellis::data::read_cifar10(&data).is_ok())
    });
}

/// The engine is deterministic (the same seed gives the same inputs) and does mutate.
#[test]
fn fuzz_engine_is_deterministic() {
    let run = |s| {
        let mut rng = Rng(s);
        (0..50)
            .map(|_| {
                mutate(
                    CONFIG_SEED.as_bytes(),
                    &mut rng,
                    Mode::Text(CONFIG_LINES),
                    &[],
                    1 << 16,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    assert!(run(1).iter().any(|m| m != CONFIG_SEED.as_bytes()));
}
