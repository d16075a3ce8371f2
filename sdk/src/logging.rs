//! Forwards a plugin's `tracing` events to the host.
//!
//! A dylib has its own copy of tracing's global dispatcher, so events a plugin emits would go
//! nowhere. Each plugin installs this subscriber when loaded; it formats events and hands them
//! to the host, which re-emits them with the plugin's name as target.

use std::fmt::Write as _;

use abi_stable::std_types::RStr;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::abi::LogFn;

pub(crate) fn level_number(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    }
}

struct Bridge {
    plugin: &'static str,
    log: LogFn,
    max_level: u8,
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl Subscriber for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        level_number(metadata.level()) <= self.max_level
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut message = Message::default();
        event.record(&mut message);
        (self.log.func)(
            level_number(event.metadata().level()),
            RStr::from_str(self.plugin),
            RStr::from_str(&message.0),
        );
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Installs the bridge as this dylib's global subscriber (once; later calls are ignored).
pub(crate) fn install(plugin: &'static str, log: LogFn, max_level: u8) {
    let _ = tracing::subscriber::set_global_default(Bridge {
        plugin,
        log,
        max_level,
    });
}
