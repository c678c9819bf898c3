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

/// `1 / (1 + e^(−x))` in the tensor's precision.
pub fn sigmoid_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.neg().exp().add_scalar(1.0).recip()
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
