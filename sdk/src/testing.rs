//! Test a component without the `trellis` binary: a [`FakeHost`] that answers every host service
//! from values the test sets, and [`TinyNet`], a small convolutional classifier with the layer
//! kinds per-layer methods look for (Conv2d, BatchNorm, Linear).
//!
//! ```no_run
//! use trellis_sdk::testing::{random_batch, FakeHost, TinyNet};
//!
//! let fake = FakeHost::new(TinyNet::new(3, 10)).batches(vec![random_batch(8, [3, 8, 8], 10)]);
//! let host = fake.host(); // hand this to `Component::new`
//! let model = host.model().unwrap(); // the same network the component sees
//! # let _ = model;
//! ```

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::host::{Host, HostServices, Model, Normalization};
use crate::roles::{Architecture, Batch, GroupRate, LayerKind, Outputs, Param, StepInfo};

type BuildModel = dyn Fn(&str, Option<&Path>) -> Result<Model>;

struct Facts {
    model: Option<Rc<dyn Architecture>>,
    num_classes: i64,
    input_shape: [i64; 3],
    normalization: Normalization,
    device: Device,
    seed: u64,
    progress: Cell<StepInfo>,
    batches: Vec<Batch>,
    next_batch: Cell<usize>,
    optimized: Option<Vec<(String, Tensor)>>,
    learning_rates: RefCell<Vec<GroupRate>>,
    build_model: Option<Box<BuildModel>>,
    run_dir: Option<PathBuf>,
    config_dir: PathBuf,
}

/// A host for unit tests. Set what the component under test asks for with the builder methods,
/// then hand [`FakeHost::host`] to the component. Defaults: 10 classes, 3×32×32 inputs, no
/// normalisation, the CPU, seed 0, no batches, no run directory, config directory `.`.
pub struct FakeHost {
    facts: Facts,
}

/// What [`FakeHost::host`] hands out; shares the fake's model and progress.
struct Shared(Rc<Facts>);

/// A model handle over an architecture the fake host shares.
struct SharedModel(Rc<dyn Architecture>);

impl FakeHost {
    /// A host whose run's model is `model`.
    pub fn new(model: impl Architecture) -> FakeHost {
        let mut host = FakeHost::without_model();
        host.facts.model = Some(Rc::new(model));
        host
    }

    /// A host with no model yet: what a model component's constructor sees.
    pub fn without_model() -> FakeHost {
        FakeHost {
            facts: Facts {
                model: None,
                num_classes: 10,
                input_shape: [3, 32, 32],
                normalization: Normalization {
                    mean: vec![0.0; 3],
                    std: vec![1.0; 3],
                },
                device: Device::Cpu,
                seed: 0,
                progress: Cell::new(StepInfo::default()),
                batches: Vec::new(),
                next_batch: Cell::new(0),
                optimized: None,
                learning_rates: RefCell::new(Vec::new()),
                build_model: None,
                run_dir: None,
                config_dir: PathBuf::from("."),
            },
        }
    }

    /// What `num_classes` returns.
    pub fn classes(mut self, num_classes: i64) -> Self {
        self.facts.num_classes = num_classes;
        self
    }

    /// `[channels, height, width]`; the normalisation follows the channel count.
    pub fn input_shape(mut self, shape: [i64; 3]) -> Self {
        self.facts.input_shape = shape;
        self.facts.normalization = Normalization {
            mean: vec![0.0; shape[0] as usize],
            std: vec![1.0; shape[0] as usize],
        };
        self
    }

    /// What `normalization` returns (set it after [`FakeHost::input_shape`], which resets it).
    pub fn normalization(mut self, normalization: Normalization) -> Self {
        self.facts.normalization = normalization;
        self
    }

    /// What `device` returns. The fake moves nothing: give it a model and batches on that device.
    pub fn device(mut self, device: Device) -> Self {
        self.facts.device = device;
        self
    }

    /// What `seed` returns.
    pub fn seed(mut self, seed: u64) -> Self {
        self.facts.seed = seed;
        self
    }

    /// What `train_batch` returns, in turn, round and round.
    pub fn batches(mut self, batches: Vec<Batch>) -> Self {
        self.facts.batches = batches;
        self
    }

    /// What `optimized_parameters` returns; default: the model's parameters.
    pub fn optimized_parameters(mut self, params: Vec<(String, Tensor)>) -> Self {
        self.facts.optimized = Some(params);
        self
    }

    /// What `learning_rates` returns.
    pub fn learning_rates(self, rates: Vec<GroupRate>) -> Self {
        *self.facts.learning_rates.borrow_mut() = rates;
        self
    }

    /// How `build_model` answers (a teacher for a distiller, a base for a wrapper model);
    /// without it, `build_model` is an error.
    pub fn build_model(
        mut self,
        build: impl Fn(&str, Option<&Path>) -> Result<Model> + 'static,
    ) -> Self {
        self.facts.build_model = Some(Box::new(build));
        self
    }

    /// What `run_dir` returns (e.g. a temporary directory, for components that write files).
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.facts.run_dir = Some(dir.into());
        self
    }

    /// What `config_dir` returns, the directory `Host::resolve` makes relative paths relative to.
    pub fn config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.facts.config_dir = dir.into();
        self
    }

    /// The host to hand to a component. Freeze the fake first: every host from it shares one
    /// model and one progress counter.
    pub fn host(self) -> Host {
        Host::new(Shared(Rc::new(self.facts)))
    }

    /// Hosts that share the fake, plus a handle to move its progress while a test runs.
    pub fn shared(self) -> (Host, Progress) {
        let facts = Rc::new(self.facts);
        (Host::new(Shared(facts.clone())), Progress(facts))
    }
}

/// Moves a fake host's [`Host::progress`], for components that read the epoch or step.
pub struct Progress(Rc<Facts>);

impl Progress {
    /// What every host on the fake reports from `progress` from now on.
    pub fn set(&self, at: StepInfo) {
        self.0.progress.set(at)
    }

    /// Another host on the same fake.
    pub fn host(&self) -> Host {
        Host::new(Shared(self.0.clone()))
    }
}

impl Architecture for SharedModel {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        self.0.forward(inputs)
    }
    fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        self.0.forward_with_feature_map(inputs)
    }
    fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.0.head(features)
    }
    fn parameters(&self) -> Result<Vec<Param>> {
        self.0.parameters()
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.0.buffers()
    }
    fn set_training(&self, train: bool) -> Result<()> {
        self.0.set_training(train)
    }
    fn is_training(&self) -> Result<bool> {
        self.0.is_training()
    }
    fn set_double(&self, double: bool) -> Result<()> {
        self.0.set_double(double)
    }
    fn feature_dim(&self) -> Result<i64> {
        self.0.feature_dim()
    }
    fn spec(&self) -> Result<String> {
        self.0.spec()
    }
}

impl HostServices for Shared {
    fn model(&self) -> Result<Model> {
        match &self.0.model {
            Some(m) => Ok(Model::new(SharedModel(m.clone()))),
            None => Err(Error::msg("this fake host has no model")),
        }
    }
    fn num_classes(&self) -> i64 {
        self.0.num_classes
    }
    fn input_shape(&self) -> [i64; 3] {
        self.0.input_shape
    }
    fn normalization(&self) -> Normalization {
        self.0.normalization.clone()
    }
    fn device(&self) -> Device {
        self.0.device
    }
    fn seed(&self) -> u64 {
        self.0.seed
    }
    fn progress(&self) -> StepInfo {
        self.0.progress.get()
    }
    fn train_batch(&self) -> Result<Batch> {
        let batches = &self.0.batches;
        if batches.is_empty() {
            return Err(Error::msg("this fake host has no training batches"));
        }
        let i = self.0.next_batch.get();
        self.0.next_batch.set((i + 1) % batches.len());
        let b = &batches[i];
        Ok(Batch {
            inputs: b.inputs.shallow_clone(),
            targets: b.targets.shallow_clone(),
        })
    }
    fn build_model(&self, spec: &str, checkpoint: Option<&Path>) -> Result<Model> {
        match &self.0.build_model {
            Some(build) => build(spec, checkpoint),
            None => Err(Error::msg("this fake host builds no models")),
        }
    }
    fn learning_rates(&self) -> Vec<GroupRate> {
        self.0.learning_rates.borrow().clone()
    }
    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        if let Some(params) = &self.0.optimized {
            return params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
        }
        let params = self.0.model.as_ref().map(|m| m.parameters());
        match params {
            Some(Ok(params)) => params.into_iter().map(|p| (p.name, p.tensor)).collect(),
            _ => Vec::new(),
        }
    }
    fn run_dir(&self) -> Option<PathBuf> {
        self.0.run_dir.clone()
    }
    fn config_dir(&self) -> PathBuf {
        self.0.config_dir.clone()
    }
}

/// A small classifier: `conv1` (3×3, 4 channels) → `bn1` → ReLU → global average pool →
/// `linear`. Initialised from libtorch's generator (seed it with `tch::manual_seed`).
pub struct TinyNet {
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    training: Cell<bool>,
    classes: i64,
}

impl TinyNet {
    /// Channels of the hidden convolution, the width of the features.
    pub const WIDTH: i64 = 4;

    /// A network for `in_channels`-channel images of any size and `classes` classes, in
    /// evaluation mode, float32 on the CPU.
    pub fn new(in_channels: i64, classes: i64) -> TinyNet {
        let w = TinyNet::WIDTH;
        let opts = (Kind::Float, Device::Cpu);
        let param = |name: &str, kind: LayerKind, tensor: Tensor| Param {
            name: name.to_string(),
            module: name.rsplit_once('.').map_or("", |(m, _)| m).to_string(),
            kind,
            tensor: tensor.set_requires_grad(true),
        };
        let fan_in = (in_channels * 9) as f64;
        let params = vec![
            param(
                "conv1.weight",
                LayerKind::Conv2d,
                Tensor::randn([w, in_channels, 3, 3], opts) / fan_in.sqrt(),
            ),
            param("bn1.weight", LayerKind::BatchNorm, Tensor::ones([w], opts)),
            param("bn1.bias", LayerKind::BatchNorm, Tensor::zeros([w], opts)),
            param(
                "linear.weight",
                LayerKind::Linear,
                Tensor::randn([classes, w], opts) / (w as f64).sqrt(),
            ),
            param(
                "linear.bias",
                LayerKind::Linear,
                Tensor::zeros([classes], opts),
            ),
        ];
        let buffers = vec![
            ("bn1.running_mean".to_string(), Tensor::zeros([w], opts)),
            ("bn1.running_var".to_string(), Tensor::ones([w], opts)),
        ];
        TinyNet {
            params,
            buffers,
            training: Cell::new(false),
            classes,
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        let param = self
            .params
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.tensor);
        let buffer = || self.buffers.iter().find(|(n, _)| n == name).map(|b| &b.1);
        param.or_else(buffer).expect("a TinyNet variable")
    }
}

impl Architecture for TinyNet {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let x = inputs.f_conv2d(self.get("conv1.weight"), None::<&Tensor>, 1, 1, 1, 1)?;
        let x = x.f_batch_norm(
            Some(self.get("bn1.weight")),
            Some(self.get("bn1.bias")),
            Some(self.get("bn1.running_mean")),
            Some(self.get("bn1.running_var")),
            self.training.get(),
            0.1,
            1e-5,
            false,
        )?;
        let features = x.relu().f_mean_dim(&[2i64, 3][..], false, x.kind())?;
        Ok(Outputs {
            logits: self.head(&features)?,
            features,
        })
    }
    fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features.f_linear(self.get("linear.weight"), Some(self.get("linear.bias")))?)
    }
    fn parameters(&self) -> Result<Vec<Param>> {
        Ok(self.params.iter().map(Param::shallow_clone).collect())
    }
    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .buffers
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect())
    }
    fn set_training(&self, train: bool) -> Result<()> {
        self.training.set(train);
        Ok(())
    }
    fn is_training(&self) -> Result<bool> {
        Ok(self.training.get())
    }
    fn set_double(&self, double: bool) -> Result<()> {
        set_kind(
            self.params
                .iter()
                .map(|p| &p.tensor)
                .chain(self.buffers.iter().map(|b| &b.1)),
            if double { Kind::Double } else { Kind::Float },
        );
        Ok(())
    }
    fn feature_dim(&self) -> Result<i64> {
        Ok(TinyNet::WIDTH)
    }
    fn spec(&self) -> Result<String> {
        Ok(format!("use = \"tiny\"\nclasses = {}\n", self.classes))
    }
}

/// Converts tensors in place (`set_data`), so every handle to them sees the new kind: what
/// [`Architecture::set_double`] asks of a model.
pub fn set_kind<'a>(tensors: impl IntoIterator<Item = &'a Tensor>, kind: Kind) {
    tch::no_grad(|| {
        for t in tensors {
            t.shallow_clone().set_data(&t.to_kind(kind));
        }
    });
}

/// A batch of `n` standard-normal images of `shape` with uniformly drawn labels below `classes`,
/// from libtorch's generator.
pub fn random_batch(n: i64, shape: [i64; 3], classes: i64) -> Batch {
    let [c, h, w] = shape;
    Batch {
        inputs: Tensor::randn([n, c, h, w], (Kind::Float, Device::Cpu)),
        targets: Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_host_shares_its_model_and_cycles_batches() {
        tch::manual_seed(0);
        let batches = vec![
            random_batch(2, [3, 8, 8], 10),
            random_batch(3, [3, 8, 8], 10),
        ];
        let (host, progress) = FakeHost::new(TinyNet::new(3, 10)).batches(batches).shared();
        let model = host.model().unwrap();
        let other = progress.host().model().unwrap();
        let a = &model.parameters().unwrap()[0].tensor;
        let b = &other.parameters().unwrap()[0].tensor;
        assert_eq!(a.data_ptr(), b.data_ptr(), "one model behind every host");
        let sizes: Vec<i64> = (0..3)
            .map(|_| host.train_batch().unwrap().targets.size()[0])
            .collect();
        assert_eq!(sizes, [2, 3, 2]);
        let at = StepInfo {
            epoch: 1,
            epochs: 3,
            step: 7,
            steps_per_epoch: 5,
        };
        progress.set(at);
        assert_eq!(host.progress(), at);
        assert_eq!(host.optimized_parameters().len(), 5);
        assert!(FakeHost::without_model().host().model().is_err());
    }

    #[test]
    fn tiny_net_shapes_modes_and_double() {
        tch::manual_seed(1);
        let net = TinyNet::new(3, 5);
        let x = Tensor::randn([4, 3, 6, 6], (Kind::Float, Device::Cpu));
        let out = net.forward(&x).unwrap();
        assert_eq!(
            (out.logits.size(), out.features.size()),
            (vec![4, 5], vec![4, 4])
        );
        assert!(net.head(&out.features).unwrap().equal(&out.logits));
        net.set_training(true).unwrap();
        net.forward(&x).unwrap();
        let mean = net.buffers().unwrap()[0].1.abs().sum(Kind::Float);
        assert!(
            mean.double_value(&[]) > 0.0,
            "training updates running stats"
        );
        let weight = net.parameters().unwrap()[0].tensor.shallow_clone();
        net.set_double(true).unwrap();
        assert_eq!(weight.kind(), Kind::Double, "converted in place");
        assert!(weight.requires_grad());
    }
}
