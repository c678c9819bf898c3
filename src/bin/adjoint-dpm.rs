//! The `adjoint-dpm` command line.
//!
//! ```text
//! adjoint-dpm                                             # = guide, on the embedded toy model
//! adjoint-dpm guide --target ring --out out/guide        # task 1: steer x_T to a class
//! adjoint-dpm audit --epsilon 0.2 --out out/audit        # task 2: flip labels within an ℓ∞ ball
//! adjoint-dpm invert --class square --out out/invert     # task 3: learn a new class embedding
//! adjoint-dpm finetune --style cross --out out/finetune  # task 4: LoRA stylisation
//! adjoint-dpm sample --out out/sample                    # class-conditional samples, one row per class
//! adjoint-dpm train-toy --out models/weights             # retrain the embedded default
//!
//! # Stable Diffusion: a diffusers folder and torchvision ResNet-50 weights
//! adjoint-dpm guide --weights sd15/ --classifier resnet50.pth --target 207 --device cuda
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use adjoint_dpm::tasks::run::{self as tasks, InitImage, RunConfig};
use adjoint_dpm::tasks::run_sd;
use adjoint_dpm::tasks::stable_diffusion::is_pipeline_dir;
use adjoint_dpm::tasks::{GradientChoice, SchedulerConfig, SolverChoice};
use adjoint_dpm::toy::{self, Phase, Progress, TrainConfig};
use adjoint_dpm_models::load::read_config;
use burn::backend::{Autodiff, Flex};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// Gradients through diffusion sampling (AdjointDPM) on burn.
#[derive(Debug, Parser)]
#[command(name = "adjoint-dpm", version, about)]
struct Cli {
    /// What to run (default: `guide` with its defaults).
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Task 1, guided sampling: optimise the initial noise so that samples of the unconditional
    /// model become the target class.
    Guide {
        /// Target class: circle, square, triangle, cross, ring or diamond; with Stable Diffusion
        /// the classifier's class index (ImageNet's for ResNet-50, e.g. 207).
        #[arg(long, default_value = "ring")]
        target: String,
        /// Weight of the prior that keeps x_T a plausible Gaussian sample.
        #[arg(long, default_value_t = 0.1)]
        prior: f64,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Task 2, security auditing: noise within an ℓ∞ ball of radius ε around x_T whose sample the
    /// classifier labels differently.
    Audit {
        /// Radius ε of the ℓ∞ ball (> 0).
        #[arg(long, default_value_t = 0.2)]
        epsilon: f64,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Task 3, embedding inversion: learn a conditioning embedding whose samples reproduce a
    /// reference image of a class.
    Invert {
        /// Class of the reference image (toy model).
        #[arg(long, default_value = "square")]
        class: String,
        /// The reference image (PNG or JPEG; required with Stable Diffusion, which learns the
        /// embeddings of the prompt's tokens).
        #[arg(long)]
        reference: Option<PathBuf>,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Task 4, stylisation: fine-tune LoRA adapters of the UNet towards the style (feature Gram
    /// matrices) of one reference image.
    Finetune {
        /// Class of the style image (toy model), or with Stable Diffusion the style image file
        /// (PNG or JPEG).
        #[arg(long, default_value = "cross")]
        style: String,
        /// Rank of the adapters.
        #[arg(long, default_value_t = 4)]
        rank: usize,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Class-conditional samples with classifier-free guidance, one row per class (Stable
    /// Diffusion: samples of the prompt, with the classifier's labels). With --init-image,
    /// img2img (SDEdit): the image noised to --strength of the run, then its last steps; with
    /// --mask too, inpainting (a folder with an inpainting UNet).
    Sample {
        /// Start from this image (PNG or JPEG, resized) instead of pure noise.
        #[arg(long)]
        init_image: Option<PathBuf>,
        /// With --init-image: the fraction of the steps run, from the image noised to the first
        /// of them (diffusers' img2img `strength`; 1 keeps nothing of the image). Default 0.6,
        /// and 1 with --mask (from pure noise, as diffusers' inpainting).
        #[arg(long)]
        strength: Option<f64>,
        /// With --init-image, on an inpainting folder: paint where this grayscale image (of
        /// the same size) is at least half white, keep the rest (diffusers'
        /// StableDiffusionInpaintPipeline).
        #[arg(long, requires = "init_image")]
        mask: Option<PathBuf>,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Train the embedded toy models (class-conditional UNet + classifier) on the procedural
    /// shapes and write their weights, a record and a sample grid to --out.
    TrainToy(TrainToyArgs),
}

/// Options of `train-toy`; defaults are the shipped run's.
#[derive(Debug, Args)]
struct TrainToyArgs {
    /// Output directory (created if missing; files are replaced atomically).
    #[arg(long, default_value = "models/weights")]
    out: PathBuf,
    /// Seed of weights, data, noise and label dropout.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Denoiser optimisation steps.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    steps: usize,
    /// Denoiser batch size.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    batch: usize,
    /// Denoiser peak learning rate (Adam).
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    lr: f64,
    /// Classifier optimisation steps.
    #[arg(long, default_value_t = TrainConfig::default().classifier_steps)]
    classifier_steps: usize,
    /// Class-conditional samples for the sample-quality metric.
    #[arg(long, default_value_t = TrainConfig::default().eval_samples)]
    eval_samples: usize,
    /// DDIM steps of those samples.
    #[arg(long, default_value_t = TrainConfig::default().eval_steps)]
    eval_steps: usize,
    /// Classifier-free guidance scale of those samples.
    #[arg(long, default_value_t = TrainConfig::default().eval_cfg)]
    cfg: f64,
    /// Min-SNR-γ loss weighting of the denoiser (0 = plain loss).
    #[arg(long, default_value_t = TrainConfig::default().min_snr_gamma)]
    min_snr_gamma: f64,
    /// Decay of the denoiser's weight average (what is evaluated and saved; 0 = last iterate).
    #[arg(long, default_value_t = TrainConfig::default().ema_decay)]
    ema_decay: f64,
    /// Continue from the weights in this directory (a previous `--out`) instead of random ones;
    /// its architecture is kept and its record is kept inside the new one. Give a new --seed so
    /// the continuation sees new images, and --classifier-steps 0 to keep its classifier.
    #[arg(long)]
    init: Option<PathBuf>,
}

/// `--gradient`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum GradientArg {
    /// Exact gradient of the sampler (checkpointed discrete adjoint).
    Exact,
    /// The continuous adjoint: AdjointDPM.
    Adjointdpm,
    /// Backprop through every step (memory grows with --steps).
    Backprop,
}

/// `--solver`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SolverArg {
    /// DDIM (Euler in ρ).
    Ddim,
    /// DPM-Solver++(2M) (with --gradient exact or backprop).
    Dpmpp2m,
    /// DPM-Solver++(2M) on Karras' noise levels, "DPM++ 2M Karras" (exact or backprop).
    Dpmpp2mKarras,
    /// DPM-Solver++(3M) (exact or backprop).
    Dpmpp3m,
    /// DPM-Solver++(2M) SDE, "DPM++ 2M SDE", stochastic (exact or backprop; its step noise is
    /// drawn from --seed).
    #[value(name = "dpmpp2m-sde")]
    Dpmpp2mSde,
    /// DPM-Solver++(3M) SDE, "DPM++ 3M SDE", stochastic (exact or backprop; its step noise is
    /// drawn from --seed).
    #[value(name = "dpmpp3m-sde")]
    Dpmpp3mSde,
    /// UniPC, diffusers' defaults (exact or backprop).
    Unipc,
    /// UniPC with diffusers' `solver_type = "bh1"`, for unconditional sampling in under 10 steps.
    UnipcBh1,
    /// UniPC of order 3 (diffusers' `solver_order = 3`, for unconditional sampling).
    Unipc3,
    /// Heun in ρ, diffusers' HeunDiscreteScheduler (EDM's sampler; its last step is Euler).
    Heun,
    /// Euler in ρ on diffusers' EulerDiscreteScheduler levels (DDIM's map, its timesteps).
    Euler,
    /// Euler ancestral, stochastic (exact or backprop; its step noise is drawn from --seed and
    /// held fixed).
    #[value(name = "euler-a")]
    EulerA,
    /// PLMS, diffusers' PNDMScheduler with skip_prk_steps (SD 1.x's scheduler; exact or
    /// backprop).
    Plms,
    /// LMS, diffusers' LMSDiscreteScheduler (exact or backprop).
    Lms,
    /// DEIS, diffusers' DEISMultistepScheduler (exact or backprop).
    Deis,
    /// DPM2, diffusers' KDPM2DiscreteScheduler (A1111's "DPM2"; exact or backprop).
    Dpm2,
    /// DPM2 ancestral, diffusers' KDPM2AncestralDiscreteScheduler ("DPM2 a"): stochastic (exact
    /// or backprop; its step noise is drawn from --seed and held fixed).
    #[value(name = "dpm2-a")]
    Dpm2A,
    /// DEIS of order 3 (diffusers' `solver_order = 3`, the DEIS paper's choice).
    Deis3,
    /// LCM, diffusers' LCMScheduler: multistep sampling of a latent consistency model (an
    /// LCM-distilled UNet or LCM-LoRA) in 2–8 steps; stochastic (exact or backprop; its step
    /// noise is drawn from --seed and held fixed).
    Lcm,
    /// TCD, diffusers' TCDScheduler (TCD-distilled models, TCD-LoRA): LCM's timesteps, γ =
    /// --eta (default 0.3) of each step's noise drawn afresh; exact or backprop.
    Tcd,
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The CPU (burn's flex backend).
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

/// Options every task takes.
#[derive(Debug, Args)]
struct TaskArgs {
    /// Output directory (created if missing; files are written atomically).
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Toy weights written by `train-toy` (default: the embedded ones), or a diffusers Stable
    /// Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Stable Diffusion: torchvision ResNet-50 weights judging the images (.pth or
    /// .safetensors; another ResNet when a JSON ResNetConfig with the same stem sits beside).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Stable Diffusion: the prompt (empty: the unconditional model).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Stable Diffusion: what guidance (--cfg) steers away from, diffusers' negative_prompt
    /// (empty: the unconditional model).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Stable Diffusion: condition on the text encoder's hidden state this many layers before
    /// its last (diffusers' clip_skip; 0: the pipeline's own, CLIP's last for SD 1.x/2.x, the
    /// penultimate for SDXL).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Stable Diffusion: fuse this LoRA checkpoint (.safetensors, diffusers/peft or kohya keys:
    /// LCM-LoRA, style LoRAs) into the UNet and text encoders first.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// With --lora: its scale (diffusers' lora_scale).
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    lora_scale: f64,
    /// Stable Diffusion: a textual-inversion embedding to add (repeatable; .safetensors in
    /// diffusers', A1111's or SDXL's layout, or diffusers' .bin), named in prompts by its token:
    /// the file's key in diffusers' layout, else the file's stem (A1111's EasyNegative.safetensors
    /// is "EasyNegative").
    #[arg(long = "embedding")]
    embeddings: Vec<PathBuf>,
    /// Stable Diffusion: a single-file checkpoint (.safetensors, SD 1.x in the original LDM
    /// layout, as A1111 and civitai share them) for the UNet, VAE and text encoder; --weights
    /// is then a diffusers folder giving the configs, tokenizer and scheduler (diffusers'
    /// from_single_file(file, config=DIR)).
    #[arg(long, requires = "weights")]
    checkpoint: Option<PathBuf>,
    /// Stable Diffusion: a diffusers ControlNet folder (config.json and weights, e.g.
    /// lllyasviel/sd-controlnet-canny), repeatable: the residuals of several add up. A folder
    /// with its own controlnet/ has that one first.
    #[arg(long = "controlnet")]
    controlnets: Vec<PathBuf>,
    /// Stable Diffusion with ControlNets: each one's image (edges, depth, pose...), in the
    /// order of the ControlNets, resized to the images' size.
    #[arg(long = "control-image")]
    control_images: Vec<PathBuf>,
    /// With --control-image: the ControlNets' weights (diffusers'
    /// controlnet_conditioning_scale), one per ControlNet or one for all [default: 1].
    #[arg(long = "control-scale", requires = "control_images")]
    control_scales: Vec<f64>,
    /// Stable Diffusion: the images' height in pixels (default: the UNet's sample size times
    /// the VAE's factor, 512 for SD 1.5, 1024 for SDXL); a multiple of 64 for SD.
    #[arg(long, requires = "width")]
    height: Option<usize>,
    /// Stable Diffusion: the images' width in pixels (with --height).
    #[arg(long, requires = "height")]
    width: Option<usize>,
    /// Where Stable Diffusion runs (cuda needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// How gradients pass through sampling.
    #[arg(long, value_enum, default_value = "exact")]
    gradient: GradientArg,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Sampler [default: ddim; for a Stable Diffusion folder, the scheduler it was saved with
    /// where that is one of these].
    #[arg(long, value_enum)]
    solver: Option<SolverArg>,
    /// Sample on Karras et al.'s noise levels (diffusers' use_karras_sigmas), whatever the sampler.
    #[arg(long)]
    karras: bool,
    /// Sample on noise levels evenly spaced in log σ (diffusers' use_exponential_sigmas), whatever
    /// the sampler.
    #[arg(long, conflicts_with = "karras")]
    exponential_sigmas: bool,
    /// DDIM's η: > 0 injects noise at every step (1: DDPM's variance), drawn from --seed and held
    /// fixed; exact or backprop gradients. With --solver tcd, TCD's γ in [0, 1] (default 0.3).
    #[arg(long)]
    eta: Option<f64>,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Optimisation iterations.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classifier-free guidance scale (class-conditional sampling).
    #[arg(long, default_value_t = 3.0)]
    cfg: f64,
    /// diffusers' guidance_rescale φ in [0, 1] under guidance (Lin et al. 2024; with
    /// zero-terminal-SNR v-prediction models): the guided output rescaled to the conditional one's
    /// standard deviation, in the network's output space.
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// Samples per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Start over instead of continuing where an interrupted run with the same settings in
    /// --out stopped (its state is saved after every iteration).
    #[arg(long)]
    fresh: bool,
}

impl TaskArgs {
    fn config(&self) -> RunConfig {
        RunConfig {
            out: self.out.clone(),
            weights: self.weights.clone(),
            gradient: match self.gradient {
                GradientArg::Exact => GradientChoice::Exact,
                GradientArg::Adjointdpm => GradientChoice::AdjointDpm,
                GradientArg::Backprop => GradientChoice::Backprop,
            },
            solver: match self.solver.unwrap_or(SolverArg::Ddim) {
                SolverArg::Ddim => SolverChoice::Ddim,
                SolverArg::Dpmpp2m => SolverChoice::Dpmpp2m,
                SolverArg::Dpmpp2mKarras => SolverChoice::Dpmpp2mKarras,
                SolverArg::Dpmpp3m => SolverChoice::Dpmpp3m,
                SolverArg::Dpmpp2mSde => SolverChoice::Dpmpp2mSde,
                SolverArg::Dpmpp3mSde => SolverChoice::Dpmpp3mSde,
                SolverArg::Unipc => SolverChoice::Unipc,
                SolverArg::UnipcBh1 => SolverChoice::UnipcBh1,
                SolverArg::Unipc3 => SolverChoice::Unipc3,
                SolverArg::Heun => SolverChoice::Heun,
                SolverArg::Euler => SolverChoice::Euler,
                SolverArg::EulerA => SolverChoice::EulerAncestral,
                SolverArg::Plms => SolverChoice::Plms,
                SolverArg::Lms => SolverChoice::Lms,
                SolverArg::Deis => SolverChoice::Deis,
                SolverArg::Dpm2 => SolverChoice::Dpm2,
                SolverArg::Dpm2A => SolverChoice::Dpm2Ancestral,
                SolverArg::Deis3 => SolverChoice::Deis3,
                SolverArg::Lcm => SolverChoice::Lcm,
                SolverArg::Tcd => SolverChoice::Tcd,
            },
            karras: self.karras,
            exponential: self.exponential_sigmas,
            eta: self.eta,
            steps: self.steps,
            lr: self.lr,
            iters: self.iters,
            seed: self.seed,
            cfg: self.cfg,
            guidance_rescale: self.guidance_rescale,
            batch: self.batch,
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            clip_skip: self.clip_skip,
            lora: self.lora.clone(),
            lora_scale: self.lora_scale,
            embeddings: self.embeddings.clone(),
            checkpoint: self.checkpoint.clone(),
            controlnets: self.controlnets.clone(),
            control_images: self.control_images.clone(),
            control_scales: self.control_scales.clone(),
            resolution: self.height.zip(self.width).map(|(h, w)| [h, w]),
            classifier: self.classifier.clone(),
            fresh: self.fresh,
        }
    }
}

fn print_guide(target: &str, r: &adjoint_dpm::tasks::GuidedReport, batch: usize) {
    println!(
        "guided sampling to {target:?}: classified as {target} {:.0}% -> {:.0}% of {batch} samples (mean p {:.2} -> {:.2}), {:.0} s",
        100.0 * r.target_rate_before,
        100.0 * r.target_rate_after,
        r.target_prob_before,
        r.target_prob_after,
        r.seconds
    );
}

fn print_audit(epsilon: f64, r: &adjoint_dpm::tasks::AuditReport) {
    println!(
        "audit at ε = {epsilon}: label changed for {:.0}% of samples, mean RMS image change {:.3}, margin {:.2} -> {:.2}",
        100.0 * r.success_rate,
        r.mean_image_rms,
        r.mean_margin_before,
        r.mean_margin_after
    );
}

fn print_invert(what: &str, r: &tasks::TuneReport) {
    println!(
        "embedding inversion of {what}: loss {:.4} -> {:.4}, classified as its class {:.0}% -> {:.0}%",
        r.loss_before,
        r.loss_after,
        100.0 * r.class_rate_before,
        100.0 * r.class_rate_after
    );
}

fn print_finetune(what: &str, rank: usize, r: &tasks::TuneReport) {
    println!(
        "stylisation towards {what} (LoRA rank {rank}): style loss {:.4} -> {:.4} on fresh noise",
        r.loss_before, r.loss_after
    );
}

/// A task on a Stable Diffusion folder, on backend `B`.
fn run_sd_task<B: burn::tensor::backend::Backend>(
    command: Command,
    config: &RunConfig,
    device: &B::Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let bar = task_bar("stable diffusion", config.iters);
    let mut on_iter = |i: usize, loss: f64| {
        bar.set_position(i as u64 + 1);
        bar.set_message(format!("loss {loss:.4}"));
    };
    match command {
        Command::Guide { target, prior, .. } => {
            let class: usize = target
                .parse()
                .map_err(|_| format!("--target {target:?}: with Stable Diffusion give the classifier's class index"))?;
            let r = run_sd::run_guide::<B>(config, class, prior, device, &mut on_iter)?;
            bar.finish();
            print_guide(&target, &r, config.batch);
        }
        Command::Audit { epsilon, .. } => {
            let r = run_sd::run_audit::<B>(config, epsilon, device, &mut on_iter)?;
            bar.finish();
            print_audit(epsilon, &r);
        }
        Command::Invert { reference, .. } => {
            let reference = reference.ok_or("invert on Stable Diffusion needs --reference IMAGE")?;
            let r = run_sd::run_invert::<B>(config, &reference, device, &mut on_iter)?;
            bar.finish();
            print_invert(&reference.display().to_string(), &r);
        }
        Command::Finetune { style, rank, .. } => {
            let r = run_sd::run_finetune::<B>(config, std::path::Path::new(&style), rank, device, &mut on_iter)?;
            bar.finish();
            print_finetune(&style, rank, &r);
        }
        Command::Sample {
            init_image,
            strength,
            mask,
            ..
        } => {
            bar.finish_and_clear();
            let strength = strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.6 });
            let init = init_image.as_deref().map(|path| InitImage {
                path,
                strength,
                mask: mask.as_deref(),
            });
            let labels = run_sd::sample::<B>(config, init, device)?;
            println!("{} samples; the classifier's labels: {labels:?}", labels.len());
        }
        Command::TrainToy(_) => unreachable!("train-toy is dispatched in main"),
    }
    println!("wrote {}", config.out.display());
    Ok(())
}

/// A progress bar over the iterations showing the current loss.
fn task_bar(name: &str, iters: usize) -> ProgressBar {
    let bar = ProgressBar::new(iters as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{name} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {{msg}}"
        ))
        .expect("a valid template"),
    );
    bar
}

fn run_task(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    let (name, task) = match &command {
        Command::Guide { task, .. } => ("guide", task),
        Command::Audit { task, .. } => ("audit", task),
        Command::Invert { task, .. } => ("invert", task),
        Command::Finetune { task, .. } => ("finetune", task),
        Command::Sample { task, .. } => ("sample", task),
        Command::TrainToy(_) => unreachable!("train-toy is dispatched in main"),
    };
    let mut config = task.config();
    // burn's CUDA backend compiles every kernel at first use and, built with autotune, times
    // candidate kernels for every new shape; the first UNet call waits on that, silently.
    #[cfg(feature = "cuda-base")]
    const CUDA_WARMUP: &str = if cfg!(feature = "cuda") {
        "CUDA: the first UNet calls compile and autotune kernels, which took over 6 minutes for \
         the SD-1.5 UNet on an H100 (kept in cubecl's cache for later runs; a build with \
         `--features cuda-untuned` instead of `cuda` skips autotuning: about 40 s in f32, slower \
         kernels)"
    } else {
        "CUDA: the first UNet calls compile kernels (about 40 s for the SD-1.5 UNet in f32 on an H100)"
    };
    if let Some(file) = config.weights.as_deref().filter(|w| w.is_file()) {
        return Err(format!(
            "--weights {}: a file; a single-file checkpoint goes in --checkpoint FILE, with --weights a diffusers \
             folder for its configs, tokenizer and scheduler",
            file.display()
        )
        .into());
    }
    if config.checkpoint.is_some() && !config.weights.as_deref().is_some_and(is_pipeline_dir) {
        return Err("--checkpoint needs --weights DIR, a diffusers Stable Diffusion folder for its configs".into());
    }
    if let Some(dir) = config.weights.as_deref().filter(|d| is_pipeline_dir(d)) {
        if task.solver.is_none() {
            // As diffusers samples: with the scheduler the pipeline was saved with.
            let path = dir.join("scheduler/scheduler_config.json");
            let scheduler: SchedulerConfig = read_config(&path).map_err(|e| e.to_string())?;
            match scheduler.solver() {
                Ok(solver) => {
                    config.solver = solver;
                    eprintln!(
                        "sampler: the folder's {}",
                        scheduler.class_name.as_deref().unwrap_or("scheduler")
                    );
                }
                Err(which) => eprintln!("sampler: DDIM (the folder's {which} is not one of --solver's)"),
            }
        }
        return match task.device {
            DeviceArg::Cpu => run_sd_task::<Flex>(command, &config, &Default::default()),
            #[cfg(feature = "cuda-base")]
            DeviceArg::Cuda => {
                eprintln!("{CUDA_WARMUP}");
                run_sd_task::<burn::backend::Cuda>(command, &config, &Default::default())
            }
            #[cfg(not(feature = "cuda-base"))]
            DeviceArg::Cuda => Err("this binary was built without CUDA: rebuild with `--features cuda`".into()),
        };
    }
    if let Some(dir) = config
        .weights
        .as_deref()
        .filter(|d| !d.join(toy::files::RECORD).is_file())
    {
        return Err(format!(
            "--weights {}: neither toy weights (no {}) nor a diffusers Stable Diffusion folder (no unet/)",
            dir.display(),
            toy::files::RECORD
        )
        .into());
    }
    if task.device != DeviceArg::Cpu {
        return Err("the embedded toy model runs on the CPU; --device cuda is for Stable Diffusion folders".into());
    }
    // The toy model is conditioned on classes, not text, and carries its own classifier: say so
    // rather than ignore these.
    let sd_only = !config.prompt.is_empty()
        || !config.negative_prompt.is_empty()
        || config.classifier.is_some()
        || config.clip_skip > 0
        || config.lora.is_some()
        || !config.controlnets.is_empty()
        || !config.control_images.is_empty()
        || !config.embeddings.is_empty()
        || config.resolution.is_some();
    if sd_only {
        return Err(
            "--prompt, --negative-prompt, --clip-skip, --lora, --embedding, --controlnet, --control-image, \
             --height/--width and --classifier are for Stable Diffusion folders \
             (--weights DIR with unet/); the toy model takes class names (--target, --class)"
                .into(),
        );
    }
    let bar = task_bar(name, config.iters);
    let mut on_iter = |i: usize, loss: f64| {
        bar.set_position(i as u64 + 1);
        bar.set_message(format!("loss {loss:.4}"));
    };
    let out = config.out.display().to_string();
    match command {
        Command::Guide { target, prior, .. } => {
            let r = tasks::run_guide(&config, &target, prior, &mut on_iter)?;
            bar.finish();
            print_guide(&target, &r, config.batch);
        }
        Command::Audit { epsilon, .. } => {
            let r = tasks::run_audit(&config, epsilon, &mut on_iter)?;
            bar.finish();
            print_audit(epsilon, &r);
        }
        Command::Invert { class, .. } => {
            let r = tasks::run_invert(&config, &class, &mut on_iter)?;
            bar.finish();
            print_invert(&format!("a {class}"), &r);
        }
        Command::Finetune { style, rank, .. } => {
            let r = tasks::run_finetune(&config, &style, rank, &mut on_iter)?;
            bar.finish();
            print_finetune(&format!("a {style}"), rank, &r);
        }
        Command::Sample {
            init_image,
            strength,
            mask,
            ..
        } => {
            bar.finish_and_clear();
            if mask.is_some() {
                return Err("--mask inpaints with a Stable Diffusion inpainting folder (--weights DIR)".into());
            }
            let strength = strength.unwrap_or(0.6);
            let init = init_image.as_deref().map(|path| InitImage {
                path,
                strength,
                mask: None,
            });
            let predicted = tasks::sample_grid(&config, init)?;
            let correct = predicted
                .iter()
                .enumerate()
                .filter(|(i, p)| i / config.batch == **p)
                .count();
            println!(
                "{} samples, {:.0}% classified as their class",
                predicted.len(),
                100.0 * correct as f64 / predicted.len() as f64
            );
        }
        Command::TrainToy(_) => {}
    }
    println!("wrote {out}");
    Ok(())
}

type Train = Autodiff<Flex>;

fn bar(phase: Phase, steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    let name = match phase {
        Phase::Classifier => "classifier",
        Phase::Denoiser => "denoiser  ",
        Phase::Evaluation => "sampling  ",
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{name} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} (eta {{eta}}) {{msg}}"
        ))
        .expect("a valid template"),
    );
    bar
}

fn train_toy(args: TrainToyArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = TrainConfig {
        seed: args.seed,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        classifier_steps: args.classifier_steps,
        eval_samples: args.eval_samples,
        eval_steps: args.eval_steps,
        eval_cfg: args.cfg,
        ema_decay: args.ema_decay,
        min_snr_gamma: args.min_snr_gamma,
        ..TrainConfig::default()
    };
    // Continuing: the previous run's architecture, weights and record.
    let (init, previous) = match &args.init {
        Some(dir) => {
            let previous = toy::read_record(dir)?;
            config.denoiser = previous.train.denoiser.clone();
            config.classifier = previous.train.classifier.clone();
            let (denoiser, classifier, _) = toy::load_from_dir::<Flex>(dir, &Default::default())?;
            (Some((denoiser, classifier)), Some(Box::new(previous)))
        }
        None => (None, None),
    };
    config.check()?;
    // Fail on an unwritable output directory before training, not after.
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let probe = args.out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write into {}: {e}", args.out.display()))?;
    std::fs::remove_file(&probe).ok();

    let device = Default::default();
    let mut current: Option<(Phase, ProgressBar)> = None;
    let mut ema: Option<f64> = None;
    let mut on_progress = |p: &Progress| {
        if current.as_ref().map(|(phase, _)| *phase) != Some(p.phase) {
            if let Some((_, b)) = current.take() {
                b.finish();
            }
            ema = None;
            current = Some((p.phase, bar(p.phase, p.steps)));
        }
        let (_, b) = current.as_ref().expect("set above");
        b.set_position(p.step as u64);
        if let Some(loss) = p.loss {
            let smoothed = ema.map_or(loss, |e| 0.98 * e + 0.02 * loss);
            ema = Some(smoothed);
            b.set_message(format!("loss {smoothed:.4}"));
        }
        // Not a terminal (e.g. under nohup): indicatif draws nothing, so log every 5%.
        if b.is_hidden() && (p.step.is_multiple_of((p.steps / 20).max(1)) || p.step == p.steps) {
            let loss = ema.map(|l| format!(", loss {l:.4}")).unwrap_or_default();
            eprintln!(
                "{:?} {}/{} [{:.0} s]{loss}",
                p.phase,
                p.step,
                p.steps,
                b.elapsed().as_secs_f64()
            );
        }
        if p.step == p.steps {
            b.finish();
        }
    };
    let trained = toy::train::train_from::<Train>(&config, &device, init, &mut on_progress)?;
    let record = toy::ToyRecord {
        format: toy::train::RECORD_FORMAT.into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        crate_version: env!("CARGO_PKG_VERSION").into(),
        // burn-flex is built without its thread pool (see Cargo.toml): one thread computes.
        threads: 1,
        train: config,
        report: trained.report.clone(),
        previous,
    };
    toy::train::save(&args.out, &trained, &record)?;
    let r = &record.report;
    println!(
        "classifier: held-out accuracy {:.1}% (final loss {:.4}, {:.0} s)",
        100.0 * r.classifier_held_out_accuracy,
        r.classifier_final_loss,
        r.classifier_seconds
    );
    println!(
        "denoiser: loss {:.4} -> {:.4} ({:.0} s)",
        r.denoiser_initial_loss, r.denoiser_final_loss, r.denoiser_seconds
    );
    println!(
        "samples: classifier accuracy {:.1}% on {} guided DDIM samples ({} steps, cfg {}); per class {:?}",
        100.0 * r.sample_accuracy,
        record.train.eval_samples,
        record.train.eval_steps,
        record.train.eval_cfg,
        r.sample_accuracy_per_class
            .iter()
            .map(|a| format!("{:.0}%", 100.0 * a))
            .collect::<Vec<_>>()
    );
    println!("wrote {}", args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or_else(|| {
        // No arguments: the main job, guided sampling on the embedded model into ./out/guide.
        Cli::parse_from(["adjoint-dpm", "guide", "--out", "out/guide"])
            .command
            .expect("guide parses")
    });
    let result = match command {
        Command::TrainToy(args) => train_toy(args),
        task => run_task(task),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
