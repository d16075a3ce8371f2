//! The services the core offers components through the SDK: the run's model, training batches,
//! models built from a spec and checkpoint, the current learning rates.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Device, Tensor};
use trellis_sdk::{
    Batch, Error, GroupRate, HostServices, Model, ModelServices, Outputs, Param, Result,
};

use crate::data::{Dataset, Loader, LoaderOptions, Normalize};
use crate::models::{ModelConfig, Network};

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

    pub fn forward(&self, inputs: &Tensor) -> (Tensor, Tensor) {
        self.net.borrow().forward(inputs, self.training.get())
    }
}

/// The SDK's view of a [`SharedModel`].
pub struct ModelView(pub Rc<SharedModel>);

impl ModelServices for ModelView {
    fn forward(&self, inputs: &Tensor) -> Result<Outputs> {
        let (logits, features) = self.0.forward(inputs);
        Ok(Outputs { logits, features })
    }

    fn head(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.0.net().head(features))
    }

    fn parameters(&self) -> Vec<Param> {
        let net = self.0.net();
        let layers = net.layers();
        net.parameters()
            .into_iter()
            .map(|(name, layer, tensor)| Param {
                name,
                module: layers[layer].path.clone(),
                kind: layers[layer].kind,
                tensor,
            })
            .collect()
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        self.0.net().buffers()
    }

    fn set_training(&self, train: bool) {
        self.0.set_training(train)
    }

    fn is_training(&self) -> bool {
        self.0.training.get()
    }

    fn set_double(&self, double: bool) -> Result<()> {
        let mut net = self.0.net_mut();
        if double {
            net.var_store_mut().double();
        } else {
            net.var_store_mut().float();
        }
        Ok(())
    }

    fn arch(&self) -> String {
        toml::to_string(self.0.net().config()).unwrap_or_default()
    }
}

/// What the trainer shares with the host services.
pub struct RunState {
    pub model: Rc<SharedModel>,
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
    pub run_dir: Option<PathBuf>,
    pub config_dir: PathBuf,
    /// Batches served to components, independent of the training loop's own order.
    host_batches: RefCell<Option<Loader>>,
    host_epoch: Cell<usize>,
}

impl RunState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Rc<SharedModel>,
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
            model,
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
            run_dir,
            config_dir,
            host_batches: RefCell::new(None),
            host_epoch: Cell::new(0),
        })
    }
}

/// The host as components see it.
#[derive(Clone)]
pub struct RunHost(pub Rc<RunState>);

/// Component batches use their own stream of epochs, far from the training loop's, so asking
/// for batches never changes what the trainer sees.
const HOST_BATCH_STREAM: usize = 1 << 40;

impl HostServices for RunHost {
    fn model(&self) -> Model {
        Model::new(ModelView(self.0.model.clone()))
    }

    fn num_classes(&self) -> i64 {
        self.0.num_classes
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

    fn build_model(&self, spec: &str, checkpoint: &Path) -> Result<Model> {
        let config: ModelConfig = toml::from_str(spec)
            .map_err(|e| Error::msg(format!("invalid model spec: {}", e.message())))?;
        let s = &self.0;
        let mut net = Network::build(
            &config,
            s.num_classes,
            s.in_channels,
            s.image_size,
            s.device,
        )
        .map_err(|e| Error::msg(format!("{e:#}")))?;
        net.load(checkpoint)
            .map_err(|e| Error::msg(format!("{e:#}")))?;
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
