//! The `refiner_accuracy` metric: top-1 accuracy of the Feature-Refiner head, which the run
//! trains but never exports or evaluates, beside the deployed head's `top1`.

use std::rc::Rc;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use trellis_sdk::{
    Batch, Component, EpochInfo, Error, Host, Metric, MetricValues, Outputs, Result,
};

use crate::refiner::{live_refiners, FeatureRefiner};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RefinerAccuracyConfig {}

/// `refiner_top1`: the percentage of evaluation images whose top-1 prediction by FR(φ) — the
/// run's `fc_augment` refiner on the evaluated model's pooled features φ — is the label.
///
/// It reads the very refiner the distiller trains (the same tensors, restored on resume), so the
/// numbers are those of the refiner at the evaluated epoch. The run needs exactly one
/// `fc_augment` distiller.
pub struct RefinerAccuracy {
    refiner: Rc<FeatureRefiner>,
    /// [correct, images], summed on the device so evaluation never waits on a copy.
    counts: Option<Tensor>,
}

impl Component for RefinerAccuracy {
    const NAME: &'static str = "refiner_accuracy";
    const DESCRIPTION: &'static str =
        "top-1 accuracy in percent of the fc_augment distiller's Feature-Refiner head (refiner_top1)";
    type Config = RefinerAccuracyConfig;

    fn new(_config: RefinerAccuracyConfig, _host: Host) -> Result<Self> {
        // The host creates every distiller before any metric, so the run's refiner exists now.
        let mut refiners = live_refiners();
        match refiners.len() {
            0 => Err(Error::config(
                "use",
                "refiner_accuracy measures the Feature-Refiner head of the fc_augment distiller, \
                 but this run has no fc_augment distiller: add `[[distillers]]` with \
                 `use = \"fc_augment\"` to the run config, or remove this metric",
            )),
            1 => Ok(RefinerAccuracy {
                refiner: refiners.remove(0),
                counts: None,
            }),
            n => Err(Error::config(
                "use",
                format!(
                    "refiner_accuracy measures one Feature-Refiner head, but this run has {n} \
                     fc_augment distillers: keep one of them"
                ),
            )),
        }
    }
}

impl Metric for RefinerAccuracy {
    fn reset(&mut self) -> Result<()> {
        self.counts = None;
        Ok(())
    }

    fn update(&mut self, batch: &Batch, outputs: &Outputs) -> Result<()> {
        let logits = tch::no_grad(|| {
            // The refiner's weights are float32 whatever kind a model hands its features in.
            self.refiner.forward(&outputs.features.to_kind(Kind::Float))
        });
        let correct = logits
            .argmax(-1, false)
            .f_eq_tensor(&batch.targets)?
            .sum(Kind::Float);
        // A fill on the device, not a copy from the host, which would synchronise a GPU.
        let images = Tensor::full(
            [] as [i64; 0],
            batch.targets.size()[0] as f64,
            (Kind::Float, correct.device()),
        );
        let counts = Tensor::stack(&[correct, images], 0);
        self.counts = Some(match self.counts.take() {
            Some(total) => total + counts,
            None => counts,
        });
        Ok(())
    }

    fn compute(&mut self, _info: EpochInfo) -> Result<MetricValues> {
        let Some(counts) = &self.counts else {
            return Ok(MetricValues::default());
        };
        let counts = Vec::<f64>::try_from(&counts.to_kind(Kind::Double))?;
        let [correct, images] = counts[..] else {
            return Err(Error::msg(format!(
                "refiner_accuracy: expected [correct, images], got {counts:?}"
            )));
        };
        Ok(MetricValues {
            scalars: vec![(
                "refiner_top1".to_string(),
                100.0 * correct / images.max(1.0),
            )],
            tables: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;
    use trellis_sdk::testing::{FakeHost, TinyNet};
    use trellis_sdk::Model;

    use super::*;
    use crate::distiller::{FcAugment, FcAugmentConfig};

    fn info() -> EpochInfo {
        EpochInfo {
            epoch: 1,
            epochs: 1,
            step: 1,
        }
    }

    fn host() -> Host {
        tch::manual_seed(3);
        FakeHost::new(TinyNet::new(3, 2))
            .classes(2)
            .input_shape([3, 6, 6])
            .host()
    }

    fn no_config() -> RefinerAccuracyConfig {
        RefinerAccuracyConfig {}
    }

    /// The distiller on a TinyNet (4 features, 2 classes), its refiner of width 2 without inner
    /// blocks set to: input Linear picks φ0 and φ1, output Linear and classifier are the
    /// identity, biases 0. A LayerNorm over two values (a, b) gives ±(a − b)/|a − b| (up to ε),
    /// so the refiner's logits are ≈ (1, −1) when φ0 > φ1 and (−1, 1) otherwise: it predicts
    /// class 0 exactly where φ0 > φ1.
    fn distiller_with_known_refiner(host: Host) -> FcAugment {
        let config = FcAugmentConfig {
            d: 2,
            n_inner: 0,
            m: 0.0,
        };
        let fc = FcAugment::new(config, host).unwrap();
        set_refiner(&fc, [[1.0, 0.0], [0.0, 1.0]]);
        fc
    }

    /// Sets the refiner of [`distiller_with_known_refiner`], with `classifier` as the last
    /// layer's weight, in place, as an optimizer step would.
    fn set_refiner(fc: &FcAugment, classifier: [[f32; 2]; 2]) {
        let pick = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]).view([2, 4]);
        let identity = Tensor::eye(2, (Kind::Float, Device::Cpu));
        let classifier = Tensor::from_slice(classifier.as_flattened()).view([2, 2]);
        tch::no_grad(|| {
            for (name, mut t) in fc.refiner.parameters() {
                let value = match name.as_str() {
                    "refiner.input.weight" => pick.shallow_clone(),
                    "refiner.output.weight" => identity.shallow_clone(),
                    "refiner.classifier.weight" => classifier.shallow_clone(),
                    n if n.ends_with("norm.weight") => t.ones_like(),
                    n if n.ends_with("bias") => t.zeros_like(),
                    n => panic!("unexpected refiner parameter {n}"),
                };
                t.copy_(&value);
            }
        });
    }

    fn evaluate(metric: &mut RefinerAccuracy, batches: &[(Batch, Outputs)]) -> f64 {
        metric.reset().unwrap();
        for (batch, outputs) in batches {
            metric.update(batch, outputs).unwrap();
        }
        let values = metric.compute(info()).unwrap();
        assert_eq!(values.scalars.len(), 1);
        assert_eq!(values.scalars[0].0, "refiner_top1");
        values.scalars[0].1
    }

    /// A batch whose pooled features are `features` (rows of 4), with the deployed head's logits.
    fn batch(net: &Model, features: &[[f32; 4]], targets: &[i64]) -> (Batch, Outputs) {
        let features = Tensor::from_slice(features.as_flattened()).view([-1, 4]);
        let n = targets.len() as i64;
        let batch = Batch {
            inputs: Tensor::zeros([n, 3, 6, 6], (Kind::Float, Device::Cpu)),
            targets: Tensor::from_slice(targets),
        };
        let outputs = Outputs {
            logits: net.head(&features).unwrap(),
            features,
        };
        (batch, outputs)
    }

    #[test]
    fn refiner_top1_is_the_hand_computed_accuracy_of_the_refiner() {
        let run = host();
        let net = run.model().unwrap();
        let fc = distiller_with_known_refiner(run);
        let mut metric = RefinerAccuracy::new(no_config(), host()).unwrap();
        // Predictions (class 0 where φ0 > φ1): 0, 1, 0, 1 | 1, 0. Right: 1st, 2nd, 4th | 5th.
        let batches = [
            batch(
                &net,
                &[
                    [3.0, 1.0, 9.0, 9.0],
                    [0.0, 2.0, 0.0, 0.0],
                    [5.0, 4.0, 0.0, 7.0],
                    [1.0, 1.5, 8.0, 0.0],
                ],
                &[0, 1, 1, 1],
            ),
            batch(&net, &[[0.5, 2.5, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]], &[1, 1]),
        ];
        let first = evaluate(&mut metric, &batches);
        assert!((first - 100.0 * 4.0 / 6.0).abs() < 1e-4, "{first}");
        // A new evaluation starts afresh.
        assert!((evaluate(&mut metric, &batches[1..]) - 50.0).abs() < 1e-4);

        // The metric sees the distiller's refiner as training changes it in place: with the
        // classifier's rows swapped every prediction flips, and so does every hit.
        set_refiner(&fc, [[0.0, 1.0], [1.0, 0.0]]);
        let flipped = evaluate(&mut metric, &batches);
        assert!((flipped - 100.0 * 2.0 / 6.0).abs() < 1e-4, "{flipped}");
    }

    #[test]
    fn refiner_top1_on_the_models_own_features_counts_the_refiners_argmax() {
        let run = host();
        let net = run.model().unwrap();
        let fc = FcAugment::new(FcAugmentConfig::default(), run).unwrap();
        let mut metric = RefinerAccuracy::new(no_config(), host()).unwrap();
        let batch = Batch {
            inputs: Tensor::randn([8, 3, 6, 6], (Kind::Float, Device::Cpu)),
            targets: Tensor::from_slice(&[0i64, 1, 1, 0, 1, 0, 0, 1]),
        };
        let outputs = tch::no_grad(|| net.forward(&batch.inputs)).unwrap();
        let predicted = fc.refiner.forward(&outputs.features).argmax(-1, false);
        let hits = predicted.eq_tensor(&batch.targets).sum(Kind::Int64);
        let expected = 100.0 * hits.int64_value(&[]) as f64 / 8.0;
        let got = evaluate(&mut metric, &[(batch, outputs)]);
        assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    }

    #[test]
    fn without_the_distiller_the_metric_says_to_add_it() {
        let err = RefinerAccuracy::new(no_config(), host()).err().unwrap();
        assert_eq!(err.key.as_deref(), Some("use"));
        assert!(err.message.contains("[[distillers]]"), "{}", err.message);
        assert!(
            err.message.contains("use = \"fc_augment\""),
            "{}",
            err.message
        );

        // A distiller that is gone (an earlier run's) does not count.
        drop(FcAugment::new(FcAugmentConfig::default(), host()).unwrap());
        assert!(RefinerAccuracy::new(no_config(), host()).is_err());
    }

    #[test]
    fn two_refiners_are_refused() {
        let _a = FcAugment::new(FcAugmentConfig::default(), host()).unwrap();
        let _b = FcAugment::new(FcAugmentConfig::default(), host()).unwrap();
        let err = RefinerAccuracy::new(no_config(), host()).err().unwrap();
        assert!(
            err.message.contains("2 fc_augment distillers"),
            "{}",
            err.message
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = trellis_sdk::parse_config::<RefinerAccuracyConfig>("top_k = [1]").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("top_k"));
    }
}
