//! `trellis esd`: the per-layer spectral diagnostics of a saved model, so a trained model can be
//! checked without training. The model is a built-in architecture named on the command line, or
//! whatever a run's `config.toml` describes (plugin models included).

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use tch::Device;
use trellis_spectral::Fit;

use crate::config::LoadedConfig;
use crate::esd::{analyze_network, render, LayerReport};
use crate::models::{Arch, ModelConfig, Network, Purpose, WeightsMismatch};

/// `error` with `help` after it when the file held another model's weights: then describing
/// the right model is the fix; for a file that cannot be read it is not.
fn with_help(error: anyhow::Error, help: impl FnOnce() -> String) -> anyhow::Error {
    if error.downcast_ref::<WeightsMismatch>().is_some() {
        anyhow!("{error:#}\n  help: {}", help())
    } else {
        error
    }
}

/// Which network the weights belong to.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A zoo architecture with CIFAR-shaped inputs (3 × 32 × 32).
    Builtin {
        arch: Arch,
        width: f64,
        classes: i64,
    },
    /// The `[model]`, data and plugins of a run config, e.g. a run directory's `config.toml`.
    RunConfig(PathBuf),
}

#[derive(Debug, Clone)]
pub struct EsdOptions {
    /// A `model.safetensors` written by `trellis run`.
    pub weights: PathBuf,
    pub model: ModelSource,
    pub fit: Fit,
}

/// Loads the weights into the network they were saved from and analyses every Conv2d and
/// Linear layer in registration order.
pub fn analyze_weights(opts: &EsdOptions) -> Result<Vec<LayerReport>> {
    match &opts.model {
        ModelSource::Builtin {
            arch,
            width,
            classes,
        } => {
            let cfg = ModelConfig {
                width: *width,
                ..ModelConfig::new(*arch)
            };
            let mut net = Network::build_for(&cfg, *classes, 3, 32, Device::Cpu, Purpose::Analyse)?;
            net.load(&opts.weights).map_err(|e| {
                with_help(e, || {
                    format!(
                        "pass the --arch, --width and --classes of the run that saved {} (see its \
                         config.toml), or --config with that config.toml",
                        opts.weights.display()
                    )
                })
            })?;
            analyze_network(&net, opts.fit)
        }
        ModelSource::RunConfig(config) => {
            let mut cfg = LoadedConfig::load(config, &[])?;
            // The diagnostics run on the CPU whatever device trained the model.
            cfg.config.train.device = crate::config::DeviceChoice::Cpu;
            let model = crate::train::build_run_model(&cfg, None)?;
            model.net_mut().load(&opts.weights).map_err(|e| {
                with_help(e, || {
                    format!(
                        "{} does not describe the model that saved {}",
                        config.display(),
                        opts.weights.display()
                    )
                })
            })?;
            let net = model.net();
            analyze_network(&net, opts.fit)
        }
    }
}

pub fn run(opts: &EsdOptions) -> Result<()> {
    let started = std::time::Instant::now();
    let reports = analyze_weights(opts)?;
    let seconds = started.elapsed().as_secs_f64();
    print!("{}", render(&reports, opts.fit));
    let layers = if reports.len() == 1 {
        "layer"
    } else {
        "layers"
    };
    println!("{} {layers} analysed in {seconds:.3} s", reports.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::esd::parse_arch;
    use trellis_spectral::analyze;

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
        let builtin = |width| EsdOptions {
            weights: path.clone(),
            model: ModelSource::Builtin {
                arch: Arch::Resnet18,
                width,
                classes: 10,
            },
            fit: Fit::Median,
        };
        let reports = analyze_weights(&builtin(0.125)).unwrap();
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

        let err = format!("{:#}", analyze_weights(&builtin(0.25)).unwrap_err());
        assert!(err.contains("--width"), "{err}");
        assert!(parse_arch("resnet50").unwrap_err().contains("resnet18"));
        assert_eq!(parse_arch("vgg16_bn"), Ok(Arch::Vgg16Bn));
    }
}
