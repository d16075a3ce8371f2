//! Linearized networks (Ortiz-Jiménez et al., NeurIPS 2021), METHODS.md section 8.
//!
//!   f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0)·(θ − θ0)
//!
//! `[model] use = "linearized"` wraps any model (`base = { arch = "resnet18", ... }`, built-in or
//! a plugin's) and linearises it in **every** parameter: conv and dense kernels, biases,
//! BatchNorm scale and shift. The base stays in evaluation mode, so BatchNorm normalises with
//! its statistics at θ0 and never updates them (on a fresh network: mean 0, variance 1).
//!
//! - θ0 is the base at initialisation (`at = "init"`, the default) or the weights of an earlier
//!   run (`checkpoint = "run/model.safetensors"`, relative to the config).
//! - θ, the trainable parameters, start at θ0 (so f_lin(θ0) = f(θ0) exactly) and carry the
//!   base's names, modules and layer kinds: pruners, TempBalance and `model.safetensors` see the
//!   base's layers. θ0 is saved with the buffers (`theta0.<name>`), so a resumed run expands
//!   around the same point.
//! - The JVP J(θ0)·(θ − θ0) is forward-mode AD by default (`jvp = "dual"`: a dual level, θ − θ0
//!   as each base parameter's tangent, one forward pass); `jvp = "double_vjp"` needs no forward
//!   mode (two backward passes with `create_graph`). Both are differentiable in θ, so the
//!   training loop's ordinary backward gives J(θ0)ᵀ·∂L/∂f_lin.
//! - The pooled features are linearised as well. The classifier head alone is not offered: the
//!   linearised head depends on f's features at θ0, not only on the features it is given.

mod forward_ad;
mod jvp;
mod linearized;

pub use linearized::{Jvp, Linearized, LinearizedConfig};

trellis_sdk::export_plugin!(trellis_sdk::Plugin::new(
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_VERSION"),
    "f_lin: a model's first-order Taylor expansion around θ0"
)
.model::<Linearized>());
