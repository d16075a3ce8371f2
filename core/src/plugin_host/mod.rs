//! The plugin host: reads a manifest, loads and checks every plugin it lists, and creates
//! components by role and name.
//!
//! Libraries are loaded through abi_stable's library-header API, not `RootModule::load_from_file`:
//! the latter caches one module per root-module type, so every plugin after the first would
//! silently be the first one again.

mod library;
mod logging;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abi_stable::std_types::{RResult, RStr};
use anyhow::{bail, Result};
use serde::Deserialize;
use toml::Spanned;
use trellis_sdk::abi::FfiComponent;
use trellis_sdk::{
    Architecture, Batch, Callback, Distiller, EpochInfo, Error, Events, GroupSpec, Host,
    MetricValues, Model, Optimizer, Outputs, Param, ParamGroup, PruneRequest, PruneResult, Pruner,
    Role, SchedulePoint, Scheduler, State, StepControl, StepInfo,
};

pub use library::{open, sha256_of, ComponentInfo, Library, PluginFile, PluginInfo};

use crate::source::SourceFile;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    plugin: Vec<ManifestEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    name: Spanned<String>,
    path: Spanned<PathBuf>,
    sha256: Option<Spanned<String>>,
}

/// Every loaded plugin and the components they provide.
#[derive(Debug, Default)]
pub struct Registry {
    pub manifest: Option<PathBuf>,
    pub libraries: Vec<Library>,
    /// (role, component) → index into `libraries`.
    index: BTreeMap<(Role, String), usize>,
}

impl Registry {
    /// Loads every plugin a manifest lists, checking pins, names and duplicate components.
    pub fn load(manifest: &Path) -> Result<Registry> {
        let file = SourceFile::read(manifest)?;
        let parsed: ManifestFile = file.parse()?;
        let mut registry = Registry {
            manifest: Some(manifest.to_path_buf()),
            ..Registry::default()
        };
        for entry in &parsed.plugin {
            let path = file.dir().join(entry.path.get_ref());
            let at_path =
                |e: anyhow::Error| file.error_at(entry.path.span(), &format!("{e:#}"), None);
            // The pin is compared on the bytes read, before anything is loaded; what is loaded
            // afterwards is exactly these bytes (`PluginFile::load`).
            let plugin = PluginFile::read(&path).map_err(at_path)?;
            if let Some(pin) = &entry.sha256 {
                if !pin.get_ref().eq_ignore_ascii_case(plugin.sha256()) {
                    return Err(file.error_at(
                        pin.span(),
                        &format!(
                            "plugin {} does not match its sha256 pin: the file's sha256 is {}",
                            path.display(),
                            plugin.sha256()
                        ),
                        Some("the file changed since it was pinned; rebuild the intended version or update the pin"),
                    ));
                }
            }
            let library = plugin.load().map_err(at_path)?;
            if library.info.name != *entry.name.get_ref() {
                return Err(file.error_at(
                    entry.name.span(),
                    &format!(
                        "the manifest calls this plugin `{}` but {} declares itself `{}`",
                        entry.name.get_ref(),
                        path.display(),
                        library.info.name
                    ),
                    Some("use the plugin's own name in the manifest"),
                ));
            }
            registry
                .add(library)
                .map_err(|e| file.error_at(entry.name.span(), &format!("{e:#}"), None))?;
        }
        Ok(registry)
    }

    /// Adds one library, refusing component names another plugin already provides.
    pub fn add(&mut self, library: Library) -> Result<()> {
        let position = self.libraries.len();
        for c in &library.info.components {
            if let Some(&other) = self.index.get(&(c.role, c.name.clone())) {
                bail!(
                    "{} `{}` is provided twice: by plugin {} ({}) and by plugin {} ({})",
                    c.role,
                    c.name,
                    self.libraries[other].info.name,
                    self.libraries[other].path.display(),
                    library.info.name,
                    library.path.display()
                );
            }
        }
        for c in &library.info.components {
            self.index.insert((c.role, c.name.clone()), position);
        }
        self.libraries.push(library);
        Ok(())
    }

    /// All components, by role then name.
    pub fn components(&self) -> Vec<(&Library, &ComponentInfo)> {
        self.index
            .iter()
            .map(|((role, name), &i)| {
                let library = &self.libraries[i];
                let info = library
                    .info
                    .components
                    .iter()
                    .find(|c| c.role == *role && c.name == *name)
                    .expect("index built from the declarations");
                (library, info)
            })
            .collect()
    }

    /// The error for a component nobody provides, listing the ones that exist.
    pub fn unknown(&self, role: Role, name: &str) -> String {
        let available: Vec<String> = self
            .components()
            .into_iter()
            .filter(|(_, c)| c.role == role)
            .map(|(l, c)| format!("{} (plugin {})", c.name, l.info.name))
            .collect();
        let available = if available.is_empty() {
            format!("no loaded plugin provides a {role}")
        } else {
            format!("available {role}s: {}", available.join(", "))
        };
        let manifest = self
            .manifest
            .as_ref()
            .map(|m| format!(" in {}", m.display()))
            .unwrap_or_default();
        format!("no {role} named `{name}` is provided by the plugins{manifest}; {available}")
    }

    pub fn provides(&self, role: Role, name: &str) -> bool {
        self.index.contains_key(&(role, name.to_string()))
    }

    /// Creates a component from its configuration (TOML text without `use`).
    pub fn create(&self, role: Role, name: &str, config: &str, host: Host) -> Result<Component> {
        let Some(&i) = self.index.get(&(role, name.to_string())) else {
            bail!(self.unknown(role, name));
        };
        let library = &self.libraries[i];
        let origin = Origin {
            plugin: library.info.name.clone(),
            component: name.to_string(),
            role,
        };
        let created = (library.module.create())(
            role,
            RStr::from_str(name),
            RStr::from_str(config),
            host.into_ffi(),
        );
        let created = match created {
            RResult::ROk(c) => c,
            RResult::RErr(e) => return Err(ComponentError::new(&origin, Error::from(e)).into()),
        };
        Ok(match created {
            FfiComponent::Optimizer(o) => Component::Optimizer(Named::new(origin, o)),
            FfiComponent::Scheduler(s) => Component::Scheduler(Named::new(origin, s)),
            FfiComponent::Pruner(p) => Component::Pruner(Named::new(origin, p)),
            FfiComponent::Distiller(d) => Component::Distiller(Named::new(origin, d)),
            FfiComponent::Metric(m) => Component::Metric(Named::new(origin, m)),
            FfiComponent::Model(m) => Component::Model(Named::new(origin, Model::from_ffi(m))),
            FfiComponent::Callback(c) => {
                // Asked here, where an error can still name the component: the trainer asks
                // again and trusts the answer.
                if let RResult::RErr(e) = c.events() {
                    return Err(ComponentError::new(&origin, Error::from(e)).into());
                }
                Component::Callback(Named::new(origin, c))
            }
        })
    }
}

/// Which plugin and component something came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub plugin: String,
    pub component: String,
    pub role: Role,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} `{}` (plugin {})",
            self.role, self.component, self.plugin
        )
    }
}

/// An error a component returned, with where it came from. Configuration errors keep the
/// offending key so the run config can point at its line.
#[derive(Debug)]
pub struct ComponentError {
    pub origin: Origin,
    pub error: Error,
}

impl ComponentError {
    pub fn new(origin: &Origin, error: Error) -> Self {
        ComponentError {
            origin: origin.clone(),
            error,
        }
    }
}

impl std::fmt::Display for ComponentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error.kind {
            trellis_sdk::abi::ErrorKind::Panic => {
                write!(f, "{} panicked: {}", self.origin, self.error.message)
            }
            trellis_sdk::abi::ErrorKind::Config => write!(
                f,
                "{} refused its configuration: {}",
                self.origin, self.error.message
            ),
            trellis_sdk::abi::ErrorKind::Failed => {
                write!(f, "{} failed: {}", self.origin, self.error.message)
            }
        }
    }
}

impl std::error::Error for ComponentError {}

/// A component wrapped so every error it returns names it.
pub struct Named<T> {
    pub origin: Origin,
    inner: T,
}

impl<T> Named<T> {
    fn new(origin: Origin, inner: T) -> Self {
        Named { origin, inner }
    }

    fn wrap<R>(&self, r: trellis_sdk::Result<R>) -> trellis_sdk::Result<R> {
        r.map_err(|e| Error {
            message: ComponentError::new(&self.origin, e.clone()).to_string(),
            ..e
        })
    }
}

/// A created component of any role.
pub enum Component {
    Optimizer(Named<trellis_sdk::adapt::OptimizerBox>),
    Scheduler(Named<trellis_sdk::adapt::SchedulerBox>),
    Pruner(Named<trellis_sdk::adapt::PrunerBox>),
    Distiller(Named<trellis_sdk::adapt::DistillerBox>),
    Metric(Named<trellis_sdk::adapt::MetricBox>),
    Model(Named<Model>),
    Callback(Named<trellis_sdk::adapt::CallbackBox>),
}

impl Component {
    pub fn into_optimizer(self) -> Option<Box<dyn Optimizer>> {
        match self {
            Component::Optimizer(o) => Some(Box::new(o)),
            _ => None,
        }
    }
    pub fn into_scheduler(self) -> Option<Box<dyn Scheduler>> {
        match self {
            Component::Scheduler(s) => Some(Box::new(s)),
            _ => None,
        }
    }
    pub fn into_pruner(self) -> Option<Box<dyn Pruner>> {
        match self {
            Component::Pruner(p) => Some(Box::new(p)),
            _ => None,
        }
    }
    pub fn into_distiller(self) -> Option<Box<dyn Distiller>> {
        match self {
            Component::Distiller(d) => Some(Box::new(d)),
            _ => None,
        }
    }
    pub fn into_metric(self) -> Option<Box<dyn trellis_sdk::Metric>> {
        match self {
            Component::Metric(m) => Some(Box::new(m)),
            _ => None,
        }
    }
    /// The model, its errors naming the component.
    pub fn into_model(self) -> Option<Model> {
        match self {
            Component::Model(m) => Some(Model::new(m)),
            _ => None,
        }
    }
    pub fn into_callback(self) -> Option<Box<dyn Callback>> {
        match self {
            Component::Callback(c) => Some(Box::new(c)),
            _ => None,
        }
    }
}

impl<T: Optimizer> Optimizer for Named<T> {
    fn set_param_groups(&mut self, groups: Vec<ParamGroup>) -> trellis_sdk::Result<()> {
        let r = self.inner.set_param_groups(groups);
        self.wrap(r)
    }
    fn set_learning_rates(&mut self, rates: &[f64]) -> trellis_sdk::Result<()> {
        let r = self.inner.set_learning_rates(rates);
        self.wrap(r)
    }
    fn step(&mut self) -> trellis_sdk::Result<()> {
        let r = self.inner.step();
        self.wrap(r)
    }
    fn state(&self) -> trellis_sdk::Result<State> {
        self.wrap(self.inner.state())
    }
    fn load_state(&mut self, state: State) -> trellis_sdk::Result<()> {
        let r = self.inner.load_state(state);
        self.wrap(r)
    }
}

impl<T: Scheduler> Scheduler for Named<T> {
    fn param_groups(&mut self) -> trellis_sdk::Result<Vec<GroupSpec>> {
        let r = self.inner.param_groups();
        self.wrap(r)
    }
    fn learning_rates(&mut self, point: SchedulePoint) -> trellis_sdk::Result<Option<Vec<f64>>> {
        let r = self.inner.learning_rates(point);
        self.wrap(r)
    }
    fn state(&self) -> trellis_sdk::Result<State> {
        self.wrap(self.inner.state())
    }
    fn load_state(&mut self, state: State) -> trellis_sdk::Result<()> {
        let r = self.inner.load_state(state);
        self.wrap(r)
    }
}

impl<T: Pruner> Pruner for Named<T> {
    fn prune(&mut self, request: PruneRequest) -> trellis_sdk::Result<PruneResult> {
        let r = self.inner.prune(request);
        self.wrap(r)
    }
}

impl<T: Distiller> Distiller for Named<T> {
    fn trainable_parameters(&mut self) -> trellis_sdk::Result<Vec<(String, tch::Tensor)>> {
        let r = self.inner.trainable_parameters();
        self.wrap(r)
    }
    fn replaces_task_loss(&self) -> trellis_sdk::Result<bool> {
        self.wrap(self.inner.replaces_task_loss())
    }
    fn set_training(&mut self, train: bool) -> trellis_sdk::Result<()> {
        let r = self.inner.set_training(train);
        self.wrap(r)
    }
    fn loss(
        &mut self,
        batch: &Batch,
        outputs: &Outputs,
    ) -> trellis_sdk::Result<Vec<(String, tch::Tensor)>> {
        let r = self.inner.loss(batch, outputs);
        self.wrap(r)
    }
    fn state(&self) -> trellis_sdk::Result<State> {
        self.wrap(self.inner.state())
    }
    fn load_state(&mut self, state: State) -> trellis_sdk::Result<()> {
        let r = self.inner.load_state(state);
        self.wrap(r)
    }
}

impl<T: trellis_sdk::Metric> trellis_sdk::Metric for Named<T> {
    fn reset(&mut self) -> trellis_sdk::Result<()> {
        let r = self.inner.reset();
        self.wrap(r)
    }
    fn wants_batches(&self) -> trellis_sdk::Result<bool> {
        self.wrap(self.inner.wants_batches())
    }
    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> trellis_sdk::Result<()> {
        let r = self.inner.update(batch, outputs);
        self.wrap(r)
    }
    fn compute(&mut self, info: EpochInfo) -> trellis_sdk::Result<MetricValues> {
        let r = self.inner.compute(info);
        self.wrap(r)
    }
}

impl<T: Architecture> Architecture for Named<T> {
    fn forward(&self, inputs: &tch::Tensor) -> trellis_sdk::Result<Outputs> {
        self.wrap(self.inner.forward(inputs))
    }
    fn head(&self, features: &tch::Tensor) -> trellis_sdk::Result<tch::Tensor> {
        self.wrap(self.inner.head(features))
    }
    fn parameters(&self) -> trellis_sdk::Result<Vec<Param>> {
        self.wrap(self.inner.parameters())
    }
    fn buffers(&self) -> trellis_sdk::Result<Vec<(String, tch::Tensor)>> {
        self.wrap(self.inner.buffers())
    }
    fn set_training(&self, train: bool) -> trellis_sdk::Result<()> {
        self.wrap(self.inner.set_training(train))
    }
    fn is_training(&self) -> trellis_sdk::Result<bool> {
        self.wrap(self.inner.is_training())
    }
    fn set_double(&self, double: bool) -> trellis_sdk::Result<()> {
        self.wrap(self.inner.set_double(double))
    }
    fn feature_dim(&self) -> trellis_sdk::Result<i64> {
        self.wrap(self.inner.feature_dim())
    }
    fn spec(&self) -> trellis_sdk::Result<String> {
        self.wrap(self.inner.spec())
    }
    fn forward_with_feature_map(
        &self,
        inputs: &tch::Tensor,
    ) -> trellis_sdk::Result<(Outputs, tch::Tensor)> {
        self.wrap(self.inner.forward_with_feature_map(inputs))
    }
}

impl<T: Callback> Callback for Named<T> {
    fn events(&self) -> Events {
        self.inner.events()
    }
    fn batch_start(&mut self, batch: Batch, at: StepInfo) -> trellis_sdk::Result<Batch> {
        let r = self.inner.batch_start(batch, at);
        self.wrap(r)
    }
    fn after_loss(
        &mut self,
        batch: &Batch,
        outputs: &Outputs,
        loss: &tch::Tensor,
        at: StepInfo,
    ) -> trellis_sdk::Result<Vec<(String, tch::Tensor)>> {
        let r = self.inner.after_loss(batch, outputs, loss, at);
        self.wrap(r)
    }
    fn after_backward(&mut self, at: StepInfo) -> trellis_sdk::Result<()> {
        let r = self.inner.after_backward(at);
        self.wrap(r)
    }
    fn optimizer_step(
        &mut self,
        control: &mut dyn StepControl,
        at: StepInfo,
    ) -> trellis_sdk::Result<bool> {
        let r = self.inner.optimizer_step(control, at);
        self.wrap(r)
    }
    fn after_step(&mut self, at: StepInfo) -> trellis_sdk::Result<()> {
        let r = self.inner.after_step(at);
        self.wrap(r)
    }
    fn epoch_end(&mut self, info: EpochInfo) -> trellis_sdk::Result<()> {
        let r = self.inner.epoch_end(info);
        self.wrap(r)
    }
    fn eval_start(&mut self, info: EpochInfo) -> trellis_sdk::Result<()> {
        let r = self.inner.eval_start(info);
        self.wrap(r)
    }
    fn eval_end(&mut self, info: EpochInfo) -> trellis_sdk::Result<()> {
        let r = self.inner.eval_end(info);
        self.wrap(r)
    }
    fn state(&self) -> trellis_sdk::Result<State> {
        self.wrap(self.inner.state())
    }
    fn load_state(&mut self, state: State) -> trellis_sdk::Result<()> {
        let r = self.inner.load_state(state);
        self.wrap(r)
    }
}
