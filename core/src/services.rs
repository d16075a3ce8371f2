//! The services the core offers components through the SDK: the run's model, training batches,
//! models built from a spec and checkpoint, the current learning rates.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Device, Tensor};
use trellis_sdk::{
    Architecture, Batch, Error, GroupRate, Host, HostServices, Model, Normalization, Outputs,
    Param, Result, Role, StepInfo,
};

use crate::data::{Dataset, Loader, LoaderOptions, Normalize};
use crate::models::{ModelSpec, Network};
use crate::plugin_host::Registry;

/// A network shared between the trainer and the components that look at it.
#[derive(Debug)]
pub struct SharedModel {
    net: RefCell<Network>,
    training: Cell<bool>,
}

impl SharedModel {
    pub fn new(net: Network) -> Rc<SharedModel> {
        Rc::new(SharedModel {
            net: RefCell::new(net),
            training: Cell::new(false),
        })
    }

    pub fn net(&self) -> std::cell::Ref<'_, Network> {
        self.net.borrow()
    }

    pub fn net_mut(&self) -> std::cell::RefMut<'_, Network> {
        self.net.borrow_mut()
    }

    pub fn set_training(&self, train: bool) {
        self.training.set(train)
    }

    pub fn forward(&self, inputs: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        self.net.borrow().forward(inputs, self.training.get())
    }

    pub fn forward_with_feature_map(
        &self,
        inputs: &Tensor,
    ) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
        self.net
            .borrow()
            .forward_with_feature_map(inputs, self.training.get())
    }
}

/// The SDK's view of a [`SharedModel`].
pub struct ModelView(pub Rc<SharedModel>);

impl Architecture for ModelView {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let (logits, features) = self.0.forward(inputs).map_err(core_error)?;
        Ok(Outputs { logits, features })
    }

    fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.0.net().head(features).map_err(core_error)
    }

    fn forward_with_feature_map(&self, inputs: &Tensor) -> Result<(Outputs, Tensor)> {
        let (logits, features, map) = self
            .0
            .forward_with_feature_map(inputs)
            .map_err(core_error)?;
        Ok((Outputs { logits, features }, map))
    }

    fn parameters(&self) -> Result<Vec<Param>> {
        let net = self.0.net();
        let layers = net.layers();
        Ok(net
            .parameters()
            .into_iter()
            .map(|(name, layer, tensor)| Param {
                name,
                module: layers[layer].path.clone(),
                kind: layers[layer].kind,
                tensor,
            })
            .collect())
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.0.net().buffers())
    }

    fn set_training(&self, train: bool) -> Result<()> {
        self.0.set_training(train);
        Ok(())
    }

    fn is_training(&self) -> Result<bool> {
        Ok(self.0.training.get())
    }

    fn set_double(&self, double: bool) -> Result<()> {
        self.0.net_mut().set_double(double).map_err(core_error)
    }

    fn feature_dim(&self) -> Result<i64> {
        Ok(self.0.net().feature_dim())
    }

    fn spec(&self) -> Result<String> {
        let net = self.0.net();
        // A plugin's own spec has its defaults filled in; the config's table may not.
        match net.plugin_model() {
            Some(model) => model.spec(),
            None => toml::to_string(net.spec()).map_err(|e| Error::msg(e.to_string())),
        }
    }
}

fn core_error(e: anyhow::Error) -> Error {
    Error::msg(format!("{e:#}"))
}

/// What the trainer shares with the host services.
pub struct RunState {
    /// Set once the model is built; a model component's constructor runs before.
    model: RefCell<Option<Rc<SharedModel>>>,
    /// The plugins, for building models a spec names by `use`.
    pub registry: RefCell<Option<Rc<Registry>>>,
    pub num_classes: i64,
    pub in_channels: i64,
    pub image_size: i64,
    pub device: Device,
    pub seed: u64,
    pub train_data: Rc<Dataset>,
    pub batch_size: usize,
    pub augment: bool,
    pub normalize: Normalize,
    pub rates: RefCell<Vec<GroupRate>>,
    /// Everything the optimizer steps, by group member name.
    pub optimized: RefCell<Vec<(String, Tensor)>>,
    /// Where the loop is, for `Host::progress`.
    pub progress: Cell<StepInfo>,
    pub run_dir: Option<PathBuf>,
    pub config_dir: PathBuf,
    /// Batches served to components, independent of the training loop's own order.
    host_batches: RefCell<Option<Loader>>,
    host_epoch: Cell<usize>,
    /// `(rank, world size)` of a data-parallel run; `(0, 1)` alone.
    pub world: Cell<(u32, u32)>,
}

impl RunState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        num_classes: i64,
        device: Device,
        seed: u64,
        train_data: Rc<Dataset>,
        batch_size: usize,
        augment: bool,
        normalize: Normalize,
        run_dir: Option<PathBuf>,
        config_dir: PathBuf,
    ) -> Rc<RunState> {
        let [in_channels, image_size, _] = train_data.image_shape();
        Rc::new(RunState {
            model: RefCell::new(None),
            registry: RefCell::new(None),
            num_classes,
            in_channels,
            image_size,
            device,
            seed,
            train_data,
            batch_size,
            augment,
            normalize,
            rates: RefCell::new(Vec::new()),
            optimized: RefCell::new(Vec::new()),
            progress: Cell::new(StepInfo::default()),
            run_dir,
            config_dir,
            host_batches: RefCell::new(None),
            host_epoch: Cell::new(0),
            world: Cell::new((0, 1)),
        })
    }

    /// The run's model. Only the model's own construction comes before it is set.
    pub fn model(&self) -> Rc<SharedModel> {
        self.model
            .borrow()
            .clone()
            .expect("the run's model is built before anything uses it")
    }

    pub fn set_model(&self, model: Rc<SharedModel>) {
        *self.model.borrow_mut() = Some(model);
    }
}

/// Builds the network a `[model]` spec describes for this run's data and device: a built-in
/// architecture, or a plugin's model component created through the registry.
pub fn build_network(spec: &ModelSpec, host: &RunHost) -> anyhow::Result<Network> {
    let s = &host.0;
    match spec {
        ModelSpec::Builtin(config) => {
            Network::build(config, s.num_classes, s.in_channels, s.image_size, s.device)
        }
        ModelSpec::Plugin(component) => {
            let registry = s.registry.borrow().clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "[model] use = \"{}\" names a plugin's model, but no plugins are loaded",
                    component.component
                )
            })?;
            let text = crate::config::component_text(&component.options)?;
            let model = registry
                .create(
                    Role::Model,
                    &component.component,
                    &text,
                    Host::new(host.clone()),
                )?
                .into_model()
                .ok_or_else(|| {
                    anyhow::anyhow!("internal error: a model component of another role")
                })?;
            Network::from_plugin(model, spec.clone(), s.device)
        }
    }
}

/// The host as components see it.
#[derive(Clone)]
pub struct RunHost(pub Rc<RunState>);

/// Component batches use their own stream of epochs, far from the training loop's, so asking
/// for batches never changes what the trainer sees.
const HOST_BATCH_STREAM: usize = 1 << 40;

impl HostServices for RunHost {
    fn rank_and_world_size(&self) -> (u32, u32) {
        self.0.world.get()
    }

    fn model(&self) -> Result<Model> {
        match self.0.model.borrow().clone() {
            Some(model) => Ok(Model::new(ModelView(model))),
            None => Err(Error::msg(
                "the run's model is not built yet: a model component cannot ask for it",
            )),
        }
    }

    fn num_classes(&self) -> i64 {
        self.0.num_classes
    }

    fn input_shape(&self) -> [i64; 3] {
        let s = &self.0;
        [s.in_channels, s.image_size, s.image_size]
    }

    fn normalization(&self) -> Normalization {
        let n = &self.0.normalize;
        let channels = self.0.in_channels as usize;
        let per_channel = |values: &[f32], identity: f64| -> Vec<f64> {
            if values.is_empty() {
                vec![identity; channels]
            } else {
                values.iter().map(|&v| v as f64).collect()
            }
        };
        Normalization {
            mean: per_channel(&n.mean, 0.0),
            std: per_channel(&n.std, 1.0),
        }
    }

    fn progress(&self) -> StepInfo {
        self.0.progress.get()
    }

    fn optimized_parameters(&self) -> Vec<(String, Tensor)> {
        let params = self.0.optimized.borrow();
        params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn device(&self) -> Device {
        self.0.device
    }

    fn seed(&self) -> u64 {
        self.0.seed
    }

    fn train_batch(&self) -> Result<Batch> {
        let s = &self.0;
        let mut slot = s.host_batches.borrow_mut();
        loop {
            if slot.is_none() {
                let epoch = s.host_epoch.get();
                s.host_epoch.set(epoch + 1);
                *slot = Some(Loader::new(
                    s.train_data.clone(),
                    LoaderOptions {
                        batch_size: s.batch_size,
                        shuffle: true,
                        augment: s.augment,
                        drop_last: false,
                        seed: s.seed,
                        epoch: HOST_BATCH_STREAM + epoch,
                        device: s.device,
                        normalize: s.normalize.clone(),
                    },
                ));
            }
            match slot.as_mut().and_then(Iterator::next) {
                Some(b) => {
                    return Ok(Batch {
                        inputs: b.inputs,
                        targets: b.targets,
                    })
                }
                None if s.train_data.is_empty() => {
                    return Err(Error::msg("the training set is empty"))
                }
                None => *slot = None,
            }
        }
    }

    fn build_model(&self, spec: &str, checkpoint: Option<&Path>) -> Result<Model> {
        let spec: ModelSpec = toml::from_str(spec)
            .map_err(|e| Error::msg(format!("invalid model spec: {}", e.message())))?;
        spec.validate().map_err(core_error)?;
        let mut net = build_network(&spec, self).map_err(core_error)?;
        if let Some(checkpoint) = checkpoint {
            net.load(checkpoint).map_err(core_error)?;
        }
        Ok(Model::new(ModelView(SharedModel::new(net))))
    }

    fn learning_rates(&self) -> Vec<GroupRate> {
        self.0.rates.borrow().clone()
    }

    fn run_dir(&self) -> Option<PathBuf> {
        self.0.run_dir.clone()
    }

    fn config_dir(&self) -> PathBuf {
        self.0.config_dir.clone()
    }
}
