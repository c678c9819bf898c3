//! Training the toy models: the classifier (cross-entropy) and the class-conditional denoiser
//! (ε-prediction DDPM loss with label dropout to the null class, for classifier-free guidance),
//! then their evaluation (held-out accuracy; classifier accuracy on guided DDIM samples).
//!
//! Everything is seeded: the backend's weight initialisation, the data stream, the timesteps,
//! the noise and the label dropout, so the same config reproduces the same run.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::data::{dataset_range, held_out_seed, train_seed, Rng};
use super::ema::Ema;
use super::png::{write_atomic, write_png_grid};
use super::{
    files, ClassifierConfig, DenoiserConfig, Prediction, ToyClassifier, ToyDenoiser, ToyError, CLASSES, IMAGE_SIZE,
    NULL_CLASS, NUM_CLASSES,
};
use crate::diffusion::{Cfg, NoiseSchedule, Sampler};

/// Everything that defines a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Seeds the weights, the data stream, timesteps, noise and label dropout.
    pub seed: u64,
    /// The denoiser's architecture.
    pub denoiser: DenoiserConfig,
    /// The classifier's architecture.
    pub classifier: ClassifierConfig,
    /// Denoiser optimisation steps.
    pub steps: usize,
    /// Denoiser batch size.
    pub batch: usize,
    /// Denoiser peak learning rate (Adam; linear warm-up, cosine decay to a tenth).
    pub lr: f64,
    /// Denoiser warm-up steps.
    pub warmup: usize,
    /// Probability of replacing a label by the null class.
    pub label_dropout: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023): each sample's loss is weighted as if its
    /// x̂₀ error were weighted by `min(SNR, γ)`, so the nearly clean timesteps, which are easy
    /// and numerous, stop dominating the gradient. 0 = the plain loss, as runs before it had.
    #[serde(default)]
    pub min_snr_gamma: f64,
    /// Decay of the exponential moving average of the denoiser's weights, which is what is
    /// evaluated and saved (0 = the last iterate, as runs before the average did).
    #[serde(default)]
    pub ema_decay: f64,
    /// Classifier optimisation steps.
    pub classifier_steps: usize,
    /// Classifier batch size.
    pub classifier_batch: usize,
    /// Classifier peak learning rate.
    pub classifier_lr: f64,
    /// Held-out images for the classifier's accuracy.
    pub held_out: usize,
    /// Class-conditional samples for the sample-quality metric (labels cycle over the classes).
    pub eval_samples: usize,
    /// DDIM steps of those samples.
    pub eval_steps: usize,
    /// Classifier-free guidance scale of those samples.
    pub eval_cfg: f64,
}

impl Default for TrainConfig {
    /// The shipped run.
    fn default() -> Self {
        Self {
            seed: 0,
            denoiser: DenoiserConfig::default(),
            classifier: ClassifierConfig::default(),
            steps: 11_000,
            batch: 16,
            lr: 2e-3,
            warmup: 100,
            label_dropout: 0.1,
            min_snr_gamma: 5.0,
            ema_decay: 0.999,
            classifier_steps: 600,
            classifier_batch: 64,
            classifier_lr: 2e-3,
            held_out: 600,
            eval_samples: 64,
            eval_steps: 30,
            eval_cfg: 3.0,
        }
    }
}

impl TrainConfig {
    /// Checks every option, naming the first one out of range.
    pub fn check(&self) -> Result<(), ToyError> {
        let bad =
            |name: &'static str, value: String, rule: &'static str| Err(ToyError::InvalidOption { name, value, rule });
        if self.steps == 0 {
            return bad("steps", self.steps.to_string(), "must be at least 1");
        }
        if self.batch == 0 {
            return bad("batch", self.batch.to_string(), "must be at least 1");
        }
        if self.classifier_batch == 0 {
            return bad(
                "classifier_batch",
                self.classifier_batch.to_string(),
                "must be at least 1",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "must be finite and > 0");
        }
        if !(self.classifier_lr.is_finite() && self.classifier_lr > 0.0) {
            return bad(
                "classifier_lr",
                self.classifier_lr.to_string(),
                "must be finite and > 0",
            );
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad("ema_decay", self.ema_decay.to_string(), "must be in [0, 1)");
        }
        if !(self.min_snr_gamma.is_finite() && self.min_snr_gamma >= 0.0) {
            return bad(
                "min_snr_gamma",
                self.min_snr_gamma.to_string(),
                "must be finite and >= 0",
            );
        }
        if !(0.0..1.0).contains(&self.label_dropout) {
            return bad("label_dropout", self.label_dropout.to_string(), "must be in [0, 1)");
        }
        if self.eval_samples > 0 && self.eval_steps == 0 {
            return bad("eval_steps", self.eval_steps.to_string(), "must be at least 1");
        }
        if !self.eval_cfg.is_finite() {
            return bad("eval_cfg", self.eval_cfg.to_string(), "must be finite");
        }
        self.denoiser.check()
    }
}

/// Which part of the run a [`Progress`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Training the classifier.
    Classifier,
    /// Training the denoiser.
    Denoiser,
    /// Sampling for the sample-quality metric.
    Evaluation,
}

/// One progress report: the phase, the step just done (1-based) of how many, the loss if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Steps done.
    pub step: usize,
    /// Steps in the phase.
    pub steps: usize,
    /// The step's loss (training phases).
    pub loss: Option<f64>,
}

/// Metrics and timings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Mean denoiser loss over the last 10% of steps.
    pub denoiser_final_loss: f64,
    /// Mean denoiser loss over the first 10% of steps.
    pub denoiser_initial_loss: f64,
    /// Mean classifier loss over the last 10% of steps (NaN, written as null, without steps).
    #[serde(deserialize_with = "null_as_nan")]
    pub classifier_final_loss: f64,
    /// Classifier accuracy on held-out images.
    pub classifier_held_out_accuracy: f64,
    /// Classifier accuracy on class-conditional DDIM samples (the sample-quality metric; NaN,
    /// written as null, without samples).
    #[serde(deserialize_with = "null_as_nan")]
    pub sample_accuracy: f64,
    /// The same, per class.
    #[serde(deserialize_with = "nulls_as_nan")]
    pub sample_accuracy_per_class: Vec<f64>,
    /// Trainable parameters of the denoiser.
    pub denoiser_params: usize,
    /// Trainable parameters of the classifier.
    pub classifier_params: usize,
    /// Seconds spent training the classifier.
    pub classifier_seconds: f64,
    /// Seconds spent training the denoiser.
    pub denoiser_seconds: f64,
    /// Seconds spent on evaluation.
    pub eval_seconds: f64,
    /// Denoiser loss every 50 steps (mean over those steps).
    pub denoiser_loss_curve: Vec<f64>,
}

/// JSON has no NaN: serde_json writes it as null; read null back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`null_as_nan`] for each entry.
fn nulls_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// The record `toy.json` written next to the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToyRecord {
    /// Record format tag.
    pub format: String,
    /// The command line that produced the weights.
    pub command: String,
    /// The crate version that trained them.
    pub crate_version: String,
    /// Threads the CPU backend computed with (timings depend on it).
    pub threads: usize,
    /// The run's configuration (architectures included: loading reads them).
    pub train: TrainConfig,
    /// Its metrics.
    pub report: TrainReport,
    /// The record of the weights this run started from (`train-toy --init`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<ToyRecord>>,
}

/// The current record format tag.
pub const RECORD_FORMAT: &str = "adjoint-dpm-toy/1";

/// Trained models, the report and the evaluation samples.
#[derive(Debug)]
pub struct Trained<B: Backend> {
    /// The denoiser.
    pub denoiser: ToyDenoiser<B>,
    /// The classifier.
    pub classifier: ToyClassifier<B>,
    /// Metrics and timings.
    pub report: TrainReport,
    /// The evaluation samples (`[eval_samples, 3, 32, 32]` flattened, in `[-1, 1]`; labels
    /// cycle over the classes).
    pub samples: Vec<f32>,
}

fn lr_at(step: usize, steps: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = step.saturating_sub(warmup) as f64 / steps.saturating_sub(warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Weight of one sample's squared prediction error at `ᾱ`: 1 without min-SNR (`gamma = 0`);
/// else `min(SNR, γ)` expressed for the prediction target (the x̂₀ error is the ε error
/// times `1/√SNR` and the v error times `1/√(SNR + 1)`).
fn loss_weight(alpha_bar: f64, gamma: f64, prediction: Prediction) -> f64 {
    if gamma == 0.0 {
        return 1.0;
    }
    let snr = alpha_bar / (1.0 - alpha_bar);
    match prediction {
        Prediction::Epsilon => snr.min(gamma) / snr,
        Prediction::V => snr.min(gamma) / (snr + 1.0),
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn tail_mean(v: &[f64]) -> f64 {
    mean(&v[v.len() - (v.len() / 10).max(1)..])
}

fn head_mean(v: &[f64]) -> f64 {
    mean(&v[..(v.len() / 10).max(1)])
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().expect("a scalar")[0]
}

/// Trains the classifier alone; returns it with its loss per step.
///
/// `init` continues from given weights instead of a seeded random initialisation.
pub fn train_classifier<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    init: Option<ToyClassifier<B::InnerBackend>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(ToyClassifier<B>, Vec<f64>), ToyError> {
    config.check()?;
    B::seed(device, config.seed);
    let mut model = match init {
        // Inner-backend parameters come back frozen from `from_inner`: unfreeze them all.
        Some(inner) => crate::ode::train_only(ToyClassifier::from_inner(inner), |_| true),
        None => crate::ode::materialized(config.classifier.init::<B>(device)),
    };
    let mut optim = AdamConfig::new().init::<B, ToyClassifier<B>>();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let seed = train_seed(config.seed) ^ 0x636c_6173;
    let mut rng = Rng::new(seed);
    let (steps, batch) = (config.classifier_steps, config.classifier_batch);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let data = dataset_range(seed, step * batch, batch);
        // Augmentation: Gaussian pixel noise of a random level on half the images, so the
        // judge also copes with imperfect generated samples.
        let pixels = 3 * IMAGE_SIZE * IMAGE_SIZE;
        let mut images = data.images;
        for chunk in images.chunks_mut(pixels) {
            if rng.uniform() < 0.5 {
                let level = rng.range(0.0, 0.2) as f32;
                for v in chunk.iter_mut() {
                    *v += level * rng.normal() as f32;
                }
            }
        }
        let x = Tensor::<B, 4>::from_data(TensorData::new(images, [batch, 3, IMAGE_SIZE, IMAGE_SIZE]), device);
        let labels = labels_tensor::<B>(&data.labels, device);
        let loss = loss_fn.forward(model.logits(x), labels);
        let value = scalar(loss.clone().detach());
        losses.push(value);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr_at(step, steps, steps / 20, config.classifier_lr), model, grads);
        progress(&Progress {
            phase: Phase::Classifier,
            step: step + 1,
            steps,
            loss: Some(value),
        });
    }
    Ok((model, losses))
}

fn labels_tensor<B: Backend>(labels: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(v, [labels.len()]), device)
}

/// Trains the denoiser alone with the ε- or v-prediction loss (see [`Prediction`]); returns it
/// (its weight average when `config.ema_decay > 0`) with its loss per step.
///
/// `init` continues from given weights instead of a seeded random initialisation.
pub fn train_denoiser<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    init: Option<ToyDenoiser<B::InnerBackend>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(ToyDenoiser<B::InnerBackend>, Vec<f64>), ToyError> {
    config.check()?;
    B::seed(device, config.seed.wrapping_add(1));
    let mut model = match init {
        // Inner-backend parameters come back frozen from `from_inner`: unfreeze them all.
        Some(inner) => crate::ode::train_only(ToyDenoiser::from_inner(inner), |_| true),
        None => config.denoiser.init::<B>(device)?,
    };
    let mut ema = (config.ema_decay > 0.0).then(|| Ema::new(&model.valid(), config.ema_decay));
    let mut optim = AdamConfig::new().init::<B, ToyDenoiser<B>>();
    let schedule = config.denoiser.schedule.schedule();
    let train_steps = schedule.train_steps();
    let seed = train_seed(config.seed);
    let mut rng = Rng::new(seed ^ 0x6469_6666);
    let (steps, batch) = (config.steps, config.batch);
    let pixels = 3 * IMAGE_SIZE * IMAGE_SIZE;
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let data = dataset_range(seed, step * batch, batch);
        let rows: Vec<usize> = data
            .labels
            .iter()
            .map(|&l| {
                if rng.uniform() < config.label_dropout {
                    NULL_CLASS
                } else {
                    l
                }
            })
            .collect();
        let ts: Vec<usize> = (0..batch).map(|_| rng.below(train_steps)).collect();
        let weights: Vec<f32> = ts
            .iter()
            .map(|&k| {
                loss_weight(
                    schedule.alphas_cumprod(k),
                    config.min_snr_gamma,
                    config.denoiser.prediction,
                ) as f32
            })
            .collect();
        let noise = rng.normals(batch * pixels);
        let mut noisy = Vec::with_capacity(batch * pixels);
        let mut target = Vec::with_capacity(batch * pixels);
        for (i, &k) in ts.iter().enumerate() {
            let abar = schedule.alphas_cumprod(k);
            let (a, s) = (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32);
            let range = i * pixels..(i + 1) * pixels;
            let pairs = data.images[range.clone()].iter().zip(&noise[range]);
            noisy.extend(pairs.clone().map(|(&x, &e)| a * x + s * e));
            match config.denoiser.prediction {
                Prediction::Epsilon => target.extend(pairs.map(|(_, &e)| e)),
                Prediction::V => target.extend(pairs.map(|(&x, &e)| a * e - s * x)),
            }
        }
        let shape = [batch, 3, IMAGE_SIZE, IMAGE_SIZE];
        let x_t = Tensor::<B, 4>::from_data(TensorData::new(noisy, shape), device);
        let target = Tensor::<B, 4>::from_data(TensorData::new(target, shape), device);
        let t = Tensor::<B, 1>::from_data(
            TensorData::new(ts.iter().map(|&k| k as f32).collect::<Vec<_>>(), [batch]),
            device,
        );
        let pred = model.forward(x_t, t, labels_tensor::<B>(&rows, device));
        let weights = Tensor::<B, 4>::from_data(TensorData::new(weights, [batch, 1, 1, 1]), device);
        let loss = ((pred - target).square() * weights).mean();
        let value = scalar(loss.clone().detach());
        if !value.is_finite() {
            return Err(ToyError::InvalidOption {
                name: "lr",
                value: config.lr.to_string(),
                rule: "training diverged (non-finite loss); lower the learning rate",
            });
        }
        losses.push(value);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr_at(step, steps, config.warmup, config.lr), model, grads);
        if let Some(ema) = ema.as_mut() {
            ema.update(&model.valid());
        }
        progress(&Progress {
            phase: Phase::Denoiser,
            step: step + 1,
            steps,
            loss: Some(value),
        });
    }
    let model = match ema {
        Some(ema) => ema.apply(model.valid()),
        None => model.valid(),
    };
    Ok((model, losses))
}

/// Classifier accuracy on `n` held-out images (from [`held_out_seed`]).
pub fn held_out_accuracy<B: Backend>(classifier: &ToyClassifier<B>, n: usize, seed: u64, device: &B::Device) -> f64 {
    let mut correct = 0;
    for start in (0..n).step_by(100) {
        let len = 100.min(n - start);
        let chunk = dataset_range(held_out_seed(seed), start, len);
        let predicted = classifier.predict(chunk.images_tensor::<B>(device));
        correct += predicted.iter().zip(&chunk.labels).filter(|(p, l)| p == l).count();
    }
    correct as f64 / n.max(1) as f64
}

/// Generates `n` class-conditional samples (labels cycling over the classes) with DDIM and
/// classifier-free guidance, from seeded noise; returns the images and their labels.
#[allow(clippy::too_many_arguments)]
pub fn conditional_samples<B: Backend>(
    denoiser: &ToyDenoiser<B>,
    schedule: &NoiseSchedule,
    n: usize,
    steps: usize,
    cfg: f64,
    seed: u64,
    device: &B::Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Vec<f32>, Vec<usize>), ToyError> {
    let labels: Vec<usize> = (0..n).map(|i| i % NUM_CLASSES).collect();
    let pixels = 3 * IMAGE_SIZE * IMAGE_SIZE;
    let mut rng = Rng::new(seed ^ 0x7361_6d70);
    let mut images = Vec::with_capacity(n * pixels);
    const CHUNK: usize = 32;
    for start in (0..n).step_by(CHUNK) {
        let chunk = &labels[start..(start + CHUNK).min(n)];
        let model = Cfg::new(denoiser.conditioned_for_guidance(chunk)?, cfg)?;
        let x_t = Tensor::<B, 4>::from_data(
            TensorData::new(
                rng.normals(chunk.len() * pixels),
                [chunk.len(), 3, IMAGE_SIZE, IMAGE_SIZE],
            ),
            device,
        );
        let x0 = Sampler::ddim(steps).sample_inference(&model, schedule, x_t)?;
        images.extend(x0.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data"));
        progress(&Progress {
            phase: Phase::Evaluation,
            step: (start + chunk.len()).min(n),
            steps: n,
            loss: None,
        });
    }
    Ok((images, labels))
}

/// Classifier accuracy on given images (`[n, 3, 32, 32]` flattened) and their labels, overall and
/// per class.
pub fn accuracy_on<B: Backend>(
    classifier: &ToyClassifier<B>,
    images: &[f32],
    labels: &[usize],
    device: &B::Device,
) -> (f64, Vec<f64>) {
    let n = labels.len();
    if n == 0 {
        return (f64::NAN, vec![f64::NAN; NUM_CLASSES]);
    }
    let x = Tensor::<B, 4>::from_data(TensorData::new(images.to_vec(), [n, 3, IMAGE_SIZE, IMAGE_SIZE]), device);
    let predicted = classifier.predict(x.clamp(-1.0, 1.0));
    let mut hits = [0usize; NUM_CLASSES];
    let mut totals = [0usize; NUM_CLASSES];
    for (p, &l) in predicted.iter().zip(labels) {
        totals[l] += 1;
        hits[l] += (*p == l) as usize;
    }
    let overall = hits.iter().sum::<usize>() as f64 / n.max(1) as f64;
    let per_class = hits
        .iter()
        .zip(&totals)
        .map(|(&h, &t)| if t == 0 { f64::NAN } else { h as f64 / t as f64 })
        .collect();
    (overall, per_class)
}

/// The whole run: classifier, denoiser, evaluation. Returns the models on the inner backend.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Trained<B::InnerBackend>, ToyError> {
    train_from::<B>(config, device, None, progress)
}

/// Weights a run continues from (see [`train_from`]).
pub type Start<B> = (ToyDenoiser<B>, ToyClassifier<B>);

/// [`train`], continuing from given weights when `init` is `Some` (their architecture wins over
/// the config's; with `classifier_steps = 0` the classifier is kept as it is). Use another seed
/// than the first run's so the continuation sees new images and noise.
pub fn train_from<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    init: Option<Start<B::InnerBackend>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Trained<B::InnerBackend>, ToyError> {
    config.check()?;
    let (init_denoiser, init_classifier) = match init {
        Some((d, c)) => (Some(d), Some(c)),
        None => (None, None),
    };
    let clock = Instant::now();
    let (classifier, classifier_losses) = train_classifier::<B>(config, device, init_classifier, progress)?;
    let classifier = classifier.valid();
    let classifier_seconds = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let (denoiser, denoiser_losses) = train_denoiser::<B>(config, device, init_denoiser, progress)?;
    let denoiser_seconds = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let held_out = held_out_accuracy(&classifier, config.held_out, config.seed, device);
    let schedule = config.denoiser.schedule.schedule();
    let (samples, labels) = conditional_samples(
        &denoiser,
        &schedule,
        config.eval_samples,
        config.eval_steps,
        config.eval_cfg,
        held_out_seed(config.seed),
        device,
        progress,
    )?;
    let (sample_accuracy, per_class) = accuracy_on(&classifier, &samples, &labels, device);
    let eval_seconds = clock.elapsed().as_secs_f64();

    let report = TrainReport {
        denoiser_final_loss: tail_mean(&denoiser_losses),
        denoiser_initial_loss: head_mean(&denoiser_losses),
        classifier_final_loss: if classifier_losses.is_empty() {
            f64::NAN
        } else {
            tail_mean(&classifier_losses)
        },
        classifier_held_out_accuracy: held_out,
        sample_accuracy,
        sample_accuracy_per_class: per_class,
        denoiser_params: denoiser.num_params(),
        classifier_params: classifier.num_params(),
        classifier_seconds,
        denoiser_seconds,
        eval_seconds,
        denoiser_loss_curve: denoiser_losses.chunks(50).map(mean).collect(),
    };
    Ok(Trained {
        denoiser,
        classifier,
        report,
        samples,
    })
}

/// Writes trained models into `dir` (created if missing): both safetensors files, the sample grid
/// (one row per class) and the record `toy.json`, each atomically (temporary file, then rename),
/// the record last.
pub fn save<B: Backend>(dir: &Path, trained: &Trained<B>, record: &ToyRecord) -> Result<(), ToyError> {
    std::fs::create_dir_all(dir).map_err(|source| ToyError::Io {
        path: dir.into(),
        source,
    })?;
    save_module(&trained.denoiser, &dir.join(files::DENOISER))?;
    save_module(&trained.classifier, &dir.join(files::CLASSIFIER))?;
    let n = record.train.eval_samples;
    if n > 0 {
        // Regroup the samples (labels cycle) into one row per class.
        let pixels = 3 * IMAGE_SIZE * IMAGE_SIZE;
        let per_class = n / NUM_CLASSES;
        if per_class > 0 {
            let mut grid = Vec::with_capacity(per_class * NUM_CLASSES * pixels);
            for class in 0..CLASSES.len() {
                for j in 0..per_class {
                    let i = j * NUM_CLASSES + class;
                    grid.extend_from_slice(&trained.samples[i * pixels..(i + 1) * pixels]);
                }
            }
            write_png_grid(
                &dir.join(files::SAMPLES),
                &grid,
                per_class * NUM_CLASSES,
                [IMAGE_SIZE, IMAGE_SIZE],
                per_class,
                2,
            )?;
        }
    }
    let json = serde_json::to_string_pretty(record).expect("the record serialises");
    write_atomic(&dir.join(files::RECORD), json.as_bytes())
}

fn save_module<B: Backend, M: Module<B>>(module: &M, path: &Path) -> Result<(), ToyError> {
    // Atomic: the weights go to a temporary sibling, renamed into place once complete.
    Ok(adjoint_dpm_models::load::save_safetensors(module, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The min-SNR weight turns the ε or v error into `min(SNR, γ) · ‖x̂₀ − x₀‖²`: checked by
    /// recovering x̂₀ from a perturbed prediction with the DDPM identities.
    #[test]
    fn min_snr_weight_is_the_clipped_x0_weight() {
        let (x0, eps, delta) = (0.7_f64, -1.3_f64, 0.05_f64);
        for alpha_bar in [0.999, 0.9, 0.5, 0.1, 1e-3] {
            let (a, s) = (f64::sqrt(alpha_bar), f64::sqrt(1.0 - alpha_bar));
            let snr = alpha_bar / (1.0 - alpha_bar);
            let x_t = a * x0 + s * eps;
            for gamma in [1.0, 5.0] {
                // ε-prediction off by δ.
                let x0_hat = (x_t - s * (eps + delta)) / a;
                let want = snr.min(gamma) * (x0_hat - x0).powi(2);
                let got = loss_weight(alpha_bar, gamma, Prediction::Epsilon) * delta * delta;
                assert!((got - want).abs() <= 1e-9 * want, "ε, ᾱ {alpha_bar}: {got} vs {want}");
                // v-prediction off by δ.
                let v = a * eps - s * x0;
                let x0_hat = a * x_t - s * (v + delta);
                let want = snr.min(gamma) * (x0_hat - x0).powi(2);
                let got = loss_weight(alpha_bar, gamma, Prediction::V) * delta * delta;
                assert!((got - want).abs() <= 1e-9 * want, "v, ᾱ {alpha_bar}: {got} vs {want}");
            }
            // γ = 0 is the plain loss.
            assert_eq!(loss_weight(alpha_bar, 0.0, Prediction::V), 1.0);
        }
    }
}
