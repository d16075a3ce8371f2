//! Re-emits plugins' `tracing` events in the host, with the plugin's name as target.
//!
//! tracing's macros need a static target, so each (plugin, level) pair gets a callsite built at
//! run time and leaked: there are only a handful of plugins per process.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use abi_stable::std_types::RStr;
use tracing::callsite::{Callsite, Identifier};
use tracing::field::FieldSet;
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};
use trellis_sdk::abi::LogFn;

struct PluginCallsite {
    metadata: OnceLock<Metadata<'static>>,
}

impl Callsite for PluginCallsite {
    fn set_interest(&self, _: Interest) {}
    fn metadata(&self) -> &Metadata<'_> {
        self.metadata
            .get()
            .expect("initialised before registration")
    }
}

fn level_of(number: u8) -> Level {
    match number {
        0 => Level::ERROR,
        1 => Level::WARN,
        2 => Level::INFO,
        3 => Level::DEBUG,
        _ => Level::TRACE,
    }
}

fn callsite(target: &str, level: u8) -> &'static PluginCallsite {
    static CALLSITES: OnceLock<Mutex<HashMap<(String, u8), &'static PluginCallsite>>> =
        OnceLock::new();
    let mut map = CALLSITES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry((target.to_string(), level)).or_insert_with(|| {
        let callsite: &'static PluginCallsite = Box::leak(Box::new(PluginCallsite {
            metadata: OnceLock::new(),
        }));
        let target: &'static str = Box::leak(target.to_string().into_boxed_str());
        let _ = callsite.metadata.set(Metadata::new(
            "plugin event",
            target,
            level_of(level),
            None,
            None,
            None,
            FieldSet::new(&["message"], Identifier(callsite)),
            Kind::EVENT,
        ));
        tracing::callsite::register(callsite);
        callsite
    })
}

extern "C" fn host_log(level: u8, target: RStr<'_>, message: RStr<'_>) {
    let metadata = callsite(target.as_str(), level).metadata();
    if !tracing::dispatcher::get_default(|d| d.enabled(metadata)) {
        return;
    }
    let fields = metadata.fields();
    let Some(field) = fields.field("message") else {
        return;
    };
    let message = message.as_str();
    let value = tracing::field::display(message);
    let values = [(&field, Some(&value as &dyn tracing::Value))];
    Event::dispatch(metadata, &fields.value_set(&values));
}

pub fn log_fn() -> LogFn {
    LogFn { func: host_log }
}

/// The most verbose level the host's subscriber wants, so plugins skip formatting the rest.
pub fn max_level() -> u8 {
    match tracing::level_filters::LevelFilter::current().into_level() {
        None => 0,
        Some(Level::ERROR) => 0,
        Some(Level::WARN) => 1,
        Some(Level::INFO) => 2,
        Some(Level::DEBUG) => 3,
        Some(Level::TRACE) => 4,
    }
}
