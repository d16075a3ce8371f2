//! Evaluation metrics: top-k accuracy, mean cross-entropy, expected calibration error.
//!
//! A model with a single logit z (`[model] outputs = 1`, `loss = "bce"`) is read as the two-class
//! logits [0, z]: their softmax is [1 − σ(z), σ(z)], so cross-entropy is the binary
//! cross-entropy, top-1 is the sign of z and confidence is max(σ(z), 1 − σ(z)).
//!
//! Counts accumulate in tensors on the model's device and are read once in `compute`, so
//! evaluation never waits on a device-to-host copy per batch.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};
use trellis_sdk::{
    Batch, Component, EpochInfo, Error, Host, Metric, MetricValues, Outputs, Plugin, Result,
};

fn sum_into(total: &mut Option<Tensor>, value: Tensor) {
    *total = Some(match total.take() {
        Some(t) => t + value,
        None => value,
    });
}

/// The logits as one column per class: a single logit z becomes [0, z].
fn class_logits(logits: &Tensor) -> Tensor {
    if logits.size().get(1) == Some(&1) {
        Tensor::cat(&[logits.zeros_like(), logits.shallow_clone()], 1)
    } else {
        logits.shallow_clone()
    }
}

fn read(total: &Option<Tensor>) -> Vec<f64> {
    total
        .as_ref()
        .map(|t| Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap_or_default())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccuracyConfig {
    /// The k to report; absent: 1, and 5 where there are more than 5 classes (top-5 of a
    /// two-class task is always 100 %).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<Vec<i64>>,
}

/// Percentage of samples whose label is among the k highest logits, for every configured k.
pub struct Accuracy {
    top_k: Vec<i64>,
    /// Per k: correct count; then the sample count last.
    counts: Option<Tensor>,
}

impl Component for Accuracy {
    const NAME: &'static str = "accuracy";
    const DESCRIPTION: &'static str = "top-k accuracy in percent (top1, top5, ...)";
    type Config = AccuracyConfig;

    fn new(config: AccuracyConfig, host: Host) -> Result<Self> {
        let classes = host.num_classes();
        let top_k = match config.top_k {
            None if classes > 5 => vec![1, 5],
            None => vec![1],
            Some(top_k) => {
                if top_k.is_empty() || top_k.iter().any(|&k| k < 1) {
                    return Err(Error::config("top_k", "top_k must list values >= 1"));
                }
                if let Some(k) = top_k.iter().find(|&&k| k > classes) {
                    return Err(Error::config(
                        "top_k",
                        format!(
                            "top_k has {k}, but the data has {classes} classes: every label is \
                             among the top {classes}"
                        ),
                    ));
                }
                top_k
            }
        };
        Ok(Accuracy {
            top_k,
            counts: None,
        })
    }
}

impl Metric for Accuracy {
    fn reset(&mut self) -> Result<()> {
        self.counts = None;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let logits = class_logits(&outputs.logits);
        let classes = logits.size()[1];
        let max_k = self.top_k.iter().copied().max().unwrap_or(1).min(classes);
        let (_, top) = logits.f_topk(max_k, -1, true, true)?;
        let hits = top.f_eq_tensor(&batch.targets.unsqueeze(1))?;
        let mut counts: Vec<Tensor> = self
            .top_k
            .iter()
            .map(|&k| hits.narrow(1, 0, k.min(classes)).sum(Kind::Float))
            .collect();
        // A fill on the device, not a copy from the host, which would synchronise a GPU.
        counts.push(Tensor::full(
            [] as [i64; 0],
            batch.targets.size()[0] as f64,
            (Kind::Float, hits.device()),
        ));
        sum_into(&mut self.counts, Tensor::stack(&counts, 0));
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let counts = read(&self.counts);
        let Some(&n) = counts.last() else {
            return Ok(MetricValues::default());
        };
        let scalars = self
            .top_k
            .iter()
            .zip(&counts)
            .map(|(k, c)| (format!("top{k}"), 100.0 * c / n.max(1.0)))
            .collect();
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NoConfig {}

/// Mean cross-entropy over the evaluation set.
pub struct MeanLoss {
    /// [sum of per-sample losses, sample count]
    totals: Option<Tensor>,
}

impl Component for MeanLoss {
    const NAME: &'static str = "loss";
    const DESCRIPTION: &'static str = "mean cross-entropy of the evaluation set";
    type Config = NoConfig;

    fn new(_config: NoConfig, _host: Host) -> Result<Self> {
        Ok(MeanLoss { totals: None })
    }
}

impl Metric for MeanLoss {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let logits = class_logits(&outputs.logits).to_kind(Kind::Float);
        let sum = logits.f_cross_entropy_loss::<Tensor>(
            &batch.targets,
            None,
            Reduction::Sum,
            -100,
            0.0,
        )?;
        let n = Tensor::full(
            [] as [i64; 0],
            batch.targets.size()[0] as f64,
            (Kind::Float, sum.device()),
        );
        sum_into(&mut self.totals, Tensor::stack(&[sum, n], 0));
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let totals = read(&self.totals);
        let scalars = match totals.as_slice() {
            [sum, n] => vec![("loss".to_string(), sum / n.max(1.0))],
            _ => Vec::new(),
        };
        Ok(MetricValues {
            scalars,
            tables: Vec::new(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EceConfig {
    pub bins: i64,
}

impl Default for EceConfig {
    fn default() -> Self {
        EceConfig { bins: 15 }
    }
}

/// Expected calibration error: samples binned by confidence (max softmax probability) into
/// equal-width bins over (0, 1]; ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|, in percent.
pub struct Ece {
    bins: i64,
    /// Per bin: [count, correct, confidence sum], flattened as 3 × bins.
    totals: Option<Tensor>,
}

impl Component for Ece {
    const NAME: &'static str = "ece";
    const DESCRIPTION: &'static str = "expected calibration error in percent (equal-width bins)";
    type Config = EceConfig;

    fn new(config: EceConfig, _host: Host) -> Result<Self> {
        if config.bins < 1 {
            return Err(Error::config("bins", "bins must be >= 1"));
        }
        Ok(Ece {
            bins: config.bins,
            totals: None,
        })
    }
}

impl Metric for Ece {
    fn reset(&mut self) -> Result<()> {
        self.totals = None;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let probs = class_logits(&outputs.logits)
            .to_kind(Kind::Float)
            .f_softmax(-1, Kind::Float)?;
        let (confidence, predicted) = probs.f_max_dim(-1, false)?;
        let correct = predicted.f_eq_tensor(&batch.targets)?.to_kind(Kind::Float);
        // Bin b holds confidences in (b/B, (b+1)/B].
        let bin = (&confidence * self.bins as f64)
            .f_ceil()?
            .f_sub_scalar(1)?
            .f_clamp(0, self.bins - 1)?
            .to_kind(Kind::Int64);
        let zeros = Tensor::zeros([self.bins], (Kind::Float, confidence.device()));
        let count = zeros.f_index_add(0, &bin, &confidence.ones_like())?;
        let hits = zeros.f_index_add(0, &bin, &correct)?;
        let conf = zeros.f_index_add(0, &bin, &confidence)?;
        sum_into(&mut self.totals, Tensor::cat(&[count, hits, conf], 0));
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let totals = read(&self.totals);
        if totals.is_empty() {
            return Ok(MetricValues::default());
        }
        let bins = self.bins as usize;
        let (count, rest) = totals.split_at(bins);
        let (hits, conf) = rest.split_at(bins);
        let n: f64 = count.iter().sum();
        let ece: f64 = (0..bins)
            .filter(|&b| count[b] > 0.0)
            .map(|b| (count[b] / n) * (hits[b] / count[b] - conf[b] / count[b]).abs())
            .sum();
        Ok(MetricValues {
            scalars: vec![("ece".to_string(), 100.0 * ece)],
            tables: Vec::new(),
        })
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "evaluation metrics: accuracy, loss, calibration"
)
.metric::<Accuracy>()
.metric::<MeanLoss>()
.metric::<Ece>());

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> EpochInfo {
        EpochInfo {
            epoch: 1,
            epochs: 1,
            step: 1,
        }
    }

    fn batch(logits: &[f32], classes: i64, targets: &[i64]) -> (Batch, Outputs) {
        let n = targets.len() as i64;
        let logits = Tensor::from_slice(logits).view([n, classes]);
        (
            Batch {
                inputs: Tensor::zeros([n, 1], (Kind::Float, tch::Device::Cpu)),
                targets: Tensor::from_slice(targets),
            },
            Outputs {
                features: logits.shallow_clone(),
                logits,
            },
        )
    }

    fn scalar(values: &MetricValues, name: &str) -> f64 {
        values
            .scalars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {values:?}"))
            .1
    }

    #[test]
    fn top_k_follows_the_number_of_classes() {
        let host = |classes| {
            trellis_sdk::testing::FakeHost::new(trellis_sdk::testing::TinyNet::new(3, classes))
                .classes(classes)
                .host()
        };
        let ks = |config: &str, classes| {
            let config: AccuracyConfig = trellis_sdk::parse_config(config).unwrap();
            Accuracy::new(config, host(classes)).map(|a| a.top_k)
        };
        assert_eq!(ks("", 10).unwrap(), [1, 5]);
        assert_eq!(ks("", 2).unwrap(), [1]);
        assert_eq!(ks("top_k = [1, 2]", 2).unwrap(), [1, 2]);
        let err = ks("top_k = [1, 20]", 10).err().unwrap();
        assert_eq!(err.key.as_deref(), Some("top_k"));
        assert!(err.message.contains("20") && err.message.contains("10 classes"));
    }

    #[test]
    fn top_k_accuracy_counts_by_hand() {
        let mut acc = Accuracy {
            top_k: vec![1, 2],
            counts: None,
        };
        // Sample 0: target 2 ranked first; sample 1: target 0 ranked second; sample 2: last.
        let (b, o) = batch(
            &[0.1, 0.2, 0.9, 0.5, 0.9, 0.1, 0.9, 0.5, 0.1],
            3,
            &[2, 0, 2],
        );
        acc.update(&b, &o).unwrap();
        let v = acc.compute(info()).unwrap();
        assert!((scalar(&v, "top1") - 100.0 / 3.0).abs() < 1e-4);
        assert!((scalar(&v, "top2") - 200.0 / 3.0).abs() < 1e-4);
    }

    #[test]
    fn mean_loss_is_mean_cross_entropy_over_batches() {
        let mut loss = MeanLoss { totals: None };
        let (b1, o1) = batch(&[0.0, 0.0], 2, &[0]);
        let (b2, o2) = batch(&[0.0, 0.0, 0.0, 0.0], 2, &[1, 0]);
        loss.update(&b1, &o1).unwrap();
        loss.update(&b2, &o2).unwrap();
        let v = loss.compute(info()).unwrap();
        assert!((scalar(&v, "loss") - 2f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn ece_by_hand() {
        let mut ece = Ece {
            bins: 10,
            totals: None,
        };
        // Two samples of confidence 0.731 (logit gap 1): one right, one wrong. Bin accuracy 0.5,
        // bin confidence 0.731 → ECE = |0.5 − 0.731| = 23.1 %.
        let (b, o) = batch(&[1.0, 0.0, 1.0, 0.0], 2, &[0, 1]);
        ece.update(&b, &o).unwrap();
        let v = ece.compute(info()).unwrap();
        let conf = 1.0 / (1.0 + (-1f64).exp());
        assert!((scalar(&v, "ece") - 100.0 * (conf - 0.5)).abs() < 1e-4);
    }

    #[test]
    fn a_single_logit_is_scored_by_its_sign_and_sigmoid() {
        let z = [2.0f32, -1.0, 0.5, -0.25];
        let y = [1i64, 1, 0, 0];
        let (b, o) = batch(&z, 1, &y);

        let mut acc = Accuracy {
            top_k: vec![1],
            counts: None,
        };
        acc.update(&b, &o).unwrap();
        // Signs predict 1, 0, 1, 0: samples 0 and 3 are right.
        assert!((scalar(&acc.compute(info()).unwrap(), "top1") - 50.0).abs() < 1e-4);

        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let mut loss = MeanLoss { totals: None };
        loss.update(&b, &o).unwrap();
        let bce: f64 = z
            .iter()
            .zip(y)
            .map(|(&z, y)| {
                let p = sigmoid(z as f64);
                -if y == 1 { p.ln() } else { (1.0 - p).ln() }
            })
            .sum::<f64>()
            / 4.0;
        assert!((scalar(&loss.compute(info()).unwrap(), "loss") - bce).abs() < 1e-5);

        // Confidences σ(2) = 0.881 (right), σ(1) = 0.731 (wrong), σ(0.5) = 0.622 (wrong),
        // σ(0.25) = 0.562 (right), each alone in one of 10 bins.
        let mut ece = Ece {
            bins: 10,
            totals: None,
        };
        ece.update(&b, &o).unwrap();
        let want = [(2.0, 1.0), (1.0, 0.0), (0.5, 0.0), (0.25, 1.0)]
            .iter()
            .map(|&(z, right): &(f64, f64)| (right - sigmoid(z)).abs() / 4.0)
            .sum::<f64>();
        assert!((scalar(&ece.compute(info()).unwrap(), "ece") - 100.0 * want).abs() < 1e-4);
    }
}
