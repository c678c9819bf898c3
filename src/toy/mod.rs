//! The embedded default: a procedurally generated labelled image set, and the tiny class-
//! conditional diffusion model and classifier the crate trains on it and ships.
//!
//! - [`dataset`]: seeded 32×32 RGB images of [`CLASSES`] (shapes of varied colour, position,
//!   size and rotation on gradient backgrounds), values in `[-1, 1]`.
//! - [`ToyDenoiser`]: diffusers' `UNet2DConditionModel` (the Stable Diffusion code, a small
//!   config) conditioned through cross-attention on a class-embedding row, like a text embedding;
//!   the table's last row is the null class for classifier-free guidance.
//!   [`ToyDenoiser::conditioned`] fixes the conditioning and gives an [`EpsModel`] whose context
//!   is a trainable parameter.
//! - [`ToyClassifier`]: a small GroupNorm ResNet judging the images; [`ToyClassifier::features`]
//!   gives its feature maps for style losses.
//! - [`load_default`]: the shipped weights, embedded in the library from `models/weights/`;
//!   [`load_from_dir`] reads the same layout from a directory (what [`train::train`] writes).
//!
//! ```no_run
//! use adjoint_dpm::diffusion::{Cfg, Sampler};
//! use adjoint_dpm::toy;
//! use burn::backend::Flex;
//! use burn::tensor::{Distribution, Tensor};
//!
//! let device = Default::default();
//! let (denoiser, classifier, schedule) = toy::load_default::<Flex>(&device)?;
//! let labels = [toy::class_index("ring")?; 4];
//! let model = Cfg::new(denoiser.conditioned_for_guidance(&labels)?, 3.0).unwrap();
//! let x_t = Tensor::<Flex, 4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
//! let images = Sampler::ddim(30).sample_inference(&model, &schedule, x_t).unwrap();
//! println!("{:?}", classifier.predict(images));
//! # Ok::<(), toy::ToyError>(())
//! ```
//!
//! [`EpsModel`]: crate::diffusion::EpsModel

#![warn(missing_docs)]

pub mod classifier;
pub mod data;
pub mod denoiser;
pub mod ema;
pub mod png;
pub mod train;

use std::path::{Path, PathBuf};

use adjoint_dpm_models::load::{load_safetensors, CastFloat, KeyMap};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_store::{ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, SafetensorsStore};
use serde::{Deserialize, Serialize};

pub use classifier::{ClassifierConfig, ToyClassifier};
pub use data::{class_index, dataset, dataset_of_class, held_out_seed, train_seed, Rng, ToyData};
pub use denoiser::{Conditioned, DenoiserConfig, Prediction, ToyDenoiser};
pub use png::write_png_grid;
pub use train::{train, Phase, Progress, ToyRecord, TrainConfig, TrainReport};

use crate::diffusion::NoiseSchedule;

/// The classes, in label order.
pub const CLASSES: [&str; 6] = ["circle", "square", "triangle", "cross", "ring", "diamond"];
/// Number of classes.
pub const NUM_CLASSES: usize = CLASSES.len();
/// The class-embedding row of the null (unconditional) class: the table's last row.
pub const NULL_CLASS: usize = NUM_CLASSES;
/// Height and width of the images.
pub const IMAGE_SIZE: usize = 32;

/// File names of a weights directory.
pub mod files {
    /// The training record (configs, command, seed, metrics).
    pub const RECORD: &str = "toy.json";
    /// The denoiser (UNet + class embedding), safetensors.
    pub const DENOISER: &str = "denoiser.safetensors";
    /// The classifier, safetensors.
    pub const CLASSIFIER: &str = "classifier.safetensors";
    /// A PNG grid of class-conditional samples (one row per class).
    pub const SAMPLES: &str = "samples.png";
}

/// What can go wrong with the toy models and data.
#[derive(Debug, thiserror::Error)]
pub enum ToyError {
    /// A class index outside `0..N`.
    #[error("unknown class index {index}; the classes are 0..{} ({})", NUM_CLASSES, CLASSES.join(", "))]
    UnknownClass {
        /// The index given.
        index: usize,
    },
    /// A class name that is not one of [`CLASSES`].
    #[error("unknown class {name:?}; the classes are {}", CLASSES.join(", "))]
    UnknownClassName {
        /// The name given.
        name: String,
    },
    /// Conditioning asked for zero samples.
    #[error("no labels given: the batch must hold at least one sample")]
    EmptyBatch,
    /// A weights directory lacks a file or a file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The record `toy.json` cannot be parsed.
    #[error("cannot parse the toy model record {path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
    },
    /// A weights file does not fit the architecture of the record, or is corrupt.
    #[error("toy model weights: {0}")]
    Model(String),
    /// A training option is out of range.
    #[error("invalid training option {name} = {value}: {rule}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What it must satisfy.
        rule: &'static str,
    },
    /// Sampling failed during evaluation.
    #[error("sampling failed: {0}")]
    Sampling(#[from] crate::diffusion::DiffusionError),
    /// An image could not be encoded.
    #[error("cannot write image {path}: {message}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The encoder's message.
        message: String,
    },
}

/// The noise schedules a toy model may be trained with, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    /// DDPM's linear β, 1e-4 → 0.02 (the pixel-space default).
    #[default]
    DdpmLinear,
    /// Stable Diffusion's scaled-linear β.
    SdScaledLinear,
    /// The cosine schedule.
    Cosine,
}

impl ScheduleName {
    /// The schedule.
    pub fn schedule(self) -> NoiseSchedule {
        match self {
            ScheduleName::DdpmLinear => NoiseSchedule::ddpm_linear(),
            ScheduleName::SdScaledLinear => NoiseSchedule::sd_scaled_linear(),
            ScheduleName::Cosine => NoiseSchedule::cosine(),
        }
    }
}

/// The shipped weights' record and files, embedded at build time.
pub(crate) mod embedded {
    pub const RECORD: &str = include_str!("../../models/weights/toy.json");
    pub const DENOISER: &[u8] = include_bytes!("../../models/weights/denoiser.safetensors");
    pub const CLASSIFIER: &[u8] = include_bytes!("../../models/weights/classifier.safetensors");
}

/// The shipped record (`models/weights/toy.json`): how the default weights were trained and how
/// well they do.
pub fn default_record() -> Result<ToyRecord, ToyError> {
    serde_json::from_str(embedded::RECORD).map_err(|source| ToyError::Record {
        path: PathBuf::from("models/weights/toy.json (embedded)"),
        source,
    })
}

/// The shipped denoiser, classifier and the noise schedule they were trained with (embedded in
/// the library, so it works from any directory).
pub fn load_default<B: Backend>(
    device: &B::Device,
) -> Result<(ToyDenoiser<B>, ToyClassifier<B>, NoiseSchedule), ToyError> {
    let record = default_record()?;
    let denoiser = record.train.denoiser.init::<B>(device)?;
    let denoiser = load_bytes(denoiser, embedded::DENOISER, "denoiser")?;
    let classifier = load_bytes(
        record.train.classifier.init::<B>(device),
        embedded::CLASSIFIER,
        "classifier",
    )?;
    Ok((denoiser, classifier, record.train.denoiser.schedule.schedule()))
}

/// Reads the record `toy.json` of a weights directory.
pub fn read_record(dir: &Path) -> Result<ToyRecord, ToyError> {
    let path = dir.join(files::RECORD);
    let text = std::fs::read_to_string(&path).map_err(|source| ToyError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ToyError::Record { path, source })
}

/// Loads toy weights from a directory written by [`train::train`] (`toy.json`,
/// `denoiser.safetensors`, `classifier.safetensors`).
pub fn load_from_dir<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ToyDenoiser<B>, ToyClassifier<B>, NoiseSchedule), ToyError> {
    if !dir.is_dir() {
        return Err(ToyError::Io {
            path: dir.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let record = read_record(dir)?;
    let load = |file: &str| -> Result<PathBuf, ToyError> {
        let path = dir.join(file);
        std::fs::metadata(&path).map_err(|source| ToyError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    let denoiser = load_safetensors(
        record.train.denoiser.init::<B>(device)?,
        load(files::DENOISER)?,
        &KeyMap::new(),
    )?;
    let classifier = load_safetensors(
        record.train.classifier.init::<B>(device),
        load(files::CLASSIFIER)?,
        &KeyMap::new(),
    )?;
    Ok((denoiser, classifier, record.train.denoiser.schedule.schedule()))
}

/// Loads safetensors bytes written by [`adjoint_dpm_models::load::save_safetensors`].
fn load_bytes<B: Backend, M: Module<B>>(mut module: M, bytes: &[u8], what: &str) -> Result<M, ToyError> {
    let dtype: DType = match module.devices().first() {
        Some(device) => burn::tensor::get_device_settings::<B>(device).float_dtype.into(),
        None => DType::F32,
    };
    let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
    let snapshots = store
        .get_all_snapshots()
        .map_err(|e| ToyError::Model(format!("embedded {what} weights are corrupt: {e}")))?
        .values()
        .cloned()
        .collect();
    let adapter = PyTorchToBurnAdapter.chain(CastFloat { to: dtype });
    let result = module.apply(snapshots, None, Some(Box::new(adapter)), true);
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(ToyError::Model(format!(
            "embedded {what} weights do not fit its architecture: {} missing, {} errors (first: {:?} {:?})",
            result.missing.len(),
            result.errors.len(),
            result.missing.first().map(|m| &m.0),
            result.errors.first().map(|e| e.to_string()),
        )));
    }
    Ok(module)
}
