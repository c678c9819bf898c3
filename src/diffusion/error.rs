//! Errors of the diffusion adapter.

use thiserror::Error;

/// Bad schedules, step counts and conditioning; solver failures pass through.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DiffusionError {
    /// The noise schedule is invalid.
    #[error("invalid noise schedule: {reason}")]
    BadSchedule {
        /// What is wrong, with the value.
        reason: String,
    },
    /// Zero steps, or more than the schedule has.
    #[error("{steps} sampling steps asked of a schedule with {train_steps} training steps; use 1..={train_steps}")]
    BadStepCount {
        /// Steps asked.
        steps: usize,
        /// Training steps of the schedule.
        train_steps: usize,
    },
    /// An img2img `strength` outside (0, 1], or too small to keep a step.
    #[error("strength {strength} keeps no step of {steps}: use a value in [1/{steps}, 1]")]
    BadStrength {
        /// The strength given.
        strength: f64,
        /// The sampler's steps.
        steps: usize,
    },
    /// Two tensors that must have one shape do not.
    #[error("{name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which tensor.
        name: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        got: Vec<usize>,
    },
    /// A conditioning tensor of the wrong shape.
    #[error("conditioning {name} has shape {got:?}, expected {expected:?}")]
    ConditioningShape {
        /// Which conditioning.
        name: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        got: Vec<usize>,
    },
    /// A batch the model's conditioning does not fit ([`crate::diffusion::EpsModel::check_batch`]).
    #[error("a batch of {batch} samples does not fit the model's conditioning: {reason}")]
    BatchMismatch {
        /// The batch the model would be called on.
        batch: usize,
        /// What the conditioning holds, and which batches fit it.
        reason: String,
    },
    /// Guidance asked of a model that cannot give it.
    #[error("invalid guidance: {reason}")]
    BadGuidance {
        /// What is wrong.
        reason: String,
    },
    /// A stochastic sampler given a number of noise tensors other than its steps, or a
    /// deterministic one given noise.
    #[error("{got} noise tensors given, the sampler injects noise at {expected} steps (Sampler::noise_count)")]
    NoiseCount {
        /// One per step for a stochastic sampler, else 0.
        expected: usize,
        /// How many were given.
        got: usize,
    },
    /// A DDIM η that is negative or not finite, or an η given to a sampler that has none.
    #[error("eta = {eta}: {why}")]
    BadEta {
        /// The η given.
        eta: f64,
        /// What is wrong.
        why: &'static str,
    },
    /// A sampler's own setting that cannot work (LCM's `original_inference_steps`, its
    /// noise levels).
    #[error("the {sampler} sampler cannot run: {reason}")]
    SamplerOption {
        /// The sampler.
        sampler: &'static str,
        /// What is wrong, with the values.
        reason: String,
    },
    /// The network produced NaN or Inf.
    #[error("the noise prediction became non-finite at sampling step {step} (t = {t:.3})")]
    NonFiniteEps {
        /// Sampling step (0 = the first, at the noisiest time).
        step: usize,
        /// Continuous timestep.
        t: f64,
    },
    /// The sampler cannot be differentiated in that mode.
    #[error("{sampler} cannot be differentiated with {mode:?}: {why}")]
    UnsupportedGradient {
        /// The sampler.
        sampler: &'static str,
        /// The mode asked for.
        mode: crate::ode::GradientMode,
        /// Why, and what to use instead.
        why: &'static str,
    },
    /// The ODE engine failed.
    #[error(transparent)]
    Solver(#[from] crate::Error),
}
