//! A ready-made vector field: dz/dt = MLP(z) (optionally of z³), for benchmarks, the spiral demo
//! and quick experiments. Any other burn module works just as well as dynamics.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::ode::Dynamics;

/// The nonlinearity between layers.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh.
    Tanh,
    /// softplus (β = 1).
    Softplus,
    /// ReLU.
    Relu,
}

/// tanh, as `1 − 2 / (exp(2x) + 1)` on large tensors: built from elementwise ops every backend
/// vectorises (burn-flex 0.21.0 computes `tanh` with a scalar libm call per element, half of
/// P2's run time; the vendored burn-flex vectorises it, and then this formula and its `tanh`
/// cost the same). The formula is evaluated off the autodiff graph and its derivative
/// attached as `y + (x − x̄)·(1 − y²)` with `x̄ = x` detached: the value is `y` exactly, the
/// gradient `1 − y²`, and the graph holds one tensor per call, as burn's own tanh does, instead
/// of one per step of the formula. Its backward is one product, where burn-autodiff's `tanh`
/// recomputes tanh and squares it with `powi` (P2 RK4-100 backprop 0.88 s here, 0.99 s with
/// `x.tanh()`). `exp` overflowing to ∞ gives ±1 exactly; an infinite input
/// gives NaN on an autodiff backend (∞ − ∞), which the solver then reports as a non-finite
/// state. Small tensors, where the cost is per op rather than per element, keep burn's one-op
/// `tanh`.
pub fn tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.shape().num_elements() < 4096 {
        return x.tanh();
    }
    let x_bar = x.clone().detach();
    let y = x_bar
        .clone()
        .mul_scalar(2.0)
        .exp()
        .add_scalar(1.0)
        .recip()
        .mul_scalar(-2.0)
        .add_scalar(1.0);
    if !B::ad_enabled(&x.device()) {
        return y;
    }
    let slope = y.clone().square().neg().add_scalar(1.0);
    y + (x - x_bar) * slope
}

/// Configuration of an [`MlpField`].
#[derive(Config, Debug)]
pub struct MlpFieldConfig {
    /// Layer widths from input to output; first and last are the state's dimension.
    pub widths: Vec<usize>,
    /// Nonlinearity between layers.
    #[config(default = "Activation::Tanh")]
    pub activation: Activation,
    /// Feed z³ (elementwise) instead of z, as in the spiral problem P1.
    #[config(default = false)]
    pub cube_input: bool,
}

impl MlpFieldConfig {
    /// Builds the field with burn's default initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MlpField<B> {
        let layers = self
            .widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        let activation = match self.activation {
            Activation::Tanh => 0,
            Activation::Softplus => 1,
            Activation::Relu => 2,
        };
        MlpField {
            layers,
            activation,
            cube_input: self.cube_input,
        }
    }
}

/// dz/dt = MLP(z), autonomous.
#[derive(Module, Debug)]
pub struct MlpField<B: Backend> {
    /// The linear layers.
    pub layers: Vec<Linear<B>>,
    activation: u8,
    cube_input: bool,
}

impl<B: Backend> Dynamics<B, 2> for MlpField<B> {
    fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut x = if self.cube_input { z.powi_scalar(3) } else { z };
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = match self.activation {
                    0 => tanh(x),
                    1 => burn::tensor::activation::softplus(x, 1.0),
                    _ => burn::tensor::activation::relu(x),
                };
            }
        }
        x
    }
}
