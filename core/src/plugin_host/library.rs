//! Opening one plugin file and checking, before anything in it runs, that it is a Trellis plugin
//! built against this host's ABI, tch and libtorch.
//!
//! The file is read once; its sha256 and ELF structure are checked on those bytes (the pin by
//! the caller, between [`PluginFile::read`] and [`PluginFile::load`]), and the dynamic loader is
//! given exactly those bytes, from a sealed in-memory file.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use abi_stable::library::{lib_header_from_path, LibraryError};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use trellis_sdk::abi::{Declaration, PluginModRef, ABI_VERSION, ABI_VERSION_SYMBOL};
use trellis_sdk::plugin::{LIBTORCH_CUDA, LIBTORCH_VERSION, SDK_VERSION, TCH_VERSION};
use trellis_sdk::Role;

use super::logging;
use super::verify::{self, Refusal};

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
    Ok(sha256_hex(&bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The largest plugin file trellis reads: plugins are tens of MB (hundreds with full debug
/// info); a file over this is not one, and reading it whole would only exhaust memory.
const MAX_PLUGIN_BYTES: u64 = 2 << 30;

/// A plugin file's bytes, read once. Everything checked about the plugin — its sha256, its ELF
/// structure — is checked on these bytes, and [`PluginFile::load`] loads exactly these bytes
/// (from a sealed in-memory copy), never the file again (SECURITY.md).
pub struct PluginFile {
    path: PathBuf,
    sha256: String,
    bytes: Vec<u8>,
}

impl PluginFile {
    /// Reads `path` whole, refusing what cannot be a plugin file (missing, a directory, a pipe,
    /// over 2 GiB).
    pub fn read(path: &Path) -> Result<PluginFile> {
        let not_a_file = |what: &str| {
            anyhow::anyhow!(
                "plugin file {} is {what}, not a shared library\n  \
                 help: point the manifest at the plugin's .so (target/release/lib<name>.so)",
                path.display()
            )
        };
        let metadata = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "plugin file {} does not exist\n  help: build the plugins with `cargo build --release --workspace`, \
                 or fix the path (paths in a manifest are relative to the manifest)",
                path.display()
            ),
            Err(e) => bail!("cannot read plugin file {}: {e}", path.display()),
        };
        if metadata.is_dir() {
            return Err(not_a_file("a directory"));
        }
        let canonical = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        // Only regular files are opened: opening a FIFO would block.
        if !metadata.is_file() {
            return Err(not_a_file("not a regular file (a device, pipe or socket)"));
        }
        let file = std::fs::File::open(&canonical)
            .with_context(|| format!("cannot read plugin file {}", path.display()))?;
        // The size of what was opened, not of what the path named a moment ago.
        let size = file
            .metadata()
            .with_context(|| format!("cannot read plugin file {}", path.display()))?
            .len();
        let too_large = |size: u64| {
            anyhow::anyhow!(
                "plugin file {} has {size} bytes, more than the {MAX_PLUGIN_BYTES} (2 GiB) a plugin may have: \
                 it is not a plugin's .so\n  help: point the manifest at the plugin's .so (target/release/lib<name>.so)",
                path.display()
            )
        };
        if size > MAX_PLUGIN_BYTES {
            return Err(too_large(size));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.take(MAX_PLUGIN_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read plugin file {}", path.display()))?;
        if bytes.len() as u64 > MAX_PLUGIN_BYTES {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(PluginFile {
            path: canonical,
            sha256: sha256_hex(&bytes),
            bytes,
        })
    }

    /// The file, canonicalized.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sha256 of the bytes read, in lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Checks the bytes (a complete ELF shared object for this machine that exports
    /// `TRELLIS_SDK_ABI_VERSION`) and only then loads them, from an in-memory copy. Libraries
    /// are never unloaded: vtables and statics of a plugin may be referenced for as long as the
    /// process lives.
    pub fn load(self) -> Result<Library> {
        let path = self.path.as_path();
        verify::check(&self.bytes).map_err(|r| anyhow::anyhow!(describe_refusal(path, &r)))?;
        let loaded = in_memory(path, &self.sha256, &self.bytes)?;
        // The in-memory copy holds them now.
        drop(self.bytes);
        check_abi_version(path, &loaded)?;

        let header =
            lib_header_from_path(&loaded).map_err(|e| describe_library_error(path, &loaded, e))?;
        let module = header
            .init_root_module::<PluginModRef>()
            .map_err(|e| describe_library_error(path, &loaded, e))?;
        let info = PluginInfo::from((module.declaration())());
        check_build(path, &info)?;
        (module.init())(logging::log_fn(), logging::max_level());
        Ok(Library {
            path: self.path,
            sha256: self.sha256,
            info,
            module,
        })
    }
}

/// Reads, checks and loads `path` (see [`PluginFile`]).
pub fn open(path: &Path) -> Result<Library> {
    PluginFile::read(path)?.load()
}

fn describe_refusal(path: &Path, refusal: &Refusal) -> String {
    match refusal {
        Refusal::NotLoadable(what) => format!(
            "cannot load plugin {}: {what}\n  help: point the manifest at the plugin's .so, built for this machine",
            path.display()
        ),
        Refusal::Truncated(what) => format!(
            "cannot load plugin {}: the file is truncated: {what}\n  \
             help: it was cut short (an interrupted copy or build?): rebuild the plugin with \
             `cargo build --release -p <its crate>`, or copy it again",
            path.display()
        ),
        Refusal::NotAPlugin => format!(
            "{} is not a Trellis plugin: its dynamic symbol table has no TRELLIS_SDK_ABI_VERSION \
             (refused before loading it)\n  \
             help: plugins are cdylib crates that end with `trellis_sdk::export_plugin!(...)`",
            path.display()
        ),
    }
}

/// The path the dynamic loader opens for `path`'s checked `bytes`: `/proc/self/fd/N` of an anonymous in-memory
/// file holding exactly the checked bytes, sealed so that nothing can change, grow or shrink it.
/// The file on disk may change after it was read (a rebuild, a copy over it, truncation): what
/// runs is still what was checked, and pages past a truncated end cannot SIGBUS.
///
/// One copy per distinct content: loading the same bytes again gives the same path, so the
/// dynamic loader returns the library it already loaded (as it does for one path twice). The
/// descriptors stay open for the life of the process (libraries are never unloaded, and
/// debuggers and backtraces read the library through that path).
fn in_memory(path: &Path, sha256: &str, bytes: &[u8]) -> Result<PathBuf> {
    static COPIES: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loaded) = copies.get(sha256) {
        return Ok(loaded.clone());
    }
    let cannot = |why: String| {
        anyhow::anyhow!(
            "cannot load plugin {}: {why}\n  help: trellis loads each plugin from a sealed in-memory \
             copy of the bytes it checked (memfd_create, Linux 3.17 or later, with /proc mounted)",
            path.display()
        )
    };
    if !Path::new("/proc/self/fd").is_dir() {
        return Err(cannot(
            "/proc/self/fd does not exist (is /proc mounted?)".to_string(),
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(200).collect::<String>())
        .unwrap_or_default();
    let fd = sealed_copy(&format!("trellis-plugin:{name}"), bytes).map_err(|e| {
        cannot(format!(
            "cannot make an in-memory copy to load it from: {e}"
        ))
    })?;
    // Deliberately never closed (see above).
    let loaded = PathBuf::from(format!("/proc/self/fd/{}", fd.into_raw_fd()));
    copies.insert(sha256.to_string(), loaded.clone());
    Ok(loaded)
}

/// An anonymous in-memory file holding `bytes`, sealed against every change.
#[cfg(target_os = "linux")]
fn sealed_copy(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC keeps the copy executable where vm.memfd_noexec makes memfds non-executable
    // by default; kernels before 6.3 do not know the flag.
    let fd = match memfd_create(name, flags | MemfdFlags::EXEC) {
        Err(rustix::io::Errno::INVAL) => memfd_create(name, flags),
        other => other,
    }?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    // F_SEAL_WRITE first waits for the kernel to drop every transient reference to the pages
    // just written (per-CPU page batches among them) and fails with EBUSY after ~150 ms, which a
    // loaded CI machine reached with a debug build's 100 MB plugin. F_SEAL_FUTURE_WRITE (Linux
    // 5.1) forbids the same writes without that wait; nothing else has this file open or mapped
    // yet, so it guarantees as much here. Older kernels refuse the flag: F_SEAL_WRITE, retried.
    let rest = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
    match fcntl_add_seals(&file, SealFlags::FUTURE_WRITE | rest) {
        Err(rustix::io::Errno::INVAL) => {}
        sealed => return sealed.map(|()| file.into()).map_err(Into::into),
    }
    let mut attempts = 1;
    loop {
        match fcntl_add_seals(&file, SealFlags::WRITE | rest) {
            Err(rustix::io::Errno::BUSY) if attempts < 20 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            sealed => return sealed.map(|()| file.into()).map_err(Into::into),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn sealed_copy(_name: &str, _bytes: &[u8]) -> std::io::Result<OwnedFd> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "loading plugins from memory needs Linux (memfd_create)",
    ))
}

/// Reads the plain `TRELLIS_SDK_ABI_VERSION` symbol first, so that a plugin built against
/// another ABI is reported as such instead of as an opaque layout mismatch. `loaded` is the
/// in-memory copy of `path`'s checked bytes.
fn check_abi_version(path: &Path, loaded: &Path) -> Result<()> {
    // SAFETY: loading runs the library's initialisers. The bytes are the ones read and checked
    // (`verify::check`: a complete ELF shared object for this machine that exports the ABI
    // symbol; the manifest's sha256 pin, if any), in a sealed copy nothing can change.
    // Plugins are code the user chose to run (SECURITY.md).
    let library = unsafe { libloading::Library::new(loaded) }
        .map_err(|e| anyhow::anyhow!(describe_open_error(path, loaded, &e.to_string())))?;
    // SAFETY: the symbol is declared by `trellis_sdk::export_plugin!` as `static u32`; it is
    // read by value while `library` is alive.
    let version = unsafe {
        library
            .get::<*const u32>(ABI_VERSION_SYMBOL)
            .map(|symbol| **symbol)
    };
    // Kept loaded on purpose (see `PluginFile::load`); abi_stable opens the same handle next.
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

/// The dynamic loader's error, naming the plugin's file rather than its in-memory copy.
fn describe_open_error(path: &Path, loaded: &Path, error: &str) -> String {
    let error = error.replace(&*loaded.to_string_lossy(), &path.to_string_lossy());
    let hint = if error.contains("undefined symbol") {
        "the plugin needs symbols this process does not have: it was most likely built against \
         another libtorch or tch; rebuild it with this workspace's set-up (torch 2.11.0, tch 0.24.0)"
    } else if error.contains("invalid ELF header") || error.contains("file too short") {
        "the file is not a shared library; point the manifest at the plugin's .so"
    } else if error.contains("cannot open shared object file") {
        "the plugin needs a library this process has not loaded and cannot find. Plugins are \
         loaded from an in-memory copy, so `$ORIGIN` in their rpath does not name their \
         directory: give the library's directory as an absolute rpath, or in LD_LIBRARY_PATH"
    } else {
        "check that the file is a plugin built for this machine"
    };
    format!(
        "cannot load plugin {}: {error}\n  help: {hint}",
        path.display()
    )
}

fn describe_library_error(path: &Path, loaded: &Path, error: LibraryError) -> anyhow::Error {
    match error {
        LibraryError::OpenError { err, .. } => {
            anyhow::anyhow!(describe_open_error(path, loaded, &err.to_string()))
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
        other => anyhow::anyhow!(
            "cannot load plugin {}: {}",
            path.display(),
            other
                .to_string()
                .replace(&*loaded.to_string_lossy(), &path.to_string_lossy())
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_memory_copy_holds_the_bytes_and_cannot_change() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let fd = sealed_copy("trellis-test", &bytes).unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let mut file = std::fs::File::from(fd);
        assert!(file.write_all(b"other").is_err(), "written");
        assert!(file.set_len(10).is_err(), "shrunk");
        assert!(file.set_len(200_000).is_err(), "grown");
        if let Ok(mut again) = std::fs::OpenOptions::new().write(true).open(&path) {
            assert!(again.write_all(b"other").is_err(), "written through /proc");
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn reading_refuses_what_cannot_be_a_plugin_file() {
        let dir = tempfile::tempdir().unwrap();
        let message = |path: &Path| format!("{:#}", PluginFile::read(path).err().unwrap());
        let missing = message(&dir.path().join("libnothing.so"));
        assert!(missing.contains("does not exist"), "{missing}");
        let directory = message(dir.path());
        assert!(
            directory.contains("is a directory, not a shared library"),
            "{directory}"
        );

        let file = dir.path().join("libx.so");
        std::fs::write(&file, b"\x7fELF\x02\x01\x01 and then nothing").unwrap();
        let read = PluginFile::read(&file).unwrap();
        assert_eq!(read.sha256(), sha256_of(&file).unwrap());
        assert_eq!(read.path(), file.canonicalize().unwrap());
        let refused = format!("{:#}", read.load().err().unwrap());
        assert!(
            refused.contains("cannot load plugin") && refused.contains("the file is truncated"),
            "{refused}"
        );
    }
}
