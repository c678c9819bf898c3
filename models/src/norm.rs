//! GroupNorm's forward pass, computed so that CPU backends stay on their fast paths.
//!
//! burn's own `GroupNorm::forward` ends with `x * γ[1, C, 1, 1] + β[1, C, 1, 1]`: a broadcast
//! that burn-flex has no vectorised kernel for (the batch axis is broadcast *and* the channel
//! axis is not), so it walks the whole activation element by element, forward and backward;
//! in the toy UNet's training step that was the largest single cost after GEMM. Here the
//! per-group statistics and the affine parameters are first folded into one per-(sample,
//! channel) scale `[B, C, 1]` (a tiny tensor, materialised), and the activation sees two
//! row-broadcast passes (`(x − μ) · scale + β`), which every backend vectorises. Same
//! parameters, same keys, same result up to rounding.

use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `norm.forward(x)` for `x` of shape `[B, C, …]` (rank ≥ 3), with the same parameters and
/// result as burn's `GroupNorm::forward`.
///
/// # Panics
/// If `x`'s channel count is not `norm.num_channels` (a model-construction bug, as in burn).
pub fn group_norm<B: Backend, const D: usize>(norm: &GroupNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let shape = x.shape();
    let dims = shape.dims::<D>();
    let (batch, channels, groups) = (dims[0], dims[1], norm.num_groups);
    assert_eq!(
        channels, norm.num_channels,
        "GroupNorm over {} channels applied to {channels}",
        norm.num_channels
    );
    let spatial: usize = dims[2..].iter().product();
    let per_group = channels / groups * spatial;

    let grouped = x.reshape([batch, groups, per_group]);
    let centered = grouped.clone() - grouped.mean_dim(2);
    let inv_std = centered
        .clone()
        .square()
        .mean_dim(2)
        .add_scalar(norm.epsilon)
        .sqrt()
        .recip();
    // [B, G, 1] → [B, C, 1]: each group's factor repeated over its channels.
    let mut scale = inv_std.repeat_dim(2, channels / groups).reshape([batch, channels, 1]);
    let centered = centered.reshape([batch, channels, spatial]);
    let out = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) if norm.affine => {
            scale = scale * gamma.val().reshape([1, channels, 1]).repeat_dim(0, batch);
            centered * scale + beta.val().reshape([1, channels, 1]).repeat_dim(0, batch)
        }
        _ => centered * scale,
    };
    out.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rel_err, TestAutodiffBackend as B};
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    /// Same values and the same gradients (input, γ, β) as burn's GroupNorm, affine or not.
    #[test]
    fn matches_burn_group_norm() {
        let device = Default::default();
        for affine in [true, false] {
            let mut norm = GroupNormConfig::new(4, 8).with_affine(affine).init::<B>(&device);
            if affine {
                // Non-trivial γ, β so a wrong broadcast shows.
                norm.gamma = norm
                    .gamma
                    .map(|g| g.map(|t| t.random_like(Distribution::Normal(1.0, 0.5)).require_grad()));
                norm.beta = norm
                    .beta
                    .map(|b| b.map(|t| t.random_like(Distribution::Normal(0.0, 0.5)).require_grad()));
            }
            let x = Tensor::<B, 4>::random([3, 8, 5, 6], Distribution::Normal(0.3, 2.0), &device).require_grad();
            let w = Tensor::<B, 4>::random([3, 8, 5, 6], Distribution::Normal(0.0, 1.0), &device);
            let ours = group_norm(&norm, x.clone());
            let theirs = norm.forward(x.clone());
            assert!(rel_err(&ours.clone().into_data(), &theirs.clone().into_data()) < 1e-5);

            let g_ours = (ours * w.clone()).sum().backward();
            let g_theirs = (theirs * w).sum().backward();
            assert!(
                rel_err(
                    &x.grad(&g_ours).unwrap().into_data(),
                    &x.grad(&g_theirs).unwrap().into_data()
                ) < 1e-4
            );
            if affine {
                for p in [norm.gamma.as_ref().unwrap(), norm.beta.as_ref().unwrap()] {
                    let (a, b) = (p.val().grad(&g_ours).unwrap(), p.val().grad(&g_theirs).unwrap());
                    assert!(rel_err(&a.into_data(), &b.into_data()) < 1e-4);
                }
            }
        }
    }
}
