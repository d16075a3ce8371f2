//! Pruning in a run (METHODS.md section 0): when to prune, the scoring batches,
//! checking a pruner's masks (names, shapes, 0/1, the exact density), keeping pruned weights at
//! exactly zero for the rest of the run, and reporting every layer's density. Also `trellis
//! prune`, which stops a run at its pruning point and saves what the pruner saw and decided.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Tensor};
use trellis_sdk::{Batch, Host, Model, PruneRequest, Pruner, Role, Scope, Table};

use crate::config::{
    component_text, CountChoice, LoadedConfig, PrunerConfig, ScopeChoice, ScoringChoice, TablePath,
};
use crate::data::{self, rng::Rng, Loader, LoaderOptions};
use crate::plugin_host::Registry;
use crate::services::{ModelView, RunHost, RunState};
use crate::source::Seg;

/// Where the masks come from.
enum MaskSource {
    Pruner {
        name: String,
        pruner: Box<dyn Pruner>,
    },
    File(PathBuf),
}

/// One prunable weight with the mask it is held to.
struct Masked {
    name: String,
    weight: Tensor,
    mask: Tensor,
}

/// The masks in force: pruned weights are zero, and so is their gradient.
pub struct Masks {
    entries: Vec<Masked>,
    /// The training step at which they were applied.
    pub step: u64,
    /// The pruner or mask file they came from.
    pub origin: String,
}

/// Kept weights of one prunable parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDensity {
    pub name: String,
    pub kept: i64,
    pub total: i64,
}

impl LayerDensity {
    pub fn density(&self) -> f64 {
        self.kept as f64 / self.total.max(1) as f64
    }
}

impl Masks {
    /// Zeroes the pruned weights; called after pruning and after every optimizer step, so that
    /// neither momentum nor weight decay can bring them back.
    pub fn apply(&self) {
        tch::no_grad(|| {
            for m in &self.entries {
                let _ = m.weight.shallow_clone().g_mul_(&m.mask);
            }
        });
    }

    /// Zeroes the gradient of pruned weights, so the optimizer's state never sees one.
    pub fn mask_gradients(&self) {
        for m in &self.entries {
            let mut grad = m.weight.grad();
            if grad.defined() {
                let _ = grad.g_mul_(&m.mask);
            }
        }
    }

    /// The masks by parameter name (for checkpoints and mask files).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .map(|m| (m.name.clone(), m.mask.shallow_clone()))
            .collect()
    }

    pub fn densities(&self) -> Vec<LayerDensity> {
        self.entries
            .iter()
            .map(|m| LayerDensity {
                name: m.name.clone(),
                kept: m.mask.count_nonzero(None::<i64>).int64_value(&[]),
                total: m.mask.numel() as i64,
            })
            .collect()
    }
}

/// (kept, total) over all prunable weights.
fn totals(layers: &[LayerDensity]) -> (i64, i64) {
    (
        layers.iter().map(|l| l.kept).sum(),
        layers.iter().map(|l| l.total).sum(),
    )
}

/// What `trellis prune` saves besides the masks: exactly what the pruner was given and returned.
pub struct Inspection {
    pub scores: Vec<(String, Tensor)>,
    pub batches: Vec<Batch>,
    /// Every variable of the network at the pruning point, before the masks were applied.
    pub weights: Vec<(String, Tensor)>,
}

/// A run's pruning: the plan from `[pruner]`, then the masks once applied.
pub struct Pruning {
    source: MaskSource,
    pub at_step: u64,
    /// The density to reach; `None` when masks come from a file without a target.
    target: Option<f64>,
    scope: Scope,
    count: CountChoice,
    scoring: Scoring,
    pub masks: Option<Masks>,
    /// Set by `trellis prune`: keep the scores, batches and weights of the pruning.
    pub inspect: bool,
    pub inspection: Option<Inspection>,
    /// Tables for the metrics record of the epoch in which pruning happened.
    pending_tables: Vec<Table>,
}

fn target_key(p: &PrunerConfig) -> &'static str {
    if p.sparsity.is_some() {
        "sparsity"
    } else if p.density.is_some() {
        "density"
    } else if p.compression.is_some() {
        "compression"
    } else {
        "masks"
    }
}

fn sdk_error(e: trellis_sdk::Error) -> anyhow::Error {
    anyhow!(e.message)
}

/// The SDK's view of the run's model: its `prunable_parameters` defines the prunable set.
fn sdk_model(state: &RunState) -> Model {
    Model::new(ModelView(state.model()))
}

impl Pruning {
    /// Checks `[pruner]` against the model and the run's length and creates the pruner, so a
    /// bad value is refused before any training.
    pub fn setup(
        cfg: &LoadedConfig,
        registry: &Registry,
        host: &RunHost,
        total_steps: u64,
    ) -> Result<Option<Pruning>> {
        let Some(p) = &cfg.config.pruner else {
            return Ok(None);
        };
        let at = |key: &'static str| [Seg::Key("pruner"), Seg::Key(key)];
        let density = p
            .density()
            .map_err(|(k, message)| cfg.error_at(&at(k), &message, None))?;
        let target = (!density.is_nan()).then_some(density);
        let scope = match p.scope {
            ScopeChoice::Global => Scope::Global,
            ScopeChoice::Layer => Scope::Layer,
        };
        if let (Some(d), Scope::Layer) = (target, scope) {
            for param in sdk_model(&host.0)
                .prunable_parameters()
                .map_err(sdk_error)?
            {
                let n = param.tensor.numel() as i64;
                if p.count.pruned(d, n) == n {
                    let key = target_key(p);
                    return Err(cfg.error_at(
                        &at(key),
                        &format!(
                            "density {d} with scope = \"layer\" would prune all {n} weights of `{}`",
                            param.name
                        ),
                        Some(&format!(
                            "every layer keeps round({d} · its size) weights; the smallest layer needs \
                             density > {:.3e}, or use scope = \"global\"",
                            0.5 / n as f64
                        )),
                    ));
                }
            }
        }
        if p.at_step >= total_steps {
            return Err(cfg.error_at(
                &at("at_step"),
                &format!(
                    "at_step = {} is not before the end of training ({total_steps} steps): the run would never prune",
                    p.at_step
                ),
                Some("at_step counts training iterations; 0 prunes at initialisation"),
            ));
        }
        let source = match (&p.component, &p.masks) {
            (Some(name), _) => {
                let table = TablePath::Pruner;
                if !registry.provides(Role::Pruner, name) {
                    return Err(cfg.use_error(&table, &registry.unknown(Role::Pruner, name)));
                }
                let mut options = p.options.clone();
                if p.count == CountChoice::Floor {
                    options.insert("count".into(), "floor".into());
                }
                let text = component_text(&options)?;
                let pruner = registry
                    .create(Role::Pruner, name, &text, Host::new(host.clone()))
                    .map_err(|e| cfg.component_error(&table, e))?
                    .into_pruner()
                    .ok_or_else(|| anyhow!("component `{name}` is not a pruner"))?;
                MaskSource::Pruner {
                    name: name.clone(),
                    pruner,
                }
            }
            (None, Some(path)) => {
                let path = cfg.resolve(path);
                if !path.is_file() {
                    return Err(cfg.error_at(
                        &at("masks"),
                        &format!("mask file {} does not exist", path.display()),
                        Some("write one with `trellis prune CONFIG --out masks.safetensors`"),
                    ));
                }
                MaskSource::File(path)
            }
            (None, None) => bail!("[pruner] names neither a pruner nor a mask file"),
        };
        Ok(Some(Pruning {
            source,
            at_step: p.at_step,
            target,
            scope,
            count: p.count,
            scoring: Scoring {
                choice: p.scoring,
                samples_per_class: p.samples_per_class,
                augment: p.scoring_augment,
                batches: p.batches,
            },
            masks: None,
            inspect: false,
            inspection: None,
            pending_tables: Vec::new(),
        }))
    }

    /// Whether the masks are due before training step `step`.
    pub fn due(&self, step: u64) -> bool {
        self.masks.is_none() && step == self.at_step
    }

    /// Computes (or reads) the masks, checks them, zeroes the pruned weights and reports.
    pub fn prune(&mut self, state: &RunState, step: u64) -> Result<()> {
        let model = sdk_model(state);
        let (masks, origin) = match &mut self.source {
            MaskSource::Pruner { name, pruner } => {
                let batches = scoring_batches(state, &self.scoring)?;
                let weights = self.inspect.then(|| {
                    state
                        .model()
                        .net()
                        .state_dict()
                        .into_iter()
                        .map(|(n, t)| (n, t.to_device(Device::Cpu).detach_copy()))
                        .collect()
                });
                let kept_batches = self.inspect.then(|| {
                    batches
                        .iter()
                        .map(|b| Batch {
                            inputs: b.inputs.shallow_clone(),
                            targets: b.targets.shallow_clone(),
                        })
                        .collect()
                });
                let was_training = model.is_training().map_err(sdk_error)?;
                let density = self.target.unwrap_or(1.0);
                tracing::info!(
                    "pruning with {name} at step {step} to density {density} ({:?} threshold)",
                    self.scope
                );
                let result = pruner.prune(PruneRequest {
                    density,
                    scope: self.scope,
                    batches,
                });
                model.set_training(was_training).map_err(sdk_error)?;
                let result = result.map_err(sdk_error)?;
                if let (Some(weights), Some(batches)) = (weights, kept_batches) {
                    self.inspection = Some(Inspection {
                        scores: result.scores,
                        batches,
                        weights,
                    });
                }
                (result.masks, format!("pruner {name}"))
            }
            MaskSource::File(path) => {
                let masks = crate::models::read_safetensors(path)
                    .with_context(|| format!("cannot read the mask file {}", path.display()))?;
                (masks, format!("mask file {}", path.display()))
            }
        };
        let masks = checked_masks(&model, masks, &origin, step)?;
        self.check_density(&masks, &origin)?;
        masks.apply();
        masks.mask_gradients();
        let layers = masks.densities();
        let (kept, total) = totals(&layers);
        tracing::info!(
            "{origin} kept {kept} of {total} prunable weights: density {:.6}",
            kept as f64 / total.max(1) as f64
        );
        for l in layers.iter().filter(|l| l.kept == 0) {
            tracing::warn!(
                "layer collapse: {} kept none of its {} weights, so no signal passes through it",
                l.name,
                l.total
            );
        }
        self.pending_tables = self.tables(&masks);
        self.masks = Some(masks);
        Ok(())
    }

    /// The exact density check: k = round((1 − d)·N) pruned over all weights, or in every layer.
    fn check_density(&self, masks: &Masks, origin: &str) -> Result<()> {
        let Some(d) = self.target else {
            return Ok(());
        };
        let layers = masks.densities();
        let groups: Vec<(String, i64, i64)> = match self.scope {
            Scope::Global => {
                let (kept, total) = totals(&layers);
                vec![("all prunable weights".to_string(), kept, total)]
            }
            Scope::Layer => layers
                .iter()
                .map(|l| (format!("`{}`", l.name), l.kept, l.total))
                .collect(),
        };
        for (what, kept, total) in groups {
            let expected = total - self.count.pruned(d, total);
            if kept != expected {
                bail!(
                    "{origin} kept {kept} of {total} weights of {what}, but density {d} keeps exactly \
                     {expected} (k = {}((1 − d)·N) pruned, ties broken by position)",
                    match self.count {
                        CountChoice::Round => "round",
                        CountChoice::Floor => "floor",
                    }
                );
            }
        }
        Ok(())
    }

    /// Masks saved in a checkpoint, put back in force.
    pub fn restore(
        &mut self,
        state: &RunState,
        tensors: Vec<(String, Tensor)>,
        meta: &str,
    ) -> Result<()> {
        let (step, origin) = meta.split_once('\n').unwrap_or((meta, "the checkpoint"));
        let step = step
            .trim()
            .parse::<u64>()
            .map_err(|_| anyhow!("the checkpoint's masks carry no pruning step (`{meta}`)"))?;
        let masks = checked_masks(&sdk_model(state), tensors, origin, step)?;
        masks.apply();
        self.masks = Some(masks);
        Ok(())
    }

    /// The checkpoint part: the masks, with the step they were applied at and their origin as
    /// metadata.
    pub fn checkpoint_part(&self) -> Option<(Vec<(String, Tensor)>, String)> {
        self.masks
            .as_ref()
            .map(|m| (m.tensors(), format!("{}\n{}", m.step, m.origin)))
    }

    /// The density tables of the pruning just done, once.
    pub fn take_tables(&mut self) -> Vec<Table> {
        std::mem::take(&mut self.pending_tables)
    }

    /// `density`: one row per prunable weight; `pruning`: the global row.
    fn tables(&self, masks: &Masks) -> Vec<Table> {
        let layers = masks.densities();
        let (kept, total) = totals(&layers);
        let mut columns = vec![
            "density".to_string(),
            "kept".into(),
            "total".into(),
            "step".into(),
        ];
        let mut global = vec![
            kept as f64 / total.max(1) as f64,
            kept as f64,
            total as f64,
            masks.step as f64,
        ];
        if let Some(d) = self.target {
            columns.push("target".into());
            global.push(d);
        }
        vec![
            Table {
                name: "pruning".into(),
                columns,
                rows: vec![("global".into(), global)],
            },
            Table {
                name: "density".into(),
                columns: vec!["density".into(), "kept".into(), "total".into()],
                rows: layers
                    .iter()
                    .map(|l| {
                        (
                            l.name.clone(),
                            vec![l.density(), l.kept as f64, l.total as f64],
                        )
                    })
                    .collect(),
            },
        ]
    }
}

/// A pruner's (or a file's) masks checked against the model: one per prunable weight, by name,
/// with the weight's shape, and only 0s and 1s; converted to the weight's dtype and device.
fn checked_masks(
    model: &Model,
    masks: Vec<(String, Tensor)>,
    origin: &str,
    step: u64,
) -> Result<Masks> {
    let prunable: BTreeMap<String, Tensor> = model
        .prunable_parameters()
        .map_err(sdk_error)?
        .into_iter()
        .map(|p| (p.name, p.tensor))
        .collect();
    let mut given: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, mask) in masks {
        let Some(weight) = prunable.get(&name) else {
            bail!(
                "{origin} has a mask for `{name}`, which is not a prunable weight of this model \
                 (only Conv2d and Linear weights are pruned)"
            );
        };
        if mask.size() != weight.size() {
            bail!(
                "{origin}: the mask of `{name}` has shape {:?}, the weight {:?}",
                mask.size(),
                weight.size()
            );
        }
        let binary = mask.eq(0).logical_or(&mask.eq(1)).all().int64_value(&[]) != 0;
        if !binary {
            bail!("{origin}: the mask of `{name}` holds values other than 0 and 1");
        }
        if given.insert(name.clone(), mask).is_some() {
            bail!("{origin} has two masks for `{name}`");
        }
    }
    let missing: BTreeSet<&String> = prunable
        .keys()
        .filter(|n| !given.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        bail!("{origin} has no mask for {}", names.join(", "));
    }
    // In the model's registration order, for reports.
    let entries = model
        .prunable_parameters()
        .map_err(sdk_error)?
        .into_iter()
        .map(|p| {
            let mask = &given[&p.name];
            Masked {
                mask: mask.to_kind(p.tensor.kind()).to_device(p.tensor.device()),
                name: p.name,
                weight: p.tensor,
            }
        })
        .collect();
    Ok(Masks {
        entries,
        step,
        origin: origin.to_string(),
    })
}

/// What the scoring batches are made of: `[pruner]`'s `scoring`, `samples_per_class`,
/// `scoring_augment` and `batches`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scoring {
    pub choice: ScoringChoice,
    pub samples_per_class: usize,
    pub augment: bool,
    pub batches: usize,
}

/// Keeps the augmentation draws of the scoring images apart from the training loader's, which
/// takes the run seed as it is.
const SCORING_AUGMENT_STREAM: u64 = 0x5341_5547; // "SAUG"

/// The scoring data (METHODS.md section 0), drawn with the run's seed: by default
/// `samples_per_class` images of every class, interleaved by class so that every batch stays as
/// class-balanced as the split allows; with `scoring = "random"`, `samples_per_class × classes`
/// images drawn whatever their class, in the order drawn. Unaugmented unless `scoring_augment`,
/// which gives them the run's training crop and flip. Split into `batches` batches.
pub fn scoring_batches(state: &RunState, scoring: &Scoring) -> Result<Vec<Batch>> {
    let data = &state.train_data;
    let order = match scoring.choice {
        ScoringChoice::Balanced => {
            let chosen = data::class_balanced_indices(data, scoring.samples_per_class, state.seed);
            let labels = data.label_vec();
            let mut by_class: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for &i in &chosen {
                by_class.entry(labels[i as usize]).or_default().push(i);
            }
            let mut order = Vec::with_capacity(chosen.len());
            for round in 0.. {
                let before = order.len();
                order.extend(by_class.values().filter_map(|v| v.get(round).copied()));
                if order.len() == before {
                    break;
                }
            }
            order
        }
        ScoringChoice::Random => {
            let n = scoring.samples_per_class * data.num_classes as usize;
            data::random_indices(data, n, state.seed)
        }
    };
    let n = order.len();
    if n == 0 {
        bail!("the training set has no images to score the pruner on");
    }
    let batches = scoring.batches;
    if batches > n {
        bail!("[pruner] batches = {batches}, but the scoring sample has only {n} images");
    }
    let sample = data.select(&order);
    let (inputs, targets) = if scoring.augment && state.augment {
        let mut loader = Loader::new(
            &sample,
            LoaderOptions {
                batch_size: n,
                shuffle: false,
                augment: true,
                drop_last: false,
                seed: Rng::derive(state.seed, &[SCORING_AUGMENT_STREAM]).next_u64(),
                epoch: 0,
                device: state.device,
                normalize: state.normalize.clone(),
            },
        );
        let batch = loader
            .next()
            .ok_or_else(|| anyhow!("the scoring images came back empty from augmentation"))?;
        (batch.inputs, batch.targets)
    } else {
        (
            data::normalize_batch(&sample.images, &state.normalize, state.device),
            sample.labels.to_device(state.device),
        )
    };
    let sizes: Vec<i64> = (0..batches)
        .map(|i| (n / batches + usize::from(i < n % batches)) as i64)
        .collect();
    Ok(inputs
        .split_with_sizes(&sizes, 0)
        .into_iter()
        .zip(targets.split_with_sizes(&sizes, 0))
        .map(|(inputs, targets)| Batch { inputs, targets })
        .collect())
}

/// The per-layer table printed at the end of a run and by `trellis prune`.
pub fn density_table(masks: &Masks) -> String {
    let layers = masks.densities();
    let (kept, total) = totals(&layers);
    let width = layers
        .iter()
        .map(|l| l.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pruning ({}, step {}): per-layer density",
        masks.origin, masks.step
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:>10}  {:>10}  {:>9}",
        "layer", "kept", "total", "density"
    );
    let _ = writeln!(out, "{}", "-".repeat(width + 35));
    for l in &layers {
        let flag = if l.kept == 0 { "  collapsed" } else { "" };
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>9.6}{flag}",
            l.name,
            l.kept,
            l.total,
            l.density()
        );
    }
    let _ = writeln!(out, "{}", "-".repeat(width + 35));
    let _ = writeln!(
        out,
        "{:<width$}  {:>10}  {:>10}  {:>9.6}",
        "all",
        kept,
        total,
        kept as f64 / total.max(1) as f64
    );
    out
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::data::{Dataset, Normalize};
    use crate::models::{Arch, ModelConfig, Network};
    use crate::services::SharedModel;
    use tch::Kind;

    /// An MLP 4 → 4 → 3 (`fc0.weight` 16 weights, `head.weight` 12) on 12 one-channel 2×2
    /// images of 3 classes.
    fn state() -> Rc<RunState> {
        let config = ModelConfig {
            hidden: Some(vec![4]),
            ..ModelConfig::new(Arch::Mlp)
        };
        let net = Network::build(&config, 3, 1, 2, Device::Cpu).unwrap();
        let labels: Vec<i64> = (0..12).map(|i| i % 3).collect();
        let images = Tensor::arange(48, (Kind::Uint8, Device::Cpu)).view([12, 1, 2, 2]);
        let data = Dataset::new(images, Tensor::from_slice(&labels), 3).unwrap();
        let state = RunState::new(
            3,
            Device::Cpu,
            5,
            Rc::new(data),
            4,
            false,
            Normalize::identity(),
            None,
            PathBuf::from("."),
        );
        state.set_model(SharedModel::new(net));
        state
    }

    fn ones_masks() -> Vec<(String, Tensor)> {
        vec![
            (
                "fc0.weight".into(),
                Tensor::ones([4, 4], (Kind::Float, Device::Cpu)),
            ),
            (
                "head.weight".into(),
                Tensor::ones([3, 4], (Kind::Float, Device::Cpu)),
            ),
        ]
    }

    fn refusal(masks: Vec<(String, Tensor)>) -> String {
        let model = sdk_model(&state());
        match checked_masks(&model, masks, "pruner x", 0) {
            Ok(_) => panic!("masks accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn masks_must_cover_the_prunable_weights_with_their_shapes_and_only_0_and_1() {
        let mut masks = ones_masks();
        masks.push((
            "fc0.bias".into(),
            Tensor::ones([4], (Kind::Float, Device::Cpu)),
        ));
        assert!(refusal(masks).contains("`fc0.bias`, which is not a prunable weight"));
        let mut masks = ones_masks();
        masks[1].1 = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
        assert!(refusal(masks).contains("shape"));
        let mut masks = ones_masks();
        masks[0].1 = masks[0].1.shallow_clone() * 0.5;
        assert!(refusal(masks).contains("other than 0 and 1"));
        let mut masks = ones_masks();
        masks.pop();
        assert!(refusal(masks).contains("no mask for head.weight"));
        let model = sdk_model(&state());
        assert!(checked_masks(&model, ones_masks(), "pruner x", 0).is_ok());
    }

    #[test]
    fn the_density_must_be_exact_and_masks_hold_weights_and_gradients_at_zero() {
        let state = state();
        let pruning = |scope| Pruning {
            source: MaskSource::File(PathBuf::from("unused")),
            at_step: 0,
            target: Some(0.5),
            scope,
            count: CountChoice::Round,
            scoring: Scoring {
                choice: ScoringChoice::Balanced,
                samples_per_class: 1,
                augment: false,
                batches: 1,
            },
            masks: None,
            inspect: false,
            inspection: None,
            pending_tables: Vec::new(),
        };
        // 28 weights at density 0.5 keep exactly 14: prune the first 8 of fc0 and 6 of head.
        let masks = ones_masks();
        let _ = masks[0].1.view(-1).narrow(0, 0, 8).fill_(0.0);
        let _ = masks[1].1.view(-1).narrow(0, 0, 6).fill_(0.0);
        let model = sdk_model(&state);
        let checked = checked_masks(&model, masks, "pruner x", 0).unwrap();
        pruning(Scope::Global)
            .check_density(&checked, "pruner x")
            .unwrap();
        // Per layer too: fc0 keeps round(0.5 · 16) = 8, head round(0.5 · 12) = 6.
        pruning(Scope::Layer)
            .check_density(&checked, "pruner x")
            .unwrap();
        // One weight more pruned: refused, naming the counts.
        let masks = checked.tensors();
        let _ = masks[0].1.view(-1).narrow(0, 8, 1).fill_(0.0);
        let off_by_one = checked_masks(&model, masks, "pruner x", 0).unwrap();
        let e = pruning(Scope::Global)
            .check_density(&off_by_one, "pruner x")
            .unwrap_err();
        assert!(format!("{e}").contains("kept 13 of 28"), "{e}");

        // count = "floor" at density 0.51 prunes ⌊0.49 · 28⌋ = 13, where round prunes 14.
        let floor = || Pruning {
            target: Some(0.51),
            count: CountChoice::Floor,
            ..pruning(Scope::Global)
        };
        // (The off-by-one mask above shares its storage, so start again from 14 pruned.)
        let masks = ones_masks();
        let _ = masks[0].1.view(-1).narrow(0, 0, 8).fill_(0.0);
        let _ = masks[1].1.view(-1).narrow(0, 0, 6).fill_(0.0);
        let checked = checked_masks(&model, masks, "pruner x", 0).unwrap();
        let e = floor().check_density(&checked, "pruner x").unwrap_err();
        assert!(
            format!("{e}").contains("kept 14 of 28") && format!("{e}").contains("exactly 15"),
            "{e}"
        );
        let masks = checked.tensors();
        let _ = masks[0].1.view(-1).narrow(0, 7, 1).fill_(1.0);
        let thirteen_pruned = checked_masks(&model, masks, "pruner x", 0).unwrap();
        floor().check_density(&thirteen_pruned, "pruner x").unwrap();

        // Weights and gradients of pruned entries go to exactly zero.
        let weight = model.prunable_parameters().unwrap()[0]
            .tensor
            .shallow_clone();
        let loss = model
            .forward(&Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu)))
            .unwrap()
            .logits
            .sum(Kind::Float);
        loss.backward();
        off_by_one.apply();
        off_by_one.mask_gradients();
        let pruned = weight.view(-1).narrow(0, 0, 9);
        assert_eq!(pruned.count_nonzero(None::<i64>).int64_value(&[]), 0);
        let grad = weight.grad().view(-1).narrow(0, 0, 9);
        assert_eq!(grad.count_nonzero(None::<i64>).int64_value(&[]), 0);
        assert!(
            weight
                .view(-1)
                .narrow(0, 9, 7)
                .count_nonzero(None::<i64>)
                .int64_value(&[])
                > 0
        );
    }

    fn scoring(choice: ScoringChoice, samples_per_class: usize, batches: usize) -> Scoring {
        Scoring {
            choice,
            samples_per_class,
            augment: false,
            batches,
        }
    }

    fn balanced(samples_per_class: usize, batches: usize) -> Scoring {
        scoring(ScoringChoice::Balanced, samples_per_class, batches)
    }

    fn labels(batches: &[Batch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| Vec::<i64>::try_from(&b.targets).unwrap())
            .collect()
    }

    fn inputs(batches: &[Batch]) -> Tensor {
        let all: Vec<&Tensor> = batches.iter().map(|b| &b.inputs).collect();
        Tensor::cat(&all, 0)
    }

    /// `n` one-channel `side`×`side` images, labels cycling through 3 classes, every pixel
    /// different; no model, which the scoring data does not need.
    fn image_state(n: i64, side: i64, augment: bool, seed: u64) -> Rc<RunState> {
        let labels: Vec<i64> = (0..n).map(|i| i % 3).collect();
        let images = Tensor::arange(n * side * side, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([n, 1, side, side]);
        let data = Dataset::new(images, Tensor::from_slice(&labels), 3).unwrap();
        RunState::new(
            3,
            Device::Cpu,
            seed,
            Rc::new(data),
            4,
            augment,
            Normalize {
                mean: vec![0.5],
                std: vec![0.25],
            },
            None,
            PathBuf::from("."),
        )
    }

    #[test]
    fn scoring_batches_are_class_balanced_seeded_and_split_evenly() {
        let state = state();
        let batches = scoring_batches(&state, &balanced(2, 2)).unwrap();
        let targets: Vec<Vec<i64>> = batches
            .iter()
            .map(|b| Vec::<i64>::try_from(&b.targets).unwrap())
            .collect();
        assert_eq!(targets, [vec![0, 1, 2], vec![0, 1, 2]]);
        let again = scoring_batches(&state, &balanced(2, 2)).unwrap();
        assert!(batches[0].inputs.equal(&again[0].inputs));
        let sizes: Vec<i64> = scoring_batches(&state, &balanced(4, 3))
            .unwrap()
            .iter()
            .map(|b| b.targets.size()[0])
            .collect();
        assert_eq!(sizes, [4, 4, 4]);
        assert!(scoring_batches(&state, &balanced(1, 4)).is_err());
    }

    #[test]
    fn balanced_scoring_is_the_class_balanced_batch_interleaved_by_class() {
        // The batch before `scoring` existed: class_balanced_batch, then one of each class in
        // turn. The default must still give exactly these pixels.
        let state = image_state(40, 3, false, 9);
        let (x, y) = data::class_balanced_batch(
            &state.train_data,
            4,
            state.seed,
            &state.normalize,
            Device::Cpu,
        );
        let grouped = Vec::<i64>::try_from(&y).unwrap();
        assert_eq!(grouped, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        let order = Tensor::from_slice(&[0i64, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        let batches = scoring_batches(&state, &balanced(4, 2)).unwrap();
        assert!(inputs(&batches).equal(&x.index_select(0, &order)));
        assert_eq!(labels(&batches), [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_scoring_draws_are_seeded_but_not_class_balanced() {
        let random = scoring(ScoringChoice::Random, 5, 3);
        let state = image_state(60, 2, false, 5);
        let batches = scoring_batches(&state, &random).unwrap();
        let drawn = labels(&batches);
        // 5 per class × 3 classes, in three batches.
        assert_eq!(drawn.len(), 15);
        assert_eq!(
            batches
                .iter()
                .map(|b| b.targets.size()[0])
                .collect::<Vec<_>>(),
            [5, 5, 5]
        );
        let counts: Vec<usize> = (0..3)
            .map(|c| drawn.iter().filter(|&&l| l == c).count())
            .collect();
        assert_ne!(counts, [5, 5, 5], "{drawn:?}");
        // The same seed draws the same images; another seed others.
        let again = scoring_batches(&state, &random).unwrap();
        assert!(inputs(&batches).equal(&inputs(&again)));
        assert_eq!(labels(&again), drawn);
        let other = scoring_batches(&image_state(60, 2, false, 6), &random).unwrap();
        assert!(!inputs(&batches).equal(&inputs(&other)));
        // Balanced draws on the same data and seed are.
        let balanced = labels(&scoring_batches(&state, &balanced(5, 3)).unwrap());
        assert!((0..3).all(|c| balanced.iter().filter(|&&l| l == c).count() == 5));
        // More than the training set: all of it, once.
        let everything = scoring(ScoringChoice::Random, 30, 1);
        let mut all = labels(&scoring_batches(&state, &everything).unwrap());
        all.sort_unstable();
        assert_eq!(all.len(), 60);
    }

    #[test]
    fn scoring_augment_changes_the_pixels_but_not_the_labels() {
        let state = image_state(30, 8, true, 3);
        for choice in [ScoringChoice::Balanced, ScoringChoice::Random] {
            let plain = scoring(choice, 4, 2);
            let augmented = Scoring {
                augment: true,
                ..plain
            };
            let a = scoring_batches(&state, &plain).unwrap();
            let b = scoring_batches(&state, &augmented).unwrap();
            assert_eq!(labels(&a), labels(&b), "{choice:?}");
            assert_eq!(inputs(&a).size(), inputs(&b).size(), "{choice:?}");
            assert!(!inputs(&a).equal(&inputs(&b)), "{choice:?}");
            // The crop and flip draws are the run seed's.
            let again = scoring_batches(&state, &augmented).unwrap();
            assert!(inputs(&b).equal(&inputs(&again)), "{choice:?}");
        }
    }
}
