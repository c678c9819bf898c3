//! What every task shares: the classifier and decoder seams, the optimised noise, choices the CLI
//! parses once, and the task error.

use burn::module::{Module, ModuleDisplay, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use crate::diffusion::{DiffusionError, Sampler};
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

/// The initial noise as a parameter, so that burn's optimizers move it.
#[derive(Module, Debug)]
pub struct Noise<B: Backend> {
    /// `x_T`.
    pub x_t: Param<Tensor<B, 4>>,
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
    /// DPM-Solver++(2M): Backprop gradients only.
    Dpmpp2m,
    /// Heun in ρ.
    Heun,
}

impl SolverChoice {
    /// The sampler with `steps` steps differentiated as `gradient` says.
    pub fn sampler(self, steps: usize, gradient: GradientChoice) -> Sampler {
        let base = match self {
            SolverChoice::Ddim => Sampler::ddim(steps),
            SolverChoice::Dpmpp2m => Sampler::dpm_solver_pp_2m(steps),
            SolverChoice::Heun => Sampler::heun(steps),
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
    /// The loss became NaN or infinite.
    #[error("the loss became non-finite at iteration {iter}; lower --lr")]
    NonFiniteLoss {
        /// Iteration.
        iter: usize,
    },
}

/// The values of a tensor, as f64.
pub(crate) fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().into_vec::<f64>().unwrap_or_default()
}

/// A scalar tensor's value.
pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem()
}
