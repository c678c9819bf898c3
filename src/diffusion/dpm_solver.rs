//! DPM-Solver++(2M) and (3M) as one-step methods, so that the engine's exact adjoint covers them.
//!
//! A multistep method is a one-step method on a state that carries its history. Here the state
//! is `z_i = [y_i; x̂0_{i−1}]` for 2M and `[y_i; x̂0_{i−1}; x̂0_{i−2}]` for 3M (y = x/α and the
//! previous data predictions, stacked along the batch axis), and step i on the ρ grid is (Lu et
//! al. 2022, in y units; diffusers' `DPMSolverMultistepScheduler` with `algorithm_type =
//! "dpmsolver++"`, `solver_type = "midpoint"`, `lower_order_final = True`, `solver_order` 2 or
//! 3), with `h_i = log(ρ_i/ρ_{i+1})`:
//!
//! - `x̂0_i = y_i − ρ_i ε(α_i y_i, t_i)`,
//! - `y_{i+1} = (ρ_{i+1}/ρ_i) y_i + (1 − ρ_{i+1}/ρ_i) D_i`, and the history shifts in `x̂0_i`, where
//!   - first order: `D_i = x̂0_i`, at the first step, and at the last one when it lands on ρ = 0
//!     or the run has fewer than 15 steps;
//!   - second order: `D_i = x̂0_i + (x̂0_i − x̂0_{i−1}) / (2 r_0)`, `r_0 = h_{i−1}/h_i` (3M: also at
//!     the second step, and at the last but one of a run of fewer than 15);
//!   - third order: `(1 − e^{−h}) D_i = (1 − e^{−h}) D0 + ((e^{−h} − 1)/h + 1) D1 −
//!     ((e^{−h} − 1 + h)/h² − ½) D2` with diffusers' `D0 = x̂0_i`, `D1`, `D2` from the divided
//!     differences of the last three x̂0 (`r_1 = h_{i−2}/h_i`).
//!
//! That map is written as one Euler step `z + h f(ρ_i, z)` with `h = ρ_{i+1} − ρ_i` of the field
//! `f = [(y − D)/ρ_i; (x̂0_i − x̂0_{i−1})/h; (x̂0_{i−1} − x̂0_{i−2})/h]`, which knows the grid. The
//! engine then stores, replays and differentiates whole steps (`Checkpointed`, exact) or records
//! them (`Backprop`). There is no continuous adjoint: the field is not an ODE's, so `Backsolve`
//! does not apply.

use burn::module::Module;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::Dynamics;

/// The DPM-Solver++ multistep map (2M, or 3M with [`third_order`](Self::third_order)) of
/// `model` on a fixed decreasing ρ grid, as an Euler field on the stacked state `[y; history]`.
#[derive(Module, Debug)]
pub struct DpmSolverPP<B: Backend, M: Module<B>> {
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
    /// 2 or 3.
    #[module(skip)]
    order: usize,
    _backend: core::marker::PhantomData<B>,
}

/// DPM-Solver++(2M): [`DpmSolverPP`] as [`DpmSolverPP::new`] makes it.
pub type DpmSolverPP2M<B, M> = DpmSolverPP<B, M>;

impl<B: Backend, M: Module<B>> DpmSolverPP<B, M> {
    /// The 2M map of `model` on `grid` (decreasing ρ, at least two knots, all but the last > 0).
    pub fn new(model: M, schedule: NoiseSchedule, grid: Vec<f64>) -> Self {
        Self {
            model: crate::ode::materialized(model),
            schedule,
            grid,
            timesteps: None,
            total_steps: None,
            order: 2,
            _backend: core::marker::PhantomData,
        }
    }

    /// DPM-Solver++(3M): a history of two data predictions, third order from the third step.
    pub fn third_order(mut self) -> Self {
        self.order = 3;
        self
    }

    /// The network sees `timesteps[i]` at knot i instead of the schedule's t(ρ_i) (a knot
    /// without one keeps t(ρ_i); see
    /// [`PfOde::with_timesteps`](crate::diffusion::pf_ode::PfOde::with_timesteps)).
    pub fn with_timesteps(mut self, timesteps: Vec<f64>) -> Self {
        self.timesteps = Some(timesteps);
        self
    }

    /// The grid is the tail of a run of `steps` steps (img2img): the orders of the last steps
    /// follow that run's length (under 15: lower), as in diffusers, which counts them all.
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

    /// The initial stacked state `[y_T; 0…]` (no history yet).
    pub fn initial_state<const D: usize>(&self, y_t: Tensor<B, D>) -> Tensor<B, D> {
        let mut parts = vec![y_t.clone()];
        parts.extend((1..self.order).map(|_| y_t.zeros_like()));
        Tensor::cat(parts, 0)
    }

    /// The `y` part of a stacked state.
    pub fn y_of<const D: usize>(&self, z: Tensor<B, D>) -> Tensor<B, D> {
        let b = z.dims()[0] / self.order;
        z.narrow(0, 0, b)
    }

    /// The order of step i of `steps` (diffusers' warm-up and `lower_order_final`/`_second`).
    fn order_at(&self, i: usize, steps: usize, lands_on_zero: bool) -> usize {
        let run = self.total_steps.unwrap_or(steps);
        let last = i + 1 == steps && (lands_on_zero || run < 15);
        let last_but_one = i + 2 == steps && run < 15;
        if i == 0 || last {
            1
        } else if self.order == 2 || i == 1 || last_but_one {
            2
        } else {
            3
        }
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for DpmSolverPP<B, M> {
    fn f(&self, rho: Tensor<B, 1>, z: Tensor<B, D>) -> Tensor<B, D> {
        let steps = self.grid.len() - 1;
        let i = self.step_at(rho.into_scalar().elem());
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        let b = z.dims()[0] / self.order;
        let y = z.clone().narrow(0, 0, b);
        let m1 = z.clone().narrow(0, b, b);
        let m2 = (self.order == 3).then(|| z.narrow(0, 2 * b, b));
        let t = match self.timesteps.as_ref().and_then(|ts| ts.get(i)) {
            Some(&t) => t,
            None => self.schedule.t_of_rho(rho_s),
        };
        let t = Tensor::from_data(TensorData::from([t]), (&y.device(), y.dtype()));
        let eps = self
            .model
            .eps(y.clone().mul_scalar(NoiseSchedule::alpha_of_rho(rho_s)), t);
        let x0 = y.clone() - eps.mul_scalar(rho_s);
        let h = (rho_s / rho_t).ln();
        let d = match (self.order_at(i, steps, rho_t == 0.0), &m2) {
            (1, _) => x0.clone(),
            (2, _) | (_, None) => {
                let r0 = (self.grid[i - 1] / rho_s).ln() / h;
                x0.clone() + (x0.clone() - m1.clone()).mul_scalar(0.5 / r0)
            }
            (_, Some(m2)) => {
                let r0 = (self.grid[i - 1] / rho_s).ln() / h;
                let r1 = (self.grid[i - 2] / self.grid[i - 1]).ln() / h;
                let d1_0 = (x0.clone() - m1.clone()).div_scalar(r0);
                let d1_1 = (m1.clone() - m2.clone()).div_scalar(r1);
                let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
                let d2 = (d1_0 - d1_1).div_scalar(r0 + r1);
                // (1 − e^{−h}) D = (1 − e^{−h}) D0 + c1 D1 − c2 D2, with e^{−h} = ρ_t/ρ_s.
                let em = (-h).exp();
                let (c0, c1, c2) = (1.0 - em, (em - 1.0) / h + 1.0, (em - 1.0 + h) / (h * h) - 0.5);
                x0.clone() + d1.mul_scalar(c1 / c0) - d2.mul_scalar(c2 / c0)
            }
        };
        let step = rho_t - rho_s;
        let dy = (y - d).div_scalar(rho_s);
        let mut parts = vec![dy, (x0 - m1.clone()).div_scalar(step)];
        if let Some(m2) = m2 {
            parts.push((m1 - m2).div_scalar(step));
        }
        Tensor::cat(parts, 0)
    }
}
