//! What the host offers components: the model, batches, other models, the run's facts.
//!
//! Every component gets a [`Host`] in [`crate::Component::new`]; keep it to call later. The host
//! provides the services by implementing [`HostServices`] (and [`Architecture`] for its models),
//! which the SDK turns into ABI objects. Plugin authors need not implement `HostServices`:
//! tests use [`crate::testing::FakeHost`], which does.

use std::path::{Path, PathBuf};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RStr, RString};
use tch::{Device, Tensor};

use crate::abi::{FfiHostBox, FfiHost_TO, FfiModelBox, FfiModel_TO};
use crate::adapt::{self, from_ffi_batch, from_ffi_outputs, HostAdapter, ModelAdapter};
use crate::error::{Error, Result};
use crate::roles::{device_from_index, Architecture, Batch, GroupRate, Outputs, Param, StepInfo};

/// The normalisation the host applies to images: `(x / 255 − mean) / std` per channel, `x` the
/// byte value of a pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    /// Per-channel mean, in units of the `[0, 1]` pixel range (0 when the data set is not
    /// standardised); one entry per input channel.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation, in the same units (1 when not standardised).
    pub std: Vec<f64>,
}

/// The host's services. Implemented by `trellis` for a run, and by [`crate::testing::FakeHost`]
/// for plugin tests; wrap an implementation with [`Host::new`]. Each method backs the [`Host`]
/// method of the same name, which documents what it returns.
pub trait HostServices: 'static {
    /// The run's model; an error while the model itself is being built.
    fn model(&self) -> Result<Model>;
    /// See [`Host::num_classes`].
    fn num_classes(&self) -> i64;
    /// `[channels, height, width]` of the model's input images.
    fn input_shape(&self) -> [i64; 3];
    /// See [`Host::normalization`].
    fn normalization(&self) -> Normalization;
    /// See [`Host::device`].
    fn device(&self) -> Device;
    /// See [`Host::seed`].
    fn seed(&self) -> u64;
    /// See [`Host::progress`].
    fn progress(&self) -> StepInfo;
    /// See [`Host::train_batch`].
    fn train_batch(&self) -> Result<Batch>;
    /// See [`Host::build_model`].
    fn build_model(&self, spec: &str, checkpoint: Option<&Path>) -> Result<Model>;
    /// See [`Host::learning_rates`].
    fn learning_rates(&self) -> Vec<GroupRate>;
    /// See [`Host::optimized_parameters`].
    fn optimized_parameters(&self) -> Vec<(String, Tensor)>;
    /// `(rank, world size)`; `(0, 1)` for a single process.
    fn rank_and_world_size(&self) -> (u32, u32) {
        (0, 1)
    }
    /// See [`Host::run_dir`].
    fn run_dir(&self) -> Option<PathBuf>;
    /// See [`Host::config_dir`].
    fn config_dir(&self) -> PathBuf;
}

/// A model, the host's or a plugin's, seen through the ABI: what [`Host::model`] and
/// [`Host::build_model`] return.
///
/// It is a handle: the tensors it hands out share storage with the model, and every handle to
/// the run's model is the same network the trainer trains. It implements [`Architecture`] itself,
/// so a plugin model can wrap one.
pub struct Model {
    pub(crate) inner: FfiModelBox,
}

impl Model {
    /// Wraps an architecture so it can cross the plugin boundary.
    pub fn new(model: impl Architecture) -> Self {
        Model {
            inner: FfiModel_TO::from_value(ModelAdapter(model), TD_Opaque),
        }
    }

    #[doc(hidden)]
    pub fn from_ffi(inner: FfiModelBox) -> Self {
        Model { inner }
    }

    #[doc(hidden)]
    pub fn into_ffi(self) -> FfiModelBox {
        self.inner
    }

    /// Logits `[B, classes]` and pooled features `[B, feature_dim]`, in the current train/eval
    /// mode (with autograd unless called under `tch::no_grad`).
    pub fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let out = self.inner.forward(inputs.into()).into_result()?;
        Ok(from_ffi_outputs(out))
    }

    /// The classifier head applied to features `[B, feature_dim]`, giving logits.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self
            .inner
            .head(features.into())
            .into_result()?
            .into_tensor())
    }

    /// Trainable parameters in registration order, sharing storage (and `.grad()`) with the
    /// model.
    pub fn parameters(&self) -> Result<Vec<Param>> {
        let params = self.inner.parameters().into_result()?;
        Ok(params.into_iter().map(adapt::from_ffi_param).collect())
    }

    /// Non-trainable state (BatchNorm running statistics), sharing storage with the model.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(adapt::from_ffi_named(self.inner.buffers().into_result()?))
    }

    /// Switches BatchNorm (and anything else mode-dependent) between training and evaluation.
    /// On the run's model this changes the trainer's model too: a component that switches it
    /// (to score in evaluation mode, say) must switch it back, except in [`crate::Pruner::prune`],
    /// after which the host restores the mode itself.
    pub fn set_training(&self, train: bool) -> Result<()> {
        Ok(self.inner.set_training(train).into_result()?)
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> Result<bool> {
        Ok(self.inner.is_training().into_result()?)
    }

    /// Converts every parameter and buffer to float64 (or back to float32) in place, so tensors
    /// taken before see the new dtype; a component that does this to the run's model must convert
    /// it back before it returns.
    pub fn set_double(&self, double: bool) -> Result<()> {
        Ok(self.inner.set_double(double).into_result()?)
    }

    /// The width of the pooled features (the head's input).
    pub fn feature_dim(&self) -> Result<i64> {
        Ok(self.inner.feature_dim().into_result()?)
    }

    /// The `[model]` table that builds this model again, as TOML; hand it to
    /// [`Host::build_model`] for a fresh copy.
    pub fn spec(&self) -> Result<String> {
        Ok(self.inner.spec().into_result()?.into_string())
    }

    /// [`forward`](Self::forward) plus the last convolutional stage's activations `[B, C, H, W]`
    /// in the same graph; an error for a model that has none.
    pub fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        let out = self
            .inner
            .forward_with_feature_map(inputs.into())
            .into_result()?;
        Ok((from_ffi_outputs(out.outputs), out.feature_map.into_tensor()))
    }
}

/// A [`Model`] is itself an architecture: a plugin model can hand a model it wraps to code that
/// takes one.
impl Architecture for Model {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        Model::forward(self, inputs)
    }
    fn head(&self, features: &Tensor) -> Result<Tensor> {
        Model::head(self, features)
    }
    fn parameters(&self) -> Result<Vec<Param>> {
        Model::parameters(self)
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Model::buffers(self)
    }
    fn set_training(&self, train: bool) -> Result<()> {
        Model::set_training(self, train)
    }
    fn is_training(&self) -> Result<bool> {
        Model::is_training(self)
    }
    fn set_double(&self, double: bool) -> Result<()> {
        Model::set_double(self, double)
    }
    fn feature_dim(&self) -> Result<i64> {
        Model::feature_dim(self)
    }
    fn spec(&self) -> Result<String> {
        Model::spec(self)
    }
    fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        Model::forward_with_feature_map(self, inputs)
    }
}

/// The host, as components see it: handed to [`crate::Component::new`]; keep it for later calls.
///
/// `Host` is not `Send`: use it on the thread that called the component.
pub struct Host {
    pub(crate) inner: FfiHostBox,
}

impl Host {
    /// Wraps the host's services so they can cross the plugin boundary.
    pub fn new(services: impl HostServices) -> Self {
        Host {
            inner: FfiHost_TO::from_value(HostAdapter(services), TD_Opaque),
        }
    }

    pub(crate) fn from_ffi(inner: FfiHostBox) -> Self {
        Host { inner }
    }

    #[doc(hidden)]
    pub fn into_ffi(self) -> FfiHostBox {
        self.inner
    }

    /// The run's model (the student). An error inside a model component's constructor: the
    /// model is what is being built.
    pub fn model(&self) -> Result<Model> {
        let inner = self.inner.model().into_result()?;
        Ok(Model { inner })
    }

    /// The number of classes in the data set: the width of the logits, and class indices in
    /// targets are below it.
    pub fn num_classes(&self) -> i64 {
        self.inner.num_classes()
    }

    /// `[channels, height, width]` of the images the model takes.
    pub fn input_shape(&self) -> [i64; 3] {
        let shape = self.inner.input_shape();
        let at = |i: usize| shape.get(i).copied().unwrap_or(1);
        [at(0), at(1), at(2)]
    }

    /// The per-channel mean and std images are normalised with (in units of the `[0, 1]` pixel
    /// range): what a plugin needs to undo normalisation or to clip to the valid pixel range.
    pub fn normalization(&self) -> Normalization {
        let n = self.inner.normalization();
        Normalization {
            mean: n.mean.into_vec(),
            std: n.std.into_vec(),
        }
    }

    /// The device the run trains on: the model, batches and every tensor the host hands over live
    /// there; create the component's own tensors there too.
    pub fn device(&self) -> Device {
        device_from_index(self.inner.device())
    }

    /// The run's seed (`[train] seed`): derive every random choice from it.
    pub fn seed(&self) -> u64 {
        self.inner.seed()
    }

    /// Where training is now: epoch and step (all zero before the first step).
    pub fn progress(&self) -> StepInfo {
        adapt::from_ffi_step(self.inner.progress())
    }

    /// The next augmented training batch, on the run's device, from a stream of its own (asking
    /// never changes the batches the training loop sees).
    pub fn train_batch(&self) -> Result<Batch> {
        Ok(from_ffi_batch(self.inner.train_batch().into_result()?))
    }

    /// Builds a model from a `[model]`-style TOML spec (`arch = "resnet34"`, or `use = "name"`
    /// with the component's keys) for this run's data and device: with the weights a previous
    /// `trellis run` saved when `checkpoint` is given, else freshly initialised.
    pub fn build_model(&self, spec: &str, checkpoint: Option<&Path>) -> Result<Model> {
        let checkpoint = checkpoint.map(|p| p.to_string_lossy().into_owned());
        let checkpoint: ROption<RStr<'_>> = checkpoint.as_deref().map(RStr::from_str).into();
        let inner = self
            .inner
            .build_model(RStr::from_str(spec), checkpoint)
            .into_result()
            .map_err(Error::from)?;
        Ok(Model { inner })
    }

    /// The optimizer's parameter groups and their current rates; empty until the rates are first
    /// set, just before the first training step.
    pub fn learning_rates(&self) -> Vec<GroupRate> {
        self.inner
            .learning_rates()
            .into_iter()
            .map(|g| GroupRate {
                name: g.name.into_string(),
                lr: g.lr,
                params: g.params.into_iter().map(RString::into_string).collect(),
            })
            .collect()
    }

    /// Every tensor the optimizer updates, by the name its group gives it: the model's
    /// parameters and those a distiller added (empty until the optimizer has its groups, so ask
    /// during training, not in a constructor). Their `.grad()` is the step's gradient.
    pub fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        adapt::from_ffi_named(self.inner.optimized_parameters())
    }

    /// `(rank, world size)` of this process among those training together; `(0, 1)` alone.
    pub fn rank_and_world_size(&self) -> (u32, u32) {
        let pair = self.inner.rank_and_world_size();
        (pair.0, pair.1)
    }

    /// Where the run writes its outputs, if it writes any (plots go here); `None` when nothing is
    /// written, e.g. in tests.
    pub fn run_dir(&self) -> Option<PathBuf> {
        self.inner
            .run_dir()
            .into_option()
            .map(|s| s.into_string().into())
    }

    /// The directory of the run config: relative paths in a component's configuration are
    /// relative to it (see [`Host::resolve`]).
    pub fn config_dir(&self) -> PathBuf {
        self.inner.config_dir().into_string().into()
    }

    /// A path from a component's configuration, relative to the run config like the core's own
    /// paths (absolute paths are kept).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.config_dir().join(path)
        }
    }
}
