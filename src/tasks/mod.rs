//! The paper's applications as library calls: typed config in, typed report out, progress through
//! a callback. They compose the diffusion adapter (sampling and its gradient) with any
//! [`EpsModel`](crate::diffusion::EpsModel), [`Classifier`] and [`Decoder`].

pub mod audit;
pub mod common;
pub mod imagenet;
pub mod noise_opt;
pub(crate) mod output;
pub mod resume;
pub mod run;
pub mod run_sd;
pub mod stable_diffusion;
pub mod tune;
pub mod unet_eps;

pub use audit::{audit, Audit, AuditReport, AuditRun};
pub use common::{
    Classifier, Decoder, GradientChoice, Noise, PixelSpace, SolverChoice, TaskClassifier, TaskDecoder, TaskError,
    TaskModel,
};
pub use imagenet::ImageNetClassifier;
pub use noise_opt::{guided_sampling, GuidedReport, GuidedRun, GuidedSampling};
pub use resume::Resume;
pub use stable_diffusion::{EncodedPrompt, FinalSigmas, SchedulerConfig, SdError, StableDiffusion};
pub use tune::{channel_means, gram, tune_through_sampling, StyleLoss, Tuning};
pub use unet_eps::{UnetEps, UnetPrediction};
