//! The error type components return.
//!
//! An `Err` from any component method stops the run; the host prints the message prefixed with
//! the role, component and plugin, and for [`ErrorKind::Config`] points at the offending key's
//! line in the run config.

use std::fmt;

use abi_stable::std_types::{ROption, RString};

use crate::abi::{ErrorKind, FfiError};

/// What went wrong in a component. Build one with [`Error::msg`], [`Error::config`] or
/// [`bail!`](crate::bail!); `?` converts tch errors and strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What kind of failure this is; decides how the host reports it.
    pub kind: ErrorKind,
    /// The human-readable message, without the component's name (the host adds it).
    pub message: String,
    /// For configuration errors: the offending key, so the host can point at its line.
    pub key: Option<String>,
}

/// The result of every component method.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A plain failure ([`ErrorKind::Failed`]) with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Failed,
            message: message.to_string(),
            key: None,
        }
    }

    /// A refused configuration value; `key` is the key as written in the component's table.
    pub fn config(key: impl Into<String>, message: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Config,
            message: message.to_string(),
            key: Some(key.into()),
        }
    }

    /// A caught panic ([`ErrorKind::Panic`]); the SDK makes these itself when plugin code
    /// panics, so components rarely need to.
    pub fn panic(message: impl fmt::Display) -> Self {
        Error {
            kind: ErrorKind::Panic,
            message: message.to_string(),
            key: None,
        }
    }

    /// Prefixes the message, keeping kind and key.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    /// The message without libtorch's C++ backtrace.
    fn from(e: tch::TchError) -> Self {
        Error::msg(crate::adapt::without_backtrace(&e.to_string()))
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::msg(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::msg(message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError {
            kind: e.kind,
            message: RString::from(e.message),
            key: e.key.map(RString::from).into(),
        }
    }
}

impl From<FfiError> for Error {
    fn from(e: FfiError) -> Self {
        Error {
            kind: e.kind,
            // A plugin built with an older SDK may still quote libtorch's C++ backtrace.
            message: crate::adapt::without_backtrace(e.message.as_str()),
            key: match e.key {
                ROption::RSome(k) => Some(k.into_string()),
                ROption::RNone => None,
            },
        }
    }
}

/// Bails out of a component method with a formatted [`Error`]: `bail!("bad shape {:?}", s)` is
/// `return Err(Error::msg(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::msg(format!($($arg)*)))
    };
}
