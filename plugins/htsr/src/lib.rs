//! `htsr`: heavy-tailed self-regularisation diagnostics of every Conv2d and Linear layer at
//! the end of each epoch (METHODS.md section 5's ESD and α, for any run).
//!
//! Each epoch it reports a table `htsr` (one row per layer, so it lands in `metrics.jsonl`
//! under `tables`) with the power-law exponent `alpha`, `alphahat` = α·log10(λ_max), the
//! `spectral_norm` λ_max, the eigenvalue count and the learning rate the layer trained with
//! (its optimizer group's rate, when the host reports rates). It also draws, into the run
//! directory, α per layer over the epochs (`htsr_alpha.png`) and the per-layer learning rates
//! (`htsr_lr.png`).

mod plot;

use std::path::Path;

use serde::{Deserialize, Serialize};
use trellis_sdk::{
    Batch, Component, EpochInfo, Error, GroupRate, Host, Metric, MetricValues, Outputs, Plugin,
    Result, Table,
};
use trellis_spectral::{analysed_layers, analyze, Fit, LayerSpectrum};

pub const TABLE: &str = "htsr";
pub const ALPHA_PLOT: &str = "htsr_alpha.png";
pub const LR_PLOT: &str = "htsr_lr.png";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// "median" (TempBalance's xmin) or "goodness-of-fit" (WeightWatcher's).
    pub fit: Fit,
    /// Draw the PNG plots into the run directory.
    pub plots: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fit: Fit::Median,
            plots: true,
        }
    }
}

/// One layer at one epoch, as the plots need it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPoint {
    pub layer: String,
    pub alpha: Option<f64>,
    pub lr: Option<f64>,
}

/// Every epoch seen so far: (epoch, layers).
pub type History = Vec<(u64, Vec<LayerPoint>)>;

pub struct Htsr {
    config: Config,
    host: Host,
    history: History,
    /// Whether earlier epochs were read back from `metrics.jsonl` (after a resume).
    history_restored: bool,
}

impl Component for Htsr {
    const NAME: &'static str = "htsr";
    const DESCRIPTION: &'static str =
        "per-layer ESD diagnostics each epoch: alpha, alphahat, spectral norm, eigenvalue count, lr; plots";
    type Config = Config;

    fn new(config: Config, host: Host) -> Result<Self> {
        Ok(Htsr {
            config,
            host,
            history: Vec::new(),
            history_restored: false,
        })
    }
}

/// The rate of the group that trains `{layer}.weight`.
fn layer_rate(rates: &[GroupRate], layer: &str) -> Option<f64> {
    let weight = format!("{layer}.weight");
    rates
        .iter()
        .find(|g| g.params.contains(&weight))
        .map(|g| g.lr)
}

/// The table's row for a layer, or `None` when a value is not finite: JSON has no NaN, and a
/// null in `metrics.jsonl` would make the record unreadable on resume.
fn row(spectrum: &LayerSpectrum, lr: Option<f64>, with_lr: bool) -> Option<Vec<f64>> {
    let mut values = vec![
        spectrum.alpha()?,
        spectrum.alphahat()?,
        spectrum.spectral_norm,
        spectrum.eigenvalue_count as f64,
    ];
    if with_lr {
        values.push(lr?);
    }
    values.iter().all(|v| v.is_finite()).then_some(values)
}

/// The epochs before `before` of this table in a run's `metrics.jsonl`, so that the plots of a
/// resumed run still start at epoch 1.
pub fn read_history(metrics: &Path, before: u64) -> History {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Vec::new();
    };
    let mut history = Vec::new();
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(epoch) = record["epoch"].as_u64().filter(|&e| e < before) else {
            continue;
        };
        let Some(rows) = record["tables"][TABLE].as_object() else {
            continue;
        };
        let layers = rows
            .iter()
            .map(|(layer, columns)| LayerPoint {
                layer: layer.clone(),
                alpha: columns["alpha"].as_f64(),
                lr: columns["lr"].as_f64(),
            })
            .collect();
        history.push((epoch, layers));
    }
    history
}

impl Htsr {
    fn draw(&self, run_dir: &Path) -> Result<()> {
        let alpha = plot::Chart {
            title: "Power-law exponent α of each layer's ESD",
            y_label: "α",
            value: |p: &LayerPoint| p.alpha,
        };
        plot::draw(&run_dir.join(ALPHA_PLOT), &alpha, &self.history)?;
        if self
            .history
            .iter()
            .any(|(_, l)| l.iter().any(|p| p.lr.is_some()))
        {
            let lr = plot::Chart {
                title: "Learning rate of each layer",
                y_label: "learning rate",
                value: |p: &LayerPoint| p.lr,
            };
            plot::draw(&run_dir.join(LR_PLOT), &lr, &self.history)?;
        }
        Ok(())
    }
}

impl Metric for Htsr {
    fn reset(&mut self) -> Result<()> {
        Ok(())
    }

    fn wants_batches(&self) -> Result<bool> {
        Ok(false)
    }

    fn update(&mut self, _batch: &Batch, _outputs: &Outputs) -> Result<()> {
        Ok(())
    }

    fn compute(&mut self, info: EpochInfo) -> Result<MetricValues> {
        let run_dir = self.host.run_dir();
        if !self.history_restored {
            self.history_restored = true;
            if let Some(dir) = &run_dir {
                self.history = read_history(&dir.join("metrics.jsonl"), info.epoch);
            }
        }
        let rates = self.host.learning_rates();
        let with_lr = !rates.is_empty();
        let mut columns = vec!["alpha", "alphahat", "spectral_norm", "eigenvalues"];
        if with_lr {
            columns.push("lr");
        }
        let mut table = Table {
            name: TABLE.into(),
            columns: columns.into_iter().map(String::from).collect(),
            rows: Vec::new(),
        };
        let mut points = Vec::new();
        for (layer, weight) in analysed_layers(&self.host.model()?)? {
            let spectrum = analyze(&weight, self.config.fit)
                .map_err(|e| Error::msg(format!("the ESD of `{layer}`: {e}")))?;
            let lr = layer_rate(&rates, &layer);
            match row(&spectrum, lr, with_lr) {
                Some(values) => table.rows.push((layer.clone(), values)),
                None => tracing::warn!(
                    "{layer}: no power-law fit or no learning rate this epoch ({spectrum:?}); \
                     left out of the table"
                ),
            }
            points.push(LayerPoint {
                layer,
                alpha: spectrum.alpha(),
                lr,
            });
        }
        self.history.retain(|(e, _)| *e != info.epoch);
        self.history.push((info.epoch, points));
        if self.config.plots {
            if let Some(dir) = &run_dir {
                // A plot that cannot be written must not stop training; the table has the data.
                if let Err(e) = self.draw(dir) {
                    tracing::warn!("could not draw the htsr plots: {}", e.message);
                }
            }
        }
        Ok(MetricValues {
            scalars: Vec::new(),
            tables: vec![table],
        })
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "heavy-tailed spectral diagnostics of every layer, with plots"
)
.metric::<Htsr>());

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_spectral::PowerLaw;

    fn spectrum(alpha: Option<f64>, spectral_norm: f64) -> LayerSpectrum {
        LayerSpectrum {
            eigenvalue_count: 72,
            spectral_norm,
            fit: alpha.map(|alpha| PowerLaw {
                alpha,
                xmin: 1.0,
                ks_distance: 0.1,
            }),
        }
    }

    #[test]
    fn rows_hold_every_column_and_never_a_non_finite_value() {
        let s = spectrum(Some(3.0), 100.0);
        assert_eq!(
            row(&s, Some(0.1), true),
            Some(vec![3.0, 6.0, 100.0, 72.0, 0.1])
        );
        assert_eq!(row(&s, None, false), Some(vec![3.0, 6.0, 100.0, 72.0]));
        assert_eq!(row(&s, None, true), None);
        assert_eq!(row(&spectrum(None, 100.0), Some(0.1), true), None);
        assert_eq!(row(&spectrum(Some(3.0), 0.0), Some(0.1), true), None);
    }

    #[test]
    fn a_layer_trains_at_the_rate_of_the_group_holding_its_weight() {
        let rates = vec![
            GroupRate {
                name: "layer1.0.conv1".into(),
                lr: 0.15,
                params: vec!["layer1.0.conv1.weight".into(), "layer1.0.bn1.weight".into()],
            },
            GroupRate {
                name: "rest".into(),
                lr: 0.1,
                params: vec!["conv1.weight".into(), "layer1.0.conv10.weight".into()],
            },
        ];
        assert_eq!(layer_rate(&rates, "layer1.0.conv1"), Some(0.15));
        assert_eq!(layer_rate(&rates, "conv1"), Some(0.1));
        // Matched by full parameter name, never by prefix.
        assert_eq!(layer_rate(&rates, "layer1.0.conv10"), Some(0.1));
        assert_eq!(layer_rate(&rates, "layer1.0.conv"), None);
        assert_eq!(layer_rate(&rates, "linear"), None);
    }

    #[test]
    fn history_is_read_back_from_metrics_jsonl_before_the_resumed_epoch() {
        let dir = std::env::temp_dir().join(format!("htsr-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let line = |epoch: u64, alpha: f64| {
            format!(
                "{{\"epoch\":{epoch},\"tables\":{{\"htsr\":{{\"conv1\":{{\"alpha\":{alpha},\"lr\":0.1}}}}}},\"lr\":{{}}}}\n"
            )
        };
        std::fs::write(&path, line(1, 2.5) + &line(2, 2.7) + "{\"epoch\":3}\n").unwrap();
        let history = read_history(&path, 3);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].0, 2);
        assert_eq!(
            history[1].1,
            [LayerPoint {
                layer: "conv1".into(),
                alpha: Some(2.7),
                lr: Some(0.1)
            }]
        );
        assert!(read_history(Path::new("/nonexistent/metrics.jsonl"), 3).is_empty());
    }

    #[test]
    fn plots_are_png_files() {
        let dir = std::env::temp_dir().join(format!("htsr-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let layers = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "linear"];
        let history: History = (1..=4)
            .map(|epoch| {
                let points = layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| LayerPoint {
                        layer: l.to_string(),
                        alpha: Some(2.0 + i as f64 * 0.5 + epoch as f64 * 0.1),
                        lr: Some(0.1 * (1.0 + i as f64 / 4.0)),
                    })
                    .collect();
                (epoch, points)
            })
            .collect();
        let chart = plot::Chart {
            title: "Power-law exponent α of each layer's ESD",
            y_label: "α",
            value: |p: &LayerPoint| p.alpha,
        };
        let path = dir.join(ALPHA_PLOT);
        plot::draw(&path, &chart, &history).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}
