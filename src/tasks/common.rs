//! What every task shares: the classifier and decoder seams, the optimised noise, choices the CLI
//! parses once, and the task error.

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleDisplay, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::diffusion::{DiffusionError, EpsModel, NoiseSchedule, Sampler};
use crate::ode::{BacksolveOptions, GradientMode, Schedule};

/// A differentiable image classifier: logits of images in `[-1, 1]`.
pub trait Classifier<B: Backend>: Module<B> + ModuleDisplay {
    /// # Shapes
    /// - images: `[batch, 3, h, w]` in `[-1, 1]`; output: `[batch, classes]`.
    fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2>;

    /// Intermediate feature maps, for style (Gram-matrix) losses.
    fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>>;
}

/// Maps the sampler's output to images in `[-1, 1]`: the VAE decoder for latent diffusion, the
/// identity for pixel-space models.
pub trait Decoder<B: Backend>: Module<B> + ModuleDisplay {
    /// # Shapes
    /// - latents: the sampler's `x_0`; output: `[batch, 3, h, w]` in `[-1, 1]`.
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4>;
}

/// The sampler works in pixel space: nothing to decode.
#[derive(Module, Clone, Debug, Default)]
pub struct PixelSpace;

impl<B: Backend> Decoder<B> for PixelSpace {
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents
    }
}

/// An ε-model the tasks can sample on `Autodiff<B>` (differentiably) and on `B` (inference).
pub trait TaskModel<B: Backend>:
    EpsModel<Autodiff<B>, 4> + AutodiffModule<Autodiff<B>, InnerModule: EpsModel<B, 4>> + 'static
{
}

impl<B: Backend, M> TaskModel<B> for M where
    M: EpsModel<Autodiff<B>, 4> + AutodiffModule<Autodiff<B>, InnerModule: EpsModel<B, 4>> + 'static
{
}

/// A classifier usable with and without a graph.
pub trait TaskClassifier<B: Backend>:
    Classifier<Autodiff<B>> + AutodiffModule<Autodiff<B>, InnerModule: Classifier<B>>
{
}

impl<B: Backend, K> TaskClassifier<B> for K where
    K: Classifier<Autodiff<B>> + AutodiffModule<Autodiff<B>, InnerModule: Classifier<B>>
{
}

/// A decoder usable with and without a graph.
pub trait TaskDecoder<B: Backend>: Decoder<Autodiff<B>> + AutodiffModule<Autodiff<B>, InnerModule: Decoder<B>> {}

impl<B: Backend, D> TaskDecoder<B> for D where
    D: Decoder<Autodiff<B>> + AutodiffModule<Autodiff<B>, InnerModule: Decoder<B>>
{
}

/// The networks of a task that optimises the noise: frozen (so the adjoint does no parameter
/// work), on the autodiff backend for the optimisation and on the inner one for the metrics.
pub(crate) struct FrozenPipeline<'a, B: Backend, M: TaskModel<B>, K: TaskClassifier<B>, Dec: TaskDecoder<B>> {
    pub model: M,
    pub classifier: K,
    pub decoder: Dec,
    model_inner: M::InnerModule,
    classifier_inner: K::InnerModule,
    decoder_inner: Dec::InnerModule,
    pub schedule: &'a NoiseSchedule,
    pub sampler: Sampler,
    /// Seed of the noise a stochastic sampler injects ([`step_noise`]), the same at every call.
    step_noise_seed: u64,
}

impl<'a, B: Backend, M: TaskModel<B>, K: TaskClassifier<B>, Dec: TaskDecoder<B>> FrozenPipeline<'a, B, M, K, Dec> {
    pub(crate) fn new(
        model: &M,
        classifier: &K,
        decoder: &Dec,
        schedule: &'a NoiseSchedule,
        sampler: Sampler,
        step_noise_seed: u64,
    ) -> Self {
        let (model, classifier, decoder) = (
            model.clone().no_grad(),
            classifier.clone().no_grad(),
            decoder.clone().no_grad(),
        );
        Self {
            model_inner: model.valid(),
            classifier_inner: classifier.valid(),
            decoder_inner: decoder.valid(),
            model,
            classifier,
            decoder,
            schedule,
            sampler,
            step_noise_seed,
        }
    }

    /// The noise a stochastic sampler injects into a batch like `x_t`.
    pub(crate) fn step_noise(&self, x_t: &Tensor<B, 4>) -> Result<Vec<Tensor<B, 4>>, TaskError> {
        step_noise(
            &self.sampler,
            self.schedule,
            x_t.dims(),
            self.step_noise_seed,
            &x_t.device(),
        )
    }

    /// Images of a batch of noise, without a graph.
    pub(crate) fn images(&self, x_t: Tensor<B, 4>) -> Result<Tensor<B, 4>, TaskError> {
        let noise = self.step_noise(&x_t)?;
        self.images_with(x_t, noise)
    }

    /// Images of a batch of noise and the steps' noise, without a graph.
    pub(crate) fn images_with(&self, x_t: Tensor<B, 4>, noise: Vec<Tensor<B, 4>>) -> Result<Tensor<B, 4>, TaskError> {
        Ok(self.decoder_inner.decode(self.sampler.sample_inference_with_noise(
            &self.model_inner,
            self.schedule,
            x_t,
            noise,
        )?))
    }

    /// Logits of images, without a graph.
    pub(crate) fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.classifier_inner.logits(images)
    }

    /// Images of a batch of noise, differentiably.
    pub(crate) fn tracked_images(&self, x_t: Tensor<Autodiff<B>, 4>) -> Result<Tensor<Autodiff<B>, 4>, TaskError> {
        let noise = self.step_noise(&x_t.clone().inner())?;
        self.tracked_images_with(x_t, noise.into_iter().map(Tensor::from_inner).collect())
    }

    /// Images of a batch of noise and the steps' noise, differentiably in both.
    pub(crate) fn tracked_images_with(
        &self,
        x_t: Tensor<Autodiff<B>, 4>,
        noise: Vec<Tensor<Autodiff<B>, 4>>,
    ) -> Result<Tensor<Autodiff<B>, 4>, TaskError> {
        Ok(self
            .decoder
            .decode(self.sampler.sample_with_noise(&self.model, self.schedule, x_t, noise)?))
    }
}

/// The noise a stochastic sampler (DDIM with η > 0, Euler ancestral, LCM, DPM-Solver++ SDE)
/// injects: one standard normal tensor of `dims` per step that draws one, drawn after reseeding the backend with `seed`, so the same
/// seed gives the same noise and an optimisation of x_T sees one map. None for a deterministic
/// sampler (the backend is then not reseeded).
pub fn step_noise<B: Backend>(
    sampler: &Sampler,
    schedule: &NoiseSchedule,
    dims: [usize; 4],
    seed: u64,
    device: &B::Device,
) -> Result<Vec<Tensor<B, 4>>, TaskError> {
    let count = sampler.noise_count(schedule)?;
    if count > 0 {
        B::seed(device, seed);
    }
    Ok((0..count)
        .map(|_| Tensor::random(dims, Distribution::Normal(0.0, 1.0), device))
        .collect())
}

/// `Err(InvalidOption)` unless `value` is finite and > 0.
pub(crate) fn positive(name: &'static str, value: f64) -> Result<(), TaskError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(TaskError::InvalidOption {
            name,
            value: value.to_string(),
            rule: "must be finite and > 0",
        })
    }
}

/// `Err(InvalidOption)` for a LoRA rank of 0 (its scale α/rank would be 0/0).
pub(crate) fn lora_rank(rank: usize) -> Result<(), TaskError> {
    if rank == 0 {
        return Err(TaskError::InvalidOption {
            name: "rank",
            value: "0".into(),
            rule: "must be ≥ 1",
        });
    }
    Ok(())
}

/// The initial noise as a parameter, so that burn's optimizers move it, and the noise a
/// stochastic sampler injects at its steps, when that is optimised too.
#[derive(Module, Debug)]
pub struct Noise<B: Backend> {
    /// `x_T`.
    pub x_t: Param<Tensor<B, 4>>,
    /// Each step's noise (empty for a deterministic sampler, or when it is held fixed).
    pub steps: Vec<Param<Tensor<B, 4>>>,
}

/// How a task differentiates through sampling (`--gradient`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradientChoice {
    /// The exact gradient of the sampler (checkpointed discrete adjoint).
    Exact,
    /// The continuous adjoint (the paper's AdjointDPM with DDIM).
    AdjointDpm,
    /// Backprop through every step (memory grows with the steps).
    Backprop,
}

impl GradientChoice {
    /// The engine's mode.
    pub fn mode(self) -> GradientMode {
        match self {
            GradientChoice::Exact => GradientMode::Checkpointed(Schedule::All),
            GradientChoice::AdjointDpm => GradientMode::Backsolve(BacksolveOptions::default()),
            GradientChoice::Backprop => GradientMode::Backprop,
        }
    }
}

/// Which sampler a task uses (`--solver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SolverChoice {
    /// DDIM (Euler in ρ).
    Ddim,
    /// DPM-Solver++(2M): exact or Backprop gradients (no AdjointDPM).
    Dpmpp2m,
    /// DPM-Solver++(2M) on Karras' noise levels ("DPM++ 2M Karras").
    #[serde(rename = "dpmpp2m-karras")]
    Dpmpp2mKarras,
    /// DPM-Solver++(3M): exact or Backprop gradients.
    Dpmpp3m,
    /// DPM-Solver++(2M) SDE, stochastic ("DPM++ 2M SDE"): exact or Backprop gradients.
    #[serde(rename = "dpmpp2m-sde")]
    Dpmpp2mSde,
    /// DPM-Solver++(3M) SDE, stochastic ("DPM++ 3M SDE"): exact or Backprop gradients.
    #[serde(rename = "dpmpp3m-sde")]
    Dpmpp3mSde,
    /// UniPC (predictor-corrector, no extra network call): exact or Backprop gradients.
    Unipc,
    /// UniPC with `B(h) = −h` (diffusers' `solver_type = "bh1"`).
    #[serde(rename = "unipc-bh1")]
    UnipcBh1,
    /// UniPC of order 3 (diffusers' `solver_order = 3`).
    Unipc3,
    /// Heun in ρ (diffusers' `HeunDiscreteScheduler`; EDM's sampler).
    Heun,
    /// Euler in ρ on diffusers' `EulerDiscreteScheduler` levels (the map of DDIM).
    Euler,
    /// Euler ancestral (stochastic; exact or Backprop gradients).
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// PLMS, diffusers' `PNDMScheduler` with `skip_prk_steps` (SD 1.x's): exact or Backprop.
    Plms,
    /// LMS, diffusers' `LMSDiscreteScheduler`: exact or Backprop.
    Lms,
    /// DEIS, diffusers' `DEISMultistepScheduler`: exact or Backprop.
    Deis,
    /// DPM2, diffusers' `KDPM2DiscreteScheduler`: exact or Backprop.
    Dpm2,
    /// DPM2 ancestral, diffusers' `KDPM2AncestralDiscreteScheduler` (stochastic): exact or
    /// Backprop.
    #[serde(rename = "dpm2-a")]
    Dpm2Ancestral,
    /// DEIS of order 3 (`solver_order = 3`).
    Deis3,
    /// LCM, diffusers' `LCMScheduler` (latent consistency models; stochastic): exact or
    /// Backprop.
    Lcm,
    /// TCD, diffusers' `TCDScheduler` (γ = `--eta`, 0.3 by default): exact or Backprop.
    Tcd,
}

impl SolverChoice {
    /// The sampler with `steps` steps differentiated as `gradient` says.
    pub fn sampler(self, steps: usize, gradient: GradientChoice) -> Sampler {
        let base = match self {
            SolverChoice::Ddim => Sampler::ddim(steps),
            SolverChoice::Dpmpp2m => Sampler::dpm_solver_pp_2m(steps),
            SolverChoice::Dpmpp2mKarras => Sampler::dpm_solver_pp_2m(steps).karras_sigmas(true),
            SolverChoice::Dpmpp3m => Sampler::dpm_solver_pp_3m(steps),
            SolverChoice::Dpmpp2mSde => Sampler::dpm_solver_pp_2m_sde(steps),
            SolverChoice::Dpmpp3mSde => Sampler::dpm_solver_pp_3m_sde(steps),
            SolverChoice::Unipc => Sampler::unipc(steps),
            SolverChoice::UnipcBh1 => Sampler::unipc_bh1(steps),
            SolverChoice::Unipc3 => Sampler::unipc_third_order(steps),
            SolverChoice::Heun => Sampler::heun(steps),
            SolverChoice::Euler => Sampler::euler(steps),
            SolverChoice::EulerAncestral => Sampler::euler_ancestral(steps),
            SolverChoice::Plms => Sampler::plms(steps),
            SolverChoice::Lms => Sampler::lms(steps),
            SolverChoice::Deis => Sampler::deis(steps),
            SolverChoice::Dpm2 => Sampler::dpm2(steps),
            SolverChoice::Dpm2Ancestral => Sampler::dpm2_ancestral(steps),
            SolverChoice::Deis3 => Sampler::deis_third_order(steps),
            SolverChoice::Lcm => Sampler::lcm(steps),
            SolverChoice::Tcd => Sampler::tcd(steps),
        };
        base.gradient(gradient.mode())
    }
}

/// What can go wrong in a task.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Sampling or its gradient failed.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    /// An option is out of range.
    #[error("invalid option {name} = {value}: {rule}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// Value given.
        value: String,
        /// What it must satisfy.
        rule: &'static str,
    },
    /// A saved state of an interrupted run cannot be written or read.
    #[error("resume state {path}: {message}")]
    Resume {
        /// The folder or file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The loss became NaN or infinite.
    #[error("the loss became non-finite at iteration {iter}; lower --lr")]
    NonFiniteLoss {
        /// Iteration.
        iter: usize,
    },
    /// Sampling produced NaN or Inf after an optimiser step had changed what is optimised: the
    /// step was too large.
    #[error(
        "the samples became non-finite at iteration {iter}, after the previous optimiser step; lower --lr ({source})"
    )]
    Diverged {
        /// Iteration.
        iter: usize,
        /// What the sampler reported.
        source: DiffusionError,
    },
}

impl TaskError {
    /// Reports a non-finite sample at iteration `iter` > 0 as [`TaskError::Diverged`]: the
    /// optimiser step before it is what broke (at iteration 0 nothing was stepped yet).
    pub(crate) fn at_iteration(self, iter: usize) -> Self {
        match self {
            TaskError::Diffusion(
                source @ (DiffusionError::NonFiniteEps { .. }
                | DiffusionError::Solver(crate::Error::NonFiniteState { .. })),
            ) if iter > 0 => TaskError::Diverged { iter, source },
            other => other,
        }
    }
}

/// The values of a tensor, as f64.
pub(crate) fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap_or_default()
}

/// A scalar tensor's value.
pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem()
}
