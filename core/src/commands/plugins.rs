//! `trellis plugins`: the components a manifest's plugins provide, or what one plugin file
//! declares.

use std::path::Path;

use anyhow::Result;

use crate::plugin_host::{self, Registry};

/// Lists every component of the manifest's plugins, by role, with its default configuration.
pub fn list(manifest: &Path) -> Result<()> {
    let registry = Registry::load(manifest)?;
    print_components(&registry);
    Ok(())
}

fn print_components(registry: &Registry) {
    let mut last_role = None;
    for (library, c) in registry.components() {
        if last_role != Some(c.role) {
            println!("\n{}s:", c.role);
            last_role = Some(c.role);
        }
        println!(
            "  {:<20} {} (plugin {} {})",
            c.name, c.description, library.info.name, library.info.version
        );
        for line in c.default_config.lines() {
            println!("  {:<20}   {line}", "");
        }
    }
}

/// Prints what one plugin library declares, after the same checks loading it for a run makes.
pub fn inspect(file: &Path) -> Result<()> {
    let library = plugin_host::open(file)?;
    let info = &library.info;
    println!("plugin   {} {}", info.name, info.version);
    println!("about    {}", info.description);
    println!("file     {}", library.path.display());
    println!("sha256   {}", library.sha256);
    println!(
        "built    sdk {} (ABI {}), tch {}, libtorch {}{}",
        info.sdk_version,
        info.sdk_abi,
        info.tch_version,
        info.libtorch_version,
        if info.cuda { " with CUDA" } else { "" }
    );
    for c in &info.components {
        println!("\n{} `{}`: {}", c.role, c.name, c.description);
        if c.default_config.trim().is_empty() {
            println!("  (no configuration)");
        }
        for line in c.default_config.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}
