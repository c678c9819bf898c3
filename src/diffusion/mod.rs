//! The diffusion adapter: noise schedules, the probability-flow ODE in semi-linear form, samplers
//! and their gradients, by plugging into the engine. Knows nothing of Stable Diffusion.

pub mod diagnostic;
pub mod dpm_solver;
pub mod eps_model;
pub mod error;
pub mod pf_ode;
pub mod sampler;
pub mod schedule;
pub mod stochastic;

pub use diagnostic::AdjointReport;
pub use dpm_solver::{DpmSolverPP2M, MultistepMap};
pub use eps_model::{Cfg, EpsModel, GuidanceEmbeddings, Predictor, RescaleSpace, SamplePrediction, VPrediction};
pub use error::DiffusionError;
pub use pf_ode::PfOde;
pub use sampler::{LcmOptions, NoiseLevels, Sampler, SamplerKind, SecondOrder, TimestepConvention};
pub use schedule::{BetaSchedule, NoiseSchedule, TimestepSpacing};
pub use stochastic::{NoisyStep, NoisyStepMap, StepNoise};
