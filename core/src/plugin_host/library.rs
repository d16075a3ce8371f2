//! Opening one plugin file and checking, before anything in it runs, that it is a Trellis plugin
//! built against this host's ABI, tch and libtorch.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use trellis_sdk::abi::{Declaration, PluginModRef, ABI_VERSION, ABI_VERSION_SYMBOL};
use trellis_sdk::plugin::{LIBTORCH_CUDA, LIBTORCH_VERSION, SDK_VERSION, TCH_VERSION};
use trellis_sdk::Role;

use super::logging;

/// One component as a plugin declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentInfo {
    pub role: Role,
    pub name: String,
    pub description: String,
    pub default_config: String,
}

/// What a plugin declares about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub components: Vec<ComponentInfo>,
    pub sdk_abi: u32,
    pub sdk_version: String,
    pub tch_version: String,
    pub libtorch_version: String,
    pub cuda: bool,
}

impl From<Declaration> for PluginInfo {
    fn from(d: Declaration) -> Self {
        PluginInfo {
            name: d.name.into_string(),
            version: d.version.into_string(),
            description: d.description.into_string(),
            components: d
                .components
                .into_iter()
                .map(|c| ComponentInfo {
                    role: c.role,
                    name: c.name.into_string(),
                    description: c.description.into_string(),
                    default_config: c.default_config.into_string(),
                })
                .collect(),
            sdk_abi: d.sdk_abi,
            sdk_version: d.sdk_version.into_string(),
            tch_version: d.tch_version.into_string(),
            libtorch_version: d.libtorch_version.into_string(),
            cuda: d.cuda,
        }
    }
}

/// A loaded, checked plugin library.
pub struct Library {
    pub path: PathBuf,
    pub sha256: String,
    pub info: PluginInfo,
    pub(crate) module: PluginModRef,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

pub fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Opens `path` and checks it. Libraries are never unloaded: vtables and statics of a plugin
/// may be referenced for as long as the process lives.
pub fn open(path: &Path) -> Result<Library> {
    if !path.is_file() {
        bail!(
            "plugin file {} does not exist\n  help: build the plugins with `cargo build --release --workspace`, \
             or fix the path (paths in a manifest are relative to the manifest)",
            path.display()
        );
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let sha256 = sha256_of(&path)?;
    check_abi_version(&path)?;

    let header = lib_header_from_path(&path).map_err(|e| describe_library_error(&path, e))?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| describe_library_error(&path, e))?;
    let info = PluginInfo::from((module.declaration())());
    check_build(&path, &info)?;
    (module.init())(logging::log_fn(), logging::max_level());
    Ok(Library {
        path,
        sha256,
        info,
        module,
    })
}

/// Reads the plain `TRELLIS_SDK_ABI_VERSION` symbol first, so that a plugin built against
/// another ABI is reported as such instead of as an opaque layout mismatch.
fn check_abi_version(path: &Path) -> Result<()> {
    // SAFETY: loading runs the library's initialisers. Plugins are trusted code the user listed
    // in a manifest; for foreign files, dlopen's own checks (ELF, architecture) come first.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| anyhow::anyhow!(describe_open_error(path, &e.to_string())))?;
    // SAFETY: the symbol is declared by `trellis_sdk::export_plugin!` as `static u32`; it is
    // read by value while `library` is alive.
    let version = unsafe {
        library
            .get::<*const u32>(ABI_VERSION_SYMBOL)
            .map(|symbol| **symbol)
    };
    // Kept loaded on purpose (see `open`); abi_stable opens the same handle next.
    std::mem::forget(library);
    match version {
        Err(_) => bail!(
            "{} is not a Trellis plugin: it does not export TRELLIS_SDK_ABI_VERSION\n  \
             help: plugins are cdylib crates that end with `trellis_sdk::export_plugin!(...)`",
            path.display()
        ),
        Ok(v) if v != ABI_VERSION => bail!(
            "{} was built against Trellis SDK ABI version {v}, but this trellis uses ABI version {ABI_VERSION}\n  \
             help: rebuild the plugin against trellis-sdk {SDK_VERSION}",
            path.display()
        ),
        Ok(_) => Ok(()),
    }
}

fn describe_open_error(path: &Path, error: &str) -> String {
    let hint = if error.contains("undefined symbol") {
        "the plugin needs symbols this process does not have: it was most likely built against \
         another libtorch or tch; rebuild it with this workspace's set-up (torch 2.11.0, tch 0.24.0)"
    } else if error.contains("invalid ELF header") || error.contains("file too short") {
        "the file is not a shared library; point the manifest at the plugin's .so"
    } else {
        "check that the file is a plugin built for this machine"
    };
    format!(
        "cannot load plugin {}: {error}\n  help: {hint}",
        path.display()
    )
}

fn describe_library_error(path: &Path, error: LibraryError) -> anyhow::Error {
    match error {
        LibraryError::OpenError { err, .. } => {
            anyhow::anyhow!(describe_open_error(path, &err.to_string()))
        }
        LibraryError::GetSymbolError { .. } => anyhow::anyhow!(
            "{} is not a Trellis plugin: it has no abi_stable root module\n  \
             help: plugins end with `trellis_sdk::export_plugin!(...)`",
            path.display()
        ),
        LibraryError::AbiInstability(details) => anyhow::anyhow!(
            "{} has an incompatible plugin interface (a different trellis-sdk, or not a Trellis plugin)\n  \
             help: rebuild it against trellis-sdk {SDK_VERSION}\n  details: {details}",
            path.display()
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => anyhow::anyhow!(
            "{} was built against trellis-sdk {actual_version}, incompatible with this trellis (sdk {expected_version})\n  \
             help: rebuild it against trellis-sdk {SDK_VERSION}",
            path.display()
        ),
        other => anyhow::anyhow!("cannot load plugin {}: {other}", path.display()),
    }
}

/// Two libtorch builds in one process crash in ways nobody can debug: refuse early.
fn check_build(path: &Path, info: &PluginInfo) -> Result<()> {
    let mut problems = Vec::new();
    if info.tch_version != TCH_VERSION {
        problems.push(format!(
            "tch {} (this trellis: {TCH_VERSION})",
            info.tch_version
        ));
    }
    if info.libtorch_version != LIBTORCH_VERSION {
        problems.push(format!(
            "libtorch {} (this trellis: {LIBTORCH_VERSION})",
            info.libtorch_version
        ));
    }
    if info.cuda != LIBTORCH_CUDA {
        let kind = |cuda: bool| if cuda { "with CUDA" } else { "CPU-only" };
        problems.push(format!(
            "a libtorch {} (this trellis: {})",
            kind(info.cuda),
            kind(LIBTORCH_CUDA)
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "plugin {} ({}) was built against {}\n  help: rebuild it with this workspace's set-up \
         (scripts/setup.sh: torch 2.11.0 from PyPI, tch =0.24.0)",
        info.name,
        path.display(),
        problems.join(", ")
    )
}
