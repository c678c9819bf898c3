//! Activations written as tensor ops so that forward and derivative are exact in the tensor's
//! own precision on every backend. burn 0.21's defaults fall short in two ways that gradient
//! checks see: `gelu_backward` differentiates the tanh approximation of an erf forward (ndarray,
//! CUDA), and `sigmoid` (hence `silu`) is computed in f32 even for f64 tensors (ndarray); flex
//! overrides both.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The exact (erf) GELU, `x · (1 + erf(x/√2)) / 2`, composed from tensor ops so that its
/// gradient is exact on every backend: burn 0.21's default `gelu_backward`, which the ndarray and
/// CUDA backends use, differentiates the tanh approximation instead of the erf GELU that its
/// forward computes (about 1e-3 relative error per activation); only flex overrides it.
pub fn gelu_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x
        .clone()
        .div_scalar(core::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
}

/// `1 / (1 + e^(−x))` in the tensor's precision, from `e^(−|x|)`, which cannot overflow.
///
/// Written as `recip(1 + exp(−x))`, `e^(−x)` overflows for x < −88 in f32 (−11 in f16, where
/// UNet activations go) and the gradient is then `−0 · ∞` = NaN. Here σ(x) is σ(|x|) for x ≥ 0
/// and `e^(−|x|) σ(|x|)` below, accurate to the last bit either way. `|x|` is a select rather than
/// `abs`, whose derivative at 0 is 0 in burn, so σ'(0) = 1/4 exactly.
pub fn sigmoid_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let negative = x.clone().lower_elem(0.0);
    let magnitude = x.clone().mask_where(negative.clone(), x.neg());
    let decay = magnitude.neg().exp();
    let upper = decay.clone().add_scalar(1.0).recip();
    upper.clone().mask_where(negative, decay * upper)
}

/// SiLU (swish), `x · σ(x)`, in the tensor's precision.
pub fn silu_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid_exact(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, TensorData};

    use crate::testing::TestBackend as B;

    #[test]
    fn activations_match_their_formulas_in_f64() {
        let device = Default::default();
        let xs: [f64; 8] = [-30.0, -3.0, -0.5, 0.0, 1e-3, 0.7, 4.0, 30.0];
        // An f64 tensor on the crate's test backend (one backend per test binary: burn keeps one
        // default float type per device).
        let x = Tensor::<B, 1>::from_data(TensorData::from(xs), (&device, DType::F64));
        let got = |t: Tensor<B, 1>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap();
        let sig = got(sigmoid_exact(x.clone()));
        let silu = got(silu_exact(x.clone()));
        let gelu = got(gelu_exact(x));
        for (i, &v) in xs.iter().enumerate() {
            let s = 1.0 / (1.0 + (-v).exp());
            assert!((sig[i] - s).abs() <= 1e-15 * s.max(1e-300), "sigmoid({v})");
            assert!(
                (silu[i] - v * s).abs() <= 1e-15 * (v * s).abs().max(1e-300),
                "silu({v})"
            );
            // 1 + erf cancels for negative x, hence 1e-12 rather than 1e-15.
            let g = 0.5 * v * (1.0 + erf_series(v / std::f64::consts::SQRT_2));
            assert!(
                (gelu[i] - g).abs() <= 1e-12 * g.abs().max(1e-12),
                "gelu({v}) {} vs {g}",
                gelu[i]
            );
        }
    }

    /// σ' = σ(1 − σ) and SiLU' = σ + x σ(1 − σ), finite where e^(−x) overflows: x = −100 in f32,
    /// −800 in f64 (the former `recip(1 + exp(−x))` gave NaN there), and exact at 0.
    #[test]
    fn activation_gradients_stay_finite_where_exp_overflows() {
        use crate::testing::TestAutodiffBackend as AD;
        let device = Default::default();
        // Relative tolerance, and an absolute floor at the smallest normal number (f32's
        // subnormals keep few digits).
        for (dtype, xs, tol, floor) in [
            (
                DType::F64,
                vec![-800.0f64, -100.0, -30.0, -0.5, 0.0, 0.7, 30.0, 800.0],
                1e-15,
                f64::MIN_POSITIVE,
            ),
            (
                DType::F32,
                vec![-100.0, -20.0, -0.5, 0.0, 0.7, 20.0, 100.0],
                1e-6,
                f32::MIN_POSITIVE as f64,
            ),
        ] {
            let x = Tensor::<AD, 1>::from_data(TensorData::from(xs.as_slice()), (&device, dtype)).require_grad();
            let grads = (sigmoid_exact(x.clone()) + silu_exact(x.clone())).sum().backward();
            let g: Vec<f64> = x.grad(&grads).unwrap().into_data().convert::<f64>().to_vec().unwrap();
            for (&v, &got) in xs.iter().zip(&g) {
                // σ without overflow, in f64; σ(1 − σ) as σ(v) σ(−v), without cancellation.
                let sig = |v: f64| {
                    if v >= 0.0 {
                        1.0 / (1.0 + (-v).exp())
                    } else {
                        v.exp() / (1.0 + v.exp())
                    }
                };
                let slope = sig(v) * sig(-v);
                let want = slope + sig(v) + v * slope;
                assert!(
                    got.is_finite() && (got - want).abs() <= tol * want.abs() + floor,
                    "{dtype:?} x = {v}: {got} vs {want}"
                );
            }
        }
    }

    /// erf by its Maclaurin series (|x| ≤ 6; ±1 beyond, where it is 1 to 1e-17).
    fn erf_series(x: f64) -> f64 {
        if x.abs() > 6.0 {
            return x.signum();
        }
        // Σ (−1)^n x^(2n+1) / (n! (2n+1)) · 2/√π
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
