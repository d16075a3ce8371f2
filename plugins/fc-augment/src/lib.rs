//! `fc_augment`: FC augmentation for low-data regimes (Kocsis et al. NeurIPS 2022, "Feature
//! Refiner"), METHODS.md section 7.
//!
//! A branch FR on the backbone's pooled features φ ([`FeatureRefiner`]):
//!
//!   Linear(feat→d) → LayerNorm(d) → [Linear(d→d) → ReLU] × n_inner → Linear(d→d) → LayerNorm(d)
//!   → Linear(d→C)
//!
//! and the model's own head W behind a gradient gate of factor m (identity forward, gradient × m
//! backward; m = 0: the backbone learns only through FR, while W still learns to read φ). The
//! loss is L = CE(FR(φ), y) + CE(W·gate_m(φ), y), both weight 1, no KL term, and it replaces the
//! host's cross-entropy.
//!
//! FR's parameters go to the host as the distiller's trainable parameters: the run's optimizer
//! trains them and the run's checkpoint keeps them for resuming, but they are not part of the
//! model, so the exported `model.safetensors` has the original architecture, and evaluation
//! (backbone + W) never sees FR.
//!
//! Components:
//! - `fc_augment` ([`FcAugment`], distiller): the branch, the gate and the loss.
//! - `refiner_accuracy` ([`RefinerAccuracy`], metric): `refiner_top1`, the top-1 accuracy in
//!   percent of FR(φ) on the evaluated images, beside the deployed head's `top1`; it needs the
//!   `fc_augment` distiller in the same run (`[[distillers]]` with `use = "fc_augment"`).

mod distiller;
mod metric;
mod refiner;

pub use distiller::{gradient_gate, FcAugment, FcAugmentConfig};
pub use metric::{RefinerAccuracy, RefinerAccuracyConfig};
pub use refiner::FeatureRefiner;

use trellis_sdk::Plugin;

trellis_sdk::export_plugin!(Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "FC augmentation: Feature-Refiner branch and gradient gate for low-data training, and the \
     refiner head's accuracy"
)
.distiller::<FcAugment>()
.metric::<RefinerAccuracy>());
