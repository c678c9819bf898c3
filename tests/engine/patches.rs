//! The vendored burn crates' numerical patches (vendor/README.md), checked where the engine
//! depends on them: f64 gradients must be exact to rounding, and burn-flex's vectorised f32
//! functions as accurate as libm's, to an ulp or two.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{to_vec, Ad};

#[test]
fn div_scalar_gradients_are_exact_in_f64() {
    // d(x / 3)/dx = 1/3; 0.21.0 returned 1 / (3 as f32), 1.5e-8 off in relative terms. The
    // event time's implicit-function term divides by ġ this way.
    let device = Default::default();
    for divisor in [3.0, 0.1, -7.3, 1e-5] {
        let x = Tensor::<Ad, 1>::from_data(TensorData::from([1.5f64, -2.0]), &device).require_grad();
        let grads = x.clone().div_scalar(divisor).sum().backward();
        for g in to_vec(x.grad(&grads).unwrap()) {
            let want = 1.0 / divisor;
            assert!(
                (g - want).abs() <= 2.0 * f64::EPSILON * want.abs(),
                "÷{divisor}: {g} vs {want}"
            );
        }
    }
}

/// Distance in units in the last place between two finite f32 of the same sign (or zeros).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let bits = x.to_bits() as i64;
        if bits < 0 {
            i64::from(i32::MIN) - bits
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

#[test]
fn flex_f32_exp_tanh_sigmoid_are_accurate() {
    // The vendored burn-flex computes these with branch-free polynomials that vectorise
    // (vendor/README.md); compare with f64 libm, rounded, over a sweep of every f32 magnitude.
    type F = burn::backend::Flex;
    let device = Default::default();
    let mut xs: Vec<f32> = (0..u32::MAX / 997)
        .map(|i| f32::from_bits(i * 997))
        .filter(|x| x.is_finite())
        .collect();
    xs.extend([0.0, -0.0, 0.5, -0.5, 88.72, 88.73, -87.3, -103.9, -104.0, 1e-30, -1e-30]);
    let n = xs.len();
    let input = Tensor::<F, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    let values = |t: Tensor<F, 1>| t.into_data().to_vec::<f32>().unwrap();
    type Case = (&'static str, Vec<f32>, fn(f64) -> f64);
    let cases: [Case; 3] = [
        ("exp", values(input.clone().exp()), f64::exp),
        ("tanh", values(input.clone().tanh()), f64::tanh),
        ("sigmoid", values(burn::tensor::activation::sigmoid(input)), |x| {
            1.0 / (1.0 + (-x).exp())
        }),
    ];
    for (name, got, reference) in cases {
        let mut worst = (0, 0.0f32);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = reference(f64::from(x)) as f32;
            assert!(y.is_finite() == want.is_finite(), "{name}({x}) = {y}, want {want}");
            let d = if want.is_finite() {
                ulps(y, want)
            } else {
                u32::from(y != want)
            };
            if d > worst.0 {
                worst = (d, x);
            }
        }
        // Measured: 1, 2, 2 (libm's own expf: ≤ 1).
        let bound = if name == "exp" { 1 } else { 2 };
        assert!(worst.0 <= bound, "{name}: {} ulp at x = {:e}", worst.0, worst.1);
    }
    // NaN stays NaN; the infinities give the limits.
    let special = Tensor::<F, 1>::from_data(
        TensorData::new(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY], [3]),
        &device,
    );
    let exp = values(special.clone().exp());
    let tanh = values(special.clone().tanh());
    let sigmoid = values(burn::tensor::activation::sigmoid(special));
    for (name, got, want) in [
        ("exp", exp, [f32::INFINITY, 0.0]),
        ("tanh", tanh, [1.0, -1.0]),
        ("sigmoid", sigmoid, [1.0, 0.0]),
    ] {
        assert!(got[0].is_nan(), "{name}(NaN) = {}", got[0]);
        assert_eq!(got[1..], want, "{name}(±∞)");
    }
}
