//! DPM-Solver++(2M) as a one-step method, so that the engine's exact adjoint covers it.
//!
//! A multistep method is a one-step method on a state that carries its history. Here the state
//! is `z_i = [y_i; x̂0_{i−1}]` (y = x/α and the previous data prediction, stacked along the batch
//! axis) and step i on the ρ grid is (Lu et al. 2022, Alg. 2, in y units; diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`, `solver_type =
//! "midpoint"`, `lower_order_final = True`):
//!
//! - `x̂0_i = y_i − ρ_i ε(α_i y_i, t_i)`,
//! - `D_i = x̂0_i + (x̂0_i − x̂0_{i−1}) / (2 r_i)`, `r_i = log(ρ_{i−1}/ρ_i) / log(ρ_i/ρ_{i+1})`;
//!   `D_i = x̂0_i` (first order) at the first step, and at the last one when it lands on ρ = 0
//!   or the run has fewer than 15 steps,
//! - `y_{i+1} = (ρ_{i+1}/ρ_i) y_i + (1 − ρ_{i+1}/ρ_i) D_i`, and the history becomes `x̂0_i`.
//!
//! That map is written as one Euler step `z + h f(ρ_i, z)` with `h = ρ_{i+1} − ρ_i` of the field
//! `f = [(y − D)/ρ_i; (x̂0_i − x̂0_{i−1})/h]`, which knows the grid. The engine then stores,
//! replays and differentiates whole steps (`Checkpointed`, exact) or records them (`Backprop`).
//! There is no continuous adjoint: the field is not an ODE's, so `Backsolve` does not apply.

use burn::module::Module;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::Dynamics;

/// The DPM-Solver++(2M) step map of `model` on a fixed decreasing ρ grid, as an Euler field on
/// the stacked state `[y; x̂0_prev]`.
#[derive(Module, Debug)]
pub struct DpmSolverPP2M<B: Backend, M: Module<B>> {
    /// The ε-network.
    pub model: M,
    #[module(skip)]
    schedule: NoiseSchedule,
    #[module(skip)]
    grid: Vec<f64>,
    /// The network's timestep at each knot, when not the schedule's t(ρ) (Karras' levels).
    #[module(skip)]
    timesteps: Option<Vec<f64>>,
    /// Steps of the whole run when the grid is its tail (img2img), for the last step's order.
    #[module(skip)]
    total_steps: Option<usize>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> DpmSolverPP2M<B, M> {
    /// The map of `model` on `grid` (decreasing ρ, at least two knots, all but the last > 0).
    pub fn new(model: M, schedule: NoiseSchedule, grid: Vec<f64>) -> Self {
        Self {
            model: crate::ode::materialized(model),
            schedule,
            grid,
            timesteps: None,
            total_steps: None,
            _backend: core::marker::PhantomData,
        }
    }

    /// The network sees `timesteps[i]` at knot i instead of the schedule's t(ρ_i) (see
    /// [`PfOde::with_timesteps`](crate::diffusion::pf_ode::PfOde::with_timesteps)).
    pub fn with_timesteps(mut self, timesteps: Vec<f64>) -> Self {
        self.timesteps = Some(timesteps);
        self
    }

    /// The grid is the tail of a run of `steps` steps (img2img): the last step is first order
    /// when that run has fewer than 15, as in diffusers, which counts them all.
    pub(crate) fn with_total_steps(mut self, steps: usize) -> Self {
        self.total_steps = Some(steps);
        self
    }

    /// The step starting at `rho`: the grid knot nearest to it (the engine hands the field the
    /// step's start, possibly rounded to the state's precision).
    fn step_at(&self, rho: f64) -> usize {
        let steps = self.grid.len() - 1;
        (0..steps)
            .min_by(|&a, &b| (self.grid[a] - rho).abs().total_cmp(&(self.grid[b] - rho).abs()))
            .unwrap_or(0)
    }

    /// The initial stacked state `[y_T; 0]` (no history yet).
    pub fn initial_state<const D: usize>(y_t: Tensor<B, D>) -> Tensor<B, D> {
        Tensor::cat(vec![y_t.clone(), y_t.zeros_like()], 0)
    }

    /// The `y` half of a stacked state.
    pub fn y_of<const D: usize>(z: Tensor<B, D>) -> Tensor<B, D> {
        let b = z.dims()[0] / 2;
        z.narrow(0, 0, b)
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for DpmSolverPP2M<B, M> {
    fn f(&self, rho: Tensor<B, 1>, z: Tensor<B, D>) -> Tensor<B, D> {
        let steps = self.grid.len() - 1;
        let i = self.step_at(rho.into_scalar().elem());
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        let b = z.dims()[0] / 2;
        let y = z.clone().narrow(0, 0, b);
        let x0_prev = z.narrow(0, b, b);
        let t = match &self.timesteps {
            Some(ts) => ts[i],
            None => self.schedule.t_of_rho(rho_s),
        };
        let t = Tensor::from_data(TensorData::from([t]), (&y.device(), y.dtype()));
        let eps = self
            .model
            .eps(y.clone().mul_scalar(NoiseSchedule::alpha_of_rho(rho_s)), t);
        let x0 = y.clone() - eps.mul_scalar(rho_s);
        let run = self.total_steps.unwrap_or(steps);
        let first_order = i == 0 || (i + 1 == steps && (rho_t == 0.0 || run < 15));
        let d = if first_order {
            x0.clone()
        } else {
            let r = (self.grid[i - 1] / rho_s).ln() / (rho_s / rho_t).ln();
            x0.clone() + (x0.clone() - x0_prev.clone()).mul_scalar(0.5 / r)
        };
        let h = rho_t - rho_s;
        let dy = (y - d).div_scalar(rho_s);
        let dx0 = (x0 - x0_prev).div_scalar(h);
        Tensor::cat(vec![dy, dx0], 0)
    }
}
