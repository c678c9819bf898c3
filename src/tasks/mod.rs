//! The paper's applications as library calls: typed config in, typed report out, progress through
//! a callback. They compose the diffusion adapter (sampling and its gradient) with any
//! [`EpsModel`](crate::diffusion::EpsModel), [`Classifier`] and [`Decoder`].

pub mod audit;
pub mod common;
pub mod noise_opt;
pub mod run;
pub mod tune;
pub mod unet_eps;

pub use audit::{audit, Audit, AuditReport, AuditRun};
pub use common::{
    Classifier, Decoder, GradientChoice, Noise, PixelSpace, SolverChoice, TaskClassifier, TaskDecoder, TaskError,
    TaskModel,
};
pub use noise_opt::{guided_sampling, GuidedReport, GuidedRun, GuidedSampling};
pub use tune::{gram, tune_through_sampling, Tuning};
pub use unet_eps::UnetEps;
