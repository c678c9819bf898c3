//! The Stable Diffusion path on a tiny random pipeline in the diffusers layout
//! (`models/fixtures/sd_tiny`, from scripts/make_fixtures.py): the whole pipeline (prompt → CLIP
//! → guided DDIM → VAE) against diffusers' StableDiffusionPipeline, then the four tasks end to
//! end, then bad input.

use std::path::{Path, PathBuf};

use adjoint_dpm::diffusion::{Cfg, NoiseLevels, SecondOrder};
use adjoint_dpm::tasks::run::{InitImage, RunConfig, RunError};
use adjoint_dpm::tasks::run_sd::{load_image, load_mask, run_audit, run_finetune, run_guide, run_invert, sample};
use adjoint_dpm::tasks::{FinalSigmas, GradientChoice, SchedulerConfig, SdError, SolverChoice, StableDiffusion};
use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

type B = Flex;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/fixtures"))
}

fn read(st: &safetensors::SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-30)
}

/// A reference run's tensors (`io.safetensors`, as bytes) and settings (`io.json`).
fn reference_run(dir: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(dir.join("io.safetensors")).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("io.json")).unwrap()).unwrap();
    (bytes, meta)
}

/// A reference run's prompt, steps and guidance scale.
fn run_settings(meta: &serde_json::Value) -> (&str, usize, f64) {
    (
        meta["prompt"].as_str().unwrap(),
        meta["steps"].as_u64().unwrap() as usize,
        meta["guidance"].as_f64().unwrap(),
    )
}

/// The timesteps a reference run's `io.json` lists.
fn timesteps_of(meta: &serde_json::Value) -> Vec<f64> {
    let ts = meta["timesteps"].as_array().unwrap();
    ts.iter().map(|t| t.as_f64().unwrap()).collect()
}

/// The pipeline's guided run (`[negative; prompt]` rows under CFG) from a reference run's
/// latents and settings with `solver`, and its relative error against the reference's final
/// latents (the timesteps checked too where `io.json` lists them).
fn guided_run_error(
    sd: &StableDiffusion<B>,
    st: &safetensors::SafeTensors,
    meta: &serde_json::Value,
    solver: SolverChoice,
) -> f64 {
    let device = Default::default();
    let (prompt, steps, guidance) = run_settings(meta);
    let prompts = sd
        .negative_prompt(&device)
        .unwrap()
        .stack(sd.encode_prompt(prompt, &device).unwrap());
    let model = Cfg::new(sd.eps_model(prompts), guidance).unwrap();
    let sampler = sd.sampler(solver, steps, GradientChoice::Exact);
    if meta.get("timesteps").is_some() {
        assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(meta));
    }
    let (latents, shape) = read(st, "latents");
    let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape), &device);
    let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
    rel_err(&values(x_0), &read(st, "final_latents").0)
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn tiny_pipeline_matches_diffusers_end_to_end() {
    let device = Default::default();
    let dir = fixtures().join("sd_tiny");
    let mut sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);

    // Prompt encoding (the tokenizer is vocab.json + merges.txt here).
    let cond = sd.encode_prompt(prompt, &device).unwrap();
    let uncond = sd.negative_prompt(&device).unwrap();
    assert!(!sd.force_zeros_for_empty_prompt && cond.text_embeds.is_none());
    assert_eq!(uncond.tokens, 0);
    assert!(cond.tokens > 0);
    let e = rel_err(&values(cond.context.clone()), &read(&st, "prompt_embeds").0);
    assert!(e < 1e-5, "prompt embedding off by {e:e}");
    let e = rel_err(&values(uncond.context.clone()), &read(&st, "negative_embeds").0);
    assert!(e < 1e-5, "empty-prompt embedding off by {e:e}");
    // clip_skip 1: the layer before CLIP's last through its final LayerNorm; the negative
    // prompt keeps the last layer's, as in diffusers.
    let skipped = clip_skip_embeds(&mut sd, prompt, 1, &dir);
    assert!(skipped[0] < 1e-5, "clip_skip 1 off by {:e}", skipped[0]);
    let e = rel_err(
        &values(sd.negative_prompt(&device).unwrap().context),
        &read(&st, "negative_embeds").0,
    );
    assert!(e < 1e-5, "empty-prompt embedding off by {e:e}");

    // Guided DDIM with the pipeline's scheduler settings, then the VAE.
    let sampler = sd.sampler(SolverChoice::Ddim, steps, GradientChoice::Exact);
    assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
    // A pipeline saved with a Karras (exponential, Lu) scheduler samples on those levels,
    // whatever `--solver`; `final_sigmas_type` moves the end of every sampler but DDIM.
    assert_eq!(sampler.noise_levels, NoiseLevels::Spaced);
    sd.scheduler.use_karras_sigmas = true;
    let levels = |sd: &StableDiffusion<B>, solver| sd.sampler(solver, steps, GradientChoice::Exact).noise_levels;
    assert_eq!(levels(&sd, SolverChoice::Ddim), NoiseLevels::Karras);
    sd.scheduler.use_karras_sigmas = false;
    sd.scheduler.use_lu_lambdas = true;
    assert_eq!(levels(&sd, SolverChoice::Dpmpp2m), NoiseLevels::LuLambdas);
    sd.scheduler.use_lu_lambdas = false;
    assert_eq!(levels(&sd, SolverChoice::Dpmpp2mKarras), NoiseLevels::Karras);
    assert!(
        sd.sampler(SolverChoice::Euler, steps, GradientChoice::Exact)
            .final_alpha_one
    );
    sd.scheduler.final_sigmas_type = Some(FinalSigmas::SigmaMin);
    assert!(
        !sd.sampler(SolverChoice::Heun, steps, GradientChoice::Exact)
            .final_alpha_one
    );
    sd.scheduler.final_sigmas_type = None;
    sd.scheduler.rescale_betas_zero_snr = true;
    let zsnr = sd.scheduler.schedule().unwrap();
    assert!((zsnr.alphas_cumprod(999) / 2f64.powi(-24) - 1.0).abs() < 1e-12);
    sd.scheduler.rescale_betas_zero_snr = false;
    // DPM-Solver's solver_type "heun" reaches its second-order update.
    sd.scheduler.solver_type = Some("heun".into());
    let dpm = sd.sampler(SolverChoice::Dpmpp2m, steps, GradientChoice::Exact);
    assert_eq!(dpm.second_order, SecondOrder::Heun);
    sd.scheduler.solver_type = None;
    let model = Cfg::new(sd.eps_model(uncond.stack(cond)), guidance).unwrap();
    let (latents, shape) = read(&st, "latents");
    let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape.clone()), &device);
    let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
    let e = rel_err(&values(x_0.clone()), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    let image = sd.vae.decode(x_0).add_scalar(1.0).mul_scalar(0.5).clamp(0.0, 1.0);
    assert_eq!(image.dims()[2], sd.image_size());
    let e = rel_err(&values(image), &read(&st, "image").0);
    assert!(e < 1e-4, "image off by {e:e}");
}

/// SDXL: two text encoders (penultimate hidden states side by side, the second's projected
/// pooled output), zeros for the empty negative prompt, the size numbers as added conditions,
/// Euler on "leading" timesteps with an offset, against diffusers' StableDiffusionXLPipeline.
#[test]
fn tiny_sdxl_pipeline_matches_diffusers_end_to_end() {
    let device = Default::default();
    let dir = fixtures().join("sdxl_tiny");
    let sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    assert_eq!(sd.image_size() as u64, meta["size"].as_u64().unwrap());
    assert!(sd.force_zeros_for_empty_prompt);

    let cond = sd.encode_prompt(prompt, &device).unwrap();
    let e = rel_err(&values(cond.context.clone()), &read(&st, "prompt_embeds").0);
    assert!(e < 1e-5, "prompt embedding off by {e:e}");
    let pooled = cond.text_embeds.clone().expect("SDXL pools");
    let e = rel_err(&values(pooled), &read(&st, "pooled_prompt_embeds").0);
    assert!(e < 1e-5, "pooled embedding off by {e:e}");
    let uncond = sd.negative_prompt(&device).unwrap();
    assert_eq!(values(uncond.context.clone().abs().sum()), [0.0]);
    // clip_skip 1: each encoder's state two layers before its last, the pooled output as is.
    let mut skipping = StableDiffusion::<B>::load(&dir, &device).unwrap();
    let skipped = clip_skip_embeds(&mut skipping, prompt, 1, &dir);
    assert!(skipped.iter().all(|e| *e < 1e-5), "clip_skip 1 off by {skipped:?}");
    // A skip past the first encoder's embeddings (it has 2 layers) is a typed error naming it.
    skipping.clip_skip = 2;
    let err = skipping.encode_prompt(prompt, &device).unwrap_err();
    assert!(
        err.to_string()
            .contains("clip_skip 2 reaches before the embeddings of text_encoder,"),
        "{err}"
    );

    let sampler = sd.sampler(SolverChoice::Euler, steps, GradientChoice::Exact);
    assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
    let model = Cfg::new(sd.eps_model(uncond.stack(cond)), guidance).unwrap();
    let (latents, shape) = read(&st, "latents");
    let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape), &device);
    let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
    let e = rel_err(&values(x_0.clone()), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    let image = sd.vae.decode(x_0).add_scalar(1.0).mul_scalar(0.5).clamp(0.0, 1.0);
    let e = rel_err(&values(image), &read(&st, "image").0);
    assert!(e < 1e-4, "image off by {e:e}");
    eprintln!("sdxl_tiny: final latents and image within 1e-4 of diffusers (image {e:.1e})");

    // A pooled embedding of the wrong width, or none, is a typed error before the first step.
    let mut model = sd.eps_model(sd.encode_prompt(prompt, &device).unwrap());
    model.text_embeds = None;
    let x = Tensor::<B, 4>::zeros([1, 4, 8, 8], &device);
    let err = sampler.sample_inference(&model, &sd.schedule, x).unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
}

/// The relative errors of `sd`'s encoding of `prompt` under `clip_skip = skip` against the
/// folder's `clip_skip.safetensors` (context, then the pooled embedding if any).
#[test]
fn tiny_latent_consistency_pipeline_matches_diffusers_end_to_end() {
    let device = Default::default();
    let dir = fixtures().join("lcm_tiny");
    let sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    // The folder's LCMScheduler picks LCM; its UNet takes the guidance scale as a code.
    assert_eq!(sd.scheduler.solver(), Ok(SolverChoice::Lcm));
    assert!(sd.embeds_guidance());

    let cond = sd.encode_prompt(prompt, &device).unwrap();
    let e = rel_err(&values(cond.context.clone()), &read(&st, "prompt_embeds").0);
    assert!(e < 1e-5, "prompt embedding off by {e:e}");
    let mut sd = sd;
    sd.guidance_scale = guidance;
    let model = sd.eps_model(cond);
    assert_eq!(model.guidance_scale, Some(guidance));
    let sampler = sd.sampler(SolverChoice::Lcm, steps, GradientChoice::Exact);
    assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
    let (latents, shape) = read(&st, "latents");
    let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape.clone()), &device);
    let (noise, _) = read(&st, "noise");
    let noise: Vec<_> = noise
        .chunks(x_t.shape().num_elements())
        .map(|n| Tensor::<B, 4>::from_data(TensorData::new(n.to_vec(), shape.clone()), &device))
        .collect();
    assert_eq!(noise.len(), sampler.noise_count(&sd.schedule).unwrap());
    let x_0 = sampler
        .sample_inference_with_noise(&model, &sd.schedule, x_t.clone(), noise.clone())
        .unwrap();
    let e = rel_err(&values(x_0.clone()), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    let image = sd.vae.decode(x_0).add_scalar(1.0).mul_scalar(0.5).clamp(0.0, 1.0);
    let e = rel_err(&values(image), &read(&st, "image").0);
    assert!(e < 1e-4, "image off by {e:e}");
    eprintln!("lcm_tiny: final latents and image within 1e-4 of diffusers (image {e:.1e})");

    // Without the code (a plain UNet call), the run is another one.
    let mut uncoded = model.clone();
    uncoded.guidance_scale = None;
    let x_0 = sampler
        .sample_inference_with_noise(&uncoded, &sd.schedule, x_t.clone(), noise)
        .unwrap();
    let e = rel_err(&values(x_0), &read(&st, "final_latents").0);
    assert!(e > 1e-3, "the guidance code changes nothing ({e:e})");
    // A code given to a UNet without time_cond_proj_dim is a typed error before the first step.
    let plain = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    let mut coded = plain.eps_model(plain.encode_prompt(prompt, &device).unwrap());
    coded.guidance_scale = Some(8.5);
    let err = sampler
        .sample_inference(&coded, &plain.schedule, x_t.clone())
        .unwrap_err();
    assert!(err.to_string().contains("time_cond_proj_dim"), "{err}");
}

#[test]
fn tiny_inpainting_pipeline_matches_diffusers_end_to_end() {
    let device = Default::default();
    let dir = fixtures().join("inpaint_tiny");
    let sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    assert!(sd.is_inpainting());
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    let tensor = |name: &str| {
        let (v, shape) = read(&st, name);
        Tensor::<B, 4>::from_data(TensorData::new(v, shape), &device)
    };
    // The mask at the latent's size and the masked image's latents, as the pipeline makes them.
    let (mask, masked) = sd.inpainting_conditions(tensor("image"), tensor("mask")).unwrap();
    assert_eq!(values(mask.clone()), read(&st, "latent_mask").0);
    let e = rel_err(&values(masked.clone()), &read(&st, "masked_image_latents").0);
    assert!(e < 1e-5, "masked image latents off by {e:e}");

    let cond = sd.encode_prompt(prompt, &device).unwrap();
    let prompts = sd.negative_prompt(&device).unwrap().stack(cond);
    let model = Cfg::new(sd.eps_model(prompts).with_inpainting(mask, masked), guidance).unwrap();
    let sampler = sd.sampler(SolverChoice::Ddim, steps, GradientChoice::Exact);
    assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
    let x_0 = sampler
        .sample_inference(&model, &sd.schedule, tensor("latents"))
        .unwrap();
    let e = rel_err(&values(x_0.clone()), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    let image = sd.vae.decode(x_0).add_scalar(1.0).mul_scalar(0.5).clamp(0.0, 1.0);
    let e = rel_err(&values(image), &read(&st, "decoded").0);
    assert!(e < 1e-4, "image off by {e:e}");
    eprintln!("inpaint_tiny: final latents and image within 1e-4 of diffusers (image {e:.1e})");

    // The inpainting UNet without its channels, or a plain UNet given them: typed errors
    // before the first step; so are an image and a mask of another size.
    let bare = sd.eps_model(sd.encode_prompt(prompt, &device).unwrap());
    let err = sampler
        .sample_inference(&bare, &sd.schedule, tensor("latents"))
        .unwrap_err();
    assert!(err.to_string().contains("with_inpainting"), "{err}");
    let plain = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    assert!(!plain.is_inpainting());
    let (mask, masked) = plain.inpainting_conditions(tensor("image"), tensor("mask")).unwrap();
    let given = plain
        .eps_model(plain.encode_prompt(prompt, &device).unwrap())
        .with_inpainting(mask, masked);
    let err = sampler
        .sample_inference(&given, &plain.schedule, tensor("latents"))
        .unwrap_err();
    assert!(err.to_string().contains("inpainting channels"), "{err}");
    let small = Tensor::<B, 4>::zeros([1, 1, 8, 8], &device);
    assert!(matches!(
        sd.inpainting_conditions(tensor("image"), small),
        Err(SdError::InputShape(_))
    ));
}

/// SDXL inpainting (`StableDiffusionXLInpaintPipeline`, a 9-channel SDXL UNet): the added
/// conditions and the inpainting channels together, against diffusers at strength 1.
#[test]
fn tiny_sdxl_inpainting_pipeline_matches_diffusers() {
    let device = Default::default();
    let dir = fixtures().join("sdxl_inpaint_tiny");
    let sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    assert!(sd.is_inpainting() && sd.text_encoder_2.is_some());
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    let pngs = fixtures().join("inpaint_tiny");
    let image = load_image::<B>(&pngs.join("image.png"), sd.image_shape(), &device).unwrap();
    let mask = load_mask::<B>(&pngs.join("mask.png"), sd.image_shape(), &device).unwrap();
    let (mask, masked) = sd.inpainting_conditions(image, mask).unwrap();
    let e = rel_err(&values(masked.clone()), &read(&st, "masked_image_latents").0);
    assert!(e < 1e-5, "masked image latents off by {e:e}");
    let prompts = sd
        .negative_prompt(&device)
        .unwrap()
        .stack(sd.encode_prompt(prompt, &device).unwrap());
    let model = Cfg::new(sd.eps_model(prompts).with_inpainting(mask, masked), guidance).unwrap();
    let sampler = sd.sampler(sd.scheduler.solver().unwrap(), steps, GradientChoice::Exact);
    assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
    let (latents, shape) = read(&st, "latents");
    let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape), &device);
    let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
    let e = rel_err(&values(x_0), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    eprintln!("sdxl_inpaint_tiny: final latents within 1e-4 of diffusers ({e:.1e})");
    // The refiner's aesthetic-score conditioning is refused by name, not run wrongly.
    let refiner = std::env::temp_dir().join(format!("adjoint-dpm-refiner-{}", std::process::id()));
    std::fs::create_dir_all(&refiner).unwrap();
    std::fs::write(
        refiner.join("model_index.json"),
        r#"{"requires_aesthetics_score": true}"#,
    )
    .unwrap();
    let err = StableDiffusion::<B>::load(&refiner, &device).unwrap_err();
    assert!(
        matches!(err, SdError::Unsupported(_)) && err.to_string().contains("aesthetic"),
        "{err}"
    );
    std::fs::remove_dir_all(&refiner).ok();
}

#[test]
fn sample_inpaints_on_an_inpainting_folder() {
    let device = Default::default();
    let dir = fixtures().join("inpaint_tiny");
    let root = std::env::temp_dir().join(format!("adjoint-dpm-inpaint-{}", std::process::id()));
    let (image_png, mask_png) = (dir.join("image.png"), dir.join("mask.png"));
    // The files load as the pipeline's image processors read them.
    let (bytes, _) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let e = rel_err(
        &values(load_image::<B>(&image_png, [16, 16], &device).unwrap()),
        &read(&st, "image").0,
    );
    assert!(e < 1e-6, "image off by {e:e}");
    assert_eq!(
        values(load_mask::<B>(&mask_png, [16, 16], &device).unwrap()),
        read(&st, "mask").0
    );
    let c = RunConfig {
        weights: Some(dir.clone()),
        prompt: "a photo of the cat".into(),
        ..config(&root)
    };
    let init = |mask| InitImage {
        path: &image_png,
        strength: 1.0,
        mask,
    };
    assert_eq!(sample::<B>(&c, Some(init(Some(&mask_png))), &device).unwrap().len(), 2);
    assert!(root.join("samples.png").is_file());
    // Without a mask, or on a folder that does not inpaint, or another task: usage errors.
    let usage = |r: Result<Vec<usize>, RunError>| matches!(r, Err(RunError::Usage(_)));
    assert!(usage(sample::<B>(&c, Some(init(None)), &device)));
    let plain = RunConfig {
        weights: Some(fixtures().join("sd_tiny")),
        ..c.clone()
    };
    assert!(usage(sample::<B>(&plain, Some(init(Some(&mask_png))), &device)));
    let err = run_guide::<B>(&c, 3, 0.1, &device, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--mask"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// ControlNet (`StableDiffusionControlNetPipeline`: sd_tiny's parts and a tiny random
/// ControlNet): the control image as the pipeline's processor reads it, then the whole guided
/// run with the residuals at scale 0.8, against diffusers.
#[test]
fn tiny_controlnet_pipeline_matches_diffusers_end_to_end() {
    let device = Default::default();
    let dir = fixtures().join("controlnet_tiny");
    let mut sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    assert_eq!(sd.controlnets.len(), 1);
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    let scale = meta["control_scale"].as_f64().unwrap();
    let image = load_image::<B>(&dir.join("control.png"), sd.image_shape(), &device)
        .unwrap()
        .mul_scalar(0.5)
        .add_scalar(0.5);
    let e = rel_err(&values(image.clone()), &read(&st, "control_image").0);
    assert!(e < 1e-6, "control image off by {e:e}");
    sd.set_control(image.clone(), scale).unwrap();
    let run = |sd: &StableDiffusion<B>| {
        let prompts = sd
            .negative_prompt(&device)
            .unwrap()
            .stack(sd.encode_prompt(prompt, &device).unwrap());
        let model = Cfg::new(sd.eps_model(prompts), guidance).unwrap();
        let sampler = sd.sampler(SolverChoice::Ddim, steps, GradientChoice::Exact);
        assert_eq!(sampler.timesteps(&sd.schedule).unwrap(), timesteps_of(&meta));
        let (latents, shape) = read(&st, "latents");
        let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape), &device);
        sampler.sample_inference(&model, &sd.schedule, x_t).unwrap()
    };
    let x_0 = run(&sd);
    let e = rel_err(&values(x_0.clone()), &read(&st, "final_latents").0);
    assert!(e < 1e-4, "final latents off by {e:e}");
    let decoded = sd.vae.decode(x_0).add_scalar(1.0).mul_scalar(0.5).clamp(0.0, 1.0);
    let e = rel_err(&values(decoded), &read(&st, "decoded").0);
    assert!(e < 1e-4, "image off by {e:e}");
    eprintln!("controlnet_tiny: final latents and image within 1e-4 of diffusers (image {e:.1e})");
    // Two ControlNets (the same one twice, as diffusers' MultiControlNetModel) on two images.
    let mut multi = StableDiffusion::<B>::load(&dir, &device)
        .unwrap()
        .with_controlnet(dir.join("controlnet"))
        .unwrap();
    let second = load_image::<B>(&dir.join("control2.png"), sd.image_shape(), &device)
        .unwrap()
        .mul_scalar(0.5)
        .add_scalar(0.5);
    assert!(matches!(
        multi.set_control(image.clone(), 1.0),
        Err(SdError::InputShape(_))
    ));
    multi.set_controls(vec![(image.clone(), 0.8), (second, 0.5)]).unwrap();
    let bytes = std::fs::read(dir.join("multi.safetensors")).unwrap();
    let multi_ref = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let e = rel_err(&values(run(&multi)), &read(&multi_ref, "final_latents").0);
    assert!(e < 1e-4, "two ControlNets: final latents off by {e:e}");
    eprintln!("controlnet_tiny: two ControlNets within 1e-4 of diffusers' MultiControlNetModel ({e:.1e})");
    // Without its image the ControlNet is not run: another result.
    sd.control.clear();
    let e = rel_err(&values(run(&sd)), &read(&st, "final_latents").0);
    assert!(e > 1e-2, "the ControlNet changed nothing ({e:e})");

    // A control image of another size, or one without a ControlNet, is a typed error; so is a
    // ControlNet of another base model (here: SDXL's UNet).
    let small = Tensor::<B, 4>::zeros([1, 3, 8, 8], &device);
    assert!(matches!(sd.set_control(small, 1.0), Err(SdError::InputShape(_))));
    let mut plain = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    assert!(matches!(plain.set_control(image, 1.0), Err(SdError::InputShape(_))));
    let sdxl = StableDiffusion::<B>::load(fixtures().join("sdxl_tiny"), &device).unwrap();
    let err = sdxl.with_controlnet(dir.join("controlnet")).unwrap_err();
    assert!(
        matches!(err, SdError::Mismatch(_)) && err.to_string().contains("ControlNet"),
        "{err}"
    );
}

/// An SDXL ControlNet (`StableDiffusionXLControlNetPipeline`): the ControlNet takes SDXL's
/// added conditions too.
#[test]
fn tiny_sdxl_controlnet_pipeline_matches_diffusers() {
    let device = Default::default();
    let dir = fixtures().join("sdxl_controlnet_tiny");
    let mut sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
    assert!(sd.text_encoder_2.is_some());
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let png = fixtures().join("controlnet_tiny/control.png");
    let image = load_image::<B>(&png, sd.image_shape(), &device).unwrap();
    sd.set_control(
        image.mul_scalar(0.5).add_scalar(0.5),
        meta["control_scale"].as_f64().unwrap(),
    )
    .unwrap();
    let e = guided_run_error(&sd, &st, &meta, sd.scheduler.solver().unwrap());
    assert!(e < 1e-4, "final latents off by {e:e}");
    eprintln!("sdxl_controlnet_tiny: final latents within 1e-4 of diffusers ({e:.1e})");
}

/// `sample --control-image` on a ControlNet folder, `--controlnet` on a plain one, and guided
/// sampling (the exact adjoint through UNet and ControlNet) with it; missing pieces are usage
/// errors.
#[test]
fn sample_and_guide_with_a_controlnet() {
    let device = Default::default();
    let dir = fixtures().join("controlnet_tiny");
    let root = std::env::temp_dir().join(format!("adjoint-dpm-controlnet-{}", std::process::id()));
    let c = RunConfig {
        weights: Some(dir.clone()),
        prompt: "a photo of the cat".into(),
        control_images: vec![dir.join("control.png")],
        control_scales: vec![0.8],
        ..config(&root)
    };
    assert_eq!(sample::<B>(&c, None, &device).unwrap().len(), 2);
    assert!(root.join("samples.png").is_file());
    let attached = RunConfig {
        weights: Some(fixtures().join("sd_tiny")),
        controlnets: vec![dir.join("controlnet")],
        ..c.clone()
    };
    assert_eq!(sample::<B>(&attached, None, &device).unwrap().len(), 2);
    let report = run_guide::<B>(&attached, 3, 0.1, &device, &mut |_, _| {}).unwrap();
    // A ControlNet file in the original layout on a plain folder.
    let single = RunConfig {
        controlnets: vec![fixtures().join("sd_tiny_single/controlnet.safetensors")],
        ..attached.clone()
    };
    assert_eq!(sample::<B>(&single, None, &device).unwrap().len(), 2);
    // The folder's ControlNet and another, an image and a scale each.
    let two = RunConfig {
        controlnets: vec![dir.join("controlnet")],
        control_images: vec![dir.join("control.png"), dir.join("control2.png")],
        control_scales: vec![0.8, 0.5],
        ..c.clone()
    };
    assert_eq!(sample::<B>(&two, None, &device).unwrap().len(), 2);
    for (images, scales) in [(1, 2), (2, 3)] {
        let bad = RunConfig {
            control_images: two.control_images[..images].to_vec(),
            control_scales: vec![1.0; scales],
            ..two.clone()
        };
        assert!(matches!(sample::<B>(&bad, None, &device), Err(RunError::Usage(_))));
    }
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let usage = |c: RunConfig| matches!(sample::<B>(&c, None, &device), Err(RunError::Usage(_)));
    assert!(usage(RunConfig {
        control_images: Vec::new(),
        ..c.clone()
    }));
    assert!(usage(RunConfig {
        weights: Some(fixtures().join("sd_tiny")),
        ..c.clone()
    }));
    std::fs::remove_dir_all(&root).ok();
}

/// A single-file checkpoint (sd_tiny in the original LDM layout, f16) with sd_tiny's folder for
/// the configs: the run equals diffusers' `from_single_file` pipeline's; `sample --checkpoint`
/// runs it; a file given as --weights, or an SDXL folder's configs, are errors that say so.
#[test]
fn single_file_checkpoint_matches_diffusers_from_single_file() {
    let device = Default::default();
    let dir = fixtures().join("sd_tiny_single");
    let file = dir.join("model.safetensors");
    let sd = StableDiffusion::<B>::load_single_file(&file, fixtures().join("sd_tiny"), &device).unwrap();
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prompt = run_settings(&meta).0;
    let e = guided_run_error(&sd, &st, &meta, SolverChoice::Ddim);
    assert!(e < 1e-4, "final latents off by {e:e}");
    eprintln!("sd_tiny_single: final latents within 1e-4 of diffusers' from_single_file ({e:.1e})");

    let root = std::env::temp_dir().join(format!("adjoint-dpm-single-{}", std::process::id()));
    let c = RunConfig {
        checkpoint: Some(file.clone()),
        prompt: prompt.into(),
        ..config(&root)
    };
    assert_eq!(sample::<B>(&c, None, &device).unwrap().len(), 2);
    let err = StableDiffusion::<B>::load_single_file(&file, fixtures().join("sdxl_tiny"), &device).unwrap_err();
    assert!(
        matches!(err, SdError::Mismatch(_)) && err.to_string().contains("SDXL"),
        "{err}"
    );
    // A folder's own weights file is not a single file.
    let unet_file = fixtures().join("sd_tiny/unet/diffusion_pytorch_model.safetensors");
    let err = StableDiffusion::<B>::load_single_file(&unet_file, fixtures().join("sd_tiny"), &device).unwrap_err();
    assert!(err.to_string().contains("model.diffusion_model"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// An SDXL single file (sdxl_tiny in SDXL's layout: CLIP-L under `conditioner.embedders.0`,
/// the OpenCLIP encoder with fused q/k/v under `conditioner.embedders.1`, f16) with sdxl_tiny's
/// folder for the configs runs as diffusers' `StableDiffusionXLPipeline.from_single_file` does.
#[test]
fn sdxl_single_file_checkpoint_matches_diffusers_from_single_file() {
    let device = Default::default();
    let dir = fixtures().join("sdxl_tiny_single");
    let sd =
        StableDiffusion::<B>::load_single_file(dir.join("model.safetensors"), fixtures().join("sdxl_tiny"), &device)
            .unwrap();
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let e = guided_run_error(&sd, &st, &meta, sd.scheduler.solver().unwrap());
    assert!(e < 1e-4, "final latents off by {e:e}");
    eprintln!("sdxl_tiny_single: final latents within 1e-4 of diffusers' from_single_file ({e:.1e})");
    // With an SD 1.x folder's configs: an error naming both.
    let err =
        StableDiffusion::<B>::load_single_file(dir.join("model.safetensors"), fixtures().join("sd_tiny"), &device)
            .unwrap_err();
    assert!(
        matches!(err, SdError::Mismatch(_)) && err.to_string().contains("Sdxl"),
        "{err}"
    );
}

/// Textual inversion: a one-vector embedding in diffusers' layout and a three-vector one in
/// A1111's (`emb_params`, named by the token given), as diffusers' `load_textual_inversion`
/// loads them into sd_tiny: the expanded prompt's ids and the prompt and negative-prompt
/// embeddings; then SDXL's layout (`clip_l`, `clip_g`) into sdxl_tiny's two encoders.
#[test]
fn textual_inversion_embeddings_match_diffusers() {
    let device = Default::default();
    let dir = fixtures().join("sd_tiny_embeddings");
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let sd = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    let (sd, tokens) = sd
        .load_textual_inversion(&dir.join("cat-toy.safetensors"), None)
        .unwrap();
    assert_eq!(tokens, ["<cat-toy>"]);
    let (sd, tokens) = sd
        .load_textual_inversion(&dir.join("bad-hands.safetensors"), None)
        .unwrap();
    assert_eq!(tokens, ["bad-hands", "bad-hands_1", "bad-hands_2"]);
    let prompt = meta["prompt"].as_str().unwrap();
    assert_eq!(
        sd.tokenizer.convert_prompt(prompt).unwrap(),
        meta["converted"].as_str().unwrap()
    );
    let ids = st.tensor("input_ids").unwrap();
    let expected: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    assert_eq!(sd.tokenizer.encode(prompt).unwrap(), expected);
    let embeds = sd.encode_prompt(prompt, &device).unwrap();
    let e = rel_err(&values(embeds.context), &read(&st, "prompt_embeds").0);
    assert!(e < 1e-5, "prompt embeddings off by {e:e}");
    let negative = sd
        .encode_negative_prompt(meta["negative_prompt"].as_str().unwrap(), &device)
        .unwrap();
    let e = rel_err(&values(negative.context), &read(&st, "negative_prompt_embeds").0);
    assert!(e < 1e-5, "negative prompt embeddings off by {e:e}");
    // The same token twice, a file of another width, or SDXL's file on SD 1.x: errors.
    let err = sd
        .load_textual_inversion(&dir.join("cat-toy.safetensors"), None)
        .unwrap_err();
    assert!(err.to_string().contains("already"), "{err}");
    let err = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device)
        .unwrap()
        .load_textual_inversion(&dir.join("xl-style.safetensors"), None)
        .unwrap_err();
    assert!(matches!(err, SdError::Mismatch(_)), "{err}");

    let xl = StableDiffusion::<B>::load(fixtures().join("sdxl_tiny"), &device).unwrap();
    let (xl, tokens) = xl
        .load_textual_inversion(&dir.join("xl-style.safetensors"), None)
        .unwrap();
    assert_eq!(tokens, ["xl-style", "xl-style_1"]);
    let st = std::fs::read(dir.join("xl.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let embeds = xl.encode_prompt("a xl-style photo of the cat", &device).unwrap();
    let e = rel_err(&values(embeds.context), &read(&st, "prompt_embeds").0);
    assert!(e < 1e-5, "SDXL prompt embeddings off by {e:e}");
    let e = rel_err(
        &values(embeds.text_embeds.unwrap()),
        &read(&st, "pooled_prompt_embeds").0,
    );
    assert!(e < 1e-5, "SDXL pooled embedding off by {e:e}");
    eprintln!("textual inversion: ids equal, embeddings within 1e-5 of diffusers (SDXL pooled {e:.1e})");

    // From the CLI (on the autodiff backend the tasks use): `--embedding`, named in prompts.
    let root = std::env::temp_dir().join(format!("adjoint-dpm-embeddings-{}", std::process::id()));
    let c = RunConfig {
        embeddings: vec![dir.join("bad-hands.safetensors"), dir.join("cat-toy.safetensors")],
        prompt: "a photo of <cat-toy>".into(),
        negative_prompt: "bad-hands".into(),
        ..config(&root)
    };
    assert_eq!(sample::<B>(&c, None, &device).unwrap().len(), 2);
    std::fs::remove_dir_all(&root).ok();
}

/// A negative prompt is encoded as the prompt would be without `clip_skip` (diffusers encodes
/// both in one loop); only an empty one is SDXL's zeros. Guidance then steers away from it.
#[test]
fn negative_prompts_encode_as_prompts_without_clip_skip() {
    let device = Default::default();
    for folder in ["sd_tiny", "sdxl_tiny"] {
        let mut sd = StableDiffusion::<B>::load(fixtures().join(folder), &device).unwrap();
        let text = "a photo of a dog";
        let plain = sd.encode_prompt(text, &device).unwrap();
        sd.clip_skip = 1;
        let negative = sd.encode_negative_prompt(text, &device).unwrap();
        assert_eq!(values(negative.context.clone()), values(plain.context), "{folder}");
        assert_ne!(
            values(negative.context),
            values(sd.encode_prompt(text, &device).unwrap().context),
            "{folder}: clip_skip changed nothing"
        );
        let empty = values(sd.encode_negative_prompt("", &device).unwrap().context);
        assert_eq!(empty, values(sd.negative_prompt(&device).unwrap().context));
        assert_eq!(empty.iter().all(|v| *v == 0.0), folder == "sdxl_tiny", "{folder}");
    }
    // In a run: the same prompt with and without a negative one samples differently.
    let root = std::env::temp_dir().join(format!("adjoint-dpm-negative-{}", std::process::id()));
    let c = |negative: &str| RunConfig {
        prompt: "a photo of the cat".into(),
        negative_prompt: negative.into(),
        cfg: 3.0,
        ..config(&root)
    };
    sample::<B>(&c(""), None, &device).unwrap();
    let without = std::fs::read(root.join("samples.png")).unwrap();
    sample::<B>(&c("a photo of a dog"), None, &device).unwrap();
    let with = std::fs::read(root.join("samples.png")).unwrap();
    assert_ne!(without, with, "the negative prompt changed nothing");
    std::fs::remove_dir_all(&root).ok();
}

/// LoRA checkpoints fused as diffusers fuses them: a peft file (the UNet's attention,
/// feed-forward, convolutions and time projections) at lora_scale 0.8, and a kohya file (the same
/// with `.alpha` twice the rank, and the text encoder's q, v and fc1) at 1, the peft file with its
/// adapter config in the metadata (lora_alpha twice the rank) at 0.5; then the reference run from
/// sd_tiny's latents.
#[test]
fn lora_checkpoints_fuse_as_diffusers_fuses_them() {
    let device = Default::default();
    let dir = fixtures().join("sd_tiny_lora");
    let (bytes, meta) = reference_run(&dir);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (prompt, steps, guidance) = run_settings(&meta);
    let (latents, shape) = read(&st, "latents");
    let base = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    let plain = values(base.encode_prompt(prompt, &device).unwrap().context);
    for (name, file, scale, layers) in [
        ("peft", "pytorch_lora_weights.safetensors", 0.8, 77),
        ("kohya", "kohya.safetensors", 1.0, 83),
        // lora_alpha 4 in its adapter metadata: twice the rank's scale.
        ("metadata", "with_metadata.safetensors", 0.5, 77),
    ] {
        let sd = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
        let (sd, fused) = sd.fuse_lora(&dir.join(file), scale).unwrap();
        assert_eq!(fused, layers, "{name}: layers fused");
        let cond = sd.encode_prompt(prompt, &device).unwrap();
        let e = rel_err(
            &values(cond.context.clone()),
            &read(&st, &format!("prompt_embeds_{name}")).0,
        );
        assert!(e < 1e-5, "{name}: prompt embedding off by {e:e}");
        // Only the kohya file adapts the text encoder.
        assert_eq!(values(cond.context.clone()) == plain, name != "kohya", "{name}");
        let model = Cfg::new(sd.eps_model(sd.negative_prompt(&device).unwrap().stack(cond)), guidance).unwrap();
        let sampler = sd.sampler(SolverChoice::Ddim, steps, GradientChoice::Exact);
        let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents.clone(), shape.clone()), &device);
        let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
        let e = rel_err(&values(x_0), &read(&st, &format!("final_latents_{name}")).0);
        assert!(e < 1e-4, "{name}: final latents off by {e:e}");
        eprintln!("sd_tiny_lora: {name} within 1e-4 of diffusers ({e:.1e})");
    }
    // A LoRA of another network, or a missing file, is a typed error naming it.
    let sd = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    let err = sd
        .fuse_lora(
            &fixtures().join("sdxl_tiny/unet/diffusion_pytorch_model.safetensors"),
            1.0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("belong to no network"), "{err}");
    let sd = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    let err = sd.fuse_lora(&dir.join("missing.safetensors"), 1.0).unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
}

/// Images of another height and width (diffusers' `height`, `width`): the reference runs of the
/// tiny SD and SDXL pipelines at 16×24 (SDXL's size numbers follow), and the checks.
#[test]
fn non_square_images_match_diffusers() {
    let device = Default::default();
    for folder in ["sd_tiny", "sdxl_tiny"] {
        let dir = fixtures().join(folder);
        let mut sd = StableDiffusion::<B>::load(&dir, &device).unwrap();
        sd.set_resolution(16, 24).unwrap();
        assert_eq!((sd.latent_shape(), sd.image_shape()), ([4, 8, 12], [16, 24]));
        if folder == "sdxl_tiny" {
            assert_eq!(sd.time_ids(), [16.0, 24.0, 0.0, 0.0, 16.0, 24.0]);
        }
        let bytes = std::fs::read(dir.join("wide.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (latents, shape) = read(&st, "latents");
        let x_t = Tensor::<B, 4>::from_data(TensorData::new(latents, shape), &device);
        let cond = sd.encode_prompt("a photo of the cat", &device).unwrap();
        let model = Cfg::new(sd.eps_model(sd.negative_prompt(&device).unwrap().stack(cond)), 3.0).unwrap();
        let sampler = sd.sampler(sd.scheduler.solver().unwrap(), 4, GradientChoice::Exact);
        let x_0 = sampler.sample_inference(&model, &sd.schedule, x_t).unwrap();
        let e = rel_err(&values(x_0), &read(&st, "final_latents").0);
        assert!(e < 1e-4, "{folder}: final latents at 16×24 off by {e:e}");
        // Sizes the UNet cannot halve down to its coarsest level are refused, naming ones it can.
        let err = sd.set_resolution(18, 24).unwrap_err();
        assert!(
            err.to_string().contains("multiples of 4, e.g. 20×24"),
            "{folder}: {err}"
        );
    }
    // From the command line's settings.
    let root = std::env::temp_dir().join(format!("adjoint-dpm-wide-{}", std::process::id()));
    let c = RunConfig {
        resolution: Some([16, 24]),
        ..config(&root)
    };
    assert_eq!(sample::<B>(&c, None, &device).unwrap().len(), 2);
    std::fs::remove_dir_all(&root).ok();
}

fn clip_skip_embeds(sd: &mut StableDiffusion<B>, prompt: &str, skip: usize, dir: &Path) -> Vec<f64> {
    let bytes = std::fs::read(dir.join("clip_skip.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    sd.clip_skip = skip;
    let encoded = sd.encode_prompt(prompt, &Default::default()).unwrap();
    sd.clip_skip = 0;
    let mut errs = vec![rel_err(&values(encoded.context), &read(&st, "prompt_embeds").0)];
    if let Some(pooled) = encoded.text_embeds {
        errs.push(rel_err(&values(pooled), &read(&st, "pooled_prompt_embeds").0));
    }
    errs
}

/// The sampler a folder was saved with: the fixtures' DDIM and Euler, DPM-Solver's and UniPC's
/// variants, and the schedulers we do not have, named.
#[test]
fn a_folder_names_its_sampler() {
    let device = Default::default();
    let sd = StableDiffusion::<B>::load(fixtures().join("sd_tiny"), &device).unwrap();
    assert_eq!(sd.scheduler.solver(), Ok(SolverChoice::Ddim));
    let sdxl = StableDiffusion::<B>::load(fixtures().join("sdxl_tiny"), &device).unwrap();
    assert_eq!(sdxl.scheduler.solver(), Ok(SolverChoice::Euler));
    let solver = |json: &str| serde_json::from_str::<SchedulerConfig>(json).unwrap().solver();
    let dpm = r#"{"_class_name": "DPMSolverMultistepScheduler""#;
    assert_eq!(solver(&format!("{dpm}}}")), Ok(SolverChoice::Dpmpp2m));
    assert_eq!(
        solver(&format!(r#"{dpm}, "solver_order": 3, "solver_type": "midpoint"}}"#)),
        Ok(SolverChoice::Dpmpp3m)
    );
    assert_eq!(
        solver(&format!(r#"{dpm}, "algorithm_type": "sde-dpmsolver++"}}"#)),
        Ok(SolverChoice::Dpmpp2mSde)
    );
    assert_eq!(
        solver(&format!(r#"{dpm}, "solver_type": "heun"}}"#)),
        Ok(SolverChoice::Dpmpp2m)
    );
    let bh1 = solver(&format!(r#"{dpm}, "solver_type": "bh1"}}"#)).unwrap_err();
    assert!(bh1.contains("solver_type Some(\"bh1\")"), "{bh1}");
    let unipc = r#"{"_class_name": "UniPCMultistepScheduler""#;
    assert_eq!(
        solver(&format!(r#"{unipc}, "solver_type": "bh1"}}"#)),
        Ok(SolverChoice::UnipcBh1)
    );
    assert_eq!(
        solver(&format!(r#"{unipc}, "solver_order": 3}}"#)),
        Ok(SolverChoice::Unipc3)
    );
    assert_eq!(
        solver(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#),
        Ok(SolverChoice::Plms)
    );
    assert!(solver(r#"{"_class_name": "PNDMScheduler"}"#)
        .unwrap_err()
        .contains("skip_prk_steps false"));
    assert_eq!(
        solver(r#"{"_class_name": "LMSDiscreteScheduler"}"#),
        Ok(SolverChoice::Lms)
    );
    assert_eq!(solver(r#"{"_class_name": "LCMScheduler"}"#), Ok(SolverChoice::Lcm));
    assert_eq!(solver(r#"{"_class_name": "TCDScheduler"}"#), Ok(SolverChoice::Tcd));
    let deis = r#"{"_class_name": "DEISMultistepScheduler""#;
    assert_eq!(solver(&format!("{deis}}}")), Ok(SolverChoice::Deis));
    assert_eq!(
        solver(&format!(r#"{deis}, "solver_order": 3, "solver_type": "logrho"}}"#)),
        Ok(SolverChoice::Deis3)
    );
    let other = solver(&format!(r#"{deis}, "algorithm_type": "dpmsolver++"}}"#)).unwrap_err();
    assert!(other.contains("algorithm_type \"dpmsolver++\""), "{other}");
    assert_eq!(
        solver(r#"{"_class_name": "KDPM2DiscreteScheduler"}"#),
        Ok(SolverChoice::Dpm2)
    );
    assert_eq!(
        solver(r#"{"_class_name": "KDPM2AncestralDiscreteScheduler"}"#),
        Ok(SolverChoice::Dpm2Ancestral)
    );
    assert_eq!(
        solver(r#"{"_class_name": "DPMSolverSDEScheduler"}"#),
        Err("DPMSolverSDEScheduler".into())
    );
}

fn config(out: &Path) -> RunConfig {
    RunConfig {
        out: out.to_path_buf(),
        weights: Some(fixtures().join("sd_tiny")),
        classifier: Some(fixtures().join("sd_tiny_classifier/model.safetensors")),
        steps: 3,
        iters: 2,
        seed: 3,
        batch: 2,
        ..RunConfig::default()
    }
}

fn outputs_exist(dir: &Path) {
    for f in ["before_after.png", "loss.png", "metrics.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
}

/// The tasks on an SDXL folder: guided sampling under classifier-free guidance (zeros as the
/// negative prompt, the pooled embedding and size numbers through the batch), embedding
/// inversion (gradients reach the context through the added conditions' UNet), plain samples.
#[test]
fn tasks_run_on_an_sdxl_folder() {
    let device = Default::default();
    let root = std::env::temp_dir().join(format!("adjoint-dpm-sdxl-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let reference = root.join("reference.png");
    reference_png(&reference);
    let sdxl = |out: &str| RunConfig {
        weights: Some(fixtures().join("sdxl_tiny")),
        prompt: "a photo of the cat".into(),
        solver: SolverChoice::Euler,
        ..config(&root.join(out))
    };
    let r = run_guide::<B>(&sdxl("guide"), 3, 0.1, &device, &mut |_, _| {}).unwrap();
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    let c = RunConfig {
        iters: 3,
        ..sdxl("invert")
    };
    let r = run_invert::<B>(&c, &reference, &device, &mut |_, _| {}).unwrap();
    assert!(r.loss_before.is_finite() && r.loss_after.is_finite());
    assert!(r.loss_after != r.loss_before, "the learned tokens changed nothing");
    assert_eq!(sample::<B>(&sdxl("sample"), None, &device).unwrap().len(), 2);
    std::fs::remove_dir_all(&root).ok();
}

/// A 24×24 PNG reference image (resized to the pipeline's 16×16 on load).
#[test]
fn tasks_run_on_a_latent_consistency_folder() {
    let device = Default::default();
    let root = std::env::temp_dir().join(format!("adjoint-dpm-lcm-{}", std::process::id()));
    let lcm = |out: &str| RunConfig {
        weights: Some(fixtures().join("lcm_tiny")),
        prompt: "a photo of the cat".into(),
        solver: SolverChoice::Lcm,
        steps: 4,
        cfg: 8.5,
        ..config(&root.join(out))
    };
    let r = run_guide::<B>(&lcm("guide"), 3, 0.1, &device, &mut |_, _| {}).unwrap();
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    assert_eq!(sample::<B>(&lcm("sample"), None, &device).unwrap().len(), 2);
    // The folder's scheduler settings reach the sampler; Karras levels are refused by name.
    let c = RunConfig {
        karras: true,
        ..lcm("karras")
    };
    let err = run_guide::<B>(&c, 3, 0.1, &device, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("LCM sampler cannot run"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

fn reference_png(path: &Path) {
    let img = image::RgbImage::from_fn(24, 24, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 128]));
    img.save(path).unwrap();
}

#[test]
fn every_task_runs_on_a_stable_diffusion_folder() {
    let device = Default::default();
    let root = std::env::temp_dir().join(format!("adjoint-dpm-sd-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let dir = |name: &str| root.join(name);
    let reference = root.join("reference.png");
    reference_png(&reference);

    // Guided sampling with a prompt (classifier-free guidance) and exact gradients.
    let mut c = config(&dir("guide"));
    c.prompt = "a photo of the cat".into();
    let r = run_guide::<B>(&c, 3, 0.1, &device, &mut |_, _| {}).unwrap();
    assert_eq!(r.losses.len(), 2);
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    outputs_exist(&dir("guide"));

    // Auditing the unconditional model with AdjointDPM gradients.
    let mut c = config(&dir("audit"));
    c.gradient = GradientChoice::AdjointDpm;
    let r = run_audit::<B>(&c, 0.1, &device, &mut |_, _| {}).unwrap();
    assert!(r.mean_image_rms.is_finite());
    outputs_exist(&dir("audit"));

    // Embedding inversion of the prompt's tokens with DPM-Solver++(2M), exact gradients: the
    // loss on the held-out noise must not get worse by much and must move.
    let mut c = config(&dir("invert"));
    c.prompt = "a photo".into();
    c.solver = SolverChoice::Dpmpp2m;
    c.iters = 3;
    let r = run_invert::<B>(&c, &reference, &device, &mut |_, _| {}).unwrap();
    assert!(r.loss_before.is_finite() && r.loss_after.is_finite());
    assert!(r.loss_after != r.loss_before, "the learned tokens changed nothing");
    outputs_exist(&dir("invert"));

    // Plain samples of a prompt.
    let mut c = config(&dir("sample"));
    c.prompt = "a photo of the cat".into();
    let labels = sample::<B>(&c, None, &device).unwrap();
    assert_eq!(labels.len(), 2);
    assert!(dir("sample").join("samples.png").is_file());
    let plain = std::fs::read(dir("sample").join("samples.png")).unwrap();
    // img2img from the reference (VAE-encoded), the last two of 3 steps; a strength that keeps
    // no step is a typed error.
    let init = |strength| InitImage {
        path: &reference,
        strength,
        mask: None,
    };
    assert_eq!(sample::<B>(&c, Some(init(0.7)), &device).unwrap().len(), 2);
    let edited = std::fs::read(dir("sample").join("samples.png")).unwrap();
    assert_ne!(plain, edited, "the init image changed nothing");
    let err = sample::<B>(&c, Some(init(0.2)), &device).unwrap_err();
    assert!(err.to_string().contains("strength"), "{err}");

    // LoRA stylisation.
    let r = run_finetune::<B>(&config(&dir("finetune")), &reference, 2, &device, &mut |_, _| {}).unwrap();
    assert!(r.loss_before.is_finite() && r.loss_after.is_finite());
    outputs_exist(&dir("finetune"));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_stable_diffusion_inputs_are_typed_errors() {
    let device = Default::default();
    let root = std::env::temp_dir().join(format!("adjoint-dpm-sd-bad-{}", std::process::id()));
    // A folder without the pipeline layout names the missing component.
    let err = StableDiffusion::<B>::load(fixtures().join("vae_tiny"), &device).unwrap_err();
    assert!(
        matches!(err, SdError::MissingComponent { component: "unet", .. }),
        "{err}"
    );
    // An SDXL folder without its second tokenizer names it; an SD 1.x folder with SDXL's
    // second text encoder is a context too wide for its UNet.
    let copy = |from: &Path, to: &Path| {
        for entry in walk(from) {
            let target = to.join(entry.strip_prefix(from).unwrap());
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(&entry, target).unwrap();
        }
    };
    let sdxl = root.join("sdxl");
    copy(&fixtures().join("sdxl_tiny"), &sdxl);
    std::fs::remove_dir_all(sdxl.join("tokenizer_2")).unwrap();
    let err = StableDiffusion::<B>::load(&sdxl, &device).unwrap_err();
    assert!(
        matches!(
            err,
            SdError::MissingComponent {
                component: "tokenizer_2",
                ..
            }
        ),
        "{err}"
    );
    let sd = root.join("sd");
    copy(&fixtures().join("sd_tiny"), &sd);
    for part in ["text_encoder_2", "tokenizer_2"] {
        copy(&fixtures().join("sdxl_tiny").join(part), &sd.join(part));
    }
    let err = StableDiffusion::<B>::load(&sd, &device).unwrap_err();
    assert!(
        err.to_string()
            .contains("32-wide context but the text encoders produce 80"),
        "{err}"
    );
    // A scheduler on Beta-distribution levels, which we do not have, is refused by name.
    let beta = root.join("beta");
    copy(&fixtures().join("sd_tiny"), &beta);
    let path = beta.join("scheduler/scheduler_config.json");
    let mut scheduler: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    scheduler["use_beta_sigmas"] = true.into();
    std::fs::write(&path, scheduler.to_string()).unwrap();
    let err = StableDiffusion::<B>::load(&beta, &device).unwrap_err();
    assert!(
        matches!(err, SdError::Scheduler { .. }) && err.to_string().contains("use_beta_sigmas"),
        "{err}"
    );
    // No classifier.
    let mut c = config(&root.join("a"));
    c.classifier = None;
    let err = run_guide::<B>(&c, 0, 0.1, &device, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, RunError::Usage(_)), "{err}");
    // A class the classifier does not have.
    let err = run_guide::<B>(&config(&root.join("b")), 10, 0.1, &device, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("classes 0..10"), "{err}");
    // A missing reference image.
    let err = run_invert::<B>(
        &config(&root.join("c")),
        &root.join("nope.png"),
        &device,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, RunError::Image { .. }), "{err}");
    // A classifier file that is not a checkpoint.
    let bogus = root.join("bogus.safetensors");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(&bogus, b"not a checkpoint").unwrap();
    let mut c = config(&root.join("d"));
    c.classifier = Some(bogus);
    let err = run_guide::<B>(&c, 0, 0.1, &device, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, RunError::Classifier { .. }), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
