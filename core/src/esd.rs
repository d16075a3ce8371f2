//! The heavy-tailed spectral diagnostics (METHODS.md section 5) of every Conv2d and Linear layer
//! of a network, and their table; `trellis esd` ([`crate::commands::esd`]) runs them on a saved
//! model.

use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use serde::Deserialize;
use trellis_sdk::LayerKind;
use trellis_spectral::{analyze, Fit, LayerSpectrum};

use crate::models::{Arch, Network};

/// One analysed layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub layer: String,
    pub shape: Vec<i64>,
    pub spectrum: LayerSpectrum,
}

/// An architecture by its config name (`resnet18`, `vgg16_bn`, ...).
pub fn parse_arch(name: &str) -> Result<Arch, String> {
    let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(name);
    Arch::deserialize(de).map_err(|_| {
        format!("unknown architecture `{name}`: use resnet18, resnet34, vgg16_bn, mlp or lenet5")
    })
}

/// Every Conv2d and Linear layer of a network, in registration order.
pub fn analyze_network(net: &Network, fit: Fit) -> Result<Vec<LayerReport>> {
    let params = net.parameters();
    let mut reports = Vec::new();
    for layer in net.layers() {
        if !matches!(layer.kind, LayerKind::Conv2d | LayerKind::Linear) {
            continue;
        }
        let name = format!("{}.weight", layer.path);
        let (_, _, weight) = params
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| anyhow!("the model has no parameter {name}"))?;
        let spectrum =
            analyze(weight, fit).map_err(|e| anyhow!("the ESD of {}: {e}", layer.path))?;
        reports.push(LayerReport {
            layer: layer.path.clone(),
            shape: weight.size(),
            spectrum,
        });
    }
    Ok(reports)
}

fn number(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// The per-layer table `trellis esd` prints.
pub fn render(reports: &[LayerReport], fit: Fit) -> String {
    let width = reports
        .iter()
        .map(|r| r.layer.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:<14} {:>6} {:>9} {:>9} {:>14}",
        "layer", "shape", "eigs", "alpha", "alphahat", "spectral_norm"
    );
    for r in reports {
        let shape: Vec<String> = r.shape.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(
            out,
            "{:<width$}  {:<14} {:>6} {:>9} {:>9} {:>14.4}",
            r.layer,
            shape.join("x"),
            r.spectrum.eigenvalue_count,
            number(r.spectrum.alpha()),
            number(r.spectrum.alphahat()),
            r.spectrum.spectral_norm,
        );
    }
    let alphas: Vec<f64> = reports.iter().filter_map(|r| r.spectrum.alpha()).collect();
    if !alphas.is_empty() {
        let mean = alphas.iter().sum::<f64>() / alphas.len() as f64;
        let _ = writeln!(
            out,
            "\nmean alpha {mean:.4} over {} of {} layers (fit: {fit}; '-': the spectrum admits no power-law fit)",
            alphas.len(),
            reports.len()
        );
    }
    out
}
