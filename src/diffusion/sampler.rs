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

use crate::diffusion::dpm_solver::MultistepMap;
use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::error::DiffusionError;
use crate::diffusion::pf_ode::PfOde;
use crate::diffusion::schedule::{
    dpm_solver_timesteps, exponential_levels, fractional_timesteps, karras_levels, lcm_timesteps, timesteps,
    NoiseSchedule, TimestepSpacing,
};
use crate::diffusion::stochastic::{ancestral_levels, NoisyStep, NoisyStepMap};
use crate::ode::tableau::{self, ButcherTableau};
use crate::ode::{Dynamics, GradientMode, NeuralOde, Solver, StepControl};

/// The integration method in ρ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// Euler in ρ: DDIM with η = 0 (Song et al. 2021), exactly.
    Ddim,
    /// Heun in ρ: the second-order sampler of EDM (Karras et al. 2022, Algorithm 1) and
    /// AdjointDPM, one extra network call per step; a last step to ρ = 0 is an Euler step, so
    /// the network is never evaluated at ρ = 0 (as EDM and diffusers' `HeunDiscreteScheduler`).
    Heun,
    /// Classical RK4 in ρ.
    Rk4,
    /// Euler ancestral (k-diffusion; diffusers' `EulerAncestralDiscreteScheduler`): an Euler
    /// step part of the way down, then fresh noise back up to the next level. Stochastic: run
    /// with [`Sampler::sample_with_noise`]; exact and Backprop gradients (see
    /// [`NoisyStepMap`]).
    EulerAncestral,
    /// DPM-Solver++(2M) (Lu et al. 2022): the multistep exponential integrator in data-prediction
    /// form, `y_{i+1} = (ρ_{i+1}/ρ_i) y_i + (1 − ρ_{i+1}/ρ_i) D_i` with `D_i` a second-order
    /// combination of the last two x̂_0. Run as a one-step method on `[y; x̂0_prev]` (see
    /// [`MultistepMap`]), so `Checkpointed` gives its exact gradient; it has no continuous
    /// adjoint (`Backsolve` is refused).
    DpmSolverPP2M,
    /// DPM-Solver++(3M): the same with a third-order combination of the last three x̂_0 from
    /// the third step on (diffusers' `solver_order = 3`), state `[y; x̂0_prev; x̂0_prev2]`.
    DpmSolverPP3M,
    /// DPM-Solver++(2M) SDE (diffusers' `algorithm_type = "sde-dpmsolver++"`, "DPM++ 2M SDE"):
    /// the 2M update with fresh noise at each step. Stochastic: run it with
    /// [`Sampler::sample_with_noise`]; exact and Backprop gradients, the noise's included.
    DpmSolverPP2MSde,
    /// DPM-Solver++(3M) SDE (`algorithm_type = "sde-dpmsolver++"`, `solver_order = 3`, "DPM++ 3M
    /// SDE"): 3M's orders with the SDE's coefficients and fresh noise at each step. Stochastic,
    /// as [`SamplerKind::DpmSolverPP2MSde`].
    DpmSolverPP3MSde,
    /// UniPC (Zhao et al. 2023) as diffusers' `UniPCMultistepScheduler` defaults to: a
    /// second-order multistep predictor (UniP) and a corrector (UniC) that refines each sample
    /// with the network output already computed there, so no extra network call; state
    /// `[y; x̂0_prev; x̂0_prev2; y_corrected_prev]`. Exact and Backprop gradients, like DPM-Solver++.
    ///
    /// `bh1`: `B(h) = −h` instead of `e^{−h} − 1` (diffusers' `solver_type = "bh1"`, which the
    /// paper recommends for unconditional sampling in under 10 steps). `third_order`: diffusers'
    /// `solver_order = 3` (the paper's choice for unconditional sampling), with one more data
    /// prediction in the state.
    UniPc {
        /// `solver_type = "bh1"` (else bh2).
        bh1: bool,
        /// `solver_order = 3` (else 2).
        third_order: bool,
    },
    /// PLMS (Liu et al. 2022; diffusers' `PNDMScheduler` with `skip_prk_steps`, Stable
    /// Diffusion 1.x's default): DDIM's step with ε extrapolated Adams–Bashforth-style from the
    /// last four evaluations, a trapezoid step first (one network call more than steps). State
    /// `[y; ε_prev; ε_prev2; ε_prev3]`; exact and Backprop gradients, like DPM-Solver++.
    Plms,
    /// LMS (k-diffusion's `sample_lms`; diffusers' `LMSDiscreteScheduler`): linear multistep
    /// in ρ of order up to 4, its weights the integrals of the Lagrange basis over each step,
    /// on Euler's levels. State as PLMS's; exact and Backprop gradients.
    Lms,
    /// DEIS (Zhang & Chen 2023; diffusers' `DEISMultistepScheduler`, "logrho"): the exponential
    /// integrator with ε interpolated as a polynomial in log ρ through the last evaluations,
    /// integrated exactly; DPM-Solver++'s timesteps and orders, the last step to ᾱ_0. State
    /// `[y; ε_prev(; ε_prev2)]`; exact and Backprop gradients, like DPM-Solver++.
    Deis {
        /// `solver_order = 3` (else 2, diffusers' default).
        third_order: bool,
    },
    /// LCM, multistep consistency sampling (Luo et al. 2023; diffusers' `LCMScheduler`), for
    /// latent consistency models (LCM-distilled UNets, LCM-LoRA): each step takes the
    /// consistency function's value and noises it afresh to the next level; the last returns
    /// it. Stochastic, as [`SamplerKind::EulerAncestral`] (see [`NoisyStepMap`]); settings in
    /// [`LcmOptions`].
    Lcm,
    /// TCD, strategic stochastic sampling (Zheng et al. 2024, "Trajectory Consistency
    /// Distillation"; diffusers' `TCDScheduler`), for TCD-distilled models and TCD-LoRA: LCM's
    /// timesteps, each step a DDIM step down to the level of `⌊(1 − γ) t_{i+1}⌋` and fresh noise
    /// back up, γ = [`Sampler::eta`] (0: deterministic, DDIM on those timesteps). Stochastic for
    /// γ > 0, as [`SamplerKind::Lcm`]; no continuous adjoint.
    Tcd,
    /// DPM2 (k-diffusion's `sample_dpm_2`, diffusers' `KDPM2DiscreteScheduler`, A1111's "DPM2"):
    /// a midpoint step in log ρ, two network calls per step (one for the last, an Euler step to
    /// ρ = 0), on Euler's levels; `ancestral` (`KDPM2AncestralDiscreteScheduler`, "DPM2 a")
    /// lands on Euler ancestral's `ρ_down` and draws fresh noise up to the next level (see
    /// [`NoisyStepMap`]). Exact and Backprop gradients; no continuous adjoint.
    Dpm2 {
        /// With ancestral noise.
        ancestral: bool,
    },
}

/// A latent consistency model's sampling settings (diffusers' `LCMScheduler` config). Other
/// samplers ignore them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LcmOptions {
    /// The timesteps the model was distilled on, `N / original_steps` apart
    /// (`original_inference_steps`, 50).
    pub original_steps: usize,
    /// The factor on the timestep in the boundary scalings `c_skip`, `c_out`
    /// (`timestep_scaling`, 10).
    pub timestep_scaling: f64,
}

impl Default for LcmOptions {
    fn default() -> Self {
        Self {
            original_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

impl SamplerKind {
    fn tableau(self) -> &'static ButcherTableau {
        match self {
            SamplerKind::Ddim
            | SamplerKind::EulerAncestral
            | SamplerKind::Lcm
            | SamplerKind::Tcd
            | SamplerKind::Dpm2 { .. } => &tableau::EULER,
            SamplerKind::Heun => &tableau::HEUN,
            SamplerKind::Rk4 => &tableau::RK4,
            SamplerKind::DpmSolverPP2M
            | SamplerKind::DpmSolverPP3M
            | SamplerKind::DpmSolverPP2MSde
            | SamplerKind::DpmSolverPP3MSde
            | SamplerKind::UniPc { .. }
            | SamplerKind::Plms
            | SamplerKind::Lms
            | SamplerKind::Deis { .. } => &tableau::EULER,
        }
    }

    /// Whether it is a multistep method (DPM-Solver++, UniPC, PLMS, LMS, DEIS), which has no
    /// continuous adjoint.
    pub fn is_multistep(self) -> bool {
        matches!(
            self,
            SamplerKind::DpmSolverPP2M
                | SamplerKind::DpmSolverPP3M
                | SamplerKind::DpmSolverPP2MSde
                | SamplerKind::DpmSolverPP3MSde
                | SamplerKind::UniPc { .. }
                | SamplerKind::Plms
                | SamplerKind::Lms
                | SamplerKind::Deis { .. }
        )
    }
}

/// Where the noise levels of a run lie: diffusers' `use_karras_sigmas`,
/// `use_exponential_sigmas` and `use_lu_lambdas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseLevels {
    /// The schedule's levels at the spaced timesteps ([`Sampler::spacing`]).
    #[default]
    Spaced,
    /// Karras et al. (2022): evenly spaced in ρ^(1/7), dense at low noise.
    Karras,
    /// Evenly spaced in log ρ, that is in λ (`use_exponential_sigmas`).
    Exponential,
    /// The levels of `Exponential`, the network told rounded timesteps there:
    /// `DPMSolverMultistepScheduler`'s `use_lu_lambdas` (Lu et al.'s uniform-λ steps, which
    /// diffusers spaces in λ between the same ends).
    LuLambdas,
}

/// How a run turns timesteps into noise levels: the two conventions of diffusers' schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepConvention {
    /// `DDIMScheduler`, `DPMSolverMultistepScheduler`, `UniPCMultistepScheduler`: integer
    /// timesteps, the schedule's ρ at each. Karras' and exponential levels span the whole
    /// schedule, ρ(N−1) to ρ(0); the network is told their timesteps rounded (Karras, Lu) or
    /// truncated (exponential), as those schedulers store them as integers.
    #[default]
    Integer,
    /// `EulerDiscreteScheduler`, `HeunDiscreteScheduler`: "linspace" timesteps are not
    /// rounded, and ρ is interpolated linearly between training steps
    /// ([`NoiseSchedule::rho_lerp`]). Karras' and exponential levels span the spaced levels,
    /// and the network is told their fractional timesteps.
    Fractional,
}

/// DPM-Solver++'s second-order update (diffusers' `solver_type` of
/// `DPMSolverMultistepScheduler`): both take the same two data predictions and weigh their
/// difference `D1` differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecondOrder {
    /// `D = D0 + D1/2` (diffusers' default, `"midpoint"`).
    #[default]
    Midpoint,
    /// `D = D0 + (1/(1 − e^{−h}) − 1/h) D1` (`"heun"`; for the SDE, with `2h`).
    Heun,
}

/// A sampler: method, timesteps as diffusers picks them, and how it is differentiated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Method.
    pub kind: SamplerKind,
    /// Number of inference steps S.
    pub steps: usize,
    /// How the S timesteps are spread over the training steps. Every step goes from one
    /// timestep to the next. (diffusers' DDIM instead steps from t to t − N/S, which is the next
    /// timestep only for "leading" spacing or when S divides N; with "trailing" and other S it
    /// lands on a noise level the next step does not start from.)
    pub spacing: TimestepSpacing,
    /// Added to "leading" timesteps (diffusers' `steps_offset`; 1 for Stable Diffusion).
    pub steps_offset: usize,
    /// The last step lands on ᾱ = 1 (ρ = 0, diffusers' `set_alpha_to_one`) rather than on ᾱ_0.
    pub final_alpha_one: bool,
    /// Where the noise levels lie ([`Sampler::noise_levels`], [`Sampler::karras_sigmas`]).
    pub noise_levels: NoiseLevels,
    /// Which of diffusers' conventions turns timesteps into noise levels.
    pub convention: TimestepConvention,
    /// DPM-Solver++'s second-order update ([`Sampler::second_order`]); other samplers ignore it.
    pub second_order: SecondOrder,
    /// The fraction of the steps run, the last ones (img2img; see [`Sampler::strength`]).
    pub strength: f64,
    /// DDIM's η ([`Sampler::eta`]): 0 is the deterministic sampler.
    pub eta: f64,
    /// LCM's settings ([`Sampler::lcm`]).
    pub lcm: LcmOptions,
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
            noise_levels: NoiseLevels::Spaced,
            convention: TimestepConvention::Integer,
            second_order: SecondOrder::Midpoint,
            strength: 1.0,
            eta: 0.0,
            lcm: LcmOptions::default(),
            gradient: GradientMode::default(),
        }
    }

    /// LCM (multistep latent consistency sampling) with `steps` steps as diffusers'
    /// `LCMScheduler` defaults: `steps` of the 50 timesteps the model was distilled on, the
    /// last step to ρ = 0, exact gradients. Stochastic: run it with
    /// [`Sampler::sample_with_noise`], one noise tensor per step but the last.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let lcm = Sampler::lcm(4);
    /// assert_eq!(lcm.timesteps(&schedule)?, [999.0, 759.0, 499.0, 259.0]);
    /// assert_eq!(lcm.noise_count(&schedule)?, 3);
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn lcm(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Lcm,
            ..Self::ddim(steps)
        }
    }

    /// TCD with `steps` steps and γ = 0.3, as diffusers' `TCDScheduler` and its pipelines
    /// default: LCM's timesteps ([`LcmOptions`]), the last step to timestep 0 (ᾱ_0). Set γ with
    /// [`Sampler::eta`]; for γ > 0 run it with [`Sampler::sample_with_noise`], one noise tensor
    /// per step but the last.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let tcd = Sampler::tcd(4);
    /// assert_eq!(tcd.timesteps(&schedule)?, [999.0, 759.0, 499.0, 259.0]);
    /// assert_eq!((tcd.noise_count(&schedule)?, tcd.eta(0.0).noise_count(&schedule)?), (3, 0));
    /// assert_eq!(tcd.rho_grid(&schedule)?[4], schedule.rho(0.0));
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn tcd(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Tcd,
            eta: 0.3,
            final_alpha_one: false,
            ..Self::ddim(steps)
        }
    }

    /// DEIS with `steps` steps as diffusers' `DEISMultistepScheduler` defaults (`solver_order`
    /// 2): [`Sampler::dpm_solver_pp_2m`]'s timesteps, the last step to ᾱ_0 (DEIS's last level is
    /// always the schedule's smallest), exact gradients.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let deis = Sampler::deis(10);
    /// assert_eq!(deis.timesteps(&schedule)?, Sampler::dpm_solver_pp_2m(10).timesteps(&schedule)?);
    /// assert_eq!(deis.rho_grid(&schedule)?[10], schedule.rho(0.0));
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn deis(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Deis { third_order: false },
            final_alpha_one: false,
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// DEIS with diffusers' `solver_order = 3` (the DEIS paper's choice), otherwise as
    /// [`Sampler::deis`].
    pub fn deis_third_order(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Deis { third_order: true },
            ..Self::deis(steps)
        }
    }

    /// PLMS with `steps` steps as diffusers' `PNDMScheduler` defaults (with `skip_prk_steps`):
    /// DDIM's "leading" timesteps, last step to ᾱ_0 (`set_alpha_to_one = False`), exact
    /// gradients. Stable Diffusion 1.x ships it with `steps_offset = 1`.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let mut plms = Sampler::plms(20);
    /// plms.steps_offset = 1;
    /// let ts = plms.timesteps(&NoiseSchedule::sd_scaled_linear())?;
    /// assert_eq!((ts[0], ts[1], ts[19]), (951.0, 901.0, 1.0));
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn plms(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Plms,
            final_alpha_one: false,
            ..Self::ddim(steps)
        }
    }

    /// DPM-Solver++ (2M, 3M, and their SDEs) with the second-order update `update` (diffusers'
    /// `solver_type`).
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{Sampler, SecondOrder};
    /// let dpm = Sampler::dpm_solver_pp_2m(20).second_order(SecondOrder::Heun);
    /// assert_eq!(dpm.second_order, SecondOrder::Heun);
    /// ```
    pub fn second_order(self, update: SecondOrder) -> Self {
        Self {
            second_order: update,
            ..self
        }
    }

    /// DPM-Solver++(2M) with `steps` steps, as diffusers' `DPMSolverMultistepScheduler` defaults:
    /// "linspace" spacing, last step to ρ = 0 in first order, exact gradients.
    pub fn dpm_solver_pp_2m(steps: usize) -> Self {
        Self {
            kind: SamplerKind::DpmSolverPP2M,
            spacing: TimestepSpacing::Linspace,
            ..Self::ddim(steps)
        }
    }

    /// DPM-Solver++(3M) with `steps` steps, otherwise as [`Sampler::dpm_solver_pp_2m`].
    pub fn dpm_solver_pp_3m(steps: usize) -> Self {
        Self {
            kind: SamplerKind::DpmSolverPP3M,
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// DPM-Solver++(2M) SDE with `steps` steps, otherwise as [`Sampler::dpm_solver_pp_2m`].
    /// Stochastic: run it with [`Sampler::sample_with_noise`].
    pub fn dpm_solver_pp_2m_sde(steps: usize) -> Self {
        Self {
            kind: SamplerKind::DpmSolverPP2MSde,
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// DPM-Solver++(3M) SDE with `steps` steps, otherwise as [`Sampler::dpm_solver_pp_2m`].
    /// Stochastic: run it with [`Sampler::sample_with_noise`].
    pub fn dpm_solver_pp_3m_sde(steps: usize) -> Self {
        Self {
            kind: SamplerKind::DpmSolverPP3MSde,
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// UniPC with `steps` steps, otherwise as [`Sampler::dpm_solver_pp_2m`] (diffusers'
    /// `UniPCMultistepScheduler` picks the same timesteps).
    pub fn unipc(steps: usize) -> Self {
        Self {
            kind: SamplerKind::UniPc {
                bh1: false,
                third_order: false,
            },
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// UniPC with diffusers' `solver_type = "bh1"`, otherwise as [`Sampler::unipc`].
    pub fn unipc_bh1(steps: usize) -> Self {
        Self {
            kind: SamplerKind::UniPc {
                bh1: true,
                third_order: false,
            },
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// UniPC with diffusers' `solver_order = 3`, otherwise as [`Sampler::unipc`]. (Both options
    /// at once: `SamplerKind::UniPc { bh1: true, third_order: true }`.)
    pub fn unipc_third_order(steps: usize) -> Self {
        Self {
            kind: SamplerKind::UniPc {
                bh1: false,
                third_order: true,
            },
            ..Self::dpm_solver_pp_2m(steps)
        }
    }

    /// Euler in ρ with `steps` steps as diffusers' `EulerDiscreteScheduler` defaults:
    /// unrounded "linspace" timesteps, ρ interpolated linearly between training steps, last
    /// step to ρ = 0. The same map as DDIM (Euler in ρ is DDIM), on that scheduler's levels.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let ts = Sampler::euler(20).timesteps(&schedule)?;
    /// assert!((ts[1] - 946.421_052_631_578_9).abs() < 1e-9); // 999 · 18/19, not rounded
    /// assert_eq!(Sampler::euler(20).rho_grid(&schedule)?[20], 0.0);
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn euler(steps: usize) -> Self {
        Self {
            spacing: TimestepSpacing::Linspace,
            convention: TimestepConvention::Fractional,
            ..Self::ddim(steps)
        }
    }

    /// Euler ancestral with `steps` steps on [`Sampler::euler`]'s levels, as diffusers'
    /// `EulerAncestralDiscreteScheduler` defaults. Stochastic: run it with
    /// [`Sampler::sample_with_noise`].
    pub fn euler_ancestral(steps: usize) -> Self {
        Self {
            kind: SamplerKind::EulerAncestral,
            ..Self::euler(steps)
        }
    }

    /// DDIM's η (diffusers' `eta`): each step injects `η` times the DDPM posterior's standard
    /// deviation of fresh noise (η = 1: DDPM's ancestral sampler). With η > 0 the sampler is
    /// stochastic: run it with [`Sampler::sample_with_noise`], one standard normal tensor per
    /// step, and its exact gradient reaches each of them too.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// assert_eq!(Sampler::ddim(10).eta(1.0).noise_count(&schedule)?, 10);
    /// assert_eq!(Sampler::ddim(10).noise_count(&schedule)?, 0);
    /// assert!(Sampler::heun(10).eta(0.5).noise_count(&schedule).is_err()); // DDIM's alone
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// The noise step of a stochastic sampler; `None` for a deterministic one.
    fn noisy_step(&self) -> Result<Option<NoisyStep>, DiffusionError> {
        let bad = |why: &'static str| DiffusionError::BadEta { eta: self.eta, why };
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(bad("η must be finite and ≥ 0"));
        }
        Ok(match (self.kind, self.eta > 0.0) {
            (SamplerKind::Tcd, _) if self.eta > 1.0 => return Err(bad("TCD's γ must be in [0, 1]")),
            (SamplerKind::Tcd, _) => Some(NoisyStep::Tcd),
            (SamplerKind::Dpm2 { ancestral }, false) => Some(NoisyStep::Dpm2 { ancestral }),
            (SamplerKind::Ddim, true) => Some(NoisyStep::Ddim { eta: self.eta }),
            (SamplerKind::EulerAncestral, false) => Some(NoisyStep::EulerAncestral),
            (SamplerKind::Lcm, false) => Some(NoisyStep::Lcm {
                timestep_scaling: self.lcm.timestep_scaling,
            }),
            (_, false) => None,
            (_, true) => {
                return Err(bad(
                    "η belongs to DDIM (and TCD's γ; Euler ancestral, LCM and DPM-Solver++ SDE fix their noise's scale, the other samplers inject none)",
                ))
            }
        })
    }

    /// Whether the sampler injects noise at its steps: DDIM with η > 0, Euler ancestral, LCM,
    /// TCD with γ > 0, DPM-Solver++(2M) and (3M) SDE.
    fn is_stochastic(&self) -> Result<bool, DiffusionError> {
        let noisy = self.noisy_step()?.is_some();
        Ok(match self.kind {
            SamplerKind::Tcd => self.eta > 0.0,
            SamplerKind::Dpm2 { ancestral } => ancestral,
            SamplerKind::DpmSolverPP2MSde | SamplerKind::DpmSolverPP3MSde => true,
            _ => noisy,
        })
    }

    /// How many noise tensors [`Sampler::sample_with_noise`] takes: one per step run for a
    /// stochastic sampler (DDIM with η > 0, Euler ancestral, DPM-Solver++ SDE; LCM, which
    /// draws none for its last step, one fewer), none otherwise. As in diffusers, a last step
    /// to ρ = 0 scales its noise by 0.
    pub fn noise_count(&self, schedule: &NoiseSchedule) -> Result<usize, DiffusionError> {
        self.noise_count_on(&self.rho_grid(schedule)?)
    }

    /// [`Sampler::noise_count`] of a run on `grid`.
    fn noise_count_on(&self, grid: &[f64]) -> Result<usize, DiffusionError> {
        let steps = grid.len().saturating_sub(1);
        Ok(match (self.is_stochastic()?, self.kind) {
            (false, _) => 0,
            (true, SamplerKind::Lcm | SamplerKind::Tcd | SamplerKind::Dpm2 { .. }) => steps.saturating_sub(1),
            (true, _) => steps,
        })
    }

    /// LMS with `steps` steps as diffusers' `LMSDiscreteScheduler` defaults: [`Sampler::euler`]'s
    /// levels and timesteps, order up to 4, exact gradients.
    pub fn lms(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Lms,
            ..Self::euler(steps)
        }
    }

    /// DPM2 with `steps` steps (2·steps − 1 network calls) as diffusers'
    /// `KDPM2DiscreteScheduler` defaults, on [`Sampler::euler`]'s levels (with Karras' levels,
    /// the network told their rounded timesteps, as that scheduler does).
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let dpm2 = Sampler::dpm2(10);
    /// assert_eq!(dpm2.timesteps(&schedule)?, Sampler::euler(10).timesteps(&schedule)?);
    /// assert_eq!(Sampler::dpm2_ancestral(10).noise_count(&schedule)?, 9); // none for the last step
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn dpm2(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Dpm2 { ancestral: false },
            ..Self::euler(steps)
        }
    }

    /// DPM2 ancestral with `steps` steps as diffusers' `KDPM2AncestralDiscreteScheduler`
    /// defaults. Stochastic: run it with [`Sampler::sample_with_noise`], one noise tensor per
    /// step but the last.
    pub fn dpm2_ancestral(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Dpm2 { ancestral: true },
            ..Self::euler(steps)
        }
    }

    /// Heun in ρ with `steps` steps (2·steps − 1 network calls) as diffusers'
    /// `HeunDiscreteScheduler` defaults, on [`Sampler::euler`]'s levels; the last step, to
    /// ρ = 0, is an Euler step (EDM's Algorithm 1).
    pub fn heun(steps: usize) -> Self {
        Self {
            kind: SamplerKind::Heun,
            ..Self::euler(steps)
        }
    }

    /// Steps on Karras et al. (2022)'s noise levels: ρ evenly spaced in ρ^(1/7), dense at low
    /// noise (diffusers' `use_karras_sigmas = True`; "DPM++ 2M Karras" is
    /// `Sampler::dpm_solver_pp_2m(n).karras_sigmas(true)`). In the
    /// [`TimestepConvention::Integer`] of `DPMSolverMultistepScheduler` they span ρ(N−1) to
    /// ρ(0), the network told the rounded training timestep of each, and `spacing` and
    /// `steps_offset` are unused; in the [`TimestepConvention::Fractional`] of
    /// [`Sampler::euler`] and [`Sampler::heun`] they span the spaced levels, timesteps not
    /// rounded. Every sampler and gradient mode takes them. `false` returns to
    /// [`NoiseLevels::Spaced`].
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let karras = Sampler::dpm_solver_pp_2m(10).karras_sigmas(true);
    /// let rhos = karras.rho_grid(&schedule)?;
    /// assert_eq!((rhos.len(), rhos[10]), (11, 0.0)); // ten levels, then ρ = 0
    /// assert!((rhos[0] - schedule.rho(999.0)).abs() < 1e-12);
    /// assert_eq!(karras.timesteps(&schedule)?[0], 999.0);
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn karras_sigmas(mut self, on: bool) -> Self {
        self.noise_levels = match on {
            true => NoiseLevels::Karras,
            false => NoiseLevels::Spaced,
        };
        self
    }

    /// Where the noise levels lie ([`NoiseLevels`]).
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseLevels, NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let rhos = Sampler::dpm_solver_pp_2m(10).noise_levels(NoiseLevels::Exponential).rho_grid(&schedule)?;
    /// let ratio = rhos[1] / rhos[0];
    /// assert!((1..9).all(|i| (rhos[i + 1] / rhos[i] - ratio).abs() < 1e-12)); // even in log ρ
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn noise_levels(mut self, levels: NoiseLevels) -> Self {
        self.noise_levels = levels;
        self
    }

    /// Runs only the last `⌊strength · steps⌋` steps, from a clean sample noised to the first
    /// of them ([`Sampler::noised`]): diffusers' img2img `strength`, SDEdit, DiffPure's
    /// purification. Every gradient mode then differentiates down to the clean sample and the
    /// noise. The timesteps are those of the whole run (what diffusers' `get_timesteps` keeps),
    /// and DPM-Solver++'s last steps are of the order the whole run would give them.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
    /// let schedule = NoiseSchedule::sd_scaled_linear();
    /// let full = Sampler::ddim(10).timesteps(&schedule)?;
    /// let edit = Sampler::ddim(10).strength(0.6);
    /// assert_eq!(edit.timesteps(&schedule)?, full[4..]);
    /// assert!(Sampler::ddim(10).strength(0.05).timesteps(&schedule).is_err()); // no step left
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn strength(mut self, strength: f64) -> Self {
        self.strength = strength;
        self
    }

    /// How many of the first steps `strength` skips.
    fn skipped(&self) -> Result<usize, DiffusionError> {
        let kept = (self.steps as f64 * self.strength) as usize;
        if !(self.strength > 0.0 && self.strength <= 1.0) || kept == 0 {
            return Err(DiffusionError::BadStrength {
                strength: self.strength,
                steps: self.steps,
            });
        }
        Ok(self.steps - kept.min(self.steps))
    }

    /// Where sampling starts from a clean sample `x_0` and noise ε of its shape: `α x_0 + σ ε`
    /// at the first noise level run (diffusers' `scheduler.add_noise` at the first kept
    /// timestep). Tensor ops, so gradients reach `x_0` and ε.
    pub fn noised<B: Backend, const D: usize>(
        &self,
        schedule: &NoiseSchedule,
        x_0: Tensor<B, D>,
        noise: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, DiffusionError> {
        if noise.dims() != x_0.dims() {
            return Err(DiffusionError::ShapeMismatch {
                name: "the noise",
                expected: x_0.dims().to_vec(),
                got: noise.dims().to_vec(),
            });
        }
        let rho = self.rho_grid(schedule)?[0];
        let alpha = NoiseSchedule::alpha_of_rho(rho);
        Ok(x_0.mul_scalar(alpha) + noise.mul_scalar(rho * alpha))
    }

    /// Sets the gradient mode.
    pub fn gradient(mut self, gradient: GradientMode) -> Self {
        self.gradient = gradient;
        self
    }

    /// The timesteps the network is told at the levels run, descending: the last
    /// ⌊strength · steps⌋ of the run (fractional in [`TimestepConvention::Fractional`]).
    pub fn timesteps(&self, schedule: &NoiseSchedule) -> Result<Vec<f64>, DiffusionError> {
        Ok(self.run_levels(schedule)?.1)
    }

    /// The noise levels and the network's timesteps of the whole run, `strength` aside.
    fn all_levels(&self, schedule: &NoiseSchedule) -> Result<(Vec<f64>, Vec<f64>), DiffusionError> {
        let n = schedule.train_steps();
        if self.steps == 0 || self.steps > n {
            return Err(DiffusionError::BadStepCount {
                steps: self.steps,
                train_steps: n,
            });
        }
        if matches!(self.kind, SamplerKind::Lcm | SamplerKind::Tcd) {
            return self.lcm_levels(schedule);
        }
        let fractional = self.convention == TimestepConvention::Fractional;
        let spaced = || -> Result<Vec<f64>, DiffusionError> {
            // PLMS takes DDIM's timesteps (PNDMScheduler computes them as DDIMScheduler does).
            let dpm_solver = self.kind.is_multistep() && self.kind != SamplerKind::Plms;
            let integer = match (fractional, dpm_solver) {
                (true, _) => return fractional_timesteps(n, self.steps, self.spacing, self.steps_offset),
                (false, true) => dpm_solver_timesteps(n, self.steps, self.spacing, self.steps_offset)?,
                (false, false) => timesteps(n, self.steps, self.spacing, self.steps_offset)?,
            };
            Ok(integer.into_iter().map(|t| t as f64).collect())
        };
        let level = |t: f64| match fractional {
            true => schedule.rho_lerp(t),
            false => schedule.rho(t),
        };
        let (rho_max, rho_min) = match (self.noise_levels, fractional) {
            (NoiseLevels::Spaced, _) => {
                let ts = spaced()?;
                return Ok((ts.iter().map(|&t| level(t)).collect(), ts));
            }
            (_, true) => {
                let ts = spaced()?;
                (level(ts[0]), level(ts[ts.len() - 1]))
            }
            (_, false) => (schedule.rho((n - 1) as f64), schedule.rho(0.0)),
        };
        let rhos = match self.noise_levels {
            NoiseLevels::Karras => karras_levels(rho_max, rho_min, self.steps),
            _ => exponential_levels(rho_max, rho_min, self.steps),
        };
        let ts = rhos
            .iter()
            .map(|&rho| {
                let t = schedule.t_of_rho_log_lerp(rho);
                match (self.noise_levels, fractional) {
                    (NoiseLevels::LuLambdas, _) | (NoiseLevels::Karras, false) => t.round_ties_even(),
                    // KDPM2's schedulers round Karras' timesteps in either convention.
                    (NoiseLevels::Karras, true) if matches!(self.kind, SamplerKind::Dpm2 { .. }) => t.round_ties_even(),
                    (NoiseLevels::Exponential, false) => t.trunc(),
                    _ => t,
                }
            })
            .collect();
        Ok((rhos, ts))
    }

    /// LCM's (and TCD's) levels: the schedule's at the timesteps it picks from those it was
    /// distilled on.
    fn lcm_levels(&self, schedule: &NoiseSchedule) -> Result<(Vec<f64>, Vec<f64>), DiffusionError> {
        let sampler = match self.kind {
            SamplerKind::Tcd => "TCD",
            _ => "LCM",
        };
        if self.noise_levels != NoiseLevels::Spaced || self.convention != TimestepConvention::Integer {
            return Err(DiffusionError::SamplerOption {
                sampler,
                reason: format!(
                    "it runs on the timesteps it was distilled on, not on {:?} levels in the {:?} convention",
                    self.noise_levels, self.convention
                ),
            });
        }
        self.skipped()?;
        let (n, options) = (schedule.train_steps(), self.lcm);
        if !(options.timestep_scaling.is_finite() && options.timestep_scaling > 0.0) {
            return Err(DiffusionError::SamplerOption {
                sampler,
                reason: format!("timestep_scaling {} must be finite and > 0", options.timestep_scaling),
            });
        }
        let ts: Vec<f64> = lcm_timesteps(n, self.steps, options.original_steps, self.strength)
            .map_err(|e| match e {
                DiffusionError::SamplerOption { reason, .. } => DiffusionError::SamplerOption { sampler, reason },
                e => e,
            })?
            .into_iter()
            .map(|t| t as f64)
            .collect();
        Ok((ts.iter().map(|&t| schedule.rho(t)).collect(), ts))
    }

    /// The noise levels and the network's timesteps of the steps run (`strength` applied).
    fn run_levels(&self, schedule: &NoiseSchedule) -> Result<(Vec<f64>, Vec<f64>), DiffusionError> {
        let (mut rhos, mut ts) = self.all_levels(schedule)?;
        let skipped = self.skipped()?;
        Ok((rhos.split_off(skipped), ts.split_off(skipped)))
    }

    /// The ρ grid, decreasing: the level of each step run, then the final ρ (0, or ρ at ᾱ_0;
    /// always 0 for LCM, whose last step returns the consistency function's value, and ρ at
    /// ᾱ_0 for TCD, whose last step lands on timestep 0).
    pub fn rho_grid(&self, schedule: &NoiseSchedule) -> Result<Vec<f64>, DiffusionError> {
        let mut grid = self.run_levels(schedule)?.0;
        let last = match self.kind {
            SamplerKind::Lcm | SamplerKind::Dpm2 { .. } => 0.0,
            SamplerKind::Tcd => schedule.rho(0.0),
            _ if self.final_alpha_one => 0.0,
            _ => schedule.rho(0.0),
        };
        if grid[grid.len() - 1] > last {
            grid.push(last);
        }
        Ok(grid)
    }

    /// The PF-ODE of `model`, told the run's timestep at each level.
    pub(crate) fn pf_ode<B: Backend, M: burn::module::Module<B>>(
        &self,
        model: M,
        schedule: &NoiseSchedule,
    ) -> Result<PfOde<B, M>, DiffusionError> {
        let (rhos, ts) = self.run_levels(schedule)?;
        Ok(PfOde::new(model, schedule.clone()).with_timesteps(rhos, ts))
    }

    /// The stochastic sampler's step map of `model` on `grid`, told the run's timestep at each
    /// level; for TCD with where each step's DDIM part lands, the level of `⌊(1 − γ) t_{i+1}⌋`
    /// (in f32, as diffusers' `torch.floor((1 - eta) * prev_timestep)`), timestep 0 after the last.
    fn noisy_map<B: Backend, M: burn::module::Module<B>, const D: usize>(
        &self,
        model: M,
        step: NoisyStep,
        schedule: &NoiseSchedule,
        grid: &[f64],
        noise: Vec<Tensor<B, D>>,
    ) -> Result<NoisyStepMap<B, M>, DiffusionError> {
        let ts = self.timesteps(schedule)?;
        let map = NoisyStepMap::new(model, step, grid.to_vec(), ts.clone(), noise);
        if let NoisyStep::Dpm2 { ancestral } = step {
            // The midpoint between the step's start and where it lands (Euler ancestral's level,
            // or the next knot): their geometric mean (diffusers: exp of the lerp of the logs),
            // its timestep by log-ρ interpolation; none for a step landing on 0 (Euler).
            let midpoints = grid
                .windows(2)
                .map(|w| {
                    let down = match ancestral {
                        true => ancestral_levels(w[0], w[1]).0,
                        false => w[1],
                    };
                    (down > 0.0).then(|| {
                        let rho_m = (w[0] * down).sqrt();
                        (rho_m, schedule.t_of_rho_log_lerp(rho_m))
                    })
                })
                .collect();
            return Ok(map.with_midpoints(midpoints));
        }
        if step != NoisyStep::Tcd {
            return Ok(map);
        }
        let landing = (0..grid.len() - 1)
            .map(|i| {
                let next = ts.get(i + 1).copied().unwrap_or(0.0);
                schedule.rho(((1.0 - self.eta) as f32 * next as f32).floor() as f64)
            })
            .collect();
        Ok(map.with_landing(landing))
    }

    /// The multistep map (DPM-Solver++ 2M or 3M, UniPC) of `model` on `grid`, told the run's
    /// timestep at each level.
    fn dpm_map<B: Backend, M: burn::module::Module<B>, const D: usize>(
        &self,
        model: M,
        schedule: &NoiseSchedule,
        grid: &[f64],
        noise: Vec<Tensor<B, D>>,
    ) -> Result<MultistepMap<B, M>, DiffusionError> {
        let map = MultistepMap::new(model, schedule.clone(), grid.to_vec())
            .with_total_steps(self.steps)
            .with_timesteps(self.timesteps(schedule)?);
        Ok(match self.kind {
            SamplerKind::DpmSolverPP3M => map.third_order(),
            SamplerKind::DpmSolverPP2MSde => map.sde(noise),
            SamplerKind::DpmSolverPP3MSde => map.third_order().sde(noise),
            SamplerKind::UniPc { bh1, third_order } => map.unipc(bh1, third_order),
            SamplerKind::Plms => map.plms(),
            SamplerKind::Lms => map.lms(),
            SamplerKind::Deis { third_order } => map.deis(third_order),
            _ => map,
        }
        .heun_update(self.second_order == SecondOrder::Heun))
    }

    /// The engine solves a run on `grid` is made of, in order: one, except that Heun's step to
    /// ρ = 0 is an Euler step (Karras et al. 2022, Algorithm 1; diffusers'
    /// `HeunDiscreteScheduler`), so ε is never asked at ρ = 0, below every training level.
    pub(crate) fn segments<'g>(&self, grid: &'g [f64]) -> Vec<(Solver, &'g [f64])> {
        let n = grid.len();
        if self.kind == SamplerKind::Heun && n >= 2 && grid[n - 1] == 0.0 {
            let euler = Solver {
                tableau: &tableau::EULER,
                control: StepControl::PerInterval(1),
            };
            return match n {
                2 => vec![(euler, grid)],
                _ => vec![(self.solver(), &grid[..n - 1]), (euler, &grid[n - 2..])],
            };
        }
        vec![(self.solver(), grid)]
    }

    pub(crate) fn solver(&self) -> Solver {
        Solver {
            tableau: self.kind.tableau(),
            control: StepControl::PerInterval(1),
        }
    }

    /// Generates `x_0` from `x_T` on an autodiff backend. A loss on the result back-propagates
    /// into `x_T` (when tracked) and every trainable parameter of `model` (weights, embeddings).
    /// A stochastic sampler needs [`Sampler::sample_with_noise`].
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
    {
        self.sample_with_noise(model, schedule, x_t, Vec::new())
    }

    /// [`Sampler::sample`] with the noise a stochastic sampler injects: one standard normal
    /// tensor of `x_T`'s shape per step run ([`Sampler::noise_count`]; none for a deterministic
    /// sampler). Gradients reach every tracked noise tensor as well.
    ///
    /// ```
    /// use adjoint_dpm::diffusion::{EpsModel, NoiseSchedule, Sampler};
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::prelude::*;
    /// use burn::tensor::Distribution;
    /// # #[derive(Module, Clone, Debug)]
    /// # struct Shrink;
    /// # impl<B: Backend> EpsModel<B, 2> for Shrink {
    /// #     fn eps(&self, x: Tensor<B, 2>, _t: Tensor<B, 1>) -> Tensor<B, 2> { x.mul_scalar(0.5) }
    /// # }
    /// type B = Autodiff<Flex>;
    /// let (device, schedule) = (Default::default(), NoiseSchedule::sd_scaled_linear());
    /// let sampler = Sampler::ddim(10).eta(1.0);
    /// let x_t = Tensor::<B, 2>::random([2, 4], Distribution::Normal(0.0, 1.0), &device).require_grad();
    /// let noise: Vec<_> = (0..sampler.noise_count(&schedule)?)
    ///     .map(|_| Tensor::<B, 2>::random([2, 4], Distribution::Normal(0.0, 1.0), &device).require_grad())
    ///     .collect();
    /// let x_0 = sampler.sample_with_noise(&Shrink, &schedule, x_t.clone(), noise.clone())?;
    /// let grads = x_0.powi_scalar(2).sum().backward();
    /// assert!(x_t.grad(&grads).is_some() && noise[3].grad(&grads).is_some());
    /// # Ok::<(), adjoint_dpm::diffusion::DiffusionError>(())
    /// ```
    pub fn sample_with_noise<B, C, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<Autodiff<B, C>, D>,
        noise: Vec<Tensor<Autodiff<B, C>, D>>,
    ) -> Result<Tensor<Autodiff<B, C>, D>, DiffusionError>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: EpsModel<Autodiff<B, C>, D> + AutodiffModule<Autodiff<B, C>> + 'static,
        M::InnerModule: EpsModel<B, D>,
    {
        let grid = self.rho_grid(schedule)?;
        model.check_batch(x_t.dims()[0])?;
        self.check_noise(&grid, &x_t, &noise)?;
        self.check_gradient()?;
        if grid.len() < 2 {
            // The only step kept starts on the run's last level (img2img keeping the step from
            // t = 0 with `set_alpha_to_one` off): a zero step, which leaves the sample as it is.
            return Ok(x_t);
        }
        let y_t = x_t.div_scalar(NoiseSchedule::alpha_of_rho(grid[0]));
        let alpha_0 = NoiseSchedule::alpha_of_rho(grid[grid.len() - 1]);
        if self.kind.is_multistep() {
            let map = self.dpm_map(model.clone(), schedule, &grid, noise)?;
            let ode = NeuralOde::new(map).solver(self.solver()).gradient(self.gradient);
            let z_0 = ode
                .solve(ode.dynamics.initial_state(y_t), &grid)
                .map_err(|e| name_step(e, schedule, &grid, 0))?
                .last();
            return Ok(ode.dynamics.y_of(z_0).mul_scalar(alpha_0));
        }
        if let Some(step) = self.noisy_step()? {
            let map = self.noisy_map(model.clone(), step, schedule, &grid, noise)?;
            let ode = NeuralOde::new(map).solver(self.solver()).gradient(self.gradient);
            let y_0 = ode
                .solve(y_t, &grid)
                .map_err(|e| name_step(e, schedule, &grid, 0))?
                .last();
            return Ok(y_0.mul_scalar(alpha_0));
        }
        let pf_ode = self.pf_ode(model.clone(), schedule)?;
        let mut y = y_t;
        let mut done = 0;
        for (solver, knots) in self.segments(&grid) {
            let ode = NeuralOde::new(pf_ode.clone()).solver(solver).gradient(self.gradient);
            y = ode
                .solve(y, knots)
                .map_err(|e| name_step(e, schedule, knots, done))?
                .last();
            done += knots.len() - 1;
        }
        Ok(y.mul_scalar(alpha_0))
    }

    /// Checks that `noise` holds one tensor of `x_t`'s shape per step of a stochastic sampler,
    /// or none.
    fn check_noise<B: Backend, const D: usize>(
        &self,
        grid: &[f64],
        x_t: &Tensor<B, D>,
        noise: &[Tensor<B, D>],
    ) -> Result<(), DiffusionError> {
        let expected = self.noise_count_on(grid)?;
        if noise.len() != expected {
            return Err(DiffusionError::NoiseCount {
                expected,
                got: noise.len(),
            });
        }
        if let Some(bad) = noise.iter().find(|n| n.dims() != x_t.dims()) {
            return Err(DiffusionError::ShapeMismatch {
                name: "a noise tensor",
                expected: x_t.dims().to_vec(),
                got: bad.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// Refuses the continuous adjoint where there is none: multistep and stochastic samplers.
    fn check_gradient(&self) -> Result<(), DiffusionError> {
        const MULTISTEP: &str = "a multistep method has no continuous adjoint; use Checkpointed (exact) or \
                                 Backprop, or DDIM/Heun for AdjointDPM";
        if !matches!(self.gradient, GradientMode::Backsolve(_)) {
            return Ok(());
        }
        let stochastic = self.is_stochastic()?;
        let (sampler, why) = match self.kind {
            _ if stochastic => (
                "a stochastic sampler",
                "its steps inject noise, so it discretises no ODE and has no continuous adjoint; use \
                 Checkpointed (exact) or Backprop",
            ),
            SamplerKind::Dpm2 { .. } => (
                "DPM2",
                "it runs as a step map (two network calls a step), which has no continuous adjoint; use \
                 Checkpointed (exact) or Backprop, or Heun (also of second order) for AdjointDPM",
            ),
            SamplerKind::Tcd => (
                "TCD",
                "its steps land below the next level and jump back up, so it discretises no ODE; use \
                 Checkpointed (exact) or Backprop, or DDIM for AdjointDPM",
            ),
            SamplerKind::UniPc { .. } => ("UniPC", MULTISTEP),
            SamplerKind::Plms => ("PLMS", MULTISTEP),
            SamplerKind::Lms => ("LMS", MULTISTEP),
            SamplerKind::Deis { .. } => ("DEIS", MULTISTEP),
            kind if kind.is_multistep() => ("DPM-Solver++", MULTISTEP),
            _ => return Ok(()),
        };
        Err(DiffusionError::UnsupportedGradient {
            sampler,
            mode: self.gradient,
            why,
        })
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
    {
        self.sample_inference_with_noise(model, schedule, x_t, Vec::new())
    }

    /// [`Sampler::sample_inference`] with a stochastic sampler's noise (see
    /// [`Sampler::sample_with_noise`]).
    pub fn sample_inference_with_noise<B, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<B, D>,
        noise: Vec<Tensor<B, D>>,
    ) -> Result<Tensor<B, D>, DiffusionError>
    where
        B: Backend,
        M: EpsModel<B, D>,
    {
        let mut last = self.inference(model, schedule, x_t, noise, false)?;
        Ok(last.pop().expect("inference returns the last sample"))
    }

    /// Every intermediate sample, `x_T` first and `x_0` last (one per ρ knot), on any backend
    /// without a graph: what diffusers' `scheduler.step` returns step by step.
    pub fn trajectory_inference<B, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<B, D>,
    ) -> Result<Vec<Tensor<B, D>>, DiffusionError>
    where
        B: Backend,
        M: EpsModel<B, D>,
    {
        self.trajectory_inference_with_noise(model, schedule, x_t, Vec::new())
    }

    /// [`Sampler::trajectory_inference`] with a stochastic sampler's noise (see
    /// [`Sampler::sample_with_noise`]).
    pub fn trajectory_inference_with_noise<B, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<B, D>,
        noise: Vec<Tensor<B, D>>,
    ) -> Result<Vec<Tensor<B, D>>, DiffusionError>
    where
        B: Backend,
        M: EpsModel<B, D>,
    {
        self.inference(model, schedule, x_t, noise, true)
    }

    /// Graph-free sampling: the sample at every knot (`keep_all`), or at the last alone.
    fn inference<B, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<B, D>,
        noise: Vec<Tensor<B, D>>,
        keep_all: bool,
    ) -> Result<Vec<Tensor<B, D>>, DiffusionError>
    where
        B: Backend,
        M: EpsModel<B, D>,
    {
        let grid = self.rho_grid(schedule)?;
        model.check_batch(x_t.dims()[0])?;
        self.check_noise(&grid, &x_t, &noise)?;
        if grid.len() < 2 {
            // A zero step only, as in `sample_with_noise`.
            return Ok(vec![x_t]);
        }
        let y_t = x_t.div_scalar(NoiseSchedule::alpha_of_rho(grid[0]));
        let ys = if let Some(step) = self.noisy_step()? {
            let map = self.noisy_map(model.clone(), step, schedule, &grid, noise)?;
            let ode = NeuralOde::new(map).solver(self.solver());
            run_map(&ode, y_t, &grid, schedule, keep_all)?
        } else if self.kind.is_multistep() {
            let map = self.dpm_map(model.clone(), schedule, &grid, noise)?;
            let ode = NeuralOde::new(map).solver(self.solver());
            let z_t = ode.dynamics.initial_state(y_t);
            run_map(&ode, z_t, &grid, schedule, keep_all)?
                .into_iter()
                .map(|z| ode.dynamics.y_of(z))
                .collect::<Vec<_>>()
        } else {
            let pf_ode = self.pf_ode(model.clone(), schedule)?;
            // Each segment starts from the last state of the one before; that state is kept once.
            let (mut ys, mut start, mut done) = (Vec::new(), y_t, 0);
            for (solver, knots) in self.segments(&grid) {
                let ode = NeuralOde::new(pf_ode.clone()).solver(solver);
                let solution = ode
                    .integrate(start, knots)
                    .map_err(|e| name_step(e, schedule, knots, done))?;
                let mut states = solution.states();
                start = solution.last();
                states.pop();
                ys.extend(states);
                done += knots.len() - 1;
            }
            ys.push(start);
            ys
        };
        // Without `keep_all` the one-step maps return the last state alone: align from the end.
        Ok(ys
            .into_iter()
            .rev()
            .zip(grid.iter().rev())
            .map(|(y, &rho)| y.mul_scalar(NoiseSchedule::alpha_of_rho(rho)))
            .rev()
            .collect())
    }
}

/// The states of a one-step map's run (a multistep method's stacked history, a stochastic
/// sampler's sample) on `grid`: every knot's, or without `keep_all` the last alone, stepping one
/// interval at a time so that one state is held at once.
fn run_map<B: Backend, Dy: Dynamics<B, D>, const D: usize>(
    ode: &NeuralOde<Dy>,
    z: Tensor<B, D>,
    grid: &[f64],
    schedule: &NoiseSchedule,
    keep_all: bool,
) -> Result<Vec<Tensor<B, D>>, DiffusionError> {
    if keep_all {
        let solution = ode.integrate(z, grid).map_err(|e| name_step(e, schedule, grid, 0))?;
        return Ok(solution.states());
    }
    let mut z = z;
    for (done, knots) in grid.windows(2).enumerate() {
        z = ode
            .integrate(z, knots)
            .map_err(|e| name_step(e, schedule, knots, done))?
            .last();
    }
    Ok(vec![z])
}

/// Names the sampling step and timestep of a non-finite network output in a solve on `grid`
/// that starts after `done` steps of the run.
fn name_step(e: crate::Error, schedule: &NoiseSchedule, grid: &[f64], done: usize) -> DiffusionError {
    match e {
        // The engine reports the state after step `step` (1-based); the network was evaluated
        // at the step's start.
        crate::Error::NonFiniteState { step, .. } if step >= 1 => DiffusionError::NonFiniteEps {
            step: done + step - 1,
            t: schedule.t_of_rho(grid[step - 1]),
        },
        e => DiffusionError::Solver(e),
    }
}
