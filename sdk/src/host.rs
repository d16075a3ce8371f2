//! What the host offers components: the model, batches, other models, the run's facts.
//!
//! Plugins hold a [`Host`] and call it; the host provides the services by implementing
//! [`HostServices`] and [`ModelServices`], which the SDK turns into ABI objects.

use std::path::{Path, PathBuf};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RStr, RString};
use tch::{Device, Tensor};

use crate::abi::{FfiHostBox, FfiHost_TO, FfiModelBox, FfiModel_TO};
use crate::adapt::{self, from_ffi_batch, from_ffi_outputs, HostAdapter, ModelAdapter};
use crate::error::{Error, Result};
use crate::roles::{device_from_index, Batch, GroupRate, Outputs, Param};

/// The host's side of a model. Implemented by `trellis` for its networks.
pub trait ModelServices: 'static {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs>;
    fn head(&self, features: &Tensor) -> Result<Tensor>;
    /// Trainable parameters in module registration order.
    fn parameters(&self) -> Vec<Param>;
    /// Non-trainable buffers (BatchNorm running statistics).
    fn buffers(&self) -> Vec<(String, Tensor)>;
    fn set_training(&self, train: bool);
    fn is_training(&self) -> bool;
    fn set_double(&self, double: bool) -> Result<()>;
    fn arch(&self) -> String;
}

/// The host's services. Implemented by `trellis` for a run.
pub trait HostServices: 'static {
    fn model(&self) -> Model;
    fn num_classes(&self) -> i64;
    fn device(&self) -> Device;
    fn seed(&self) -> u64;
    fn train_batch(&self) -> Result<Batch>;
    fn build_model(&self, spec: &str, checkpoint: &Path) -> Result<Model>;
    fn learning_rates(&self) -> Vec<GroupRate>;
    fn run_dir(&self) -> Option<PathBuf>;
    fn config_dir(&self) -> PathBuf;
}

/// A model owned by the host.
pub struct Model {
    pub(crate) inner: FfiModelBox,
}

impl Model {
    pub fn new(services: impl ModelServices) -> Self {
        Model {
            inner: FfiModel_TO::from_value(ModelAdapter(services), TD_Opaque),
        }
    }

    /// Logits and pooled features, in the current train/eval mode.
    pub fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let out = self.inner.forward(inputs.into()).into_result()?;
        Ok(from_ffi_outputs(out))
    }

    /// The classifier head applied to features.
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self
            .inner
            .head(features.into())
            .into_result()?
            .into_tensor())
    }

    /// Trainable parameters in registration order, sharing storage with the model.
    pub fn parameters(&self) -> Vec<Param> {
        self.inner
            .parameters()
            .into_iter()
            .map(adapt::from_ffi_param)
            .collect()
    }

    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        adapt::from_ffi_named(self.inner.buffers())
    }

    pub fn set_training(&self, train: bool) {
        self.inner.set_training(train)
    }

    pub fn is_training(&self) -> bool {
        self.inner.is_training()
    }

    /// Converts every parameter and buffer to float64 (or back to float32) in place.
    pub fn set_double(&self, double: bool) -> Result<()> {
        Ok(self.inner.set_double(double).into_result()?)
    }

    pub fn arch(&self) -> String {
        self.inner.arch().into_string()
    }
}

/// The host, as components see it.
pub struct Host {
    pub(crate) inner: FfiHostBox,
}

impl Host {
    pub fn new(services: impl HostServices) -> Self {
        Host {
            inner: FfiHost_TO::from_value(HostAdapter(services), TD_Opaque),
        }
    }

    pub(crate) fn from_ffi(inner: FfiHostBox) -> Self {
        Host { inner }
    }

    /// The ABI object, for handing the host to a plugin's constructor.
    pub fn into_ffi(self) -> FfiHostBox {
        self.inner
    }

    /// The run's model (the student).
    pub fn model(&self) -> Model {
        Model {
            inner: self.inner.model(),
        }
    }

    pub fn num_classes(&self) -> i64 {
        self.inner.num_classes()
    }

    pub fn device(&self) -> Device {
        device_from_index(self.inner.device())
    }

    pub fn seed(&self) -> u64 {
        self.inner.seed()
    }

    /// The next augmented training batch, on the run's device.
    pub fn train_batch(&self) -> Result<Batch> {
        Ok(from_ffi_batch(self.inner.train_batch().into_result()?))
    }

    /// Builds a model from a `[model]`-style TOML spec (e.g. `arch = "resnet34"`) and loads the
    /// weights a previous `trellis run` saved.
    pub fn build_model(&self, spec: &str, checkpoint: &Path) -> Result<Model> {
        let checkpoint = checkpoint.to_string_lossy();
        let inner = self
            .inner
            .build_model(RStr::from_str(spec), RStr::from_str(&checkpoint))
            .into_result()
            .map_err(Error::from)?;
        Ok(Model { inner })
    }

    /// The optimizer's parameter groups and their current rates.
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

    /// Where the run writes its outputs, if it writes any (plots go here).
    pub fn run_dir(&self) -> Option<PathBuf> {
        self.inner
            .run_dir()
            .into_option()
            .map(|s| s.into_string().into())
    }

    /// The directory of the run config.
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
