//! The four tasks on a Stable Diffusion folder (diffusers layout) with a torchvision ResNet as the
//! judge, on any backend (CPU, or CUDA with the `cuda` feature): what the CLI runs when
//! `--weights` names a pipeline folder. Outputs as for the toy model (see [`crate::tasks::run`]).
//!
//! - guide / audit: the prompt's model (unconditional for an empty prompt; with guidance
//!   `--cfg` otherwise); classes are the classifier's indices (ImageNet's for ResNet-50).
//! - invert: learns the embeddings of the prompt's tokens (the end token's for an empty prompt)
//!   so that samples reproduce a reference image; the networks stay frozen.
//! - finetune: LoRA adapters on the UNet's attention, towards the Gram statistics of the
//!   classifier's features of a style image.

use std::path::Path;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

use crate::diffusion::{Cfg, RescaleSpace, Sampler};
use crate::tasks::common::{lora_rank, scalar, step_noise, Classifier, TaskModel};
use crate::tasks::imagenet::ImageNetClassifier;
use crate::tasks::output;
use crate::tasks::resume::Resume;
use crate::tasks::run::{files_fingerprint, resume_for, tune_and_report, InitImage, RunConfig, RunError, TuneReport};
use crate::tasks::stable_diffusion::StableDiffusion;
use crate::tasks::unet_eps::UnetEps;
use crate::tasks::{audit, guided_sampling, Audit, GuidedSampling, StyleLoss, Tuning};

/// The pipeline, the judge and the sampler of a run.
struct Setup<B: Backend> {
    sd: StableDiffusion<Autodiff<B>>,
    classifier: ImageNetClassifier<Autodiff<B>>,
    sampler: Sampler,
    device: B::Device,
}

fn setup<B: Backend>(config: &RunConfig, device: &B::Device) -> Result<Setup<B>, RunError> {
    output::prepare(&config.out, config.batch, config.steps, config.cfg)?;
    let dir = config
        .weights
        .as_ref()
        .ok_or_else(|| RunError::Usage("a Stable Diffusion run needs --weights DIR (a diffusers folder)".into()))?;
    let path = config.classifier.as_ref().ok_or_else(|| {
        RunError::Usage("a Stable Diffusion run needs --classifier FILE (torchvision ResNet-50 weights)".into())
    })?;
    let mut sd = match &config.checkpoint {
        Some(file) => StableDiffusion::<Autodiff<B>>::load_single_file(file, dir, device)?,
        None => StableDiffusion::<Autodiff<B>>::load(dir, device)?,
    };
    if let Some(lora) = &config.lora {
        sd = sd.fuse_lora(lora, config.lora_scale)?.0;
    }
    for path in &config.embeddings {
        let (loaded, tokens) = sd.load_textual_inversion(path, None)?;
        eprintln!("embedding {}: the prompt token {}", path.display(), tokens[0]);
        sd = loaded;
    }
    for controlnet in &config.controlnets {
        sd = sd.with_controlnet(controlnet)?;
    }
    // Every network constant: the tasks choose what trains.
    let mut sd = sd.frozen();
    if let Some([h, w]) = config.resolution {
        sd.set_resolution(h, w)?;
    }
    let (nets, images) = (sd.controlnets.len(), config.control_images.len());
    if nets != images {
        return Err(RunError::Usage(format!(
            "{images} --control-image for {nets} ControlNet(s) (--controlnet, and the folder's controlnet/): give one \
             image per ControlNet"
        )));
    }
    let scales = &config.control_scales;
    if scales.len() > 1 && scales.len() != nets {
        return Err(RunError::Usage(format!(
            "{} --control-scale for {nets} ControlNet(s): give one per ControlNet, or one for all",
            scales.len()
        )));
    }
    let mut controls = Vec::with_capacity(nets);
    for (i, path) in config.control_images.iter().enumerate() {
        // diffusers' control image processor: RGB in [0, 1], not normalised.
        let image = load_image::<Autodiff<B>>(path, sd.image_shape(), device)?
            .mul_scalar(0.5)
            .add_scalar(0.5);
        let scale = scales.get(i).or(scales.first()).copied().unwrap_or(1.0);
        controls.push((image, scale));
    }
    if nets > 0 {
        sd.set_controls(controls)?;
    }
    sd.clip_skip = config.clip_skip;
    sd.guidance_scale = config.cfg;
    let classifier = ImageNetClassifier::load(path, 224, device)
        .map_err(|source| RunError::Classifier {
            path: path.clone(),
            source,
        })?
        .no_grad();
    let sampler = config.configure(sd.sampler(config.solver, config.steps, config.gradient));
    Ok(Setup {
        sd,
        classifier,
        sampler,
        device: device.clone(),
    })
}

/// Seeded latent noise, `[batch, c, h, w]`.
fn noise<B: Backend>(s: &Setup<B>, config: &RunConfig, salt: u64) -> Tensor<B, 4> {
    B::seed(&s.device, config.seed.wrapping_mul(1_000_003).wrapping_add(salt));
    let [c, h, w] = s.sd.latent_shape();
    Tensor::random([config.batch, c, h, w], Distribution::Normal(0.0, 1.0), &s.device)
}

/// `Err(Usage)` unless `class` is one of the classifier's.
fn check_class<B: Backend>(s: &Setup<B>, class: usize) -> Result<(), RunError> {
    let n = s.classifier.num_classes();
    if class < n {
        Ok(())
    } else {
        Err(RunError::Usage(format!(
            "class {class} does not exist: the classifier has classes 0..{n}"
        )))
    }
}

/// The classifier's label of one image (`[1, 3, h, w]`).
fn label_of<B: Backend>(s: &Setup<B>, image: Tensor<B, 4>) -> usize {
    scalar(s.classifier.valid().logits(image).argmax(1).float().reshape([1])) as usize
}

/// The model of the run's prompt: plain for an empty prompt and negative prompt (or `--cfg 1`),
/// with classifier-free guidance at `--cfg` otherwise (one batched UNet call on `[negative;
/// cond]`);
/// a latent consistency model is told `--cfg` as a code instead, without guidance (as
/// diffusers' pipelines run it).
enum PromptModel<B: Backend> {
    Plain(UnetEps<Autodiff<B>>),
    Guided(Cfg<Autodiff<B>, UnetEps<Autodiff<B>>>),
}

/// An inpainting UNet's mask and masked image latents (`StableDiffusion::inpainting_conditions`).
type Inpainting<B> = (Tensor<Autodiff<B>, 4>, Tensor<Autodiff<B>, 4>);

/// `Err(Usage)` for an inpainting UNet without an image and a mask.
fn not_inpainting<B: Backend>(s: &Setup<B>) -> Result<(), RunError> {
    match s.sd.is_inpainting() {
        true => Err(RunError::Usage(
            "this folder's UNet inpaints (it takes a mask and a masked image): run `sample --init-image IMAGE \
             --mask MASK`"
                .into(),
        )),
        false => Ok(()),
    }
}

fn prompt_model<B: Backend>(
    s: &Setup<B>,
    config: &RunConfig,
    inpaint: Option<Inpainting<B>>,
) -> Result<PromptModel<B>, RunError> {
    if inpaint.is_none() {
        not_inpainting(s)?;
    }
    let model = |prompt| {
        let model = s.sd.eps_model(prompt);
        match inpaint.clone() {
            Some((mask, masked)) => model.with_inpainting(mask, masked).frozen_conditioning(),
            None => model,
        }
    };
    let cond = s.sd.encode_prompt(&config.prompt, &s.device)?.detach();
    let unguided = config.prompt.is_empty() && config.negative_prompt.is_empty();
    if unguided || config.cfg == 1.0 || s.sd.embeds_guidance() {
        return Ok(PromptModel::Plain(model(cond)));
    }
    let negative = s.sd.encode_negative_prompt(&config.negative_prompt, &s.device)?;
    let prompts = negative.detach().stack(cond);
    // diffusers rescales the network's own output: v for a v-prediction UNet.
    let space = match s.sd.scheduler.prediction_type.as_str() {
        "v_prediction" => RescaleSpace::V(s.sd.schedule.clone()),
        _ => RescaleSpace::Epsilon,
    };
    Ok(PromptModel::Guided(
        Cfg::new(model(prompts), config.cfg)?.guidance_rescale(config.guidance_rescale, space)?,
    ))
}

/// Task 1 on Stable Diffusion: steer samples of the prompt's model to classifier class `target`.
pub fn run_guide<B: Backend>(
    config: &RunConfig,
    target: usize,
    prior_weight: f64,
    device: &B::Device,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::GuidedReport, RunError> {
    let s = setup::<B>(config, device)?;
    check_class(&s, target)?;
    let task = GuidedSampling {
        target,
        iters: config.iters,
        lr: config.lr,
        prior_weight,
        sampler: s.sampler,
        step_noise_seed: config.step_noise_seed(),
        resume: resume_for(config, &("guide", target, prior_weight))?,
    };
    let x_t = noise(&s, config, 1);
    match prompt_model(&s, config, None)? {
        PromptModel::Plain(m) => guide_with(&s, config, m, x_t, &task, on_iter),
        PromptModel::Guided(m) => guide_with(&s, config, m, x_t, &task, on_iter),
    }
}

fn guide_with<B: Backend, M: TaskModel<B>>(
    s: &Setup<B>,
    config: &RunConfig,
    model: M,
    x_t: Tensor<B, 4>,
    task: &GuidedSampling,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::GuidedReport, RunError> {
    let run = guided_sampling(&model, &s.classifier, &s.sd.vae, &s.sd.schedule, x_t, task, on_iter)?;
    output::write_outputs(
        &config.out,
        config,
        run.before,
        run.after,
        &run.report.losses,
        &run.report,
    )?;
    Ok(run.report)
}

/// Task 2 on Stable Diffusion: noise within an ℓ∞ ball of radius `epsilon` that changes the
/// classifier's label of each sample.
pub fn run_audit<B: Backend>(
    config: &RunConfig,
    epsilon: f64,
    device: &B::Device,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::AuditReport, RunError> {
    let s = setup::<B>(config, device)?;
    let task = Audit {
        epsilon,
        iters: config.iters,
        lr: config.lr,
        closeness_weight: 1.0,
        sampler: s.sampler,
        step_noise_seed: config.step_noise_seed(),
        resume: resume_for(config, &("audit", epsilon))?,
    };
    let x_t = noise(&s, config, 2);
    match prompt_model(&s, config, None)? {
        PromptModel::Plain(m) => audit_with(&s, config, m, x_t, &task, on_iter),
        PromptModel::Guided(m) => audit_with(&s, config, m, x_t, &task, on_iter),
    }
}

fn audit_with<B: Backend, M: TaskModel<B>>(
    s: &Setup<B>,
    config: &RunConfig,
    model: M,
    x_t: Tensor<B, 4>,
    task: &Audit,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<crate::tasks::AuditReport, RunError> {
    let run = audit(&model, &s.classifier, &s.sd.vae, &s.sd.schedule, x_t, task, on_iter)?;
    output::write_outputs(
        &config.out,
        config,
        run.before,
        run.after,
        &run.report.losses,
        &run.report,
    )?;
    Ok(run.report)
}

/// Samples of the prompt's model from seeded noise (no optimisation), or from `init`'s image
/// encoded by the VAE (img2img), written as `samples.png`; returns the classifier's label of
/// each.
pub fn sample<B: Backend>(
    config: &RunConfig,
    init: Option<InitImage>,
    device: &B::Device,
) -> Result<Vec<usize>, RunError> {
    let s = setup::<B>(config, device)?;
    let x_t = noise(&s, config, 1);
    let mut inpaint = None;
    let (sampler, x_t) = match init {
        Some(init) => {
            let size = s.sd.image_shape();
            let image = load_image::<B>(init.path, size, device)?;
            if let Some(mask) = init.mask {
                if !s.sd.is_inpainting() {
                    return Err(RunError::Usage(
                        "--mask needs an inpainting UNet (9 input channels, e.g. stable-diffusion-inpainting)".into(),
                    ));
                }
                let mask = load_mask::<Autodiff<B>>(mask, size, device)?;
                let image = Tensor::<Autodiff<B>, 4>::from_inner(image.clone());
                let (mask, masked) = s.sd.inpainting_conditions(image, mask)?;
                inpaint = Some((mask.detach(), masked.detach()));
            }
            match (init.mask, init.strength) {
                // diffusers' inpainting at full strength starts from pure noise: no image latent.
                (Some(_), strength) if strength >= 1.0 => (s.sampler, x_t),
                _ => {
                    let latent = s.sd.vae.valid().encode_mean(image).repeat_dim(0, config.batch);
                    init.start(s.sampler, &s.sd.schedule, latent, x_t)?
                }
            }
        }
        None => (s.sampler, x_t),
    };
    let steps = step_noise(&sampler, &s.sd.schedule, x_t.dims(), config.step_noise_seed(), device)?;
    let latents = match prompt_model(&s, config, inpaint)? {
        PromptModel::Plain(m) => sampler.sample_inference_with_noise(&m.valid(), &s.sd.schedule, x_t, steps)?,
        PromptModel::Guided(m) => sampler.sample_inference_with_noise(&m.valid(), &s.sd.schedule, x_t, steps)?,
    };
    let images = s.sd.vae.valid().decode(latents);
    let labels = crate::tasks::common::to_f64(s.classifier.valid().logits(images.clone()).argmax(1).float());
    let [n, _, h, w] = images.dims();
    let pixels = images
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default();
    crate::toy::write_png_grid(&config.out.join("samples.png"), &pixels, n, [h, w], n, (96 / h).max(1))?;
    Ok(labels.into_iter().map(|l| l as usize).collect())
}

/// An image file resized to `[height, width]` with a triangle filter.
fn open_resized(path: &Path, [h, w]: [usize; 2]) -> Result<image::DynamicImage, RunError> {
    let image = image::open(path).map_err(|e| RunError::Image {
        path: path.into(),
        message: e.to_string(),
    })?;
    Ok(image.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle))
}

/// A mask file as `[1, 1, height, width]` in `[0, 1]` (its luminance, resized with a triangle
/// filter).
pub fn load_mask<B: Backend>(path: &Path, size: [usize; 2], device: &B::Device) -> Result<Tensor<B, 4>, RunError> {
    let gray = open_resized(path, size)?.to_luma8();
    let values: Vec<f32> = gray.pixels().map(|p| p[0] as f32 / 255.0).collect();
    Ok(Tensor::from_data(
        TensorData::new(values, [1, 1, size[0], size[1]]),
        device,
    ))
}

/// An image file as `[1, 3, height, width]` in `[-1, 1]` (resized with a triangle filter).
pub fn load_image<B: Backend>(path: &Path, size: [usize; 2], device: &B::Device) -> Result<Tensor<B, 4>, RunError> {
    let rgb = open_resized(path, size)?.to_rgb8();
    let [h, w] = size;
    let mut planar = vec![0f32; 3 * h * w];
    for (x, y, p) in rgb.enumerate_pixels() {
        for c in 0..3 {
            planar[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_data(TensorData::new(planar, [1, 3, h, w]), device))
}

/// Task 3 on Stable Diffusion: learn the prompt's token embeddings so that samples take the
/// appearance ([`StyleLoss::appearance`]: pooled ResNet features) of the image at `reference`.
pub fn run_invert<B: Backend>(
    config: &RunConfig,
    reference: &Path,
    device: &B::Device,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError> {
    let s = setup::<B>(config, device)?;
    not_inpainting(&s)?;
    let target = load_image::<Autodiff<B>>(reference, s.sd.image_shape(), device)?;
    let label = label_of(&s, target.clone().inner());
    let mut prompt = s.sd.encode_prompt(&config.prompt, device)?.detach();
    let tokens = prompt.tokens;
    prompt.context = prompt.context.require_grad();
    // Learn the prompt's own tokens (positions 1..=n), or the end token of an empty prompt;
    // SDXL's pooled embedding stays the prompt's.
    let mut model = s.sd.eps_model(prompt).with_trainable_tokens(1, 1 + tokens.max(1));
    model.text_embeds = model.text_embeds.map(|p| p.set_require_grad(false));
    let appearance = StyleLoss::appearance(&s.classifier, target);
    let loss = |images: Tensor<Autodiff<B>, 4>| appearance.loss(images);
    let resume = resume_for(config, &("invert", reference, files_fingerprint(reference)))?;
    tune(config, &s, model, &loss, label, resume, on_iter)
}

/// Task 4 on Stable Diffusion: LoRA adapters of rank `rank` on the UNet's attention, towards the
/// style (feature Gram matrices) of the image at `style`.
pub fn run_finetune<B: Backend>(
    config: &RunConfig,
    style_path: &Path,
    rank: usize,
    device: &B::Device,
    on_iter: &mut dyn FnMut(usize, f64),
) -> Result<TuneReport, RunError> {
    lora_rank(rank)?;
    let s = setup::<B>(config, device)?;
    not_inpainting(&s)?;
    let style = load_image::<Autodiff<B>>(style_path, s.sd.image_shape(), device)?;
    let label = label_of(&s, style.clone().inner());
    let style = StyleLoss::new(&s.classifier, style);
    let mut model = s.sd.eps_model(s.sd.encode_prompt(&config.prompt, device)?.detach());
    model.unet = model.unet.no_grad().with_lora(rank, rank as f64);
    let model = crate::ode::materialized(model);
    let loss = |images: Tensor<Autodiff<B>, 4>| style.loss(images);
    let resume = resume_for(config, &("finetune", style_path, files_fingerprint(style_path), rank))?;
    tune(config, &s, model, &loss, label, resume, on_iter)
}

/// Tunes the trainable parameters of `model` under `loss`, evaluated on held-out noise;
/// `class` is the label whose rate the report gives (the reference image's).
fn tune<B: Backend>(
    config: &RunConfig,
    s: &Setup<B>,
    model: UnetEps<Autodiff<B>>,
    loss: &dyn Fn(Tensor<Autodiff<B>, 4>) -> Tensor<Autodiff<B>, 1>,
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
    let pipeline = (&s.classifier, &s.sd.vae, &s.sd.schedule);
    tune_and_report(
        config,
        model,
        pipeline,
        &tuning,
        loss,
        class,
        &|salt| noise(s, config, salt),
        on_iter,
    )
}
