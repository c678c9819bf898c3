//! Stochastic samplers with their noise given — DDIM with η > 0 and Euler ancestral — as
//! one-step maps on a state that carries the noise, so that the exact adjoint reaches it too.
//!
//! A stochastic sampler adds fresh Gaussian noise ξ_i at every step. Drawn up front and stacked
//! under the sample along the batch axis, `z = [y; ξ_0; …; ξ_{S−1}]`, the noise makes each step
//! a deterministic map of z, and the engine's `Checkpointed` and `Backprop` modes give the exact
//! gradient with respect to x_T, the conditioning, the weights and every ξ_i (what noise
//! optimisation through a stochastic sampler trains). The noise blocks never change. In
//! `y = x/α`, with `ᾱ = α² = 1/(1 + ρ²)` and `x̂0 = y − ρ_i ε(α_i y, t_i)`, step i is:
//!
//! - DDIM(η) (Song et al. 2021; diffusers' `DDIMScheduler.step` with `eta` and
//!   `variance_noise`): `σ_i = η √((1 − ᾱ_{i+1})/(1 − ᾱ_i)) √(1 − ᾱ_i/ᾱ_{i+1})` and
//!   `y_{i+1} = x̂0 + (√(1 − ᾱ_{i+1} − σ_i²) ε + σ_i ξ_i) / α_{i+1}`; η = 0 is DDIM, η = 1 DDPM's
//!   posterior variance.
//! - Euler ancestral (k-diffusion's `sample_euler_ancestral`; diffusers'
//!   `EulerAncestralDiscreteScheduler`): `ρ_up = ρ_{i+1} √(1 − ρ_{i+1}²/ρ_i²)`,
//!   `ρ_down = √(ρ_{i+1}² − ρ_up²)`, `y_{i+1} = y + (ρ_down − ρ_i) ε + ρ_up ξ_i`.
//!
//! Carrying the noise costs memory: every state the engine stores, and the solve's output at
//! every step, holds S + 1 sample-sized tensors, so memory grows as S² whatever the schedule
//! (still no activations of the network; measured in `examples/bench_diffusion.rs`).
//!
//! Both are written, as the multistep maps are, as one Euler step of the field
//! `f = (z_{i+1} − z_i)/h`, `h = ρ_{i+1} − ρ_i`. A stochastic sampler is not an ODE's
//! discretisation, so it has no continuous adjoint: `Backsolve` is refused.

use burn::module::Module;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::Dynamics;

/// Which stochastic step a [`NoisyStepMap`] takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoisyStep {
    /// DDIM with its η (0: deterministic DDIM; 1: DDPM's posterior variance).
    Ddim {
        /// The fraction of the posterior standard deviation injected.
        eta: f64,
    },
    /// Euler ancestral: an Euler step down to `ρ_down`, then noise up to `ρ_{i+1}`.
    EulerAncestral,
}

/// A stochastic sampler's step map of `model` on a fixed decreasing ρ grid, as an Euler field
/// on `[y; ξ_0; …; ξ_{S−1}]` (see the module's doc).
#[derive(Module, Debug)]
pub struct NoisyStepMap<B: Backend, M: Module<B>> {
    /// The ε-network.
    pub model: M,
    #[module(skip)]
    grid: Vec<f64>,
    /// The network's timestep at each knot.
    #[module(skip)]
    timesteps: Vec<f64>,
    #[module(skip)]
    step: NoisyStep,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> NoisyStepMap<B, M> {
    /// The map of `model` on `grid` (decreasing ρ, at least two knots), the network told
    /// `timesteps[i]` at knot i.
    pub fn new(model: M, step: NoisyStep, grid: Vec<f64>, timesteps: Vec<f64>) -> Self {
        Self {
            model: crate::ode::materialized(model),
            grid,
            timesteps,
            step,
            _backend: core::marker::PhantomData,
        }
    }

    /// Steps of the grid, one noise block each.
    fn steps(&self) -> usize {
        self.grid.len() - 1
    }

    /// The stacked initial state `[y_T; ξ_0; …; ξ_{S−1}]`.
    pub fn initial_state<const D: usize>(&self, y_t: Tensor<B, D>, noise: Vec<Tensor<B, D>>) -> Tensor<B, D> {
        let mut parts = vec![y_t];
        parts.extend(noise);
        Tensor::cat(parts, 0)
    }

    /// The `y` part of a stacked state.
    pub fn y_of<const D: usize>(&self, z: Tensor<B, D>) -> Tensor<B, D> {
        let rows = z.dims()[0] / (self.steps() + 1);
        z.narrow(0, 0, rows)
    }

    /// Step i's update as `y_{i+1} = y_i + c_ε ε + c_ξ ξ_i`: `(c_ε, c_ξ)`.
    fn coefficients(&self, i: usize) -> (f64, f64) {
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        match self.step {
            NoisyStep::Ddim { eta } => {
                let abar = |rho: f64| 1.0 / (1.0 + rho * rho);
                let (a_s, a_t) = (abar(rho_s), abar(rho_t));
                let sigma = eta * ((1.0 - a_t) / (1.0 - a_s)).sqrt() * (1.0 - a_s / a_t).sqrt();
                let alpha_t = a_t.sqrt();
                let direction = (1.0 - a_t - sigma * sigma).max(0.0).sqrt() / alpha_t;
                (direction - rho_s, sigma / alpha_t)
            }
            NoisyStep::EulerAncestral => {
                let up = rho_t * (1.0 - (rho_t * rho_t) / (rho_s * rho_s)).max(0.0).sqrt();
                let down = (rho_t * rho_t - up * up).max(0.0).sqrt();
                (down - rho_s, up)
            }
        }
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for NoisyStepMap<B, M> {
    fn f(&self, rho: Tensor<B, 1>, z: Tensor<B, D>) -> Tensor<B, D> {
        let steps = self.steps();
        let i = super::dpm_solver::knot_index(&self.grid, rho.into_scalar().elem());
        let rows = z.dims()[0] / (steps + 1);
        let y = z.clone().narrow(0, 0, rows);
        let xi = z.clone().narrow(0, (i + 1) * rows, rows);
        let t = Tensor::from_data(TensorData::from([self.timesteps[i]]), (&y.device(), y.dtype()));
        let eps = self
            .model
            .eps(y.clone().mul_scalar(NoiseSchedule::alpha_of_rho(self.grid[i])), t);
        let (c_eps, c_xi) = self.coefficients(i);
        let h = self.grid[i + 1] - self.grid[i];
        let dy = (eps.mul_scalar(c_eps) + xi.mul_scalar(c_xi)).div_scalar(h);
        let still = z.narrow(0, rows, steps * rows).zeros_like();
        Tensor::cat(vec![dy, still], 0)
    }
}
