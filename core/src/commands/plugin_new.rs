//! `trellis plugin new NAME --role ROLE [--dir D]`: a new out-of-tree plugin crate in `D/NAME`
//! that builds, passes its test and trains as generated.
//!
//! The crate builds against the SDK of the checkout this binary was built from (its path is
//! compiled in) and the libtorch that checkout links (`.libtorch`, from `scripts/setup.sh`). The
//! templates are the files in `plugin_new/`: one `src/lib.rs` per role, and the crate's
//! `Cargo.toml`, `.cargo/config.toml`, `run.toml` and README; `plugins.toml` and the role's
//! tables of `run.toml` are written here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use trellis_sdk::Role;

/// What `trellis plugin new` was asked for.
#[derive(Debug, Clone)]
pub struct NewOptions {
    /// The crate's name, e.g. `my-lr-warmup`.
    pub name: String,
    /// The role, as `Role::as_str` spells it.
    pub role: String,
    /// The directory the crate's directory is created in.
    pub dir: PathBuf,
}

/// The Trellis checkout a crate is generated against.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub root: PathBuf,
}

impl Checkout {
    /// The checkout this binary was built from.
    pub fn of_this_build() -> Checkout {
        let core = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = core.parent().unwrap_or(core);
        Checkout {
            root: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
        }
    }

    pub fn sdk(&self) -> PathBuf {
        self.root.join("sdk")
    }

    /// The link to libtorch that `scripts/setup.sh` makes, unresolved: it stays valid when
    /// setup.sh points it elsewhere.
    pub fn libtorch(&self) -> PathBuf {
        self.root.join(".libtorch")
    }

    /// A workspace plugin's release build, e.g. `plugin("trellis-optim")`.
    pub fn plugin(&self, package: &str) -> PathBuf {
        self.root
            .join("target/release")
            .join(format!("lib{}.so", package.replace('-', "_")))
    }
}

const CARGO_TOML: &str = include_str!("plugin_new/Cargo.toml.tmpl");
const CARGO_CONFIG: &str = include_str!("plugin_new/config.toml.tmpl");
const README: &str = include_str!("plugin_new/README.md.tmpl");
const RUN_TOML: &str = include_str!("plugin_new/run.toml.tmpl");

/// `src/lib.rs` for a role.
fn lib_template(role: Role) -> &'static str {
    match role {
        Role::Optimizer => include_str!("plugin_new/optimizer.rs.tmpl"),
        Role::Scheduler => include_str!("plugin_new/scheduler.rs.tmpl"),
        Role::Pruner => include_str!("plugin_new/pruner.rs.tmpl"),
        Role::Distiller => include_str!("plugin_new/distiller.rs.tmpl"),
        Role::Metric => include_str!("plugin_new/metric.rs.tmpl"),
        Role::Model => include_str!("plugin_new/model.rs.tmpl"),
        Role::Callback => include_str!("plugin_new/callback.rs.tmpl"),
    }
}

/// The role's one-line help for the listing of what is valid.
fn roles_help() -> String {
    let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
    format!("  help: the roles are {}", names.join(", "))
}

pub fn parse_role(role: &str) -> Result<Role> {
    match Role::ALL.into_iter().find(|r| r.as_str() == role) {
        Some(r) => Ok(r),
        None => bail!("unknown role `{role}`\n{}", roles_help()),
    }
}

/// Names the generated crate cannot take: Rust keywords and the crates it depends on or would
/// shadow.
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
    "abi_stable",
    "serde",
    "tch",
    "torch_sys",
    "tracing",
    "trellis",
    "trellis_sdk",
];

const NAME_HELP: &str =
    "  help: a plugin's name is a crate name: lowercase ASCII letters, digits, `-` and `_`, \
     starting with a letter, at most 64 characters, not a Rust keyword, e.g. `my-lr-warmup`";

/// Checks that `name` can be the crate's name (and, with `-` as `_`, its component's).
pub fn check_name(name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > 64 {
        Some("is longer than 64 characters".to_string())
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("does not start with a lowercase letter".to_string())
    } else if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'))
    {
        Some(format!("contains `{c}`"))
    } else if RESERVED.contains(&name.replace('-', "_").as_str()) {
        Some("is reserved (a Rust keyword or a crate the plugin depends on)".to_string())
    } else {
        None
    };
    match problem {
        Some(problem) => bail!("`{name}` is not a valid plugin name: it {problem}\n{NAME_HELP}"),
        None => Ok(()),
    }
}

/// Names the templates import; a component type of one of these names would clash.
const TEMPLATE_NAMES: &[&str] = &[
    "Architecture",
    "Batch",
    "Boundary",
    "Callback",
    "Cell",
    "Component",
    "Config",
    "Device",
    "Deserialize",
    "Distiller",
    "EpochInfo",
    "Error",
    "Events",
    "GroupSpec",
    "HashMap",
    "Host",
    "Kind",
    "LayerKind",
    "Metric",
    "MetricValues",
    "Optimizer",
    "Outputs",
    "Param",
    "ParamGroup",
    "Plugin",
    "PruneRequest",
    "PruneResult",
    "Pruner",
    "Result",
    "SchedulePoint",
    "Scheduler",
    "Scope",
    "Serialize",
    "State",
    "StepInfo",
    "Tensor",
    "TinyNet",
    "FakeHost",
];

/// The component's Rust type: `my-lr-warmup` → `MyLrWarmup`.
fn type_name(name: &str) -> String {
    let camel: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect();
    if TEMPLATE_NAMES.contains(&camel.as_str()) {
        camel + "Component"
    } else {
        camel
    }
}

/// A TOML basic string holding `text`, quoted and escaped.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("the path {} is not UTF-8", path.display()))
}

/// The workspace plugins the role's run needs besides the new one, in manifest order.
fn workspace_plugins(role: Role) -> &'static [&'static str] {
    match role {
        Role::Optimizer => &["trellis-metrics"],
        Role::Metric => &["trellis-optim"],
        _ => &["trellis-optim", "trellis-metrics"],
    }
}

fn plugins_toml(name: &str, lib: &str, role: Role, checkout: &Checkout) -> Result<String> {
    let mut text = format!(
        "# The plugins run.toml uses. Relative paths are relative to this file.\n\n\
         # This crate, as `cargo build --release` builds it.\n\
         [[plugin]]\nname = \"{name}\"\npath = \"target/release/lib{lib}.so\"\n"
    );
    text.push_str(
        "\n# Trellis' own, from the checkout this crate was generated from (build them there with\n\
         # `cargo build --release --workspace`).",
    );
    for package in workspace_plugins(role) {
        let path = checkout.plugin(package);
        text.push_str(&format!(
            "\n[[plugin]]\nname = \"{package}\"\npath = {}\n",
            toml_string(utf8(&path)?)
        ));
    }
    Ok(text)
}

/// The role's parts of run.toml: the model, the optimizer, extra tables and the metrics.
fn run_toml(role: Role, component: &str) -> String {
    let c = component;
    let own = "# this component's own key";
    let model = match role {
        Role::Model => format!("[model]\nuse = \"{c}\"\nhidden = 64            {own}\n"),
        _ => "[model]\narch = \"resnet18\"\nwidth = 0.125           # 8/16/32/64 channels\n".into(),
    };
    let optimizer = match role {
        Role::Optimizer => format!(
            "[optimizer]\nuse = \"{c}\"\nlr = 0.05\nweight_decay = 5e-4\nmomentum = 0.9          {own}\n"
        ),
        _ => "[optimizer]\nuse = \"sgd\"\nlr = 0.05\nmomentum = 0.9\nweight_decay = 5e-4\n".into(),
    };
    let tables = match role {
        Role::Scheduler => format!(
            "\n# Every parameter at a constant rate, instead of the cosine schedule above.\n\
             [scheduler]\nuse = \"{c}\"\nlr = 0.02               {own}\n"
        ),
        Role::Pruner => format!(
            "\n# Prune half of the weights before the first step.\n\
             [pruner]\nuse = \"{c}\"\nsparsity = 0.5\nlayer_normalized = false  {own}\n"
        ),
        Role::Distiller => {
            format!("\n[[distillers]]\nuse = \"{c}\"\nweight = 0.01           {own}\n")
        }
        Role::Callback => {
            format!("\n[[callbacks]]\nuse = \"{c}\"\nevery = 10              {own}\n")
        }
        _ => String::new(),
    };
    let metrics = match role {
        Role::Metric => format!("\n[[metrics]]\nuse = \"{c}\"\npercent = true          {own}"),
        _ => "\n[[metrics]]\nuse = \"accuracy\"        # top1, top5\n\n[[metrics]]\nuse = \"loss\""
            .into(),
    };
    fill(
        RUN_TOML,
        &[
            ("model", &model),
            ("optimizer", &optimizer),
            ("tables", &tables),
            ("metrics", &metrics),
            ("role", role.as_str()),
            ("component", component),
        ],
    )
}

/// `template` with every `{{key}}` replaced by its value.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut text = template.to_string();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    debug_assert!(!text.contains("{{"), "a placeholder is left in:\n{text}");
    text
}

/// The files of a new crate, by path relative to its directory.
pub fn files(name: &str, role: Role, checkout: &Checkout) -> Result<Vec<(PathBuf, String)>> {
    let lib = name.replace('-', "_");
    let type_name = type_name(name);
    let sdk = checkout.sdk();
    let libtorch = checkout.libtorch();
    let rpath = format!("link-arg=-Wl,-rpath,{}", utf8(&libtorch.join("lib"))?);
    let needs: Vec<String> = workspace_plugins(role)
        .iter()
        .map(|p| format!("`{p}`"))
        .collect();
    let needs = format!(
        "The run also uses {} of that\ncheckout; build them there with `cargo build --release --workspace`.",
        needs.join(" and ")
    );
    let values: &[(&str, &str)] = &[
        ("name", name),
        ("lib", &lib),
        ("component", &lib),
        ("Type", &type_name),
        ("role", role.as_str()),
        ("sdk_path", &toml_string(utf8(&sdk)?)),
        ("sdk_version", trellis_sdk::plugin::SDK_VERSION),
        ("tch_version", trellis_sdk::plugin::TCH_VERSION),
        ("libtorch", &toml_string(utf8(&libtorch)?)),
        ("rpath", &toml_string(&rpath)),
        ("checkout", utf8(&checkout.root)?),
        ("needs", &needs),
    ];
    Ok(vec![
        ("Cargo.toml".into(), fill(CARGO_TOML, values)),
        (".cargo/config.toml".into(), fill(CARGO_CONFIG, values)),
        ("src/lib.rs".into(), fill(lib_template(role), values)),
        (
            "plugins.toml".into(),
            plugins_toml(name, &lib, role, checkout)?,
        ),
        ("run.toml".into(), run_toml(role, &lib)),
        ("README.md".into(), fill(README, values)),
    ])
}

/// What each generated file is, for the listing printed at the end.
fn describe(path: &Path, role: Role) -> String {
    match path.to_str().unwrap_or_default() {
        "Cargo.toml" => "the crate: a cdylib against this checkout's trellis-sdk".into(),
        "Cargo.lock" => "the dependency versions this checkout builds with".into(),
        ".cargo/config.toml" => "where libtorch is".into(),
        "src/lib.rs" => format!("the {role}, its configuration and its unit test"),
        "plugins.toml" => "the manifest run.toml uses".into(),
        "run.toml" => format!("a 2-epoch synthetic run with the {role}"),
        "README.md" => "how to build, test and run it".into(),
        _ => String::new(),
    }
}

/// Creates the crate; returns its directory and the files written, relative to it.
pub fn create(options: &NewOptions, checkout: &Checkout) -> Result<(PathBuf, Vec<PathBuf>)> {
    let role = parse_role(&options.role)?;
    check_name(&options.name)?;
    let target = options.dir.join(&options.name);
    if target.exists() {
        let empty = target.is_dir()
            && std::fs::read_dir(&target)
                .with_context(|| format!("reading {}", target.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "{} already exists and is not an empty directory\n  help: choose another NAME or \
                 --dir, or remove it first",
                target.display()
            );
        }
    }
    let mut written = Vec::new();
    for (path, text) in files(&options.name, role, checkout)? {
        let full = target.join(&path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&full, text).with_context(|| format!("writing {}", full.display()))?;
        written.push(path);
    }
    // The checkout's lock file: the crate resolves to the very versions (tch, abi_stable, serde,
    // ...) the checkout builds with, without a registry; cargo drops what it does not use.
    let lock = checkout.root.join("Cargo.lock");
    if lock.is_file() {
        std::fs::copy(&lock, target.join("Cargo.lock"))
            .with_context(|| format!("copying {}", lock.display()))?;
        written.insert(1, "Cargo.lock".into());
    }
    Ok((target, written))
}

/// `trellis plugin new`: creates the crate and says what it holds and what to run next.
pub fn new(options: &NewOptions) -> Result<()> {
    let checkout = Checkout::of_this_build();
    let role = parse_role(&options.role)?;
    let (target, written) = create(options, &checkout)?;
    println!(
        "Created {}, a {role} plugin (component `{}`), in {}:",
        options.name,
        options.name.replace('-', "_"),
        target.display()
    );
    for path in &written {
        println!("  {:<20} {}", path.display(), describe(path, role));
    }
    let mut warnings = Vec::new();
    if !checkout.sdk().join("Cargo.toml").is_file() {
        warnings.push(format!(
            "{} is not there (this trellis was built in a checkout that has moved): fix the \
             trellis-sdk path in Cargo.toml",
            checkout.sdk().display()
        ));
    }
    if !checkout.libtorch().join("lib").is_dir() {
        warnings.push(format!(
            "{} does not exist yet: run scripts/setup.sh in {} first",
            checkout.libtorch().display(),
            checkout.root.display()
        ));
    }
    let missing: Vec<&str> = workspace_plugins(role)
        .iter()
        .copied()
        .filter(|p| !checkout.plugin(p).is_file())
        .collect();
    if !missing.is_empty() {
        warnings.push(format!(
            "run.toml also uses {}, not built yet: run `cargo build --release -p {}` in {}",
            missing.join(" and "),
            missing.join(" -p "),
            checkout.root.display()
        ));
    }
    for w in &warnings {
        println!("\nnote: {w}");
    }
    let trellis = std::env::current_exe().unwrap_or_else(|_| "trellis".into());
    println!("\nNext:");
    println!("  cd {}", target.display());
    println!("  cargo build --release   # the plugin");
    println!("  cargo test              # its unit test");
    println!("  {} run run.toml   # train with it", trellis.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    fn checkout() -> Checkout {
        Checkout {
            root: PathBuf::from("/opt/trellis"),
        }
    }

    #[test]
    fn names_are_crate_names() {
        for ok in ["my-lr-warmup", "lion", "x2", "a_b-c"] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            "My-Plugin",
            "2fast",
            "-x",
            "my plugin",
            "été",
            "fn",
            "tch",
            "trellis-sdk",
            "test",
        ] {
            let e = format!("{:#}", check_name(bad).unwrap_err());
            assert!(e.contains("is not a valid plugin name"), "{bad}: {e}");
            assert_eq!(e.lines().count(), 2, "{e}");
            assert!(e.lines().nth(1).unwrap().trim_start().starts_with("help:"));
        }
        assert_eq!(type_name("my-lr-warmup"), "MyLrWarmup");
        assert_eq!(type_name("a__b2-c"), "AB2C");
        assert_eq!(type_name("metric"), "MetricComponent");
    }

    #[test]
    fn roles_are_the_sdk_roles() {
        for role in Role::ALL {
            assert_eq!(parse_role(role.as_str()).unwrap(), role);
        }
        let e = format!("{:#}", parse_role("optimiser").unwrap_err());
        assert_eq!(
            e,
            "unknown role `optimiser`\n  help: the roles are model, optimizer, scheduler, pruner, \
             distiller, metric, callback"
        );
    }

    #[test]
    fn every_template_fills_and_its_toml_parses() {
        for role in Role::ALL {
            let files = files("my-thing", role, &checkout()).unwrap();
            for (path, text) in &files {
                assert!(!text.contains("{{"), "{role} {}:\n{text}", path.display());
                if path.extension().is_some_and(|e| e == "toml") {
                    let parsed: Result<toml::Table, _> = toml::from_str(text);
                    assert!(parsed.is_ok(), "{role} {}: {parsed:?}", path.display());
                }
            }
            let text = |name: &str| &files.iter().find(|(p, _)| p == Path::new(name)).unwrap().1;
            let run: RunConfig = toml::from_str(text("run.toml")).unwrap();
            let components = format!("{run:?}");
            assert!(components.contains("\"my_thing\""), "{role}: {components}");
            let cargo: toml::Table = toml::from_str(text("Cargo.toml")).unwrap();
            let sdk = &cargo["dependencies"]["trellis-sdk"];
            assert_eq!(sdk["path"].as_str(), Some("/opt/trellis/sdk"));
            assert_eq!(
                sdk["version"].as_str().unwrap(),
                format!("={}", trellis_sdk::plugin::SDK_VERSION)
            );
            assert!(text("src/lib.rs").contains("pub struct MyThing"));
            assert!(text("plugins.toml").contains("\"target/release/libmy_thing.so\""));
        }
    }
}
