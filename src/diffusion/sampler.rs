//! Samplers: integrate the semi-linear PF-ODE from pure noise to a sample, differentiably.
//!
//! Every sampler here is an engine solve on the ρ grid of the inference timesteps with one step
//! per interval, so all three gradient modes apply unchanged: `Checkpointed` (exact gradient of
//! the sampler, the default), `Backsolve` with Euler (the paper's AdjointDPM), `Backprop`.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::diffusion::error::DiffusionError;
use crate::diffusion::pf_ode::{EpsModel, PfOde};
use crate::diffusion::schedule::{timesteps, NoiseSchedule, TimestepSpacing};
use crate::ode::tableau::{self, ButcherTableau};
use crate::ode::{Dynamics, GradientMode, NeuralOde, Solver, StepControl};

/// The integration method in ρ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// Euler in ρ: DDIM with η = 0 (Song et al. 2021), exactly.
    Ddim,
    /// Heun in ρ: the second-order sampler of EDM / AdjointDPM (one extra network call per step).
    Heun,
    /// Classical RK4 in ρ.
    Rk4,
}

impl SamplerKind {
    fn tableau(self) -> &'static ButcherTableau {
        match self {
            SamplerKind::Ddim => &tableau::EULER,
            SamplerKind::Heun => &tableau::HEUN,
            SamplerKind::Rk4 => &tableau::RK4,
        }
    }
}

/// A sampler: method, timesteps as diffusers picks them, and how it is differentiated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Method.
    pub kind: SamplerKind,
    /// Number of inference steps S.
    pub steps: usize,
    /// How the S timesteps are spread over the training steps.
    pub spacing: TimestepSpacing,
    /// Added to "leading" timesteps (diffusers' `steps_offset`; 1 for Stable Diffusion).
    pub steps_offset: usize,
    /// The last step lands on ᾱ = 1 (ρ = 0, diffusers' `set_alpha_to_one`) rather than on ᾱ_0.
    pub final_alpha_one: bool,
    /// How gradients flow through sampling.
    pub gradient: GradientMode,
}

impl Sampler {
    /// DDIM (η = 0) with `steps` steps, "leading" spacing, last step to ᾱ = 1, exact gradients.
    pub fn ddim(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps,
            spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            final_alpha_one: true,
            gradient: GradientMode::default(),
        }
    }

    /// Heun in ρ with `steps` steps.
    pub fn heun(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Heun,
            ..Self::ddim(steps)
        }
    }

    /// Sets the gradient mode.
    pub fn gradient(mut self, gradient: GradientMode) -> Self {
        self.gradient = gradient;
        self
    }

    /// The inference timesteps, descending.
    pub fn timesteps(&self, schedule: &NoiseSchedule) -> Result<Vec<usize>, DiffusionError> {
        timesteps(schedule.train_steps(), self.steps, self.spacing, self.steps_offset)
    }

    /// The ρ grid, decreasing: ρ at each timestep, then the final ρ (0, or ρ at ᾱ_0).
    pub fn rho_grid(&self, schedule: &NoiseSchedule) -> Result<Vec<f64>, DiffusionError> {
        let mut grid: Vec<f64> = self
            .timesteps(schedule)?
            .iter()
            .map(|&t| schedule.rho(t as f64))
            .collect();
        let last = if self.final_alpha_one { 0.0 } else { schedule.rho(0.0) };
        if grid[grid.len() - 1] > last {
            grid.push(last);
        }
        Ok(grid)
    }

    fn solver(&self) -> Solver {
        Solver {
            tableau: self.kind.tableau(),
            control: StepControl::PerInterval(1),
        }
    }

    /// Generates `x_0` from `x_T` on an autodiff backend. A loss on the result back-propagates
    /// into `x_T` (when tracked) and every trainable parameter of `model` (weights, embeddings).
    pub fn sample<B, C, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<Autodiff<B, C>, D>,
    ) -> Result<Tensor<Autodiff<B, C>, D>, DiffusionError>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: EpsModel<Autodiff<B, C>, D> + AutodiffModule<Autodiff<B, C>> + 'static,
        M::InnerModule: EpsModel<B, D>,
        PfOde<Autodiff<B, C>, M>: AutodiffModule<Autodiff<B, C>, InnerModule = PfOde<B, M::InnerModule>>,
    {
        let grid = self.rho_grid(schedule)?;
        let ode = NeuralOde::new(PfOde::new(model.clone(), schedule.clone()))
            .solver(self.solver())
            .gradient(self.gradient);
        let y_t = x_t.div_scalar(NoiseSchedule::alpha_of_rho(grid[0]));
        let y_0 = ode.solve(y_t, &grid)?.last();
        Ok(y_0.mul_scalar(NoiseSchedule::alpha_of_rho(grid[grid.len() - 1])))
    }

    /// Generates `x_0` from `x_T` on any backend, without a graph (inference).
    pub fn sample_inference<B, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, DiffusionError>
    where
        B: Backend,
        M: EpsModel<B, D>,
        PfOde<B, M>: Dynamics<B, D>,
    {
        let grid = self.rho_grid(schedule)?;
        let ode = NeuralOde::new(PfOde::new(model.clone(), schedule.clone())).solver(self.solver());
        let y_t = x_t.div_scalar(NoiseSchedule::alpha_of_rho(grid[0]));
        let y_0 = ode.integrate(y_t, &grid)?.last();
        Ok(y_0.mul_scalar(NoiseSchedule::alpha_of_rho(grid[grid.len() - 1])))
    }
}
