//! The vendored burn-autodiff's numerical patches (vendor/README.md), checked where the engine
//! depends on them: f64 gradients must be exact to rounding.

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
