//! `kd`: knowledge distillation from a trained teacher (Hinton et al.; RepDistiller `DistillKL`),
//! METHODS.md section 6.
//!
//!   L = γ·CE(z_s, y) + α·T²·KL( softmax(z_t/T) ‖ softmax(z_s/T) )
//!
//! with the KL divergence summed over classes and averaged over the batch ("batchmean"). The
//! distiller supplies the whole loss, the γ·CE term included, so it replaces the host's own
//! cross-entropy. T² stays whatever α is: torchdistill's KDLoss drops it when α = 0, which
//! changes the scale of the loss behind the user's back.
//!
//! The teacher is any model Trellis builds, loaded from the `model.safetensors` a previous
//! `trellis run` wrote. It runs in eval mode (BatchNorm on running statistics) without
//! gradients, and it is not a trainable parameter, so it never reaches the optimizer, the
//! student's checkpoint or the exported model.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};
use trellis_sdk::{Batch, Component, Distiller, Error, Host, Model, Outputs, Plugin, Result};
use trellis_teacher::load_teacher;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KdConfig {
    /// Softmax temperature T of both distributions.
    pub temperature: f64,
    /// Weight γ of the cross-entropy with the labels.
    pub gamma: f64,
    /// Weight α of the T²-scaled KL term.
    pub alpha: f64,
    /// The teacher's weights: the `model.safetensors` of the run that trained it, relative to
    /// the run config.
    pub teacher_checkpoint: PathBuf,
    /// The teacher's architecture, written like the `[model]` table it was trained with, e.g.
    /// `teacher = { arch = "resnet34", width = 0.25 }`.
    pub teacher: toml::Table,
}

impl Default for KdConfig {
    fn default() -> Self {
        // RepDistiller's CIFAR defaults.
        KdConfig {
            temperature: 4.0,
            gamma: 0.1,
            alpha: 0.9,
            teacher_checkpoint: PathBuf::new(),
            teacher: toml::Table::new(),
        }
    }
}

/// The weights of the two loss terms and the temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdWeights {
    pub temperature: f64,
    pub gamma: f64,
    pub alpha: f64,
}

/// The two terms of the KD loss, named as they appear in logs: `kd_ce` = γ·CE(z_s, y) and
/// `kd_kl` = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) with "batchmean" reduction.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    targets: &Tensor,
    w: KdWeights,
) -> Result<Vec<(String, Tensor)>> {
    let t = w.temperature;
    let batch = student_logits.size()[0].max(1) as f64;
    let ce =
        student_logits.f_cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, 0.0)?;
    let kind = student_logits.kind();
    let log_p_student = (student_logits / t).f_log_softmax(-1, kind)?;
    // Teacher log-probabilities from log_softmax rather than log(softmax): a class whose
    // probability underflows to 0 then contributes exactly 0, not 0·(−∞) = NaN.
    let log_p_teacher = (teacher_logits / t).f_log_softmax(-1, kind)?;
    let kl = (log_p_teacher.exp() * (&log_p_teacher - &log_p_student)).sum(kind) / batch;
    Ok(vec![
        ("kd_ce".to_string(), ce * w.gamma),
        ("kd_kl".to_string(), kl * (w.alpha * t * t)),
    ])
}

pub struct Kd {
    teacher: Model,
    weights: KdWeights,
}

fn check_weight(key: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(Error::config(
            key,
            format!("{key} must be a finite number >= 0, got {value}"),
        ));
    }
    Ok(())
}

impl Component for Kd {
    const NAME: &'static str = "kd";
    const DESCRIPTION: &'static str =
        "knowledge distillation: γ·CE + α·T²·KL(teacher ‖ student) at temperature T";
    type Config = KdConfig;

    fn new(config: KdConfig, host: Host) -> Result<Self> {
        if !(config.temperature.is_finite() && config.temperature > 0.0) {
            return Err(Error::config(
                "temperature",
                format!("temperature must be > 0, got {}", config.temperature),
            ));
        }
        check_weight("gamma", config.gamma)?;
        check_weight("alpha", config.alpha)?;
        let teacher = load_teacher(
            &host,
            Self::NAME,
            &config.teacher,
            &config.teacher_checkpoint,
        )?;
        Ok(Kd {
            teacher,
            weights: KdWeights {
                temperature: config.temperature,
                gamma: config.gamma,
                alpha: config.alpha,
            },
        })
    }
}

impl Distiller for Kd {
    fn replaces_task_loss(&self) -> Result<bool> {
        Ok(true)
    }

    fn loss(&mut self, batch: &Batch, outputs: &Outputs) -> Result<Vec<(String, Tensor)>> {
        let teacher = tch::no_grad(|| self.teacher.forward(&batch.inputs))?;
        kd_loss(
            &outputs.logits,
            &teacher.logits,
            &batch.targets,
            self.weights,
        )
    }
}

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "knowledge distillation from a trained teacher"
)
.distiller::<Kd>());

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(z: &[f64], t: f64) -> Vec<f64> {
        let max = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| ((v - max) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    const STUDENT: [[f64; 3]; 2] = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]];
    const TEACHER: [[f64; 3]; 2] = [[3.0, 0.5, -1.0], [0.0, 1.0, 4.0]];
    const TARGETS: [i64; 2] = [0, 2];

    fn tensors() -> (Tensor, Tensor, Tensor) {
        let flat = |m: [[f64; 3]; 2]| {
            let v: Vec<f32> = m.iter().flatten().map(|&x| x as f32).collect();
            Tensor::from_slice(&v).view([2, 3])
        };
        (flat(STUDENT), flat(TEACHER), Tensor::from_slice(&TARGETS))
    }

    fn by_hand(w: KdWeights) -> (f64, f64) {
        let mut ce = 0.0;
        let mut kl = 0.0;
        for i in 0..2 {
            ce -= softmax(&STUDENT[i], 1.0)[TARGETS[i] as usize].ln();
            let p = softmax(&TEACHER[i], w.temperature);
            let q = softmax(&STUDENT[i], w.temperature);
            kl += (0..3).map(|c| p[c] * (p[c] / q[c]).ln()).sum::<f64>();
        }
        let t2 = w.temperature * w.temperature;
        (w.gamma * ce / 2.0, w.alpha * t2 * kl / 2.0)
    }

    fn value(terms: &[(String, Tensor)], name: &str) -> f64 {
        terms
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no term {name}"))
            .1
            .double_value(&[])
    }

    #[test]
    fn kd_loss_matches_the_formula_by_hand_including_t_squared() {
        let (s, t, y) = tensors();
        let w = KdWeights {
            temperature: 4.0,
            gamma: 0.1,
            alpha: 0.9,
        };
        let terms = kd_loss(&s, &t, &y, w).unwrap();
        let (ce, kl) = by_hand(w);
        assert!(kl > 1e-3, "the example must have a visible KL term");
        assert!((value(&terms, "kd_ce") - ce).abs() < 1e-6);
        assert!((value(&terms, "kd_kl") - kl).abs() < 1e-6 * kl.max(1.0));
        // The T² factor is what makes this term comparable across temperatures.
        let w2 = KdWeights {
            temperature: 2.0,
            ..w
        };
        let terms = kd_loss(&s, &t, &y, w2).unwrap();
        assert!((value(&terms, "kd_kl") - by_hand(w2).1).abs() < 1e-6);
    }

    #[test]
    fn kd_loss_is_cross_entropy_when_alpha_is_zero_and_gamma_one() {
        let (s, t, y) = tensors();
        let w = KdWeights {
            temperature: 4.0,
            gamma: 1.0,
            alpha: 0.0,
        };
        let terms = kd_loss(&s, &t, &y, w).unwrap();
        let total: f64 = terms.iter().map(|(_, v)| v.double_value(&[])).sum();
        let ce = s.cross_entropy_for_logits(&y).double_value(&[]);
        assert!((total - ce).abs() < 1e-6);
        assert!((total - by_hand(w).0).abs() < 1e-6);
    }

    #[test]
    fn default_config_lists_every_key() {
        let text = toml::to_string(&KdConfig::default()).unwrap();
        let back: KdConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, KdConfig::default());
        let parsed: KdConfig = toml::from_str(
            "teacher_checkpoint = \"t/model.safetensors\"\nteacher = { arch = \"resnet34\", width = 0.25 }\n",
        )
        .unwrap();
        assert_eq!(parsed.teacher["arch"].as_str(), Some("resnet34"));
        assert_eq!(parsed.temperature, 4.0);
    }
}
