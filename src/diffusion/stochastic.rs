//! Stochastic samplers with their noise given — DDIM with η > 0, Euler ancestral, LCM, TCD and
//! DPM2 ancestral — as one-step maps whose noise is a parameter, so that the exact adjoint
//! reaches it too (and DPM2 and γ = 0 TCD, deterministic, as the same maps without noise).
//!
//! A stochastic sampler adds fresh Gaussian noise ξ_i at every step. Drawn up front and held by
//! the step map as one parameter ([`StepNoise`]), the noise makes each step a deterministic map
//! of the sample, and the engine's `Checkpointed` and `Backprop` modes give the exact gradient
//! with respect to x_T, the conditioning, the weights and every ξ_i (what noise optimisation
//! through a stochastic sampler trains): a parameter's gradient is summed over the steps that
//! read it, as the network's weights' is. In `y = x/α`, with `ᾱ = α² = 1/(1 + ρ²)` and
//! `x̂0 = y − ρ_i ε(α_i y, t_i)`, step i is:
//!
//! - DDIM(η) (Song et al. 2021; diffusers' `DDIMScheduler.step` with `eta` and
//!   `variance_noise`): `σ_i = η √((1 − ᾱ_{i+1})/(1 − ᾱ_i)) √(1 − ᾱ_i/ᾱ_{i+1})` and
//!   `y_{i+1} = x̂0 + (√(1 − ᾱ_{i+1} − σ_i²) ε + σ_i ξ_i) / α_{i+1}`; η = 0 is DDIM, η = 1 DDPM's
//!   posterior variance.
//! - Euler ancestral (k-diffusion's `sample_euler_ancestral`; diffusers'
//!   `EulerAncestralDiscreteScheduler`): `ρ_up = ρ_{i+1} √(1 − ρ_{i+1}²/ρ_i²)`,
//!   `ρ_down = √(ρ_{i+1}² − ρ_up²)`, `y_{i+1} = y + (ρ_down − ρ_i) ε + ρ_up ξ_i`.
//! - LCM, multistep consistency sampling (Luo et al. 2023, Algorithm 1; diffusers'
//!   `LCMScheduler`): the consistency function's value `D = c_skip α_i y + c_out x̂0` (EDM's
//!   boundary scalings at `s = 10 t_i`: `c_skip = ¼/(s² + ¼)`, `c_out = s/√(s² + ¼)`), then
//!   noised afresh to the next level, `y_{i+1} = D + ρ_{i+1} ξ_i`; the last step returns `D`
//!   (its ρ is 0, and no noise is drawn for it).
//! - TCD, strategic stochastic sampling (Zheng et al. 2024; diffusers' `TCDScheduler`): a DDIM
//!   step down to the level `ρ_s` of timestep `s = ⌊(1 − γ) t_{i+1}⌋`, then noise back up,
//!   `y_{i+1} = y + (ρ_s − ρ_i) ε + √(ρ_{i+1}² − ρ_s²) ξ_i`; γ = 0 is DDIM, and the last step
//!   (to timestep 0) draws no noise.
//! - DPM2 and DPM2 ancestral (k-diffusion's `sample_dpm_2` and `sample_dpm_2_ancestral`;
//!   diffusers' `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`): a midpoint
//!   step in log ρ, `ε` evaluated again at `ỹ = y + (ρ_m − ρ_i) ε(y)` on the level
//!   `ρ_m = √(ρ_i ρ_d)`, then `y_{i+1} = y + (ρ_d − ρ_i) ε(ỹ) + ρ_u ξ_i`, with Euler ancestral's
//!   `ρ_d`, `ρ_u` (DPM2: `ρ_d = ρ_{i+1}`, no noise). The last step, to ρ = 0, is Euler (two
//!   network calls per step but the last).
//!
//! The state is the sample alone, so what the engine stores per step is what a deterministic
//! sampler stores; the noise is held once. (Carried in the state instead, as it was first, every
//! stored state and the solve's output at every step held all S + 1 blocks, and memory grew as
//! S²: 1 342 MiB against 72 MiB now for 200 steps of DDIM η = 1 on the tiny UNet at a 32×32
//! latent, `examples/bench_diffusion.rs --sampler ddim-eta`.)
//!
//! Each is written, as the multistep maps are, as one Euler step of the field
//! `f = (y_{i+1} − y_i)/h`, `h = ρ_{i+1} − ρ_i`. None of them is an ODE's discretisation in
//! this form, so there is no continuous adjoint: `Backsolve` is refused.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::Dynamics;

/// A stochastic sampler's noise, one block per step, as one parameter of its step map: step i's
/// block, flattened, is row i. A parameter's gradient is what the engine's adjoint already sums
/// over the steps, for weights; so the noise rides neither in the state nor in any stored step.
///
/// It is trainable exactly when some block is tracked (`require_grad`, or computed from tracked
/// tensors): then each block's gradient flows back to it through burn's graph. Untracked, it is
/// frozen and costs the adjoint nothing.
///
/// ```
/// use adjoint_dpm::diffusion::StepNoise;
/// use burn::backend::{Autodiff, Flex};
/// use burn::prelude::*;
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let xi: Vec<_> = (0..3)
///     .map(|k| Tensor::<B, 2>::full([2, 4], k as f32, &device).require_grad())
///     .collect();
/// let noise = StepNoise::new(xi.clone());
/// let y = Tensor::<B, 2>::zeros([2, 4], &device);
/// assert_eq!(noise.len(), 3);
/// // Step 2's block, as the step map reads it; its gradient reaches `xi[2]`.
/// let grads = noise.at(2, &y).sum().backward();
/// assert_eq!(xi[2].grad(&grads).map(|g| g.sum().into_scalar()), Some(8.0)); // ones, 2 × 4
/// assert!(xi[1].grad(&grads).is_none_or(|g| g.abs().sum().into_scalar() == 0.0));
/// ```
#[derive(Module, Debug)]
pub struct StepNoise<B: Backend> {
    /// `[steps, elements of a block]`; `None` when the map injects no noise.
    blocks: Option<Param<Tensor<B, 2>>>,
}

impl<B: Backend> StepNoise<B> {
    /// No noise: a deterministic map's.
    pub fn none() -> Self {
        Self { blocks: None }
    }

    /// The noise `blocks`, one per step, all of one shape (the sampler checks this).
    pub fn new<const D: usize>(blocks: Vec<Tensor<B, D>>) -> Self {
        if blocks.is_empty() {
            return Self::none();
        }
        let rows: Vec<Tensor<B, 2>> = blocks
            .into_iter()
            .map(|b| {
                let n = b.shape().num_elements();
                b.reshape([1, n])
            })
            .collect();
        // `initialized` keeps the tensor as it is: `Param::from_tensor` would ask a tensor that
        // is not a leaf of the user's graph to `require_grad`, which burn-autodiff refuses.
        Self {
            blocks: Some(Param::initialized(ParamId::new(), Tensor::cat(rows, 0))),
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.as_ref().map_or(0, |b| b.val().dims()[0])
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Step `i`'s block, shaped like `like` (zeros where there is none: no noise).
    pub fn at<const D: usize>(&self, i: usize, like: &Tensor<B, D>) -> Tensor<B, D> {
        match &self.blocks {
            Some(blocks) => blocks.val().narrow(0, i, 1).reshape(like.dims()),
            None => like.zeros_like(),
        }
    }
}

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
    /// LCM: the consistency function's value, noised afresh to `ρ_{i+1}`.
    Lcm {
        /// The factor on the timestep in the boundary scalings (diffusers' `timestep_scaling`).
        timestep_scaling: f64,
    },
    /// TCD: a DDIM step down to the level of `⌊(1 − γ) t_{i+1}⌋`
    /// ([`NoisyStepMap::with_landing`]), then noise up to `ρ_{i+1}`.
    Tcd,
    /// DPM2: a midpoint step in log ρ, ε taken again at the midpoint
    /// ([`NoisyStepMap::with_midpoints`]); `ancestral`, down to Euler ancestral's `ρ_down`
    /// and noise up to `ρ_{i+1}`.
    Dpm2 {
        /// With ancestral noise.
        ancestral: bool,
    },
}

/// Euler ancestral's split of a step from `ρ_s` to `ρ_t`: the level `ρ_down` the step lands
/// on and the noise `ρ_up` that takes it back up, `ρ_down² + ρ_up² = ρ_t²`.
pub(crate) fn ancestral_levels(rho_s: f64, rho_t: f64) -> (f64, f64) {
    let up = rho_t * (1.0 - (rho_t * rho_t) / (rho_s * rho_s)).max(0.0).sqrt();
    ((rho_t * rho_t - up * up).max(0.0).sqrt(), up)
}

/// A stochastic sampler's step map of `model` on a fixed decreasing ρ grid, as an Euler field
/// on the sample `y`, its noise a parameter (see the module's doc).
#[derive(Module, Debug)]
pub struct NoisyStepMap<B: Backend, M: Module<B>> {
    /// The ε-network.
    pub model: M,
    /// ξ_0 … ξ_{S−1}.
    pub noise: StepNoise<B>,
    #[module(skip)]
    grid: Vec<f64>,
    /// The network's timestep at each knot.
    #[module(skip)]
    timesteps: Vec<f64>,
    #[module(skip)]
    step: NoisyStep,
    /// Where each TCD step's DDIM part lands, in ρ.
    #[module(skip)]
    landing: Vec<f64>,
    /// DPM2's midpoint of each step, its level and the network's timestep there (`None`: an
    /// Euler step).
    #[module(skip)]
    midpoints: Vec<Option<(f64, f64)>>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> NoisyStepMap<B, M> {
    /// The map of `model` on `grid` (decreasing ρ, at least two knots), the network told
    /// `timesteps[i]` at knot i, injecting `noise[i]` at step i (one standard normal tensor of
    /// the sample's shape per step).
    pub fn new<const D: usize>(
        model: M,
        step: NoisyStep,
        grid: Vec<f64>,
        timesteps: Vec<f64>,
        noise: Vec<Tensor<B, D>>,
    ) -> Self {
        Self {
            model: crate::ode::materialized(model),
            noise: StepNoise::new(noise),
            grid,
            timesteps,
            step,
            landing: Vec::new(),
            midpoints: Vec::new(),
            _backend: core::marker::PhantomData,
        }
    }

    /// The level each TCD step's DDIM part lands on before noise takes it up to the next knot
    /// (`ρ_s`, one per step).
    pub fn with_landing(mut self, landing: Vec<f64>) -> Self {
        self.landing = landing;
        self
    }

    /// DPM2's midpoint of each step: its level and the network's timestep there, or `None` for
    /// an Euler step.
    pub fn with_midpoints(mut self, midpoints: Vec<Option<(f64, f64)>>) -> Self {
        self.midpoints = midpoints;
        self
    }

    /// Step i's update as `y_{i+1} = c_y y_i + c_ε ε + c_ξ ξ_i`: `(c_y, c_ε, c_ξ)`.
    fn coefficients(&self, i: usize) -> (f64, f64, f64) {
        let (rho_s, rho_t) = (self.grid[i], self.grid[i + 1]);
        let (c_eps, c_xi) = match self.step {
            NoisyStep::Ddim { eta } => {
                let abar = |rho: f64| 1.0 / (1.0 + rho * rho);
                let (a_s, a_t) = (abar(rho_s), abar(rho_t));
                let sigma = eta * ((1.0 - a_t) / (1.0 - a_s)).sqrt() * (1.0 - a_s / a_t).sqrt();
                let alpha_t = a_t.sqrt();
                let direction = (1.0 - a_t - sigma * sigma).max(0.0).sqrt() / alpha_t;
                (direction - rho_s, sigma / alpha_t)
            }
            NoisyStep::EulerAncestral | NoisyStep::Dpm2 { ancestral: true } => {
                let (down, up) = ancestral_levels(rho_s, rho_t);
                (down - rho_s, up)
            }
            NoisyStep::Dpm2 { ancestral: false } => (rho_t - rho_s, 0.0),
            NoisyStep::Tcd => {
                // Without landing levels, the next knot (DDIM).
                let land = self.landing.get(i).copied().unwrap_or(rho_t);
                (land - rho_s, (rho_t * rho_t - land * land).max(0.0).sqrt())
            }
            NoisyStep::Lcm { timestep_scaling } => {
                // D = c_skip x_t + c_out x̂0 with x_t = α_i y and x̂0 = y − ρ_i ε.
                let s = self.timesteps[i] * timestep_scaling;
                let (c_skip, c_out) = (0.25 / (s * s + 0.25), s / (s * s + 0.25).sqrt());
                return (
                    c_skip * NoiseSchedule::alpha_of_rho(rho_s) + c_out,
                    -c_out * rho_s,
                    rho_t,
                );
            }
        };
        (1.0, c_eps, c_xi)
    }
}

impl<B: Backend, M: EpsModel<B, D>, const D: usize> Dynamics<B, D> for NoisyStepMap<B, M> {
    fn f(&self, rho: Tensor<B, 1>, y: Tensor<B, D>) -> Tensor<B, D> {
        let i = super::dpm_solver::knot_index(&self.grid, rho.into_scalar().elem());
        let t = Tensor::from_data(TensorData::from([self.timesteps[i]]), (&y.device(), y.dtype()));
        let mut eps = self
            .model
            .eps(y.clone().mul_scalar(NoiseSchedule::alpha_of_rho(self.grid[i])), t);
        if let Some(&Some((rho_m, t_m))) = self.midpoints.get(i) {
            // DPM2: ε again at the midpoint reached by an Euler step.
            let y_m = y.clone() + eps.mul_scalar(rho_m - self.grid[i]);
            let t_m = Tensor::from_data(TensorData::from([t_m]), (&y.device(), y.dtype()));
            eps = self.model.eps(y_m.mul_scalar(NoiseSchedule::alpha_of_rho(rho_m)), t_m);
        }
        let (c_y, c_eps, c_xi) = self.coefficients(i);
        let h = self.grid[i + 1] - self.grid[i];
        let mut step = eps.mul_scalar(c_eps);
        if c_y != 1.0 {
            step = step + y.mul_scalar(c_y - 1.0);
        }
        // LCM, TCD and DPM2 ancestral draw none for their last step.
        if i < self.noise.len() {
            let xi = self.noise.at(i, &step);
            step = step + xi.mul_scalar(c_xi);
        }
        step.div_scalar(h)
    }
}
