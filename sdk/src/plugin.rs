//! Declaring a plugin: its components, their configurations, and how the host creates them.
//!
//! The version constants are what a plugin declares about its build; the host refuses a plugin
//! whose ABI version, tch, libtorch version or CUDA support differ from its own.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RString};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::abi::*;
use crate::adapt::{guard, install_panic_hook, Guarded, ModelAdapter};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::roles::{Architecture, Callback, Distiller, Metric, Optimizer, Pruner, Scheduler};

/// The tch this SDK is built with (pinned exactly in its Cargo.toml).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch this build linked, read from the installation at build time.
pub const LIBTORCH_VERSION: &str = env!("TRELLIS_LIBTORCH_VERSION");
/// Whether that libtorch has CUDA.
pub const LIBTORCH_CUDA: bool = const_str_is_true(env!("TRELLIS_LIBTORCH_CUDA"));
/// This SDK's crate version, declared by every plugin built with it (for reports; compatibility
/// is decided by the ABI version, tch and libtorch).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

const fn const_str_is_true(s: &str) -> bool {
    matches!(s.as_bytes(), b"true")
}

/// A component a plugin offers: its name, a one-line description, and its configuration type.
///
/// `Config` is read from the component's TOML table (minus `use`). Give it
/// `#[serde(deny_unknown_fields, default)]` so a misspelt key is refused and omitted keys take
/// their defaults; `Config::default()` is what `trellis plugins` shows.
pub trait Component: Sized + 'static {
    /// The name a run config uses it by (`use = "NAME"`); unique among the components of one
    /// role across every plugin in the manifest.
    const NAME: &'static str;
    /// One line for `trellis plugins`.
    const DESCRIPTION: &'static str;
    /// The component's own configuration: its table's keys other than `use` (and other than the
    /// host's own keys in `[optimizer]` and `[pruner]`, see [`crate::Optimizer`] and
    /// [`crate::Pruner`]).
    type Config: Serialize + DeserializeOwned + Default;
    /// Creates the component from its parsed configuration, each time a config table (or, for a
    /// model, a [`Host::build_model`] spec) names it. Check the configuration here and return
    /// [`Error::config`] naming the key of a refused value, so the host points at its line. Keep
    /// `host` for later calls.
    fn new(config: Self::Config, host: Host) -> Result<Self>;
}

type Create = fn(&str, Host) -> Result<FfiComponent>;

struct Entry {
    role: Role,
    name: &'static str,
    description: &'static str,
    default_config: fn() -> String,
    create: Create,
}

/// A plugin's declaration; build one with [`Plugin::new`] and the role methods, and export it
/// with [`crate::export_plugin!`].
pub struct Plugin {
    name: &'static str,
    version: &'static str,
    description: &'static str,
    entries: Vec<Entry>,
}

fn default_config<T: Component>() -> String {
    toml::to_string(&T::Config::default()).unwrap_or_default()
}

/// Parses a component's configuration; errors name the offending key.
pub fn parse_config<C: DeserializeOwned>(text: &str) -> Result<C> {
    toml::from_str(text).map_err(|e| {
        let key = e.span().and_then(|span| key_at(text, span.start));
        let message = e.message().trim().to_string();
        match key {
            Some(key) => Error::config(key, message),
            None => Error::msg(message).context("invalid configuration"),
        }
    })
}

/// The key of the `key = value` line containing byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split('=').next()?.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
}

macro_rules! role_method {
    ($method:ident, $trait:ident, $role:ident, $ffi:ident) => {
        #[doc = concat!("Adds a ", stringify!($role), " component.")]
        pub fn $method<T: Component + $trait>(mut self) -> Self {
            fn create<T: Component + $trait>(config: &str, host: Host) -> Result<FfiComponent> {
                let component = T::new(parse_config(config)?, host)?;
                Ok(FfiComponent::$role($ffi::from_value(
                    Guarded(component),
                    TD_Opaque,
                )))
            }
            self.entries.push(Entry {
                role: Role::$role,
                name: T::NAME,
                description: T::DESCRIPTION,
                default_config: default_config::<T>,
                create: create::<T>,
            });
            self
        }
    };
}

impl Plugin {
    /// A plugin offering no components yet; add them with the role methods. Use
    /// `env!("CARGO_PKG_NAME")` and `env!("CARGO_PKG_VERSION")` for name and version. The
    /// manifest entry's `name` must equal this name, and the host's messages use it.
    pub fn new(name: &'static str, version: &'static str, description: &'static str) -> Self {
        Plugin {
            name,
            version,
            description,
            entries: Vec::new(),
        }
    }

    role_method!(optimizer, Optimizer, Optimizer, FfiOptimizer_TO);
    role_method!(scheduler, Scheduler, Scheduler, FfiScheduler_TO);
    role_method!(pruner, Pruner, Pruner, FfiPruner_TO);
    role_method!(distiller, Distiller, Distiller, FfiDistiller_TO);
    role_method!(metric, Metric, Metric, FfiMetric_TO);
    role_method!(callback, Callback, Callback, FfiCallback_TO);

    /// Adds a model component: an architecture for `[model] use = "name"`.
    pub fn model<T: Component + Architecture>(mut self) -> Self {
        fn create<T: Component + Architecture>(config: &str, host: Host) -> Result<FfiComponent> {
            let model = T::new(parse_config(config)?, host)?;
            Ok(FfiComponent::Model(FfiModel_TO::from_value(
                ModelAdapter(model),
                TD_Opaque,
            )))
        }
        self.entries.push(Entry {
            role: Role::Model,
            name: T::NAME,
            description: T::DESCRIPTION,
            default_config: default_config::<T>,
            create: create::<T>,
        });
        self
    }

    /// The plugin's name, as given to [`Plugin::new`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What the plugin tells the host about itself and its components (for the generated root
    /// module).
    #[doc(hidden)]
    pub fn declaration(&self) -> Declaration {
        Declaration {
            name: self.name.into(),
            version: self.version.into(),
            description: self.description.into(),
            components: self
                .entries
                .iter()
                .map(|e| ComponentDecl {
                    role: e.role,
                    name: e.name.into(),
                    description: e.description.into(),
                    default_config: (e.default_config)().into(),
                })
                .collect(),
            sdk_abi: ABI_VERSION,
            sdk_version: SDK_VERSION.into(),
            tch_version: TCH_VERSION.into(),
            libtorch_version: LIBTORCH_VERSION.into(),
            cuda: LIBTORCH_CUDA,
        }
    }

    /// Creates a component; the constructor and config parsing run guarded against panics (for
    /// the generated root module).
    #[doc(hidden)]
    pub fn create(
        &self,
        role: Role,
        name: &str,
        config: &str,
        host: FfiHostBox,
    ) -> FfiResult<FfiComponent> {
        let result = guard(|| {
            let entry = self
                .entries
                .iter()
                .find(|e| e.role == role && e.name == name)
                .ok_or_else(|| {
                    Error::msg(format!("plugin {} has no {role} named {name}", self.name))
                })?;
            (entry.create)(config, Host::from_ffi(host))
        });
        match result {
            Ok(c) => RResult::ROk(c),
            Err(e) => RResult::RErr(e.into()),
        }
    }
}

/// Called by the host right after loading: logging bridge and panic hook (for the generated root
/// module).
#[doc(hidden)]
pub fn init(plugin: &'static str, log: LogFn, max_level: u8) {
    install_panic_hook();
    crate::logging::install(plugin, log, max_level);
}

/// An ABI string from a `&str` (for generated code).
#[doc(hidden)]
pub fn rstring(s: &str) -> RString {
    s.into()
}

/// Exports a plugin from a `cdylib` crate. The argument is an expression building the
/// [`Plugin`]; it is evaluated once, when the host first asks.
///
/// Use it once, at the crate root. The generated root module names `::abi_stable` paths, so the
/// plugin crate lists `abi_stable` (0.11) among its dependencies next to `trellis-sdk`. The items
/// it generates (a `TRELLIS_SDK_ABI_VERSION` symbol and `__trellis_*` functions) are hidden from
/// the plugin's documentation.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:expr) => {
        /// Read by the host with a plain symbol lookup before anything else.
        #[doc(hidden)]
        #[no_mangle]
        pub static TRELLIS_SDK_ABI_VERSION: u32 = $crate::abi::ABI_VERSION;

        fn __trellis_plugin() -> &'static $crate::Plugin {
            static PLUGIN: ::std::sync::OnceLock<$crate::Plugin> = ::std::sync::OnceLock::new();
            PLUGIN.get_or_init(|| $plugin)
        }

        extern "C" fn __trellis_declaration() -> $crate::abi::Declaration {
            __trellis_plugin().declaration()
        }

        extern "C" fn __trellis_init(log: $crate::abi::LogFn, max_level: u8) {
            $crate::plugin::init(__trellis_plugin().name(), log, max_level)
        }

        extern "C" fn __trellis_create(
            role: $crate::Role,
            name: ::abi_stable::std_types::RStr<'_>,
            config: ::abi_stable::std_types::RStr<'_>,
            host: $crate::abi::FfiHostBox,
        ) -> $crate::abi::FfiResult<$crate::abi::FfiComponent> {
            __trellis_plugin().create(role, name.as_str(), config.as_str(), host)
        }

        #[doc(hidden)]
        #[::abi_stable::export_root_module]
        pub fn __trellis_root_module() -> $crate::abi::PluginModRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::abi::PluginMod {
                declaration: __trellis_declaration,
                init: __trellis_init,
                create: __trellis_create,
            }
            .leak_into_prefix()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Config {
        lr: f64,
        momentum: f64,
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = parse_config::<Config>("lr = 0.1\nmomentm = 0.9\n").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert_eq!(err.key.as_deref(), Some("momentm"));
        assert!(err.message.contains("unknown field"), "{}", err.message);

        let err = parse_config::<Config>("lr = \"fast\"\nmomentum = 0.9\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("lr"));
    }
}
