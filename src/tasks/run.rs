//! The four tasks end to end on the embedded toy model: load it, draw the noise, run, and write
//! into an output directory a before/after PNG grid, a loss-curve PNG and `metrics.json` (every
//! file written atomically). This is what the CLI subcommands call.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use serde::Serialize;

use crate::diffusion::NoiseSchedule;
use crate::diffusion::{Cfg, NoiseLevels, RescaleSpace, Sampler};
use crate::tasks::common::{
    lora_rank, scalar, step_noise, to_f64, Classifier, Decoder, GradientChoice, PixelSpace, SolverChoice,
    TaskClassifier, TaskDecoder, TaskError, TaskModel,
};
use crate::tasks::output;
use crate::tasks::resume::Resume;
use crate::tasks::{audit, guided_sampling, tune_through_sampling, Audit, GuidedSampling, StyleLoss, Tuning};
use crate::toy::{self, ToyClassifier, ToyDenoiser, ToyError, CLASSES, IMAGE_SIZE};

/// The CPU backend the tasks run on.
pub type Inner = Flex;
type Ad = Autodiff<Inner>;

/// Options every task takes (`--gradient`, `--steps`, `--solver`, `--lr`, `--iters`, `--seed`,
/// `--cfg`, `--batch`, `--out`, `--weights`, and for Stable Diffusion `--prompt`, `--classifier`).
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// A directory of toy weights (as `train-toy` writes them); `None`: the embedded ones.
    pub weights: Option<PathBuf>,
    /// Gradient mode through sampling.
    pub gradient: GradientChoice,
    /// Sampler.
    pub solver: SolverChoice,
    /// Sample on Karras' noise levels, whatever the sampler (`--karras`).
    pub karras: bool,
    /// Sample on levels evenly spaced in log ρ, whatever the sampler (`--exponential-sigmas`).
    pub exponential: bool,
    /// DDIM's η or TCD's γ (`--eta`): > 0 makes DDIM stochastic; `None` keeps the sampler's
    /// own (0, or TCD's 0.3).
    pub eta: Option<f64>,
    /// Sampling steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// Optimisation iterations.
    pub iters: usize,
    /// Seed of the noise.
    pub seed: u64,
    /// Guidance scale for class-conditional sampling.
    pub cfg: f64,
    /// diffusers' `guidance_rescale` φ under guidance (`--guidance-rescale`; 0: off).
    pub guidance_rescale: f64,
    /// Samples per batch.
    pub batch: usize,
    /// Stable Diffusion (`weights` is a diffusers folder): the prompt; empty = unconditional.
    pub prompt: String,
    /// Stable Diffusion: the negative prompt guidance steers away from (`--negative-prompt`;
    /// empty: the unconditional model).
    pub negative_prompt: String,
    /// Stable Diffusion: condition on the hidden state `clip_skip` layers before CLIP's last
    /// (diffusers' `clip_skip`, `--clip-skip`; 0: the pipeline's own).
    pub clip_skip: usize,
    /// Stable Diffusion: a LoRA checkpoint fused into the UNet and text encoders before the run
    /// (`--lora`; diffusers/peft or kohya keys), scaled by `lora_scale` (`--lora-scale`).
    pub lora: Option<PathBuf>,
    /// The LoRA's scale (diffusers' `lora_scale`).
    pub lora_scale: f64,
    /// Stable Diffusion: textual-inversion embeddings added to the text encoders
    /// (`--embedding`, repeatable; each named by its file's token, else its file's stem).
    pub embeddings: Vec<PathBuf>,
    /// Stable Diffusion: a single-file checkpoint (`--checkpoint`; SD 1.x in the original LDM
    /// layout) whose UNet, VAE and text encoder replace the `weights` folder's, which then
    /// gives only the configs, tokenizer and scheduler.
    pub checkpoint: Option<PathBuf>,
    /// Stable Diffusion: diffusers ControlNet folders (`--controlnet`, repeatable), after the
    /// folder's own `controlnet/` if it has one.
    pub controlnets: Vec<PathBuf>,
    /// Stable Diffusion: each ControlNet's image (`--control-image`, one per ControlNet:
    /// edges, depth, pose...), resized to the images' size, in `[0, 1]`.
    pub control_images: Vec<PathBuf>,
    /// The ControlNets' weights (diffusers' `controlnet_conditioning_scale`,
    /// `--control-scale`): one per ControlNet, one for all, or none (1).
    pub control_scales: Vec<f64>,
    /// Stable Diffusion: the images' height and width in pixels (`--height`, `--width`;
    /// `None`: the UNet's `sample_size`, square).
    pub resolution: Option<[usize; 2]>,
    /// Stable Diffusion: the torchvision ResNet judging the images (`.pth` or `.safetensors`;
    /// ResNet-50 unless a JSON `ResNetConfig` with the same stem sits beside it).
    pub classifier: Option<PathBuf>,
    /// Start over instead of continuing the state an interrupted run left in `out`.
    pub fresh: bool,
}

/// The resume state of a task run: a saved state is continued only under the same task
/// arguments and options (the iteration count and `fresh` aside) and the same weight files
/// (see [`files_fingerprint`]); `fresh` discards saved ones.
pub(crate) fn resume_for(config: &RunConfig, task: &impl Serialize) -> Result<Option<Resume>, RunError> {
    let key = RunConfig {
        iters: 0,
        fresh: false,
        ..config.clone()
    };
    let files = match &config.weights {
        Some(dir) => files_fingerprint(dir),
        None => {
            let mut h = DefaultHasher::new();
            (toy::embedded::DENOISER, toy::embedded::CLASSIFIER).hash(&mut h);
            h.finish()
        }
    };
    let files = (files, config.classifier.as_deref().map(files_fingerprint));
    let resume = Resume::new(&config.out, &(task, key, files));
    if config.fresh {
        resume.clear()?;
    }
    Ok(Some(resume))
}

/// Identifies the files at `path` (a file, or a folder walked recursively) by name, size and
/// modification time, so a state saved while other weights or images were there (retrained,
/// replaced) is never resumed. Unreadable entries count as absent: loading reports them.
pub(crate) fn files_fingerprint(path: &Path) -> u64 {
    fn walk(path: &Path, h: &mut DefaultHasher) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        path.hash(h);
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            children.sort();
            for child in children {
                walk(&child, h);
            }
        } else {
            meta.len().hash(h);
            meta.modified().ok().hash(h);
        }
    }
    let mut h = DefaultHasher::new();
    walk(path, &mut h);
    h.finish()
}

impl RunConfig {
    /// `sampler` on the noise levels `--karras` or `--exponential-sigmas` asks for (else its
    /// own), with `--eta`.
    pub fn configure(&self, sampler: Sampler) -> Sampler {
        let sampler = match self.eta {
            Some(eta) => sampler.eta(eta),
            None => sampler,
        };
        match (self.karras, self.exponential) {
            (true, _) => sampler.noise_levels(NoiseLevels::Karras),
            (_, true) => sampler.noise_levels(NoiseLevels::Exponential),
            _ => sampler,
        }
    }

    /// Seed of the noise a stochastic sampler injects at its steps (apart from x_T's).
    pub fn step_noise_seed(&self) -> u64 {
        self.seed.wrapping_mul(1_000_003).wrapping_add(0x5eed_0000)
    }
}

impl Default for RunConfig {
    /// The CLI's defaults.
    fn default() -> Self {
        Self {
            out: PathBuf::from("out"),
            weights: None,
            gradient: GradientChoice::Exact,
            solver: SolverChoice::Ddim,
            karras: false,
            exponential: false,
            eta: None,
            steps: 20,
            lr: 0.05,
            iters: 30,
            seed: 0,
            cfg: 3.0,
            guidance_rescale: 0.0,
            batch: 8,
            prompt: String::new(),
            negative_prompt: String::new(),
            clip_skip: 0,
            lora: None,
            lora_scale: 1.0,
            embeddings: Vec::new(),
            checkpoint: None,
            controlnets: Vec::new(),
            control_images: Vec::new(),
            control_scales: Vec::new(),
            resolution: None,
            classifier: None,
            fresh: false,
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The task itself.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Loading the toy model, its data or writing an image.
    #[error(transparent)]
    Toy(#[from] ToyError),
    /// Loading a Stable Diffusion folder.
    #[error(transparent)]
    StableDiffusion(#[from] crate::tasks::stable_diffusion::SdError),
    /// Loading the classifier.
    #[error("classifier {path}: {source}")]
    Classifier {
        /// The weights file.
        path: PathBuf,
        /// Why it failed.
        source: adjoint_dpm_models::load::LoadError,
    },
    /// A required option is missing or does not fit the model.
    #[error("{0}")]
    Usage(String),
    /// A reference image cannot be read.
    #[error("cannot read image {path}: {message}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The output directory or a result file.
    #[error("cannot write {path}: {message}")]
    Output {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl From<crate::diffusion::DiffusionError> for RunError {
    fn from(e: crate::diffusion::DiffusionError) -> Self {
        RunError::Task(TaskError::Diffusion(e))
    }
}

impl<B: burn::tensor::backend::Backend> crate::tasks::Classifier<B> for ToyClassifier<B> {
    fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        ToyClassifier::logits(self, images)
    }

    fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        ToyClassifier::features(self, images)
    }
}

/// Everything a run needs, loaded once.
struct Setup {
    denoiser: ToyDenoiser<Ad>,
    classifier: ToyClassifier<Ad>,
    schedule: crate::diffusion::NoiseSchedule,
    sampler: Sampler,
}

fn setup(config: &RunConfig) -> Result<Setup, RunError> {
    output::prepare(&config.out, config.batch, config.steps, config.cfg)?;
    let device = Default::default();
    let (denoiser, classifier, schedule) = match &config.weights {
        Some(dir) => toy::load_from_dir::<Ad>(dir, &device)?,
        None => toy::load_default::<Ad>(&device)?,
    };
    let sampler = config.configure(config.solver.sampler(config.steps, config.gradient));
    Ok(Setup {
        denoiser,
        classifier,
        schedule,
        sampler,
    })
}

fn noise(config: &RunConfig, salt: u64) -> Tensor<Inner, 4> {
    let device = Default::default();
    <Inner as burn::tensor::backend::Backend>::seed(&device, config.seed.wrapping_mul(1_000_003).wrapping_add(salt));
    Tensor::random(
        [config.batch, 3, IMAGE_SIZE, IMAGE_SIZE],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
}

fn values(t: Tensor<Inner, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap_or_default()
}

/// Writes the before/after grid, the loss curve and metrics.
fn write_outputs<M: Serialize>(
    config: &RunConfig,
    before: Tensor<Inner, 4>,
    after: Tensor<Inner, 4>,
    losses: &[f64],
    metrics: &M,
) -> Result<(), RunError> {
    output::write_outputs(&config.out, config, before, after, losses, metrics)
}

/// Task 1: samples of the unconditional model steered to `target` by optimising x_T.
pub fn run_guide(
    config: &RunConfig,
    target: &str,
    prior_weight: f64,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::GuidedReport, RunError> {
    let target = toy::class_index(target)?;
    let s = setup(config)?;
    let task = GuidedSampling {
        target,
        iters: config.iters,
        lr: config.lr,
        prior_weight,
        sampler: s.sampler,
        step_noise_seed: config.step_noise_seed(),
        resume: resume_for(config, &("guide", target, prior_weight))?,
    };
    let model = s.denoiser.unconditional();
    let run = guided_sampling(
        &model,
        &s.classifier,
        &PixelSpace,
        &s.schedule,
        noise(config, 1),
        &task,
        on_iter,
    )?;
    write_outputs(config, run.before, run.after, &run.report.losses, &run.report)?;
    Ok(run.report)
}

/// Task 2: for each sample, noise within an ℓ∞ ball of radius `epsilon` that changes its label.
pub fn run_audit(
    config: &RunConfig,
    epsilon: f64,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::AuditReport, RunError> {
    let s = setup(config)?;
    let task = Audit {
        epsilon,
        iters: config.iters,
        lr: config.lr,
        closeness_weight: 1.0,
        sampler: s.sampler,
        step_noise_seed: config.step_noise_seed(),
        resume: resume_for(config, &("audit", epsilon))?,
    };
    let model = s.denoiser.unconditional();
    let run = audit(
        &model,
        &s.classifier,
        &PixelSpace,
        &s.schedule,
        noise(config, 2),
        &task,
        on_iter,
    )?;
    write_outputs(config, run.before, run.after, &run.report.losses, &run.report)?;
    Ok(run.report)
}

/// Metrics of tasks 3 and 4.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    /// The objective on held-out noise before tuning.
    pub loss_before: f64,
    /// … and after.
    pub loss_after: f64,
    /// Fraction of held-out samples the classifier assigns to the class in question, before.
    pub class_rate_before: f64,
    /// … and after.
    pub class_rate_after: f64,
    /// Loss per iteration.
    pub losses: Vec<f64>,
}

/// Task 3: learn a new conditioning embedding (starting from the null class) whose samples take
/// the appearance ([`StyleLoss::appearance`]) of a reference image of `class`; the UNet stays
/// frozen.
pub fn run_invert(
    config: &RunConfig,
    class: &str,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError> {
    let class = toy::class_index(class)?;
    let s = setup(config)?;
    let device = Default::default();
    let reference = toy::dataset_of_class(class, 1, config.seed)?;
    let reference = Tensor::<Ad, 4>::from_data(
        TensorData::new(reference.images, [1, 3, IMAGE_SIZE, IMAGE_SIZE]),
        &device,
    );
    let mut model = s.denoiser.unconditional();
    model.unet = model.unet.no_grad();
    model.context = Param::from_tensor(model.context.val().detach().require_grad());
    let appearance = StyleLoss::appearance(&s.classifier, reference);
    let loss = |images: Tensor<Ad, 4>| appearance.loss(images);
    let resume = resume_for(config, &("invert", class))?;
    tune_task(config, &s, model, &loss, class, resume, on_iter)
}

/// Task 4: fine-tune LoRA adapters of the UNet so that samples take the style (Gram statistics
/// of the classifier's features) of one reference image of `style_class`.
pub fn run_finetune(
    config: &RunConfig,
    style_class: &str,
    rank: usize,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError> {
    let class = toy::class_index(style_class)?;
    lora_rank(rank)?;
    let s = setup(config)?;
    let device = Default::default();
    let style = toy::dataset_of_class(class, 1, config.seed.wrapping_add(7))?;
    let style = Tensor::<Ad, 4>::from_data(TensorData::new(style.images, [1, 3, IMAGE_SIZE, IMAGE_SIZE]), &device);
    let features = s.classifier.clone().no_grad();
    let style = StyleLoss::new(&features, style);
    let mut model = s.denoiser.unconditional();
    model.unet = model.unet.no_grad().with_lora(rank, rank as f64);
    model.context = model.context.set_require_grad(false);
    let model = crate::ode::materialized(model);
    let loss = |images: Tensor<Ad, 4>| style.loss(images);
    let resume = resume_for(config, &("finetune", class, rank))?;
    tune_task(config, &s, model, &loss, class, resume, on_iter)
}

/// Tunes the trainable parameters of `model` under `loss`, evaluating it on held-out noise.
fn tune_task(
    config: &RunConfig,
    s: &Setup,
    model: toy::Conditioned<Ad>,
    loss: &dyn Fn(Tensor<Ad, 4>) -> Tensor<Ad, 1>,
    class: usize,
    resume: Option<Resume>,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError> {
    let tuning = Tuning {
        iters: config.iters,
        lr: config.lr,
        sampler: s.sampler,
        step_noise_seed: config.step_noise_seed(),
        resume,
    };
    let pipeline = (&s.classifier, &PixelSpace, &s.schedule);
    tune_and_report(
        config,
        model,
        pipeline,
        &tuning,
        loss,
        class,
        &|salt| noise(config, salt),
        on_iter,
    )
}

/// The tuning run of tasks 3 and 4 for any model, judge and decoder: loss and rate of `class`
/// on held-out noise (`noise(999)`), [`tune_through_sampling`] on `noise(101 + iteration)`, the
/// same evaluation after, and the outputs written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tune_and_report<B, M, K, Dec>(
    config: &RunConfig,
    model: M,
    (classifier, decoder, schedule): (&K, &Dec, &NoiseSchedule),
    tuning: &Tuning,
    loss: &dyn Fn(Tensor<Autodiff<B>, 4>) -> Tensor<Autodiff<B>, 1>,
    class: usize,
    noise: &dyn Fn(u64) -> Tensor<B, 4>,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError>
where
    B: Backend,
    M: TaskModel<B>,
    K: TaskClassifier<B>,
    Dec: TaskDecoder<B>,
{
    let held_out = noise(999);
    // Iteration i's steps draw with seed + i; the held-out batch's with seed − 1.
    let seed = tuning.step_noise_seed.wrapping_sub(1);
    let held_out_steps = step_noise(&tuning.sampler, schedule, held_out.dims(), seed, &held_out.device())?;
    let (classifier, decoder_inner) = (classifier.valid(), decoder.valid());
    let evaluate = |m: &M| -> Result<(f64, f64, Tensor<B, 4>), RunError> {
        let samples = tuning.sampler.sample_inference_with_noise(
            &m.valid(),
            schedule,
            held_out.clone(),
            held_out_steps.clone(),
        )?;
        let images = decoder_inner.decode(samples);
        let l = scalar(loss(Tensor::from_inner(images.clone())).inner());
        let labels = to_f64(classifier.logits(images.clone()).argmax(1).float());
        let rate = labels.iter().filter(|&&c| c as usize == class).count() as f64 / labels.len().max(1) as f64;
        Ok((l, rate, images))
    };
    let (loss_before, rate_before, before) = evaluate(&model)?;
    let (tuned, losses) = tune_through_sampling(
        model,
        decoder,
        schedule,
        tuning,
        &mut |iter| noise(101 + iter as u64),
        loss,
        on_iter,
    )?;
    let (loss_after, rate_after, after) = evaluate(&tuned)?;
    let report = TuneReport {
        loss_before,
        loss_after,
        class_rate_before: rate_before,
        class_rate_after: rate_after,
        losses,
    };
    output::write_outputs(&config.out, config, before, after, &report.losses, &report)?;
    Ok(report)
}

/// img2img (SDEdit, diffusers' img2img pipeline): sampling starts from an image noised to the
/// first of the last `strength` of the steps ([`Sampler::strength`], [`Sampler::noised`]).
#[derive(Debug, Clone, Copy)]
pub struct InitImage<'a> {
    /// The image (PNG or JPEG; resized to the model's size).
    pub path: &'a Path,
    /// The fraction of the steps run, in (0, 1].
    pub strength: f64,
    /// Inpainting (a Stable Diffusion folder with an inpainting UNet): the mask, a grayscale
    /// image of the same size, painted where it is at least half white.
    pub mask: Option<&'a Path>,
}

impl InitImage<'_> {
    /// The sampler that runs the last steps, and where it starts: `clean` (the image as the
    /// model's sample, batched) noised with `noise` (standard normal, `clean`'s shape).
    pub fn start<B: burn::tensor::backend::Backend>(
        &self,
        sampler: Sampler,
        schedule: &crate::diffusion::NoiseSchedule,
        clean: Tensor<B, 4>,
        noise: Tensor<B, 4>,
    ) -> Result<(Sampler, Tensor<B, 4>), RunError> {
        let sampler = sampler.strength(self.strength);
        let x_t = sampler.noised(schedule, clean, noise)?;
        Ok((sampler, x_t))
    }
}

/// Class-conditional samples with classifier-free guidance, one row per class, as PNG; from
/// `init`'s image when given (img2img).
pub fn sample_grid(config: &RunConfig, init: Option<InitImage>) -> Result<Vec<usize>, RunError> {
    if init.is_some_and(|init| init.mask.is_some()) {
        return Err(RunError::Usage(
            "the toy model does not inpaint: --mask takes a Stable Diffusion inpainting folder".into(),
        ));
    }
    let s = setup(config)?;
    let labels: Vec<usize> = (0..CLASSES.len())
        .flat_map(|c| std::iter::repeat_n(c, config.batch))
        .collect();
    let model = Cfg::new(s.denoiser.valid().conditioned_for_guidance(&labels)?, config.cfg)?
        .guidance_rescale(config.guidance_rescale, RescaleSpace::Epsilon)?;
    let device = Default::default();
    <Inner as burn::tensor::backend::Backend>::seed(&device, config.seed);
    let x_t = Tensor::<Inner, 4>::random(
        [labels.len(), 3, IMAGE_SIZE, IMAGE_SIZE],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let (sampler, x_t) = match init {
        Some(init) => {
            let image = crate::tasks::run_sd::load_image::<Inner>(init.path, [IMAGE_SIZE; 2], &device)?;
            init.start(s.sampler, &s.schedule, image.repeat_dim(0, labels.len()), x_t)?
        }
        None => (s.sampler, x_t),
    };
    let steps = step_noise(&sampler, &s.schedule, x_t.dims(), config.step_noise_seed(), &device)?;
    let images = sampler.sample_inference_with_noise(&model, &s.schedule, x_t, steps)?;
    let predicted = s.classifier.valid().predict(images.clone());
    toy::write_png_grid(
        &config.out.join("samples.png"),
        &values(images),
        labels.len(),
        [IMAGE_SIZE, IMAGE_SIZE],
        config.batch,
        3,
    )?;
    Ok(predicted)
}
