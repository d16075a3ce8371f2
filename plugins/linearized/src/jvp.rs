//! The two ways of computing J(θ0)·(θ − θ0) for a forward pass of the base model.
//!
//! Both return, for every output y of the base (logits, features, feature map), the pair
//! (y(θ0), J_y(θ0)·v) with v = θ − θ0, and both keep J·v differentiable in θ so that one ordinary
//! backward gives the gradient of the loss, J(θ0)ᵀ·∂L/∂f_lin.

use tch::Tensor;
use trellis_sdk::Result;

use crate::forward_ad::DualLevel;

/// The base's parameters at θ0 and the trainable θ, pairwise.
pub struct Expansion<'a> {
    pub theta0: &'a [Tensor],
    pub theta: &'a [Tensor],
}

impl Expansion<'_> {
    fn directions(&self) -> Vec<Tensor> {
        self.theta
            .iter()
            .zip(self.theta0)
            .map(|(theta, theta0)| theta - theta0)
            .collect()
    }
}

/// Forward-mode AD: θ − θ0 is attached as each base parameter's tangent for one forward pass;
/// the outputs' tangents are J·v. Costs about one forward pass more than f.
pub fn dual(
    expansion: &Expansion<'_>,
    forward: impl FnOnce() -> Result<Vec<Tensor>>,
) -> Result<Vec<(Tensor, Tensor)>> {
    let level = DualLevel::enter()?;
    for (theta0, direction) in expansion.theta0.iter().zip(expansion.directions()) {
        level.set_tangent(theta0, &direction)?;
    }
    let outputs = forward()?;
    outputs.iter().map(|y| level.unpack(y)).collect()
    // Leaving the level (dropping `level`) clears the parameters' tangents.
}

/// The double-vjp trick, for when forward mode is unavailable: with u a dummy cotangent,
/// g(u) = J(θ0)ᵀu is linear in u, so ∂/∂u ⟨g(u), v⟩ = J(θ0)·v. Two backward passes with
/// `create_graph`, so it costs more than [`dual`].
///
/// The base's parameters must require grad while `forward` runs (the caller switches them); the
/// gradients this leaves on them are the caller's to clear.
pub fn double_vjp(
    expansion: &Expansion<'_>,
    forward: impl FnOnce() -> Result<Vec<Tensor>>,
) -> Result<Vec<(Tensor, Tensor)>> {
    let outputs = forward()?;
    let cotangents: Vec<Tensor> = outputs
        .iter()
        .map(|y| y.zeros_like().set_requires_grad(true))
        .collect();
    let pairing = outputs
        .iter()
        .zip(&cotangents)
        .map(|(y, u)| (y * u).sum(y.kind()))
        .reduce(|a, b| a + b)
        .expect("the base returns outputs");
    let transposed = Tensor::run_backward(&[pairing], expansion.theta0, true, true);
    let directions = expansion.directions();
    let projected = transposed
        .iter()
        .zip(&directions)
        // A parameter that no output depends on has no gradient: it adds nothing to J·v.
        .filter(|(g, _)| g.defined())
        .map(|(g, v)| (g * v).sum(g.kind()))
        .reduce(|a, b| a + b)
        .ok_or_else(|| {
            trellis_sdk::Error::msg("no output of the base depends on its parameters")
        })?;
    let tangents = Tensor::run_backward(&[projected], &cotangents, true, true);
    Ok(outputs
        .into_iter()
        .zip(tangents)
        .map(|(y, tangent)| {
            let tangent = if tangent.defined() {
                tangent
            } else {
                y.zeros_like()
            };
            (y, tangent)
        })
        .collect())
}
