//! The model zoo: the reference architectures of the reproduced papers, with PyTorch's module
//! names, registration order, initialisation and BatchNorm semantics, so that checkpoints and
//! per-layer methods (pruning, TempBalance) line up with the original code.

mod blocks;
mod resnet;
mod size;
mod small;
mod vgg;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use trellis_sdk::LayerKind;

use crate::config::ComponentConfig;

pub use blocks::{autocast, autocast_kind, sync_batch_norm};
use blocks::{Builder, Linear, Var};
pub use size::{
    available_memory, byte_words, catch_panic, check_fits, count_words, DoesNotFit, ModelSize,
    Purpose,
};

/// The `[model]` table of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Channel multiplier (hidden-size multiplier for the MLP): `max(1, round(c · width))`.
    #[serde(default = "default_width")]
    pub width: f64,
    /// MLP hidden layer sizes, `[256, 256]` when absent; refused for the other architectures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Vec<i64>>,
    /// `1`: a single logit for a two-class task (`[train] loss = "bce"`); absent: one logit per
    /// class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<i64>,
    /// ResNets: the second BatchNorm of every block starts with scale 0.
    #[serde(default, skip_serializing_if = "is_false")]
    pub zero_init_residual: bool,
    /// LeNet-5's pooling.
    #[serde(default, skip_serializing_if = "Pool::is_default")]
    pub pool: Pool,
    /// LeNet-5's convolution padding.
    #[serde(default, skip_serializing_if = "Padding::is_default")]
    pub padding: Padding,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How LeNet-5 pools after each convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Max,
    Avg,
}

impl Pool {
    fn is_default(&self) -> bool {
        *self == Pool::default()
    }
}

/// How LeNet-5 pads its 5×5 convolutions: not at all, or to keep the image size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    #[default]
    Valid,
    Same,
}

impl Padding {
    fn is_default(&self) -> bool {
        *self == Padding::default()
    }
}

fn default_width() -> f64 {
    1.0
}

impl ModelConfig {
    /// The architecture at full width with its default hidden sizes.
    pub fn new(arch: Arch) -> Self {
        ModelConfig {
            arch,
            width: default_width(),
            hidden: None,
            outputs: None,
            zero_init_residual: false,
            pool: Pool::Max,
            padding: Padding::Valid,
        }
    }

    /// The parameters and buffers [`Network::build`] creates for this config, counted from the
    /// architecture without allocating anything.
    pub fn size(&self, num_classes: i64, in_channels: i64, image_size: i64) -> ModelSize {
        let mut size = ModelSize::default();
        let w = self.width;
        let features = match self.arch {
            Arch::Resnet18 | Arch::Resnet34 => {
                resnet::ResNet::count(resnet_depths(self.arch), w, in_channels, &mut size)
            }
            Arch::Vgg16Bn => vgg::Vgg::count(w, in_channels, image_size, &mut size),
            Arch::Mlp => {
                let hidden = self.hidden.as_deref().unwrap_or(&small::DEFAULT_HIDDEN);
                let in_dim = in_channels
                    .saturating_mul(image_size)
                    .saturating_mul(image_size);
                small::Mlp::count(hidden, w, in_dim, &mut size)
            }
            Arch::Lenet5 => {
                small::LeNet5::count(w, in_channels, image_size, self.padding, &mut size)
            }
        };
        size.linear(features, size::dim(self.outputs.unwrap_or(num_classes)));
        size
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.width.is_finite() && self.width > 0.0,
            "model.width must be a positive number, got {}",
            self.width
        );
        if let Some(hidden) = &self.hidden {
            ensure!(
                self.arch == Arch::Mlp,
                "model.hidden only applies to arch = \"mlp\", not to \"{}\"",
                self.arch
            );
            ensure!(
                hidden.iter().all(|&h| h > 0),
                "model.hidden sizes must be positive, got {hidden:?}"
            );
        }
        if let Some(outputs) = self.outputs {
            ensure!(
                outputs == 1,
                "model.outputs = {outputs} is not supported: `outputs = 1` gives a single logit \
                 for a two-class task (with [train] loss = \"bce\"); leave it out for one logit \
                 per class"
            );
        }
        ensure!(
            !self.zero_init_residual || matches!(self.arch, Arch::Resnet18 | Arch::Resnet34),
            "model.zero_init_residual only applies to the ResNets, not to \"{}\"",
            self.arch
        );
        ensure!(
            self.arch == Arch::Lenet5 || (self.pool, self.padding) == Default::default(),
            "model.pool and model.padding only apply to arch = \"lenet5\", not to \"{}\"",
            self.arch
        );
        Ok(())
    }
}

/// The `[model]` table: a built-in architecture (`arch = "resnet18"`) or a plugin's
/// (`use = "name"` and the component's own keys).
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSpec {
    Builtin(ModelConfig),
    Plugin(ComponentConfig),
}

impl ModelSpec {
    /// What log lines and errors call the model.
    pub fn name(&self) -> String {
        match self {
            ModelSpec::Builtin(c) => c.arch.to_string(),
            ModelSpec::Plugin(c) => c.component.clone(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelSpec::Builtin(c) => c.validate(),
            ModelSpec::Plugin(_) => Ok(()),
        }
    }
}

impl From<ModelConfig> for ModelSpec {
    fn from(c: ModelConfig) -> Self {
        ModelSpec::Builtin(c)
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let table = toml::Table::deserialize(deserializer)?;
        let value = toml::Value::Table(table);
        let has = |key: &str| value.get(key).is_some();
        if has("use") {
            if has("arch") {
                return Err(D::Error::custom(
                    "[model] takes `arch` (a built-in architecture) or `use` (a plugin's model), not both",
                ));
            }
            ComponentConfig::deserialize(value)
                .map(ModelSpec::Plugin)
                .map_err(D::Error::custom)
        } else if has("arch") {
            ModelConfig::deserialize(value)
                .map(ModelSpec::Builtin)
                .map_err(D::Error::custom)
        } else {
            Err(D::Error::custom(
                "[model] needs `arch = \"resnet18\"` (resnet18, resnet34, vgg16_bn, mlp, lenet5) \
                 or `use = \"<model component>\"` from a plugin",
            ))
        }
    }
}

impl Serialize for ModelSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ModelSpec::Builtin(c) => c.serialize(serializer),
            ModelSpec::Plugin(c) => c.serialize(serializer),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Vgg16Bn,
    Mlp,
    Lenet5,
}

impl Arch {
    /// The name used in config files.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Vgg16Bn => "vgg16_bn",
            Arch::Mlp => "mlp",
            Arch::Lenet5 => "lenet5",
        }
    }

    /// The classifier's module name in the reference implementation.
    fn head_name(self) -> &'static str {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => "linear",
            Arch::Vgg16Bn => "classifier",
            Arch::Mlp => "head",
            Arch::Lenet5 => "fc3",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Blocks per stage of the two ResNets.
fn resnet_depths(arch: Arch) -> [usize; 4] {
    if arch == Arch::Resnet34 {
        [3, 4, 6, 3]
    } else {
        [2, 2, 2, 2]
    }
}

/// Rounds like Python's `round` (half to even) so that widths give the same channel counts as
/// the reference code's `int(round(c * width))`.
pub(crate) fn scaled(c: i64, width: f64) -> i64 {
    ((c as f64 * width).round_ties_even() as i64).max(1)
}

/// One module that owns parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The module's dotted PyTorch name, e.g. `layer1.0.conv1`.
    pub path: String,
    pub kind: LayerKind,
}

#[derive(Debug)]
enum Body {
    ResNet(resnet::ResNet),
    Vgg(vgg::Vgg),
    Mlp(small::Mlp),
    LeNet5(small::LeNet5),
}

/// Where a network's computation lives.
enum Inner {
    /// One of the zoo's architectures, its variables in a `VarStore`.
    Builtin {
        vs: VarStore,
        body: Body,
        head: Linear,
    },
    /// A plugin's model component; `training` remembers the mode last set, so a step does not
    /// cross the boundary twice.
    Plugin {
        model: trellis_sdk::Model,
        training: Cell<Option<bool>>,
    },
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inner::Builtin { body, .. } => f.debug_tuple("Builtin").field(body).finish(),
            Inner::Plugin { .. } => f.write_str("Plugin"),
        }
    }
}

/// A classifier: a feature extractor and a linear head, built-in or a plugin's. Everything the
/// core does with a model (train, prune, checkpoint, export) goes through this one type.
#[derive(Debug)]
pub struct Network {
    inner: Inner,
    spec: ModelSpec,
    feature_dim: i64,
    device: Device,
    layers: Vec<Layer>,
    /// Shallow clones of the model's tensors (same storage) in registration order.
    vars: Vec<Var>,
}

impl Network {
    /// Input is `[B, in_channels, image_size, image_size]` float; CIFAR: 3 channels, 32 pixels.
    /// Refuses, before allocating, a model that cannot fit in memory for training.
    pub fn build(
        cfg: &ModelConfig,
        num_classes: i64,
        in_channels: i64,
        image_size: i64,
        device: Device,
    ) -> Result<Network> {
        Self::build_for(
            cfg,
            num_classes,
            in_channels,
            image_size,
            device,
            Purpose::Train,
        )
    }

    /// [`build`](Self::build) for `purpose`, which decides the memory it must fit in. A
    /// failure libtorch reports while allocating (an error or one of tch's panics) is an error
    /// naming the width, never a crash.
    pub fn build_for(
        cfg: &ModelConfig,
        num_classes: i64,
        in_channels: i64,
        image_size: i64,
        device: Device,
        purpose: Purpose,
    ) -> Result<Network> {
        cfg.validate()?;
        ensure!(
            num_classes >= 1,
            "a classifier needs at least one class, got {num_classes}"
        );
        ensure!(
            in_channels >= 1,
            "input channels must be positive, got {in_channels}"
        );
        ensure!(
            image_size >= 1,
            "image size must be positive, got {image_size}"
        );
        check_fits(cfg, num_classes, in_channels, image_size, device, purpose)?;
        let failed = |detail: &str| {
            let size = cfg.size(num_classes, in_channels, image_size);
            anyhow!(
                "cannot allocate {} at {} ({} parameters, {} as float32): {detail}\n  help: \
                 lower {}, or free memory",
                cfg.arch,
                purpose.width_setting(cfg.width),
                count_words(size.parameters),
                byte_words(size.bytes()),
                purpose.width_key()
            )
        };
        let built =
            catch_panic(|| Self::allocate(cfg, num_classes, in_channels, image_size, device));
        match built {
            Ok(Ok(net)) => Ok(net),
            Ok(Err(e)) if e.downcast_ref::<tch::TchError>().is_some() => Err(failed(
                &trellis_sdk::adapt::without_backtrace(&e.to_string()),
            )),
            Ok(Err(e)) => Err(e),
            Err(panic) => Err(failed(&panic)),
        }
    }

    fn allocate(
        cfg: &ModelConfig,
        num_classes: i64,
        in_channels: i64,
        image_size: i64,
        device: Device,
    ) -> Result<Network> {
        let vs = VarStore::new(device);
        let mut b = Builder::new(&vs);
        let w = cfg.width;
        let (body, feature_dim) = match cfg.arch {
            Arch::Resnet18 | Arch::Resnet34 => {
                let depths = resnet_depths(cfg.arch);
                let (net, dim) =
                    resnet::ResNet::new(&mut b, depths, w, in_channels, cfg.zero_init_residual)?;
                (Body::ResNet(net), dim)
            }
            Arch::Vgg16Bn => {
                let (net, dim) = vgg::Vgg::new(&mut b, w, in_channels, image_size)?;
                (Body::Vgg(net), dim)
            }
            Arch::Mlp => {
                let hidden = cfg.hidden.as_deref().unwrap_or(&small::DEFAULT_HIDDEN);
                let in_dim = in_channels * image_size * image_size;
                let (net, dim) = small::Mlp::new(&mut b, hidden, w, in_dim)?;
                (Body::Mlp(net), dim)
            }
            Arch::Lenet5 => {
                let (net, dim) =
                    small::LeNet5::new(&mut b, w, in_channels, image_size, cfg.pool, cfg.padding)?;
                (Body::LeNet5(net), dim)
            }
        };
        let outputs = cfg.outputs.unwrap_or(num_classes);
        let head = b.linear(cfg.arch.head_name(), feature_dim, outputs)?;
        let (layers, vars) = b.finish();
        Ok(Network {
            inner: Inner::Builtin { vs, body, head },
            spec: ModelSpec::Builtin(cfg.clone()),
            feature_dim,
            device,
            layers,
            vars,
        })
    }

    /// Wraps a plugin's model component, created from `spec` on `device`.
    pub fn from_plugin(
        model: trellis_sdk::Model,
        spec: ModelSpec,
        device: Device,
    ) -> Result<Network> {
        let sdk = |e: trellis_sdk::Error| anyhow!(e.message);
        let feature_dim = model.feature_dim().map_err(sdk)?;
        let (layers, vars) = plugin_registry(&model).map_err(sdk)?;
        ensure!(
            !vars.iter().all(|v| !v.trainable),
            "model `{}` has no trainable parameters",
            spec.name()
        );
        let mut names = HashSet::new();
        if let Some(v) = vars.iter().find(|v| !names.insert(v.name.as_str())) {
            bail!(
                "model `{}` names two tensors `{}`; every parameter and buffer needs its own name",
                spec.name(),
                v.name
            );
        }
        if let Some(v) = vars.iter().find(|v| v.tensor.device() != device) {
            bail!(
                "model `{}` put `{}` on {}, but the run is on {}\n  help: create tensors on \
                 `host.device()`",
                spec.name(),
                v.name,
                device_name(v.tensor.device()),
                device_name(device)
            );
        }
        Ok(Network {
            inner: Inner::Plugin {
                model,
                training: Cell::new(None),
            },
            spec,
            feature_dim,
            device,
            layers,
            vars,
        })
    }

    /// Logits `[B, classes]` and the pooled features fed to the classifier `[B, feature_dim]`.
    /// `train` selects batch statistics (and updates the running ones) in BatchNorm layers.
    /// Under [`autocast`] both come back in the weights' kind, so losses and metrics see f32.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (logits, features) = match &self.inner {
            Inner::Builtin { body, head, .. } => {
                let features = match body {
                    Body::ResNet(net) => resnet::ResNet::pool(&net.feature_map(x, train)),
                    Body::Vgg(net) => net.pool(&net.feature_map(x, train), train),
                    Body::Mlp(net) => net.features(x),
                    Body::LeNet5(net) => net.pool(&net.feature_map(x)),
                };
                (head.forward(&features), features)
            }
            Inner::Plugin { model, training } => {
                if training.get() != Some(train) {
                    model.set_training(train).map_err(|e| anyhow!(e.message))?;
                    training.set(Some(train));
                }
                let out = model.forward(x).map_err(|e| anyhow!(e.message))?;
                (out.logits, out.features)
            }
        };
        if autocast_kind().is_some() {
            let kind = self.kind();
            return Ok((logits.to_kind(kind), features.to_kind(kind)));
        }
        Ok((logits, features))
    }

    /// [`forward`](Self::forward) that also returns the activations of the last convolutional
    /// stage `[B, C, H, W]`, in the same graph as the logits (Grad-CAM differentiates a logit with
    /// respect to them). An error for a model without convolutions.
    pub fn forward_with_feature_map(
        &self,
        x: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.inner {
            Inner::Builtin { body, head, .. } => {
                let (map, features) = match body {
                    Body::ResNet(net) => {
                        let map = net.feature_map(x, train);
                        let features = resnet::ResNet::pool(&map);
                        (map, features)
                    }
                    Body::Vgg(net) => {
                        let map = net.feature_map(x, train);
                        let features = net.pool(&map, train);
                        (map, features)
                    }
                    Body::LeNet5(net) => {
                        let map = net.feature_map(x);
                        let features = net.pool(&map);
                        (map, features)
                    }
                    Body::Mlp(_) => bail!(
                        "{} has no convolutional feature map (Grad-CAM needs one)",
                        self.spec.name()
                    ),
                };
                Ok((head.forward(&features), features, map))
            }
            Inner::Plugin { model, training } => {
                if training.get() != Some(train) {
                    model.set_training(train).map_err(|e| anyhow!(e.message))?;
                    training.set(Some(train));
                }
                let (out, map) = model
                    .forward_with_feature_map(x)
                    .map_err(|e| anyhow!("model `{}`: {}", self.spec.name(), e.message))?;
                Ok((out.logits, out.features, map))
            }
        }
    }

    /// The classifier head alone, applied to given features.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Inner::Builtin { head, .. } => Ok(head.forward(features)),
            Inner::Plugin { model, .. } => model.head(features).map_err(|e| anyhow!(e.message)),
        }
    }

    /// The kind of the weights (what outputs come back in under autocast).
    fn kind(&self) -> Kind {
        match &self.inner {
            Inner::Builtin { head, .. } => head.kind(),
            Inner::Plugin { .. } => self
                .vars
                .iter()
                .find(|v| v.trainable)
                .map_or(Kind::Float, |v| v.tensor.kind()),
        }
    }

    pub fn feature_dim(&self) -> i64 {
        self.feature_dim
    }

    /// Modules that own parameters, in registration order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Trainable parameters in registration order: full name, index into `layers()`, tensor.
    pub fn parameters(&self) -> Vec<(String, usize, Tensor)> {
        let params = self.vars.iter().filter(|v| v.trainable);
        params
            .map(|v| (v.name.clone(), v.layer, v.tensor.shallow_clone()))
            .collect()
    }

    /// Non-trainable buffers (BatchNorm running statistics) in registration order.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let buffers = self.vars.iter().filter(|v| !v.trainable);
        buffers
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()))
            .collect()
    }

    /// Every variable, parameters and buffers, in registration order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()))
            .collect()
    }

    /// The number of trainable elements.
    pub fn num_parameters(&self) -> i64 {
        self.vars
            .iter()
            .filter(|v| v.trainable)
            .map(|v| v.tensor.numel() as i64)
            .sum()
    }

    /// The `VarStore` of a built-in architecture.
    pub fn var_store(&self) -> Option<&VarStore> {
        match &self.inner {
            Inner::Builtin { vs, .. } => Some(vs),
            Inner::Plugin { .. } => None,
        }
    }

    /// Converts every parameter and buffer to float64 (or back to float32) in place.
    pub fn set_double(&mut self, double: bool) -> Result<()> {
        match &mut self.inner {
            Inner::Builtin { vs, .. } => {
                if double {
                    vs.double()
                } else {
                    vs.float()
                }
            }
            Inner::Plugin { model, .. } => {
                model.set_double(double).map_err(|e| anyhow!(e.message))?;
                // In place is the contract, but a model that swapped its tensors must not leave
                // us holding the old ones.
                (self.layers, self.vars) =
                    plugin_registry(model).map_err(|e| anyhow!(e.message))?;
            }
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The `[model]` table that built this network.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The plugin model component behind this network, if it is one.
    pub fn plugin_model(&self) -> Option<&trellis_sdk::Model> {
        match &self.inner {
            Inner::Plugin { model, .. } => Some(model),
            Inner::Builtin { .. } => None,
        }
    }

    /// Saves every variable as safetensors under the names of `state_dict()`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .state_dict()
            .into_iter()
            .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        // Written beside the target and renamed, so that a crash mid-write never replaces a good
        // checkpoint with a truncated one.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = Path::new(&tmp);
        write_safetensors(&tensors, tmp).context("cannot save the model's weights")?;
        std::fs::rename(tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Loads a file written by `save()`. Strict: every name must be present with the same shape,
    /// and nothing is changed unless the whole file matches.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = read_safetensors(path)?;
        let file: HashMap<String, Tensor> = file.into_iter().collect();
        let ours: HashSet<&str> = self.vars.iter().map(|v| v.name.as_str()).collect();

        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for v in &self.vars {
            match file.get(&v.name) {
                None => missing.push(v.name.clone()),
                Some(t) if t.size() != v.tensor.size() => mismatched.push(format!(
                    "{} (file {:?}, model {:?})",
                    v.name,
                    t.size(),
                    v.tensor.size()
                )),
                Some(_) => {}
            }
        }
        let mut unexpected: Vec<String> = file
            .keys()
            .filter(|n| !ours.contains(n.as_str()))
            .cloned()
            .collect();
        unexpected.sort();

        if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
            let mut problems = Vec::new();
            for (what, list) in [
                ("missing from the file", &missing),
                ("unexpected in the file", &unexpected),
                ("with a different shape", &mismatched),
            ] {
                if !list.is_empty() {
                    problems.push(format!("{} {what}: {}", list.len(), abbreviate(list)));
                }
            }
            return Err(WeightsMismatch(format!(
                "{} does not hold the weights of this {} model: {}",
                path.display(),
                self.spec.name(),
                problems.join("; ")
            ))
            .into());
        }

        tch::no_grad(|| -> Result<()> {
            for v in &self.vars {
                let mut dst = v.tensor.shallow_clone();
                dst.f_copy_(&file[&v.name])
                    .with_context(|| format!("copying {} from {}", v.name, path.display()))?;
            }
            Ok(())
        })
    }
}

/// The error of [`Network::load`] for a readable file whose tensors are another model's (other
/// names or shapes), so that callers can say which model to describe instead.
#[derive(Debug)]
pub struct WeightsMismatch(pub String);

impl fmt::Display for WeightsMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WeightsMismatch {}

/// How messages name a device: `cpu`, `cuda:0`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".to_string(),
        Device::Vulkan => "vulkan".to_string(),
    }
}

/// Reads a safetensors file with errors a user can act on: the path with the system's reason
/// when it cannot be read (tch would quote the safetensors crate's `IoError(Os { .. })`), and
/// "not a safetensors file, or truncated" when its bytes are not one (`HeaderTooLarge`, ...).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if metadata.is_dir() {
        bail!("{} is a directory, not a safetensors file", path.display());
    }
    std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    Tensor::read_safetensors(path).map_err(|e| safetensors_error(path, e, "read"))
}

/// Writes a safetensors file; an error names the path and the system's reason.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    // Created first so that a permission or a missing directory is reported by std, with its
    // reason, rather than inside the safetensors crate's Debug text.
    std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    Tensor::write_safetensors(tensors, path).map_err(|e| safetensors_error(path, e, "write"))
}

/// A tch error about a safetensors file at `path`, in words.
fn safetensors_error(path: &Path, e: tch::TchError, verb: &str) -> anyhow::Error {
    let tch::TchError::SafeTensorError { err, .. } = &e else {
        return anyhow!(
            "cannot {verb} {}: {}",
            path.display(),
            trellis_sdk::adapt::without_backtrace(&e.to_string())
        );
    };
    // The crate's errors have no Display of their own, only the variant's name.
    let variant = err.to_string();
    let variant = variant.split('(').next().unwrap_or_default();
    let detail = match variant {
        "IoError" => return anyhow!("cannot {verb} {}: an I/O error", path.display()),
        "HeaderTooSmall" => "it is shorter than the 8 bytes of a header length",
        "HeaderTooLarge" | "InvalidHeaderLength" => {
            "its first 8 bytes are not a plausible header length"
        }
        "InvalidHeader" | "InvalidHeaderStart" | "InvalidHeaderDeserialization" | "JsonError" => {
            "its header is not the JSON a safetensors file starts with"
        }
        _ => "its tensors do not match the file's length",
    };
    anyhow!(
        "{} is not a safetensors file, or is truncated: {detail}",
        path.display()
    )
}

/// Layers and variables of a plugin's model, from what it declares: a layer per module path, in
/// the order its parameters come; a buffer belongs to the layer of its module (or its own).
fn plugin_registry(model: &trellis_sdk::Model) -> trellis_sdk::Result<(Vec<Layer>, Vec<Var>)> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut vars = Vec::new();
    let layer_of = |layers: &mut Vec<Layer>, path: &str, kind: LayerKind| match layers
        .iter()
        .position(|l| l.path == path)
    {
        Some(i) => i,
        None => {
            layers.push(Layer {
                path: path.to_string(),
                kind,
            });
            layers.len() - 1
        }
    };
    for p in model.parameters()? {
        let layer = layer_of(&mut layers, &p.module, p.kind);
        vars.push(Var {
            name: p.name,
            layer,
            tensor: p.tensor,
            trainable: true,
        });
    }
    for (name, tensor) in model.buffers()? {
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let layer = layer_of(&mut layers, module, LayerKind::Other);
        vars.push(Var {
            name,
            layer,
            tensor,
            trainable: false,
        });
    }
    Ok((layers, vars))
}

/// The first few names of a list, so an error stays readable when everything mismatches.
fn abbreviate(list: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut text = list
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        text.push_str(&format!(", … and {} more", list.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    const ALL: [Arch; 5] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Vgg16Bn,
        Arch::Mlp,
        Arch::Lenet5,
    ];

    fn small(arch: Arch) -> Network {
        let cfg = ModelConfig {
            width: 0.125,
            ..ModelConfig::new(arch)
        };
        Network::build(&cfg, 10, 3, 32, Device::Cpu).unwrap()
    }

    fn batch() -> Tensor {
        Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
    }

    fn get(net: &Network, name: &str) -> Tensor {
        net.state_dict()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    }

    #[test]
    fn config_from_toml() {
        for (text, arch) in [
            ("resnet18", Arch::Resnet18),
            ("resnet34", Arch::Resnet34),
            ("vgg16_bn", Arch::Vgg16Bn),
            ("mlp", Arch::Mlp),
            ("lenet5", Arch::Lenet5),
        ] {
            let cfg: ModelConfig = toml::from_str(&format!("arch = \"{text}\"")).unwrap();
            assert_eq!(cfg, ModelConfig::new(arch));
            assert_eq!(arch.to_string(), text);
        }
        let cfg: ModelConfig =
            toml::from_str("arch = \"mlp\"\nwidth = 0.5\nhidden = [128, 64]").unwrap();
        assert_eq!(
            cfg,
            ModelConfig {
                width: 0.5,
                hidden: Some(vec![128, 64]),
                ..ModelConfig::new(Arch::Mlp)
            }
        );
        let back: ModelConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        let unknown = toml::from_str::<ModelConfig>("arch = \"resnet18\"\ndepth = 3");
        assert!(unknown.unwrap_err().to_string().contains("depth"));
        assert!(toml::from_str::<ModelConfig>("arch = \"resnet50\"").is_err());
        assert!(toml::from_str::<ModelConfig>("width = 1.0").is_err());
    }

    #[test]
    fn config_validation() {
        for width in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let cfg = ModelConfig {
                width,
                ..ModelConfig::new(Arch::Resnet18)
            };
            let err = Network::build(&cfg, 10, 3, 32, Device::Cpu).unwrap_err();
            assert!(err.to_string().contains("width"), "{err}");
        }
        let cfg = ModelConfig {
            hidden: Some(vec![64]),
            ..ModelConfig::new(Arch::Resnet18)
        };
        let err = Network::build(&cfg, 10, 3, 32, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("hidden") && err.to_string().contains("resnet18"));
        let cfg = ModelConfig {
            hidden: Some(vec![64, 0]),
            ..ModelConfig::new(Arch::Mlp)
        };
        assert!(Network::build(&cfg, 10, 3, 32, Device::Cpu).is_err());
        assert!(Network::build(&ModelConfig::new(Arch::Mlp), 0, 3, 32, Device::Cpu).is_err());
        // A tiny width still leaves every layer at least one channel.
        assert_eq!(scaled(64, 1e-6), 1);
        // Python's round: 84 × 0.125 = 10.5 → 10, 6 × 0.25 = 1.5 → 2.
        assert_eq!(
            (scaled(84, 0.125), scaled(6, 0.25), scaled(64, 0.25)),
            (10, 2, 16)
        );
    }

    /// The analytic count is the built model's count, parameters and buffers, for every
    /// architecture, at several widths and with each option that changes a shape.
    #[test]
    fn analytic_size_equals_the_built_models() {
        let check = |cfg: ModelConfig, classes: i64, channels: i64, side: i64| {
            let net = Network::build(&cfg, classes, channels, side, Device::Cpu).unwrap();
            let buffers: i64 = net.buffers().iter().map(|(_, t)| t.numel() as i64).sum();
            let size = cfg.size(classes, channels, side);
            assert_eq!(
                (size.parameters, size.buffers),
                (net.num_parameters() as u128, buffers as u128),
                "{cfg:?} on {channels}×{side}×{side}, {classes} classes"
            );
        };
        for arch in ALL {
            for width in [0.0625, 0.3, 1.0] {
                check(
                    ModelConfig {
                        width,
                        ..ModelConfig::new(arch)
                    },
                    10,
                    3,
                    32,
                );
            }
        }
        for width in [1e-6, 0.25, 1.5, 2.0] {
            for arch in [Arch::Mlp, Arch::Lenet5] {
                let cfg = ModelConfig {
                    width,
                    ..ModelConfig::new(arch)
                };
                check(cfg, 100, 3, 32);
            }
        }
        check(
            ModelConfig {
                hidden: Some(vec![40, 7, 3]),
                width: 0.5,
                ..ModelConfig::new(Arch::Mlp)
            },
            5,
            1,
            8,
        );
        check(
            ModelConfig {
                outputs: Some(1),
                pool: Pool::Avg,
                padding: Padding::Same,
                ..ModelConfig::new(Arch::Lenet5)
            },
            2,
            3,
            32,
        );
        check(ModelConfig::new(Arch::Lenet5), 10, 1, 28);
        check(
            ModelConfig {
                width: 0.125,
                ..ModelConfig::new(Arch::Vgg16Bn)
            },
            10,
            3,
            64,
        );
        check(
            ModelConfig {
                width: 0.1,
                zero_init_residual: true,
                ..ModelConfig::new(Arch::Resnet34)
            },
            20,
            1,
            16,
        );
        // The published counts, without building anything.
        let size = |arch, width| {
            ModelConfig {
                width,
                ..ModelConfig::new(arch)
            }
            .size(10, 3, 32)
            .parameters
        };
        assert_eq!(size(Arch::Resnet18, 1.0), 11_173_962);
        assert_eq!(size(Arch::Resnet34, 1.0), 21_282_122);
        assert_eq!(size(Arch::Vgg16Bn, 1.0), 14_728_266);
        // Width 64: 4096× the channel pairs, about 46 billion parameters.
        assert!((45e9..46e9).contains(&(size(Arch::Resnet18, 64.0) as f64)));
        // Absurd widths saturate instead of overflowing.
        assert!(size(Arch::Resnet18, 1e300) > 1u128 << 100);
    }

    #[test]
    fn a_model_too_large_for_the_machine_is_refused_before_allocating() {
        let resnet = |width| ModelConfig {
            width,
            ..ModelConfig::new(Arch::Resnet18)
        };
        let refusal = |cfg: &ModelConfig, available, purpose| {
            let e = size::check_fits_in(cfg, 10, 3, 32, available, purpose).unwrap_err();
            e.downcast_ref::<DoesNotFit>().unwrap().clone()
        };
        // Width 1 is 11.2 million parameters, 44.7 MB; training needs 4× that.
        let r = refusal(&resnet(1.0), Some(100 << 20), Purpose::Train);
        assert!(
            r.message
                .contains("model.width = 1 makes resnet18 a model of 11.2 million parameters")
                && r.message.contains("needs at least 4× that")
                && r.message.contains("100.0 MiB of memory available"),
            "{r}"
        );
        assert!(r.help.contains("is about the widest that fits"), "{r}");
        let widest: f64 = r.help["lower model.width: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((0.5..1.0).contains(&widest), "{r}");
        assert!(
            size::check_fits_in(&resnet(widest), 10, 3, 32, Some(100 << 20), Purpose::Train)
                .is_ok()
        );
        // Loading for analysis needs 2×, and the message speaks of --width.
        assert!(
            size::check_fits_in(&resnet(1.0), 10, 3, 32, Some(100 << 20), Purpose::Analyse).is_ok()
        );
        let r = refusal(&resnet(2.0), Some(100 << 20), Purpose::Analyse);
        assert!(r.message.starts_with("--width 2 makes resnet18"), "{r}");
        // With the memory unknown (a GPU), only what no machine has is refused.
        assert!(size::check_fits_in(&resnet(64.0), 10, 3, 32, None, Purpose::Train).is_ok());
        let r = refusal(&resnet(1000.0), None, Purpose::Train);
        assert!(r.message.contains("more than any machine has"), "{r}");
        let r = refusal(&resnet(1e300), None, Purpose::Train);
        assert!(r.message.contains("more than 10^36 parameters"), "{r}");
        // Network::build refuses it the same way, whatever this machine has.
        for width in [1000.0, 1e300] {
            let e = Network::build(&resnet(width), 10, 3, 32, Device::Cpu).unwrap_err();
            assert!(format!("{e:#}").contains("model.width ="), "{e:#}");
        }
        let hidden = ModelConfig {
            hidden: Some(vec![i64::MAX]),
            ..ModelConfig::new(Arch::Mlp)
        };
        assert!(Network::build(&hidden, 10, 3, 32, Device::Cpu).is_err());
    }

    #[test]
    fn unreadable_or_foreign_weight_files_are_refused_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let mut net = small(Arch::Mlp);
        let message = |net: &mut Network, path: &Path| format!("{:#}", net.load(path).unwrap_err());
        let absent = dir.path().join("absent.safetensors");
        let e = message(&mut net, &absent);
        assert!(
            e.contains("cannot read")
                && e.contains("absent.safetensors")
                && e.contains("No such file"),
            "{e}"
        );
        let e = message(&mut net, dir.path());
        assert!(e.contains("is a directory"), "{e}");
        for (bytes, phrase) in [
            (&b"abc"[..], "shorter than the 8 bytes"),
            (
                &b"\xff\xff\xff\xff\xff\xff\xff\x7f{}"[..],
                "not a plausible header length",
            ),
            (&b"\x04\0\0\0\0\0\0\0nope"[..], "not the JSON"),
        ] {
            let path = dir.path().join("bad.safetensors");
            std::fs::write(&path, bytes).unwrap();
            let e = message(&mut net, &path);
            assert!(
                e.contains("is not a safetensors file, or is truncated") && e.contains(phrase),
                "{e}"
            );
            for rust in ["HeaderToo", "IoError", "Os {", "InvalidHeader"] {
                assert!(!e.contains(rust), "{e}");
            }
        }
        let path = dir.path().join("model.safetensors");
        net.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let e = message(&mut net, &path);
        assert!(
            e.contains("is not a safetensors file, or is truncated"),
            "{e}"
        );
        // Writing where there is no directory names the path and the reason.
        let e = net
            .save(&dir.path().join("missing/model.safetensors"))
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("missing/model.safetensors.tmp") && e.contains("No such file"),
            "{e}"
        );
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
        assert_eq!(device_name(Device::Cpu), "cpu");
    }

    #[test]
    fn seed_paper_options_are_checked_and_shape_the_network() {
        let refused = |cfg: ModelConfig, word: &str| {
            let err = Network::build(&cfg, 2, 3, 32, Device::Cpu).unwrap_err();
            assert!(err.to_string().contains(word), "{err}");
        };
        refused(
            ModelConfig {
                outputs: Some(2),
                ..ModelConfig::new(Arch::Mlp)
            },
            "outputs = 2",
        );
        refused(
            ModelConfig {
                zero_init_residual: true,
                ..ModelConfig::new(Arch::Vgg16Bn)
            },
            "zero_init_residual",
        );
        refused(
            ModelConfig {
                pool: Pool::Avg,
                ..ModelConfig::new(Arch::Resnet18)
            },
            "lenet5",
        );

        // The reference LeNet of section 8 on 3×32×32: conv 6@5×5 same, avgpool, conv 16@5×5
        // same, avgpool, dense 16·8·8 → 120 → 84 → 1.
        let lenet = ModelConfig {
            outputs: Some(1),
            pool: Pool::Avg,
            padding: Padding::Same,
            ..ModelConfig::new(Arch::Lenet5)
        };
        let net = Network::build(&lenet, 2, 3, 32, Device::Cpu).unwrap();
        let count: i64 = net
            .parameters()
            .iter()
            .map(|(_, _, t)| t.numel() as i64)
            .sum();
        let expected = (3 * 25 * 6 + 6) + (6 * 25 * 16 + 16) + (1024 * 120 + 120);
        assert_eq!(count, expected + (120 * 84 + 84) + (84 + 1));
        let (logits, _, map) = net.forward_with_feature_map(&batch(), false).unwrap();
        assert_eq!(
            (logits.size(), map.size()),
            (vec![2, 1], vec![2, 16, 16, 16])
        );
        // Average pooling: the features are the 2×2 means of the (ReLU'd) map.
        let (_, features) = net.forward(&batch(), false).unwrap();
        assert_eq!(features.size(), [2, 84]);

        // zero_init_residual: every block starts as its shortcut (bn2's scale is 0).
        let resnet = ModelConfig {
            width: 0.125,
            zero_init_residual: true,
            ..ModelConfig::new(Arch::Resnet18)
        };
        let net = Network::build(&resnet, 10, 3, 32, Device::Cpu).unwrap();
        let scales: Vec<_> = net
            .state_dict()
            .into_iter()
            .filter(|(n, _)| n.ends_with("bn2.weight"))
            .collect();
        assert_eq!(scales.len(), 8);
        for (name, scale) in scales {
            assert_eq!(
                scale.abs().sum(Kind::Float).double_value(&[]),
                0.0,
                "{name}"
            );
        }
        let first_bn = get(&net, "bn1.weight");
        assert_eq!(first_bn.min().double_value(&[]), 1.0);
    }

    #[test]
    fn feature_map_is_the_map_the_features_pool() {
        tch::manual_seed(1);
        let x = batch();
        for arch in [Arch::Resnet18, Arch::Vgg16Bn, Arch::Lenet5] {
            let net = small(arch);
            let (logits, features) = net.forward(&x, false).unwrap();
            let (l2, f2, map) = net.forward_with_feature_map(&x, false).unwrap();
            assert!(logits.equal(&l2) && features.equal(&f2), "{arch}");
            assert_eq!(map.dim(), 4, "{arch}");
            assert_eq!(map.size()[0], 2, "{arch}");
        }
        let err = small(Arch::Mlp)
            .forward_with_feature_map(&x, false)
            .unwrap_err();
        assert!(err.to_string().contains("feature map"), "{err}");
    }

    #[test]
    fn output_shapes_and_head_for_every_arch() {
        tch::manual_seed(0);
        let x = batch();
        for (arch, dim) in [
            (Arch::Resnet18, 64),
            (Arch::Resnet34, 64),
            (Arch::Vgg16Bn, 64),
            (Arch::Mlp, 32),
            (Arch::Lenet5, 10),
        ] {
            let net = small(arch);
            assert_eq!(net.feature_dim(), dim, "{arch}");
            for train in [true, false] {
                let (logits, features) = net.forward(&x, train).unwrap();
                assert_eq!(logits.size(), [2, 10], "{arch}");
                assert_eq!(features.size(), [2, dim], "{arch}");
                if !train {
                    assert!(
                        net.head(&features)
                            .unwrap()
                            .allclose(&logits, 1e-5, 1e-6, false),
                        "{arch}"
                    );
                }
            }
            let head = net.layers().last().unwrap();
            assert_eq!(
                (head.path.as_str(), head.kind),
                (arch.head_name(), LayerKind::Linear)
            );
            assert_eq!(
                net.spec(),
                &ModelSpec::Builtin(ModelConfig {
                    width: 0.125,
                    ..ModelConfig::new(arch)
                })
            );
        }
    }

    #[test]
    fn registry_matches_var_store() {
        for arch in ALL {
            let net = small(arch);
            let vars = net.var_store().unwrap().variables();
            let state = net.state_dict();
            assert_eq!(vars.len(), state.len(), "{arch}");
            for (name, t) in &state {
                let stored = &vars[name];
                assert_eq!(stored.data_ptr(), t.data_ptr(), "{arch} {name}");
            }
            let params = net.parameters();
            assert_eq!(
                net.var_store().unwrap().trainable_variables().len(),
                params.len(),
                "{arch}"
            );
            assert!(params.iter().all(|(_, _, t)| t.requires_grad()));
            assert!(net.buffers().iter().all(|(_, t)| !t.requires_grad()));
            let total: i64 = params.iter().map(|(_, _, t)| t.numel() as i64).sum();
            assert_eq!(total, net.num_parameters());
        }
    }

    #[test]
    fn train_flag_controls_batch_norm() {
        tch::manual_seed(1);
        let net = small(Arch::Resnet18);
        let x = batch();
        let mean = get(&net, "bn1.running_mean");
        let var = get(&net, "bn1.running_var");

        let (eval1, _) = net.forward(&x, false).unwrap();
        assert_eq!(
            mean.abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "eval updated stats"
        );
        let (train1, _) = net.forward(&x, true).unwrap();
        assert!(
            !train1.allclose(&eval1, 1e-4, 1e-5, false),
            "train used running stats"
        );

        // PyTorch's update: momentum 0.1 and the unbiased batch variance.
        let stem =
            tch::no_grad(|| x.conv2d(&get(&net, "conv1.weight"), None::<&Tensor>, 1, 1, 1, 1));
        let batch_mean = stem.mean_dim(&[0, 2, 3][..], false, Kind::Float);
        let batch_var = stem.var_dim(&[0, 2, 3][..], true, false);
        assert!(mean.allclose(&(batch_mean * 0.1), 1e-4, 1e-6, false));
        assert!(var.allclose(&(batch_var * 0.1 + 0.9), 1e-4, 1e-6, false));

        let (eval2, _) = net.forward(&x, false).unwrap();
        assert!(
            !eval2.allclose(&eval1, 1e-4, 1e-5, false),
            "eval ignored running stats"
        );
        let (eval3, _) = net.forward(&x, false).unwrap();
        assert!(eval3.equal(&eval2), "eval is not deterministic");
    }

    #[test]
    fn autocast_bf16_computes_in_bf16_and_returns_the_weights_kind() {
        tch::manual_seed(4);
        let x = batch();
        for arch in [Arch::Resnet18, Arch::Mlp] {
            let net = small(arch);
            let (want, _) = net.forward(&x, true).unwrap();
            let (got, features) = autocast(Some(Kind::BFloat16), || net.forward(&x, true).unwrap());
            assert_eq!(autocast_kind(), None, "autocast left on");
            assert_eq!((got.kind(), features.kind()), (Kind::Float, Kind::Float));
            // bf16 keeps 8 bits of mantissa: close to the f32 result, but not equal to it.
            let scale = want.abs().max().double_value(&[]);
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(
                diff > 0.0 && diff < 0.05 * scale,
                "{arch}: {diff} vs {scale}"
            );

            // The casts are differentiable: gradients reach the f32 weights, as f32.
            let (logits, _) = autocast(Some(Kind::BFloat16), || net.forward(&x, true).unwrap());
            logits.sum(Kind::Float).backward();
            for (name, _, p) in net.parameters() {
                let g = p.grad();
                assert!(g.defined(), "{arch} {name} has no gradient");
                assert_eq!(g.kind(), Kind::Float, "{arch} {name}");
            }
        }
    }

    #[test]
    fn convolution_layout_changes_strides_only() {
        tch::manual_seed(5);
        let x = Tensor::randn([2, 3, 5, 4], (Kind::Float, Device::Cpu));
        let nhwc = blocks::convolution_layout(&x);
        assert_eq!(nhwc.size(), x.size());
        assert_eq!(nhwc.stride(), [60, 1, 12, 3], "not channels-last");
        assert!(nhwc.equal(&x));
        // Convolutions agree up to the order of their sums.
        let w = Tensor::randn([6, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = |x: &Tensor| x.conv2d(&w, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert!(conv(&nhwc).allclose(&conv(&x), 1e-5, 1e-5, false));
    }

    #[test]
    fn save_then_load_restores_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let x = batch();
        for arch in ALL {
            tch::manual_seed(10);
            let src = small(arch);
            // Non-trivial running statistics must survive the round trip too.
            let _ = src.forward(&x, true).unwrap();
            let path = dir.path().join(format!("{arch}.safetensors"));
            src.save(&path).unwrap();
            let written: Vec<String> = Tensor::read_safetensors(&path)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let expected: HashSet<String> = src.state_dict().into_iter().map(|(n, _)| n).collect();
            assert_eq!(
                written.into_iter().collect::<HashSet<_>>(),
                expected,
                "{arch}"
            );

            tch::manual_seed(11);
            let mut dst = small(arch);
            let (before, _) = dst.forward(&x, false).unwrap();
            let (want, want_features) = src.forward(&x, false).unwrap();
            assert!(
                !before.allclose(&want, 1e-4, 1e-5, false),
                "{arch}: seeds gave equal nets"
            );
            dst.load(&path).unwrap();
            let (got, got_features) = dst.forward(&x, false).unwrap();
            assert!(got.equal(&want), "{arch}");
            assert!(got_features.equal(&want_features), "{arch}");
            for (name, t) in src.state_dict() {
                let loaded = get(&dst, &name);
                assert!(loaded.equal(&t), "{arch} {name}");
                assert_ne!(
                    loaded.data_ptr(),
                    t.data_ptr(),
                    "{arch} {name} shares storage"
                );
            }
        }
    }

    #[test]
    fn load_rejects_mismatched_files() {
        tch::manual_seed(2);
        let dir = tempfile::tempdir().unwrap();
        let src = small(Arch::Resnet18);
        let state = src.state_dict();
        let write = |file: &str, tensors: &[(String, Tensor)]| {
            let path = dir.path().join(file);
            Tensor::write_safetensors(tensors, &path).unwrap();
            path
        };
        let without = |name: &str| -> Vec<(String, Tensor)> {
            let kept = state.iter().filter(|(n, _)| n != name);
            kept.map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
        };

        tch::manual_seed(3);
        let mut dst = small(Arch::Resnet18);
        let before = get(&dst, "conv1.weight").copy();

        let missing = write(
            "missing.safetensors",
            &without("layer2.0.shortcut.1.running_var"),
        );
        let mut extra = without("");
        extra.push((
            "layer5.0.conv1.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        let extra = write("extra.safetensors", &extra);
        let mut reshaped = without("linear.weight");
        reshaped.push((
            "linear.weight".into(),
            Tensor::zeros([7, 64], (Kind::Float, Device::Cpu)),
        ));
        let reshaped = write("shape.safetensors", &reshaped);

        for (path, needles) in [
            (
                &missing,
                vec!["layer2.0.shortcut.1.running_var", "1 missing"],
            ),
            (&extra, vec!["layer5.0.conv1.weight", "1 unexpected"]),
            (
                &reshaped,
                vec![
                    "linear.weight",
                    "[7, 64]",
                    "[10, 64]",
                    "1 with a different shape",
                ],
            ),
        ] {
            let err = format!("{:#}", dst.load(path).unwrap_err());
            assert!(err.contains(&path.display().to_string()), "{err}");
            for needle in needles {
                assert!(err.contains(needle), "{needle:?} not in: {err}");
            }
        }
        // A rejected file leaves every weight untouched, even the ones it did hold.
        assert!(get(&dst, "conv1.weight").equal(&before));

        // A file of another architecture names many problems but keeps the message short.
        let lenet = write("lenet.safetensors", &small(Arch::Lenet5).state_dict());
        let err = dst.load(&lenet).unwrap_err().to_string();
        assert!(
            err.contains("… and") && err.contains("more") && err.contains("fc3.weight"),
            "{err}"
        );
        assert!(dst.load(&dir.path().join("absent.safetensors")).is_err());
    }
}
