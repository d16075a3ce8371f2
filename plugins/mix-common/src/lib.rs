//! What the mixing callbacks (`mixup`, `cutmix`) share: the keyed generator their draws come
//! from, targets as per-class probabilities, and mixing along the batch. A library, not a plugin:
//! linking one plugin crate into another would export its plugin symbols twice.

use tch::{Kind, Tensor};
use trellis_sdk::{bail, Error, Result};

pub mod rng;

/// Targets as per-class probabilities `[B, classes]`: one-hot rows for class indices, soft
/// targets as they are.
pub fn soft_targets(targets: &Tensor, classes: i64) -> Result<Tensor> {
    match targets.dim() {
        1 => Ok(targets.f_one_hot(classes)?.to_kind(Kind::Float)),
        2 if targets.is_floating_point() => {
            let width = targets.size()[1];
            if width != classes {
                bail!("soft targets have {width} columns but the run has {classes} classes");
            }
            Ok(targets.shallow_clone())
        }
        _ => bail!(
            "targets must be class indices [B] or float probabilities [B, classes], got {:?} {:?}",
            targets.kind(),
            targets.size()
        ),
    }
}

/// λ·t + (1 − λ)·t[π] along the batch dimension.
pub fn mix(t: &Tensor, lam: f64, perm: &Tensor) -> Result<Tensor> {
    Ok(t * lam + t.f_index_select(0, perm)? * (1.0 - lam))
}

/// A config value that must be a probability, refused at its key otherwise.
pub fn check_probability(key: &str, value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        return Err(Error::config(
            key,
            format!("{key} must be in [0, 1], got {value}"),
        ));
    }
    Ok(())
}
