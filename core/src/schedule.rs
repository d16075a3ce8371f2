//! The global learning-rate schedule (`[schedule]`). A Scheduler component (TempBalance) may
//! turn the rate it gives into per-group rates.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    /// ½(1 + cos(π t / T)) from the base rate down to `min_lr`.
    Cosine,
    /// × gamma at each milestone epoch.
    Step,
    /// Linear decay to 0 at the end of training.
    Linear,
}

/// Whether the rate changes once per epoch (PyTorch's usual `scheduler.step()` per epoch) or at
/// every optimizer step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Epoch,
    Step,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Default: per step for `linear`, per epoch otherwise.
    pub per: Option<Granularity>,
    /// Epochs at which `step` multiplies the rate by `gamma`.
    pub milestones: Vec<usize>,
    pub gamma: f64,
    /// Cosine's floor.
    pub min_lr: f64,
    /// Linear warm-up from 0 over this many epochs, per step.
    pub warmup_epochs: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Constant,
            per: None,
            milestones: Vec::new(),
            gamma: 0.1,
            min_lr: 0.0,
            warmup_epochs: 0,
        }
    }
}

impl ScheduleConfig {
    pub fn granularity(&self) -> Granularity {
        self.per.unwrap_or(match self.kind {
            ScheduleKind::Linear => Granularity::Step,
            _ => Granularity::Epoch,
        })
    }

    /// Checks the table; on error gives the offending key and a message.
    pub fn validate(&self, epochs: usize) -> Result<(), (&'static str, String)> {
        if self.kind == ScheduleKind::Step && self.milestones.is_empty() {
            return Err((
                "kind",
                "kind = \"step\" needs milestones = [epoch, ...]".into(),
            ));
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(("milestones", "milestones must be increasing epochs".into()));
        }
        if !(self.gamma > 0.0 && self.gamma.is_finite()) {
            return Err(("gamma", "gamma must be a positive number".into()));
        }
        if !(self.min_lr >= 0.0 && self.min_lr.is_finite()) {
            return Err(("min_lr", "min_lr must be >= 0".into()));
        }
        if self.warmup_epochs > epochs {
            return Err((
                "warmup_epochs",
                format!(
                    "warmup_epochs ({}) exceeds train.epochs ({epochs})",
                    self.warmup_epochs
                ),
            ));
        }
        Ok(())
    }

    /// The rate before the optimizer step that follows `step` completed steps, during epoch
    /// `epoch` (0-based) of `epochs` with `steps_per_epoch` steps each.
    pub fn rate(&self, base: f64, step: u64, steps_per_epoch: u64, epochs: usize) -> f64 {
        let steps_per_epoch = steps_per_epoch.max(1);
        let epoch = step / steps_per_epoch;
        let t = match self.granularity() {
            Granularity::Epoch => epoch as f64,
            Granularity::Step => step as f64 / steps_per_epoch as f64,
        };
        let total = epochs as f64;
        let scheduled = match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Cosine => {
                self.min_lr
                    + (base - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t / total).cos())
            }
            ScheduleKind::Step => {
                let passed = self
                    .milestones
                    .iter()
                    .filter(|&&m| m as u64 <= epoch)
                    .count();
                base * self.gamma.powi(passed as i32)
            }
            ScheduleKind::Linear => base * (1.0 - t / total).max(0.0),
        };
        let warmup_steps = self.warmup_epochs as u64 * steps_per_epoch;
        if step < warmup_steps {
            scheduled * (step + 1) as f64 / warmup_steps as f64
        } else {
            scheduled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn cosine_per_epoch_matches_pytorch_cosine_annealing() {
        let s = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            ..Default::default()
        };
        // CosineAnnealingLR(T_max=4) stepped per epoch: 0.1, 0.0854, 0.05, 0.0146.
        let rates: Vec<f64> = (0..4).map(|e| s.rate(0.1, e * 10 + 3, 10, 4)).collect();
        assert!(close(rates[0], 0.1));
        assert!(close(
            rates[1],
            0.05 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(rates[2], 0.05));
    }

    #[test]
    fn step_and_linear_and_warmup() {
        let s = ScheduleConfig {
            kind: ScheduleKind::Step,
            milestones: vec![2, 3],
            ..Default::default()
        };
        assert!(close(s.rate(1.0, 19, 10, 4), 1.0));
        assert!(close(s.rate(1.0, 20, 10, 4), 0.1));
        assert!(close(s.rate(1.0, 35, 10, 4), 0.01));
        let l = ScheduleConfig {
            kind: ScheduleKind::Linear,
            ..Default::default()
        };
        assert!(close(l.rate(0.05, 0, 10, 2), 0.05));
        assert!(close(l.rate(0.05, 10, 10, 2), 0.025));
        assert!(close(l.rate(0.05, 15, 10, 2), 0.0125));
        let w = ScheduleConfig {
            warmup_epochs: 1,
            ..Default::default()
        };
        assert!(close(w.rate(1.0, 0, 4, 2), 0.25));
        assert!(close(w.rate(1.0, 3, 4, 2), 1.0));
        assert!(close(w.rate(1.0, 4, 4, 2), 1.0));
    }

    #[test]
    fn validation_names_the_key() {
        let s = ScheduleConfig {
            kind: ScheduleKind::Step,
            ..Default::default()
        };
        assert_eq!(s.validate(10).unwrap_err().0, "kind");
    }
}
