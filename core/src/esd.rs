//! `trellis esd`: the heavy-tailed spectral diagnostics (METHODS.md section 5) of every Conv2d
//! and Linear layer of a saved model, so a trained model can be checked without training.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use tch::Device;
use trellis_sdk::LayerKind;
use trellis_spectral::{analyze, Fit, LayerSpectrum};

use crate::models::{Arch, ModelConfig, Network};

#[derive(Debug, Clone)]
pub struct EsdOptions {
    /// A `model.safetensors` written by `trellis run`.
    pub weights: PathBuf,
    pub arch: Arch,
    pub width: f64,
    pub classes: i64,
    pub fit: Fit,
}

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

/// Loads the weights into the network they were saved from and analyses every Conv2d and
/// Linear layer in registration order.
pub fn analyze_weights(opts: &EsdOptions) -> Result<Vec<LayerReport>> {
    analyze_network(&load_network(opts)?, opts.fit)
}

/// The network `opts` describes, with the saved weights.
pub fn load_network(opts: &EsdOptions) -> Result<Network> {
    let cfg = ModelConfig {
        arch: opts.arch,
        width: opts.width,
        hidden: None,
    };
    // The model zoo's inputs are CIFAR-shaped: 3 channels of 32 × 32.
    let mut net = Network::build(&cfg, opts.classes, 3, 32, Device::Cpu)?;
    net.load(&opts.weights).with_context(|| {
        format!(
            "help: pass the --arch, --width and --classes of the run that saved {} (see its config.toml)",
            opts.weights.display()
        )
    })?;
    Ok(net)
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

pub fn run(opts: &EsdOptions) -> Result<()> {
    let net = load_network(opts)?;
    let started = std::time::Instant::now();
    let reports = analyze_network(&net, opts.fit)?;
    let seconds = started.elapsed().as_secs_f64();
    print!("{}", render(&reports, opts.fit));
    println!("{} layers analysed in {seconds:.3} s", reports.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_conv_and_linear_layer_of_a_saved_model_is_analysed() {
        tch::manual_seed(4);
        let cfg = ModelConfig {
            width: 0.125,
            ..ModelConfig::new(Arch::Resnet18)
        };
        let net = Network::build(&cfg, 10, 3, 32, Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        net.save(&path).unwrap();
        let opts = EsdOptions {
            weights: path,
            arch: Arch::Resnet18,
            width: 0.125,
            classes: 10,
            fit: Fit::Median,
        };
        let reports = analyze_weights(&opts).unwrap();
        // stem + 16 block convs + 3 shortcut convs + the classifier.
        assert_eq!(reports.len(), 21);
        assert_eq!(reports[0].layer, "conv1");
        assert_eq!(reports[20].layer, "linear");
        let weight = net
            .parameters()
            .into_iter()
            .find(|(n, _, _)| n == "layer2.0.conv1.weight")
            .unwrap()
            .2;
        let report = reports
            .iter()
            .find(|r| r.layer == "layer2.0.conv1")
            .unwrap();
        assert_eq!(report.shape, [16, 8, 3, 3]);
        assert_eq!(
            report.spectrum,
            analyze(&weight, Fit::Median).unwrap(),
            "the file's weights, not a fresh initialisation"
        );
        let table = render(&reports, Fit::Median);
        assert!(
            table.contains("layer2.0.conv1") && table.contains("16x8x3x3"),
            "{table}"
        );

        let wrong = EsdOptions {
            width: 0.25,
            ..opts
        };
        let err = format!("{:#}", analyze_weights(&wrong).unwrap_err());
        assert!(err.contains("--width"), "{err}");
        assert!(parse_arch("resnet50").unwrap_err().contains("resnet18"));
        assert_eq!(parse_arch("vgg16_bn"), Ok(Arch::Vgg16Bn));
    }
}
