//! GroupNorm's forward pass, computed so that CPU backends stay on their fast paths, and
//! LayerNorm's in f32 for half-precision inputs.
//!
//! burn's own `GroupNorm::forward` ends with `x * γ[1, C, 1, 1] + β[1, C, 1, 1]`: a broadcast
//! that burn-flex has no vectorised kernel for (the batch axis is broadcast *and* the channel
//! axis is not), so it walks the whole activation element by element, forward and backward;
//! in the toy UNet's training step that was the largest single cost after GEMM. Here the
//! per-group statistics and the affine parameters are first folded into one per-(sample,
//! channel) scale `[B, C, 1]` (a tiny tensor, materialised), and the activation sees two
//! row-broadcast passes (`(x − μ) · scale + β`), which every backend vectorises. Same
//! parameters, same keys, same result up to rounding. f16 and bf16 are normalised in f32, as
//! PyTorch's autocast does.

use burn::module::Param;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

/// `norm.forward(x)` for `x` of shape `[B, C, …]` (rank ≥ 3), with the same parameters and
/// result as burn's `GroupNorm::forward`.
///
/// f16 and bf16 inputs are normalised in f32 and the result cast back, as PyTorch's autocast
/// runs `group_norm`: in f16 a centred value above 256 squares past 65504 (the group's 1/σ
/// becomes 0), and the backward pass sums products over whole feature maps.
///
/// # Panics
/// If `x`'s channel count is not `norm.num_channels` (a model-construction bug, as in burn).
pub fn group_norm<B: Backend, const D: usize>(norm: &GroupNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        dtype @ (DType::F16 | DType::BF16) => normalize(norm, x.cast(FloatDType::F32), true).cast(dtype),
        _ => normalize(norm, x, false),
    }
}

/// The normalisation itself; `widen` casts γ and β to f32 to meet a widened `x`.
fn normalize<B: Backend, const D: usize>(norm: &GroupNorm<B>, x: Tensor<B, D>, widen: bool) -> Tensor<B, D> {
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
    let param = |p: &Param<Tensor<B, 1>>| {
        let t = p.val().reshape([1, channels, 1]).repeat_dim(0, batch);
        if widen {
            t.cast(FloatDType::F32)
        } else {
            t
        }
    };
    let out = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) if norm.affine => {
            scale = scale * param(gamma);
            centered * scale + param(beta)
        }
        _ => centered * scale,
    };
    out.reshape(shape)
}

/// `norm.forward(x)`, with f16 and bf16 normalised in f32 and cast back, as for
/// [`group_norm`]: burn's `LayerNorm` takes the variance in the tensor's own dtype, and in f16 a
/// token whose centred values pass 256 came out wrong (`examples/check_ops.rs`).
pub fn layer_norm<B: Backend, const D: usize>(norm: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype @ (DType::F16 | DType::BF16) = x.dtype() else {
        return norm.forward(x);
    };
    // γ and β cast in the graph, so their gradients reach `norm`'s own parameters; the clone
    // only carries over the private epsilon.
    let widen = |p: &Param<Tensor<B, 1>>| Param::initialized(p.id, p.val().cast(FloatDType::F32));
    let mut wide = norm.clone();
    wide.gamma = widen(&norm.gamma);
    wide.beta = norm.beta.as_ref().map(widen);
    wide.forward(x.cast(FloatDType::F32)).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rel_err, TestAutodiffBackend as B, TestBackend};
    use burn::backend::autodiff::grads::Gradients;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{DType, Distribution, FloatDType, TensorData};

    /// `norm` on seeded N(0, 300²) data (squares past f16's 65504) in f16 and in f32, with a
    /// N(0, 1) cotangent: the relative differences of the output, of the input's gradient, and
    /// of the gradient `param` reads (a module parameter's), each f16 against f32.
    fn half_against_full<const D: usize>(
        shape: [usize; D],
        norm: impl Fn(Tensor<B, D>) -> Tensor<B, D>,
        param: impl Fn(&Gradients) -> Option<Tensor<TestBackend, 1>>,
    ) -> [f64; 3] {
        let device = Default::default();
        let data = Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 300.0), &device).into_data();
        let w = Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 1.0), &device).into_data();
        let run = |dtype: DType| {
            let x = Tensor::<B, D>::from_data(data.clone(), (&device, dtype)).require_grad();
            let out = norm(x.clone());
            let grads = (out.clone() * Tensor::from_data(w.clone(), (&device, dtype)))
                .sum()
                .backward();
            let host = |t: Tensor<TestBackend, D>| t.cast(FloatDType::F32).into_data();
            let param = param(&grads).map_or(TensorData::from([0.0f32]), |g| g.cast(FloatDType::F32).into_data());
            [host(out.inner()), host(x.grad(&grads).unwrap()), param]
        };
        let (full, half) = (run(DType::F32), run(DType::F16));
        [0, 1, 2].map(|i| rel_err(&half[i], &full[i]) as f64)
    }

    /// f16 is normalised in f32: the output and the input's gradient stay within f16 rounding
    /// of f32's, where f16 statistics gave an output of zeros and a NaN gradient.
    #[test]
    fn half_precision_group_norm_in_f32() {
        let norm = GroupNormConfig::new(4, 8)
            .with_affine(false)
            .init::<B>(&Default::default());
        let [out, grad, _] = half_against_full([2, 8, 6, 6], |x| group_norm(&norm, x), |_| None);
        assert!(out < 2e-3 && grad < 5e-3, "output {out}, gradient {grad}");
    }

    /// The same for LayerNorm, whose γ's gradient must reach the module's own parameter.
    #[test]
    fn half_precision_layer_norm_in_f32() {
        let norm = burn::nn::LayerNormConfig::new(64).init::<B>(&Default::default());
        let gamma = |g: &Gradients| norm.gamma.val().grad(g);
        let [out, grad, gamma] = half_against_full([2, 5, 64], |x| layer_norm(&norm, x), gamma);
        assert!(
            out < 2e-3 && grad < 5e-3 && gamma < 5e-3,
            "output {out}, gradient {grad}, γ {gamma}"
        );
    }

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
