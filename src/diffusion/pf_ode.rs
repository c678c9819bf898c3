//! The probability-flow ODE in semi-linear form, as an engine [`Dynamics`].
//!
//! With `y = x/α` and `ρ = σ/α` the PF-ODE of a VP diffusion, `dx/dt = f(t)x + g²(t)/(2σ) ε`,
//! loses its linear part and becomes
//!
//! `dy/dρ = ε_θ(α(ρ)·y, t(ρ), c)`, with `α(ρ) = 1/√(1 + ρ²)`.
//!
//! Sampling integrates it from `ρ_T` down to `ρ_0`: Euler in ρ is exactly DDIM (η = 0), Heun the
//! second-order exponential integrator of EDM/AdjointDPM. Gradients map between the two
//! coordinates by the chain rule, which burn applies on its own since the maps are tensor ops:
//! `∂L/∂x_T = a_y(ρ_T)/α_T` and `a_y(ρ_0) = α_0 ∂L/∂x_0`.

use burn::module::Module;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::Dynamics;

/// The semi-linear PF-ODE of `model` under `schedule`: its time is ρ, its state y = x/α.
#[derive(Module, Debug)]
pub struct PfOde<B: Backend, M: Module<B>> {
    /// The ε-network.
    pub model: M,
    #[module(skip)]
    schedule: NoiseSchedule,
    /// Knots in ρ and the network's timestep at each ([`PfOde::with_timesteps`]).
    #[module(skip)]
    knots: Option<(Vec<f64>, Vec<f64>)>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> PfOde<B, M> {
    /// Wraps a network and its schedule (materialising lazily-initialised weights, so that the
    /// copies the samplers make share them).
    pub fn new(model: M, schedule: NoiseSchedule) -> Self {
        Self {
            model: crate::ode::materialized(model),
            schedule,
            knots: None,
            _backend: core::marker::PhantomData,
        }
    }

    /// At ρ = `rhos[k]` (to 1e-6, relative: the solver's times pass through the state's float
    /// type) the network sees timestep `timesteps[k]` instead of the schedule's own t(ρ): noise
    /// levels that are not the schedule's at integer steps (Karras'), with the rounded timesteps
    /// diffusers gives the network there (a knot without a timestep keeps t(ρ)).
    pub fn with_timesteps(mut self, rhos: Vec<f64>, timesteps: Vec<f64>) -> Self {
        self.knots = Some((rhos, timesteps));
        self
    }

    /// The timestep the network sees at ρ.
    pub(crate) fn t_at(&self, rho: f64) -> f64 {
        let knot = self.knots.as_ref().and_then(|(rhos, ts)| {
            rhos.iter()
                .position(|&k| (k - rho).abs() <= 1e-6 * k.abs())
                .and_then(|i| ts.get(i).copied())
        });
        knot.unwrap_or_else(|| self.schedule.t_of_rho(rho.max(0.0)))
    }

    /// The schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for PfOde<B, M> {
    fn f(&self, rho: Tensor<B, 1>, y: Tensor<B, D>) -> Tensor<B, D> {
        let t = self.t_at(rho.clone().into_scalar().elem());
        // α(ρ) as a tensor op on ρ, so that gradients w.r.t. the sampling times pass through it.
        let alpha = rho.powi_scalar(2).add_scalar(1.0).powf_scalar(-0.5);
        let x = y * alpha.reshape([1; D]);
        let t = Tensor::from_data(TensorData::from([t]), (&x.device(), x.dtype()));
        self.model.eps(x, t)
    }
}
