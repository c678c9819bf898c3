//! DPM-Solver++(2M), (3M), UniPC and PLMS as one-step methods, so that the engine's exact
//! adjoint covers them.
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
//!     the second step, and at the last but one of a run of fewer than 15); with `solver_type =
//!     "heun"` ([`MultistepMap::heun_update`]) the difference is weighed `1/(1 − e^{−h}) − 1/h`
//!     instead of ½;
//!   - third order: `(1 − e^{−h}) D_i = (1 − e^{−h}) D0 + ((e^{−h} − 1)/h + 1) D1 −
//!     ((e^{−h} − 1 + h)/h² − ½) D2` with diffusers' `D0 = x̂0_i`, `D1`, `D2` from the divided
//!     differences of the last three x̂0 (`r_1 = h_{i−2}/h_i`).
//!
//! UniPC (Zhao et al. 2023; diffusers' `UniPCMultistepScheduler` with `predict_x0` and
//! `lower_order_final`, `solver_order` 2 or 3, `solver_type` "bh2" or "bh1") also corrects the
//! sample it evaluated, with the network output there, before predicting the next one. Its state
//! is `[y_i (predicted); x̂0_{i−1}; …; x̂0_{i−p}; y_{i−1} (corrected)]` for order p, and step i
//! is: the corrector UniC from the corrected `y_{i−1}` to `y_i^c` (of the order the predictor
//! into step i had; none at the first step), then the predictor UniP from `y_i^c`, of order
//! `min(p, i + 1, steps − i)` (warm-up, and lower at the last steps). Their coefficients solve
//! diffusers' small Vandermonde systems in the ratios `r_k` of the log-ρ steps to earlier knots,
//! with `B(h) = e^{−h} − 1` (bh2) or `B(h) = −h` (bh1, which the UniPC paper recommends for
//! unconditional sampling in under 10 steps).
//!
//! DPM-Solver++(2M) SDE (diffusers' `algorithm_type = "sde-dpmsolver++"`, Lu et al. 2022's SDE
//! solver; "DPM++ 2M SDE") takes the same `D_i` and injects fresh noise ξ_i at each step:
//! `y_{i+1} = r² y_i + (1 − r²) D_i + ρ_{i+1} √(1 − r²) ξ_i`, `r = ρ_{i+1}/ρ_i`. As for the
//! stochastic one-step samplers ([`NoisyStepMap`](crate::diffusion::NoisyStepMap)), the noise is
//! given and held by the map as a parameter ([`StepNoise`]), so the exact gradient reaches it and
//! the state stays `[y; x̂0_{i−1}]`. DPM-Solver++(3M) SDE ("DPM++ 3M SDE", `solver_order = 3`)
//! takes 3M's orders and divided differences with the SDE's coefficients:
//! `y_{i+1} = r² y_i + (1 − r²) D0 + c1 D1 + c2 D2 + ρ_{i+1} √(1 − r²) ξ_i`,
//! `c1 = (1 − r²)/(−2h) + 1`, `c2 = (1 − r² − 2h)/(2h)² − ½`.
//!
//! PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"; diffusers'
//! `PNDMScheduler` with `skip_prk_steps`, Stable Diffusion 1.x's scheduler) is Adams–Bashforth
//! on ε in y units: `y_{i+1} = y_i + (ρ_{i+1} − ρ_i) ε̂_i` (DDIM's step with ε̂ for ε), with
//! `ε̂_i` of the evaluations `e_i = ε(α_i y_i, t_i)` so far: `(3e_i − e_{i−1})/2`,
//! `(23e_i − 16e_{i−1} + 5e_{i−2})/12` and `(55e_i − 59e_{i−1} + 37e_{i−2} − 9e_{i−3})/24`
//! (uniform-step coefficients, whatever the levels), and at the first step, of a run of two or
//! more, the trapezoid `(e_0 + ε(α_1 ỹ_1, t_1))/2` through DDIM's `ỹ_1 = y_0 + (ρ_1 − ρ_0) e_0`
//! (one network call more than steps). Its state is `[y_i; e_{i−1}; e_{i−2}; e_{i−3}]`. LMS
//! (diffusers' `LMSDiscreteScheduler`, k-diffusion's `sample_lms`) takes the same state and
//! step with `ε̂_i = Σ_j e_{i−j} ∫_{ρ_i}^{ρ_{i+1}} L_j dρ / (ρ_{i+1} − ρ_i)`, `L_j` the Lagrange
//! basis on the last `min(i + 1, 4)` levels (exact where the levels are uneven), and no warm-up.
//! DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator";
//! diffusers' `DEISMultistepScheduler`, `algorithm_type = "deis"`, `solver_type = "logrho"`)
//! takes the same step with ε interpolated as a polynomial in log ρ through the last 2 or 3
//! evaluations and integrated exactly in ρ (diffusers' closed forms), of DPM-Solver++'s orders
//! (warm-up, lower at the last steps of a run under 15), state `[y_i; e_{i−1}(; e_{i−2})]`.
//!
//! Each map is written as one Euler step `z + h f(ρ_i, z)` with `h = ρ_{i+1} − ρ_i` of a field
//! that knows the grid: `f = (z_{i+1} − z_i)/h` block by block, e.g. for DPM-Solver++
//! `[(y − D)/ρ_i; (x̂0_i − x̂0_{i−1})/h; (x̂0_{i−1} − x̂0_{i−2})/h]`. The
//! engine then stores, replays and differentiates whole steps (`Checkpointed`, exact) or records
//! them (`Backprop`). There is no continuous adjoint: the field is not an ODE's, so `Backsolve`
//! does not apply.

use burn::module::Module;
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::diffusion::stochastic::StepNoise;
use crate::ode::Dynamics;

/// A multistep sampler's step map: DPM-Solver++(2M) by default, 3M with
/// [`third_order`](Self::third_order), UniPC with [`unipc`](Self::unipc); of `model` on a fixed
/// decreasing ρ grid, as an Euler field on the stacked state `[y; history]`.
#[derive(Module, Debug)]
pub struct MultistepMap<B: Backend, M: Module<B>> {
    /// The ε-network.
    pub model: M,
    /// The SDE's noise, one block per step (none for the other methods).
    pub noise: StepNoise<B>,
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
    #[module(skip)]
    method: Method,
    /// DPM-Solver++'s second-order update is diffusers' "heun" rather than "midpoint".
    #[module(skip)]
    heun: bool,
    _backend: core::marker::PhantomData<B>,
}

/// Which multistep method a [`MultistepMap`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    DpmPP2,
    DpmPP3,
    /// DPM-Solver++(2M) SDE, with one noise block per step.
    DpmPP2Sde,
    /// DPM-Solver++(3M) SDE, likewise.
    DpmPP3Sde,
    /// `bh1`: B(h) = −h instead of bh2's e^{−h} − 1; `third_order`: `solver_order = 3`.
    UniPc {
        bh1: bool,
        third_order: bool,
    },
    /// PLMS: Adams–Bashforth on ε, a history of three evaluations.
    Plms,
    /// LMS: the same history, coefficients integrated over the actual levels.
    Lms,
    /// DEIS (log-ρ): a history of one or two evaluations (`solver_order` 2 or 3).
    Deis {
        third_order: bool,
    },
}

impl Method {
    /// Tensors of the stacked state.
    fn blocks(self) -> usize {
        match self {
            Method::DpmPP2 | Method::DpmPP2Sde => 2,
            Method::DpmPP3 | Method::DpmPP3Sde => 3,
            Method::UniPc { third_order, .. } => 4 + usize::from(third_order),
            Method::Plms | Method::Lms => 4,
            Method::Deis { third_order } => 2 + usize::from(third_order),
        }
    }
}

/// DPM-Solver++(2M): [`MultistepMap`] as [`MultistepMap::new`] makes it.
pub type DpmSolverPP2M<B, M> = MultistepMap<B, M>;

impl<B: Backend, M: Module<B>> MultistepMap<B, M> {
    /// The 2M map of `model` on `grid` (decreasing ρ, at least two knots, all but the last > 0).
    pub fn new(model: M, schedule: NoiseSchedule, grid: Vec<f64>) -> Self {
        Self {
            model: crate::ode::materialized(model),
            noise: StepNoise::none(),
            schedule,
            grid,
            timesteps: None,
            total_steps: None,
            method: Method::DpmPP2,
            heun: false,
            _backend: core::marker::PhantomData,
        }
    }

    /// DPM-Solver++(3M): a history of two data predictions, third order from the third step
    /// (with [`sde`](Self::sde), before or after: DPM-Solver++(3M) SDE).
    pub fn third_order(mut self) -> Self {
        self.method = match self.method {
            Method::DpmPP2Sde | Method::DpmPP3Sde => Method::DpmPP3Sde,
            _ => Method::DpmPP3,
        };
        self
    }

    /// DPM-Solver++(2M) SDE: the 2M map with fresh noise at each step, `noise[i]` at step i
    /// (one standard normal tensor of the sample's shape per step).
    pub fn sde<const D: usize>(mut self, noise: Vec<Tensor<B, D>>) -> Self {
        self.method = match self.method {
            Method::DpmPP3 | Method::DpmPP3Sde => Method::DpmPP3Sde,
            _ => Method::DpmPP2Sde,
        };
        self.noise = StepNoise::new(noise);
        self
    }

    /// Rows of `y` in a stacked state of `rows` rows.
    fn rows_of(&self, rows: usize) -> usize {
        rows / self.method.blocks()
    }

    /// UniPC with its corrector: bh1 or bh2, second or third order; see the module's doc.
    pub fn unipc(mut self, bh1: bool, third_order: bool) -> Self {
        self.method = Method::UniPc { bh1, third_order };
        self
    }

    /// DPM-Solver++'s second-order steps with diffusers' `solver_type = "heun"` when `on`:
    /// `D = D0 + (1/(1 − e^{−h}) − 1/h) D1` (the SDE's with 2h) instead of `D0 + D1/2`.
    pub fn heun_update(mut self, on: bool) -> Self {
        self.heun = on;
        self
    }

    /// PLMS (diffusers' `PNDMScheduler` with `skip_prk_steps`); see the module's doc.
    pub fn plms(mut self) -> Self {
        self.method = Method::Plms;
        self
    }

    /// LMS (diffusers' `LMSDiscreteScheduler`, k-diffusion's `sample_lms`); see the module's
    /// doc.
    pub fn lms(mut self) -> Self {
        self.method = Method::Lms;
        self
    }

    /// DEIS of `solver_order` 2, or 3 with `third_order`; see the module's doc.
    pub fn deis(mut self, third_order: bool) -> Self {
        self.method = Method::Deis { third_order };
        self
    }

    /// DEIS's weights of `e_i, e_{i−1}, …` at step i of order `order`: diffusers' `ind_fn`
    /// closed forms of `∫ L_j(log ρ) dρ` over the step, `L_j` the Lagrange basis in log ρ on the
    /// last `order` levels, over `ρ_{i+1} − ρ_i`.
    fn deis_weights(&self, i: usize, order: usize) -> Vec<f64> {
        let g = &self.grid;
        let (s0, t) = (g[i], g[i + 1]);
        let step = t - s0;
        match order {
            1 => vec![1.0],
            2 => {
                let s1 = g[i - 1];
                let ind = |t: f64, b: f64, c: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
                vec![
                    (ind(t, s0, s1) - ind(s0, s0, s1)) / step,
                    (ind(t, s1, s0) - ind(s0, s1, s0)) / step,
                ]
            }
            _ => {
                let (s1, s2) = (g[i - 1], g[i - 2]);
                let ind = |t: f64, b: f64, c: f64, d: f64| {
                    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
                    t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0) / ((lb - lc) * (lb - ld))
                };
                vec![
                    (ind(t, s0, s1, s2) - ind(s0, s0, s1, s2)) / step,
                    (ind(t, s1, s2, s0) - ind(s0, s1, s2, s0)) / step,
                    (ind(t, s2, s0, s1) - ind(s0, s2, s0, s1)) / step,
                ]
            }
        }
    }

    /// LMS's weights of `e_i, e_{i−1}, …` at step i, over the step: `∫ L_j dρ / (ρ_{i+1} − ρ_i)`
    /// with `L_j` the Lagrange basis on the last `min(i + 1, 4)` levels.
    fn lms_weights(&self, i: usize) -> Vec<f64> {
        let g = &self.grid;
        let order = (i + 1).min(4);
        let nodes: Vec<f64> = (0..order).map(|k| g[i - k]).collect();
        let (a, b) = (g[i], g[i + 1]);
        // Three-point Gauss–Legendre: exact for the basis polynomials, of degree 3 at most.
        let points = [
            (-(0.6f64).sqrt(), 5.0 / 9.0),
            (0.0, 8.0 / 9.0),
            ((0.6f64).sqrt(), 5.0 / 9.0),
        ];
        (0..order)
            .map(|j| {
                let basis = |tau: f64| {
                    (0..order)
                        .filter(|&k| k != j)
                        .map(|k| (tau - nodes[k]) / (nodes[j] - nodes[k]))
                        .product::<f64>()
                };
                let integral: f64 = points
                    .iter()
                    .map(|(x, w)| w * basis(0.5 * (a + b) + 0.5 * (b - a) * x))
                    .sum::<f64>()
                    * 0.5
                    * (b - a);
                integral / (b - a)
            })
            .collect()
    }

    /// The network's timestep at knot `k` (at level `rho`).
    fn timestep_at(&self, k: usize, rho: f64) -> f64 {
        match self.timesteps.as_ref().and_then(|ts| ts.get(k)) {
            Some(&t) => t,
            None => self.schedule.t_of_rho(rho),
        }
    }

    /// PLMS's, LMS's or DEIS's step i as the Euler field's blocks, from `y` with its evaluation
    /// `eps` and the state `z` (whose history blocks hold the earlier evaluations).
    fn plms_field<const D: usize>(&self, i: usize, y: Tensor<B, D>, eps: Tensor<B, D>, z: &Tensor<B, D>) -> Tensor<B, D>
    where
        M: EpsModel<B, D>,
    {
        let b = y.dims()[0];
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        let step = rho_t - rho_s;
        let past: Vec<_> = (1..self.method.blocks())
            .map(|k| z.clone().narrow(0, k * b, b))
            .collect();
        let weights = match (self.method, i) {
            (Method::Lms, _) => self.lms_weights(i),
            (Method::Deis { .. }, _) => self.deis_weights(i, self.order_at(i, self.grid.len() - 1, rho_t == 0.0)),
            (_, 0) => vec![1.0],
            (_, 1) => vec![1.5, -0.5],
            (_, 2) => vec![23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
            _ => vec![55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
        };
        let mut e_hat = eps.clone().mul_scalar(weights[0]);
        for (w, e) in weights[1..].iter().zip(&past) {
            e_hat = e_hat + e.clone().mul_scalar(*w);
        }
        if self.method == Method::Plms && i == 0 && self.grid.len() > 2 {
            // The trapezoid through DDIM's step, the network asked again at its end.
            let y_end = y.clone() + eps.clone().mul_scalar(step);
            let t = Tensor::from_data(TensorData::from([self.timestep_at(1, rho_t)]), (&y.device(), y.dtype()));
            let e_end = self.model.eps(y_end.mul_scalar(NoiseSchedule::alpha_of_rho(rho_t)), t);
            e_hat = (e_hat + e_end).mul_scalar(0.5);
        }
        // [y; e_{i−1}; e_{i−2}; e_{i−3}] → [y + step ε̂; e_i; e_{i−1}; e_{i−2}] (DEIS: shorter).
        let mut parts = vec![e_hat, (eps - past[0].clone()).div_scalar(step)];
        parts.extend(past.windows(2).map(|w| (w[0].clone() - w[1].clone()).div_scalar(step)));
        Tensor::cat(parts, 0)
    }

    /// UniPC's `B(h)` for a step of `h = log(ρ_s/ρ_t)`: `e^{−h} − 1` (bh2) or `−h` (bh1).
    fn b_of(&self, h: f64) -> f64 {
        match self.method {
            Method::UniPc { bh1: true, .. } => -h,
            _ => (-h).exp_m1(),
        }
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
        knot_index(&self.grid, rho)
    }

    /// The initial stacked state `[y_T; 0…]` (no history yet).
    pub fn initial_state<const D: usize>(&self, y_t: Tensor<B, D>) -> Tensor<B, D> {
        let mut parts = vec![y_t.clone()];
        parts.extend((1..self.method.blocks()).map(|_| y_t.zeros_like()));
        Tensor::cat(parts, 0)
    }

    /// The `y` part of a stacked state.
    pub fn y_of<const D: usize>(&self, z: Tensor<B, D>) -> Tensor<B, D> {
        let b = self.rows_of(z.dims()[0]);
        z.narrow(0, 0, b)
    }

    /// UniPC's step i: the corrected sample at ρ_i and the predicted one at ρ_{i+1}, from the
    /// predicted `y` at ρ_i with its data prediction `x0`, the earlier data predictions
    /// `ms = [x̂0_{i−1}, x̂0_{i−2}, …]` and the corrected sample `y_c_prev` at ρ_{i−1}.
    fn unipc_step<const D: usize>(
        &self,
        i: usize,
        steps: usize,
        y: &Tensor<B, D>,
        x0: &Tensor<B, D>,
        ms: &[Tensor<B, D>],
        y_c_prev: &Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let g = &self.grid;
        // diffusers' order of UniP at step k: warm-up and `lower_order_final`.
        let order = |k: usize| self.unipc_order().min(steps - k).min(k + 1);
        // UniC from ρ_{i−1} to ρ_i, of the order the predictor into step i had; none at step 0.
        let y_c = if i == 0 {
            y.clone()
        } else {
            let p = order(i - 1);
            let h = (g[i - 1] / g[i]).ln();
            let base = y_c_prev.clone().mul_scalar(g[i] / g[i - 1]) - ms[0].clone().mul_scalar((-h).exp_m1());
            let d1_t = x0.clone() - ms[0].clone();
            let correction = if p == 1 {
                d1_t.mul_scalar(0.5)
            } else {
                // rhos_c = R⁻¹ b with R's rows r_k^j (and a last column of ones).
                let rks: Vec<f64> = (1..p).map(|k| (g[i - 1] / g[i - 1 - k]).ln() / h).collect();
                let rhos = solve(vandermonde(&rks, true), self.unipc_b(h, p));
                let mut sum = d1_t.mul_scalar(rhos[p - 1]);
                for (k, rk) in rks.iter().enumerate() {
                    sum = sum + (ms[k + 1].clone() - ms[0].clone()).mul_scalar(rhos[k] / rk);
                }
                sum
            };
            base - correction.mul_scalar(self.b_of(h))
        };
        // UniP from ρ_i to ρ_{i+1}: first order at the first and the last step.
        let em1 = g[i + 1] / g[i] - 1.0;
        let mut y_next = y_c.clone().mul_scalar(g[i + 1] / g[i]) - x0.clone().mul_scalar(em1);
        let p = order(i);
        if p > 1 {
            let h = (g[i] / g[i + 1]).ln();
            let rks: Vec<f64> = (1..p).map(|k| (g[i] / g[i - k]).ln() / h).collect();
            let rhos = match p {
                2 => vec![0.5],
                _ => solve(vandermonde(&rks, false), self.unipc_b(h, p - 1)),
            };
            let mut sum = x0.zeros_like();
            for (k, rk) in rks.iter().enumerate() {
                sum = sum + (ms[k].clone() - x0.clone()).mul_scalar(rhos[k] / rk);
            }
            y_next = y_next - sum.mul_scalar(self.b_of(h));
        }
        (y_next, y_c)
    }

    /// UniPC's `solver_order`.
    fn unipc_order(&self) -> usize {
        match self.method {
            Method::UniPc { third_order: true, .. } => 3,
            _ => 2,
        }
    }

    /// UniPC's `b_j = j! h φ_j(h) / B(h)`, j = 1..=n, for a step of `h = log(ρ_s/ρ_t)` (diffusers'
    /// recurrence on `h_phi_k`, with `hh = −h`).
    fn unipc_b(&self, h: f64, n: usize) -> Vec<f64> {
        let (hh, b_h) = (-h, self.b_of(h));
        let (mut phi, mut factorial) = (hh.exp_m1() / hh - 1.0, 1.0);
        (1..=n)
            .map(|j| {
                let b = phi * factorial / b_h;
                factorial *= (j + 1) as f64;
                phi = phi / hh - 1.0 / factorial;
                b
            })
            .collect()
    }

    /// The order of step i of `steps` (diffusers' warm-up and `lower_order_final`/`_second`).
    fn order_at(&self, i: usize, steps: usize, lands_on_zero: bool) -> usize {
        let run = self.total_steps.unwrap_or(steps);
        let last = i + 1 == steps && (lands_on_zero || run < 15);
        let last_but_one = i + 2 == steps && run < 15;
        if i == 0 || last {
            1
        } else if !matches!(
            self.method,
            Method::DpmPP3 | Method::DpmPP3Sde | Method::Deis { third_order: true }
        ) || i == 1
            || last_but_one
        {
            2
        } else {
            3
        }
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for MultistepMap<B, M> {
    fn f(&self, rho: Tensor<B, 1>, z: Tensor<B, D>) -> Tensor<B, D> {
        let steps = self.grid.len() - 1;
        let i = self.step_at(rho.into_scalar().elem());
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        let b = self.rows_of(z.dims()[0]);
        let y = z.clone().narrow(0, 0, b);
        let t = Tensor::from_data(TensorData::from([self.timestep_at(i, rho_s)]), (&y.device(), y.dtype()));
        let eps = self
            .model
            .eps(y.clone().mul_scalar(NoiseSchedule::alpha_of_rho(rho_s)), t);
        if matches!(self.method, Method::Plms | Method::Lms | Method::Deis { .. }) {
            return self.plms_field(i, y, eps, &z);
        }
        let x0 = y.clone() - eps.mul_scalar(rho_s);
        let step = rho_t - rho_s;
        if let Method::UniPc { .. } = self.method {
            // [y; x̂0_{i−1}, …, x̂0_{i−n}; y_c_prev]: the history shifts in x̂0_i.
            let blocks = self.method.blocks();
            let ms: Vec<_> = (1..blocks - 1).map(|k| z.clone().narrow(0, k * b, b)).collect();
            let y_c_prev = z.narrow(0, (blocks - 1) * b, b);
            let (y_next, y_c) = self.unipc_step(i, steps, &y, &x0, &ms, &y_c_prev);
            let mut parts = vec![y_next - y, x0 - ms[0].clone()];
            parts.extend(ms.windows(2).map(|w| w[0].clone() - w[1].clone()));
            parts.push(y_c - y_c_prev);
            return Tensor::cat(parts, 0).div_scalar(step);
        }
        let m1 = z.clone().narrow(0, b, b);
        let m2 = (self.method.blocks() >= 3).then(|| z.clone().narrow(0, 2 * b, b));
        let h = (rho_s / rho_t).ln();
        let d = match (self.order_at(i, steps, rho_t == 0.0), &m2) {
            (1, _) => x0.clone(),
            (2, _) | (_, None) => {
                let r0 = (self.grid[i - 1] / rho_s).ln() / h;
                // D = D0 + k D1 with D1 = (x̂0_i − x̂0_{i−1})/r0: k = ½ (midpoint), or Heun's
                // weight over the step's (1 − e^{−h}) (the SDE's, over 1 − e^{−2h}).
                let k = match (self.heun, self.method) {
                    (false, _) => 0.5,
                    (true, Method::DpmPP2Sde | Method::DpmPP3Sde) => 1.0 / -(-2.0 * h).exp_m1() - 0.5 / h,
                    (true, _) => 1.0 / -(-h).exp_m1() - 1.0 / h,
                };
                x0.clone() + (x0.clone() - m1.clone()).mul_scalar(k / r0)
            }
            (_, Some(m2)) => {
                let r0 = (self.grid[i - 1] / rho_s).ln() / h;
                let r1 = (self.grid[i - 2] / self.grid[i - 1]).ln() / h;
                let d1_0 = (x0.clone() - m1.clone()).div_scalar(r0);
                let d1_1 = (m1.clone() - m2.clone()).div_scalar(r1);
                let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
                let d2 = (d1_0 - d1_1).div_scalar(r0 + r1);
                let (c0, c1, c2) = if self.method == Method::DpmPP3Sde {
                    // (1 − e^{−2h}) D = (1 − e^{−2h}) D0 + c1 D1 + c2 D2.
                    let em2 = (-2.0 * h).exp();
                    let c0 = 1.0 - em2;
                    (c0, c0 / (-2.0 * h) + 1.0, -((c0 - 2.0 * h) / (4.0 * h * h) - 0.5))
                } else {
                    // (1 − e^{−h}) D = (1 − e^{−h}) D0 + c1 D1 − c2 D2, with e^{−h} = ρ_t/ρ_s.
                    let em = (-h).exp();
                    (1.0 - em, (em - 1.0) / h + 1.0, (em - 1.0 + h) / (h * h) - 0.5)
                };
                x0.clone() + d1.mul_scalar(c1 / c0) - d2.mul_scalar(c2 / c0)
            }
        };
        let dy = match self.method {
            Method::DpmPP2Sde | Method::DpmPP3Sde => {
                // y_{i+1} − y_i = (r² − 1)(y_i − D) + ρ_t √(1 − r²) ξ_i.
                let r2 = (rho_t / rho_s).powi(2);
                let xi = self.noise.at(i, &y);
                ((y - d).mul_scalar(r2 - 1.0) + xi.mul_scalar(rho_t * (1.0 - r2).sqrt())).div_scalar(step)
            }
            _ => (y - d).div_scalar(rho_s),
        };
        let mut parts = vec![dy, (x0 - m1.clone()).div_scalar(step)];
        if let Some(m2) = m2 {
            parts.push((m1 - m2).div_scalar(step));
        }
        Tensor::cat(parts, 0)
    }
}

/// UniPC's matrix R: row j holds `r_k^j` for each ratio, then `1` when `ones` (its last
/// column, the current step's `r = 1`); square either way.
fn vandermonde(rks: &[f64], ones: bool) -> Vec<Vec<f64>> {
    let n = rks.len() + usize::from(ones);
    (0..n)
        .map(|j| {
            let mut row: Vec<f64> = rks.iter().map(|r| r.powi(j as i32)).collect();
            if ones {
                row.push(1.0);
            }
            row
        })
        .collect()
}

/// `a x = b` for a small square system, by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (x, p) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x
}

/// The step of a one-step map on `grid` that starts at ρ: the knot nearest it, the last
/// excepted (the solver's times pass through the state's float type).
pub(crate) fn knot_index(grid: &[f64], rho: f64) -> usize {
    (0..grid.len() - 1)
        .min_by(|&a, &b| (grid[a] - rho).abs().total_cmp(&(grid[b] - rho).abs()))
        .unwrap_or(0)
}
