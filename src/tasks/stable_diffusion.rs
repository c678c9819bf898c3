//! Stable Diffusion as the tasks see it: a diffusers pipeline folder (`unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL `text_encoder_2/` and
//! `tokenizer_2/`) loaded into the models crate's networks, its scheduler config turned into a
//! [`NoiseSchedule`] and sampler settings, prompts encoded by CLIP as the pipeline does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use adjoint_dpm_models::clip::{clip_key_map, load_clip_text, ClipTextConfig, ClipTextModel, ClipTokenizer};
use adjoint_dpm_models::controlnet::{load_controlnet, ControlNetModel};
use adjoint_dpm_models::load::{load_safetensors, read_config, LoadError};
use adjoint_dpm_models::lora_file::{fuse_lora, LoraPrefixes};
use adjoint_dpm_models::norm::layer_norm;
use adjoint_dpm_models::single_file::{
    ldm_clip_key_map, ldm_controlnet, ldm_unet_key_map, ldm_vae_key_map, load_open_clip, single_file_layout,
    SingleFileLayout, SD2_OPEN_CLIP, SDXL_OPEN_CLIP,
};
use adjoint_dpm_models::textual_inversion::{add_textual_inversion, TextualInversion};
use adjoint_dpm_models::unet::{load_unet, unet_key_map, UNet2DConditionConfig, UNet2DConditionModel};
use adjoint_dpm_models::vae::{load_vae, AutoencoderKL, AutoencoderKLConfig};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use crate::diffusion::{
    BetaSchedule, DiffusionError, LcmOptions, NoiseLevels, NoiseSchedule, Sampler, SecondOrder, TimestepSpacing,
};
use crate::tasks::common::{Decoder, GradientChoice, SolverChoice};
use crate::tasks::unet_eps::{UnetEps, UnetPrediction};

/// Why a pipeline folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SdError {
    /// A component folder is missing.
    #[error("{dir} is not a diffusers Stable Diffusion folder: it has no {component}/ (expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)")]
    MissingComponent {
        /// The pipeline folder.
        dir: PathBuf,
        /// The missing sub-folder.
        component: &'static str,
    },
    /// A network or the tokenizer failed to load.
    #[error("{component}: {source}")]
    Load {
        /// Which component.
        component: &'static str,
        /// Why.
        source: LoadError,
    },
    /// The scheduler config asks for something unsupported.
    #[error("scheduler config {path}: {message}")]
    Scheduler {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The components do not fit together.
    #[error("the pipeline's components do not fit together: {0}")]
    Mismatch(String),
    /// An image size the UNet and VAE cannot make.
    #[error("{height}×{width} images: the UNet and VAE need multiples of {multiple}, e.g. {near_height}×{near_width}")]
    Resolution {
        /// The height asked.
        height: usize,
        /// The width asked.
        width: usize,
        /// What both must be multiples of.
        multiple: usize,
        /// The nearest height that works, up.
        near_height: usize,
        /// The nearest width that works, up.
        near_width: usize,
    },
    /// A pipeline this crate does not run, named.
    #[error("unsupported pipeline: {0}")]
    Unsupported(String),
    /// An image or mask of another shape than the pipeline's.
    #[error("{0}")]
    InputShape(String),
    /// A `clip_skip` that reaches before a text encoder's embeddings.
    #[error("clip_skip {skip} reaches before the embeddings of {component}, which has {layers} layers")]
    ClipSkip {
        /// The asked skip.
        skip: usize,
        /// The text encoder.
        component: &'static str,
        /// Its layers.
        layers: usize,
    },
}

/// The fields of diffusers' `scheduler_config.json` that define the noise schedule and the
/// timesteps (DDIM/PNDM/DPM-Solver configs all carry them; defaults are diffusers').
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The scheduler class the pipeline was saved with.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// N, the training steps.
    #[serde(default = "defaults::train_steps")]
    pub num_train_timesteps: usize,
    /// First β.
    #[serde(default = "defaults::beta_start")]
    pub beta_start: f64,
    /// Last β.
    #[serde(default = "defaults::beta_end")]
    pub beta_end: f64,
    /// Layout of the βs.
    #[serde(default = "defaults::beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Explicit βs, overriding the above.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "defaults::prediction")]
    pub prediction_type: String,
    /// Added to "leading" timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// The last DDIM step lands on ᾱ = 1 (DDIM's default; SD ships `false`).
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// How the inference timesteps are spread.
    #[serde(default = "defaults::spacing")]
    pub timestep_spacing: TimestepSpacing,
    /// Karras' noise levels instead (a pipeline saved with a "Karras" scheduler).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Levels evenly spaced in log σ instead.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// DPM-Solver's levels evenly spaced in λ instead (those of `use_exponential_sigmas`, with
    /// rounded timesteps).
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// Beta-distribution levels (diffusers' `use_beta_sigmas`): not supported, refused on load.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// PNDM without its Runge–Kutta warm-up, i.e. PLMS (SD 1.x ships `true`).
    #[serde(default)]
    pub skip_prk_steps: bool,
    /// DPM-Solver's variant (`dpmsolver++`, `sde-dpmsolver++`, ...).
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// Order of the multistep schedulers (DPM-Solver, UniPC).
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// DPM-Solver's second-order update (`midpoint`, `heun`) or UniPC's `B(h)` (`bh1`, `bh2`).
    #[serde(default)]
    pub solver_type: Option<String>,
    /// The schedule rescaled to zero terminal SNR
    /// ([`NoiseSchedule::rescale_zero_terminal_snr`]).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Where the schedulers other than DDIM end: `zero` (σ = 0, the default) or `sigma_min`.
    #[serde(default)]
    pub final_sigmas_type: Option<FinalSigmas>,
    /// LCM's distillation timesteps (`LCMScheduler`'s `original_inference_steps`, 50).
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    /// LCM's factor on the timestep in its boundary scalings (`timestep_scaling`, 10).
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
}

/// diffusers' `final_sigmas_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// The last step lands on σ = 0.
    Zero,
    /// The last step lands on the schedule's smallest noise level, σ at ᾱ_0.
    SigmaMin,
}

mod defaults {
    use super::*;
    pub fn train_steps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        1e-4
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn beta_schedule() -> BetaSchedule {
        BetaSchedule::Linear
    }
    pub fn prediction() -> String {
        "epsilon".into()
    }
    pub fn spacing() -> TimestepSpacing {
        TimestepSpacing::Leading
    }
}

impl SchedulerConfig {
    /// The sampler the pipeline was saved with (its `_class_name` and variant), as diffusers'
    /// `pipe.scheduler` would sample, or why there is none here.
    pub fn solver(&self) -> Result<SolverChoice, String> {
        let class = self.class_name.as_deref().unwrap_or("no _class_name");
        let order = self.solver_order.unwrap_or(2);
        let kind = self.solver_type.as_deref();
        let algorithm = self.algorithm_type.as_deref().unwrap_or(match class {
            "DEISMultistepScheduler" => "deis",
            _ => "dpmsolver++",
        });
        match (class, algorithm, order, kind) {
            ("DDIMScheduler", ..) => Ok(SolverChoice::Ddim),
            ("EulerDiscreteScheduler", ..) => Ok(SolverChoice::Euler),
            ("EulerAncestralDiscreteScheduler", ..) => Ok(SolverChoice::EulerAncestral),
            ("HeunDiscreteScheduler", ..) => Ok(SolverChoice::Heun),
            ("LMSDiscreteScheduler", ..) => Ok(SolverChoice::Lms),
            ("LCMScheduler", ..) => Ok(SolverChoice::Lcm),
            ("KDPM2DiscreteScheduler", ..) => Ok(SolverChoice::Dpm2),
            ("KDPM2AncestralDiscreteScheduler", ..) => Ok(SolverChoice::Dpm2Ancestral),
            ("TCDScheduler", ..) => Ok(SolverChoice::Tcd),
            ("PNDMScheduler", ..) if self.skip_prk_steps => Ok(SolverChoice::Plms),
            ("PNDMScheduler", ..) => Err("PNDMScheduler with its Runge-Kutta warm-up (skip_prk_steps false)".into()),
            ("DPMSolverMultistepScheduler", "dpmsolver++", 2, None | Some("midpoint" | "heun")) => {
                Ok(SolverChoice::Dpmpp2m)
            }
            ("DPMSolverMultistepScheduler", "dpmsolver++", 3, None | Some("midpoint" | "heun")) => {
                Ok(SolverChoice::Dpmpp3m)
            }
            ("DPMSolverMultistepScheduler", "sde-dpmsolver++", 2, None | Some("midpoint" | "heun")) => {
                Ok(SolverChoice::Dpmpp2mSde)
            }
            ("DPMSolverMultistepScheduler", "sde-dpmsolver++", 3, None | Some("midpoint" | "heun")) => {
                Ok(SolverChoice::Dpmpp3mSde)
            }
            ("DEISMultistepScheduler", "deis", 2, None | Some("logrho")) => Ok(SolverChoice::Deis),
            ("DEISMultistepScheduler", "deis", 3, None | Some("logrho")) => Ok(SolverChoice::Deis3),
            ("UniPCMultistepScheduler", _, 2, None | Some("bh2")) => Ok(SolverChoice::Unipc),
            ("UniPCMultistepScheduler", _, 2, Some("bh1")) => Ok(SolverChoice::UnipcBh1),
            ("UniPCMultistepScheduler", _, 3, None | Some("bh2")) => Ok(SolverChoice::Unipc3),
            ("DPMSolverMultistepScheduler" | "UniPCMultistepScheduler" | "DEISMultistepScheduler", ..) => Err(format!(
                "{class} with algorithm_type {algorithm:?}, solver_order {order} and solver_type {kind:?}"
            )),
            _ => Err(class.to_string()),
        }
    }

    /// The noise schedule.
    pub fn schedule(&self) -> Result<NoiseSchedule, DiffusionError> {
        let schedule = match &self.trained_betas {
            Some(betas) => NoiseSchedule::from_betas(betas),
            None => NoiseSchedule::new(
                self.beta_schedule,
                self.num_train_timesteps,
                self.beta_start,
                self.beta_end,
            ),
        }?;
        match self.rescale_betas_zero_snr {
            true => schedule.rescale_zero_terminal_snr(),
            false => Ok(schedule),
        }
    }
}

/// The VAE decoder maps latents to images in `[-1, 1]` (diffusers' `vae.decode(z / scale)`).
impl<B: Backend> Decoder<B> for AutoencoderKL<B> {
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        AutoencoderKL::decode(self, latents)
    }
}

/// A loaded Stable Diffusion pipeline.
#[derive(Debug)]
pub struct StableDiffusion<B: Backend> {
    /// The denoiser.
    pub unet: UNet2DConditionModel<B>,
    /// Its config (latent channels and size).
    pub unet_config: UNet2DConditionConfig,
    /// The autoencoder (its decoder turns samples into images).
    pub vae: AutoencoderKL<B>,
    /// Its config (the image size per latent pixel).
    pub vae_config: AutoencoderKLConfig,
    /// The CLIP text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// The CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (with a projection) and its tokenizer.
    pub text_encoder_2: Option<(ClipTextModel<B>, ClipTokenizer)>,
    /// Condition on the hidden state `clip_skip` layers before the text encoders' last
    /// (diffusers' `clip_skip`): SD 1.x/2.x take it through CLIP's final LayerNorm, SDXL takes
    /// the one before it (the penultimate at 0), without.
    pub clip_skip: usize,
    /// An empty negative prompt is zeros rather than the encoded "" (SDXL's
    /// `force_zeros_for_empty_prompt`, from `model_index.json`).
    pub force_zeros_for_empty_prompt: bool,
    /// The guidance scale a latent consistency model's UNet (one with `time_cond_proj_dim`)
    /// is told as a code, in place of classifier-free guidance, as diffusers' pipelines do for
    /// it ([`eps_model`](Self::eps_model); 8.5, the LCM pipeline's default).
    pub guidance_scale: f64,
    /// The images' height and width in pixels (diffusers' `height`, `width`), set by
    /// [`set_resolution`](Self::set_resolution); `None`: the UNet's `sample_size`, square.
    pub resolution: Option<[usize; 2]>,
    /// The scheduler config.
    pub scheduler: SchedulerConfig,
    /// The noise schedule it defines.
    pub schedule: NoiseSchedule,
    /// ControlNets: the folder's `controlnet/` (a `StableDiffusionControlNetPipeline`), and
    /// those added by [`with_controlnet`](Self::with_controlnet); their residuals add up.
    pub controlnets: Vec<ControlNetModel<B>>,
    /// Each ControlNet's image and scale, set by [`set_control`](Self::set_control) (or
    /// [`set_controls`](Self::set_controls)): [`eps_model`](Self::eps_model) conditions on
    /// them; empty: the ControlNets are not run.
    pub control: Vec<(Tensor<B, 4>, f64)>,
}

fn component(dir: &Path, name: &'static str) -> Result<PathBuf, SdError> {
    let path = dir.join(name);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(SdError::MissingComponent {
            dir: dir.into(),
            component: name,
        })
    }
}

/// A prompt as the UNet takes it.
#[derive(Debug, Clone)]
pub struct EncodedPrompt<B: Backend> {
    /// `[rows, tokens, cross_attention_dim]`: CLIP's last hidden state, or for SDXL the two
    /// encoders' penultimate hidden states side by side.
    pub context: Tensor<B, 3>,
    /// SDXL's pooled text embedding (the second encoder's projection), `[rows, width]`.
    pub text_embeds: Option<Tensor<B, 2>>,
    /// The number of the prompt's own tokens (between the start and end tokens).
    pub tokens: usize,
}

impl<B: Backend> EncodedPrompt<B> {
    /// Both tensors cut from the graph.
    pub fn detach(self) -> Self {
        Self {
            context: self.context.detach(),
            text_embeds: self.text_embeds.map(Tensor::detach),
            tokens: self.tokens,
        }
    }

    /// `[self; other]` row-wise (`[uncond; cond]` under guidance).
    pub fn stack(self, other: Self) -> Self {
        Self {
            context: Tensor::cat(vec![self.context, other.context], 0),
            text_embeds: match (self.text_embeds, other.text_embeds) {
                (Some(a), Some(b)) => Some(Tensor::cat(vec![a, b], 0)),
                _ => None,
            },
            tokens: other.tokens,
        }
    }
}

/// Whether `dir` looks like a diffusers pipeline folder (rather than toy weights).
pub fn is_pipeline_dir(dir: &Path) -> bool {
    dir.join("model_index.json").is_file() || dir.join("unet").is_dir()
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads a diffusers pipeline folder; every missing folder, file or key is a typed error.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, SdError> {
        Self::load_from(dir.as_ref(), None, device)
    }

    /// Loads a single-file checkpoint (the original LDM layout of A1111, ComfyUI and most
    /// shared fine-tunes: the UNet, VAE and text encoders in one `.safetensors`; SD 1.x, 2.x or
    /// SDXL, told by its keys) with the configs, tokenizer and scheduler of the diffusers folder
    /// `config_dir` of the same kind (whose weight files, if any, are not read), as diffusers'
    /// `from_single_file(file, config=dir)`.
    pub fn load_single_file(
        file: impl AsRef<Path>,
        config_dir: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<Self, SdError> {
        Self::load_from(config_dir.as_ref(), Some(file.as_ref()), device)
    }

    fn load_from(dir: &Path, single: Option<&Path>, device: &B::Device) -> Result<Self, SdError> {
        let index = read_config::<Value>(dir.join("model_index.json")).ok();
        let flag = |name: &str| index.as_ref().and_then(|i| i.get(name)).and_then(Value::as_bool);
        if flag("requires_aesthetics_score") == Some(true) {
            return Err(SdError::Unsupported(format!(
                "{}: requires_aesthetics_score (the SDXL refiner's aesthetic-score size numbers)",
                dir.display()
            )));
        }
        let paths = [
            component(dir, "unet")?,
            component(dir, "vae")?,
            component(dir, "text_encoder")?,
            component(dir, "tokenizer")?,
            component(dir, "scheduler")?,
        ];
        let load = |component: &'static str| move |source: LoadError| SdError::Load { component, source };
        let scheduler_path = paths[4].join("scheduler_config.json");
        let scheduler: SchedulerConfig = read_config(&scheduler_path).map_err(load("scheduler"))?;
        let schedule = scheduler.schedule().map_err(|e| SdError::Scheduler {
            path: scheduler_path.clone(),
            message: e.to_string(),
        })?;
        if scheduler.use_beta_sigmas {
            return Err(SdError::Scheduler {
                path: scheduler_path,
                message: "use_beta_sigmas (Beta-distribution noise levels) is not supported; use Karras, \
                          exponential or the spaced levels"
                    .into(),
            });
        }
        if !["epsilon", "v_prediction", "sample"].contains(&scheduler.prediction_type.as_str()) {
            return Err(SdError::Scheduler {
                path: scheduler_path,
                message: format!(
                    "prediction_type {:?} is not epsilon, v_prediction or sample",
                    scheduler.prediction_type
                ),
            });
        }
        // A single file's layout, and the text encoder each network's weights come from.
        let layout = single
            .map(|file| single_file_layout(file).map_err(load("single file")))
            .transpose()?;
        let folder_is_sdxl = dir.join("text_encoder_2").is_dir();
        if let (Some(layout), Some(file)) = (layout, single) {
            if (layout == SingleFileLayout::Sdxl) != folder_is_sdxl {
                return Err(SdError::Mismatch(format!(
                    "{} is a {layout:?} single file but the configs' folder {} is {}an SDXL one",
                    file.display(),
                    dir.display(),
                    if folder_is_sdxl { "" } else { "not " }
                )));
            }
        }
        let (unet_config, unet, vae_config, vae, text_config, text_encoder) = match (single, layout) {
            (Some(file), Some(layout)) => {
                let unet_config: UNet2DConditionConfig =
                    read_config(paths[0].join("config.json")).map_err(load("unet"))?;
                let vae_config: AutoencoderKLConfig = read_config(paths[1].join("config.json")).map_err(load("vae"))?;
                let text_config: ClipTextConfig =
                    read_config(paths[2].join("config.json")).map_err(load("text_encoder"))?;
                let unet = unet_config.init(device).map_err(load("unet"))?;
                let map = ldm_unet_key_map(&unet_config).map_err(load("unet"))?;
                let unet = load_safetensors(unet, file, &map).map_err(load("unet"))?;
                let vae = vae_config.init(device).map_err(load("vae"))?;
                let vae = load_safetensors(vae, file, &ldm_vae_key_map(&vae_config)).map_err(load("vae"))?;
                let text_encoder = text_config.init(device).map_err(load("text_encoder"))?;
                let text_encoder = match layout {
                    SingleFileLayout::Sd2 => load_open_clip(text_encoder, file, SD2_OPEN_CLIP),
                    sd1_or_xl => load_safetensors(
                        text_encoder,
                        file,
                        &ldm_clip_key_map(sd1_or_xl == SingleFileLayout::Sdxl),
                    ),
                }
                .map_err(load("text_encoder"))?;
                (unet_config, unet, vae_config, vae, text_config, text_encoder)
            }
            _ => {
                let (unet_config, unet) = load_unet::<B>(&paths[0], device).map_err(load("unet"))?;
                let (vae_config, vae) = load_vae::<B>(&paths[1], device).map_err(load("vae"))?;
                let (text_config, text_encoder) =
                    load_clip_text::<B>(&paths[2], device).map_err(load("text_encoder"))?;
                (unet_config, unet, vae_config, vae, text_config, text_encoder)
            }
        };
        let tokenizer = ClipTokenizer::from_dir(&paths[3]).map_err(load("tokenizer"))?;
        let text_encoder_2 = match (dir.join("text_encoder_2"), dir.join("tokenizer_2")) {
            (enc, tok) if enc.is_dir() && tok.is_dir() => {
                let (config, encoder) = match single {
                    Some(file) => {
                        let config: ClipTextConfig =
                            read_config(enc.join("config.json")).map_err(load("text_encoder_2"))?;
                        let encoder = config.init(device).map_err(load("text_encoder_2"))?;
                        let encoder = load_open_clip(encoder, file, SDXL_OPEN_CLIP).map_err(load("text_encoder_2"))?;
                        (config, encoder)
                    }
                    None => load_clip_text::<B>(&enc, device).map_err(load("text_encoder_2"))?,
                };
                let tokenizer = ClipTokenizer::from_dir(&tok).map_err(load("tokenizer_2"))?;
                Some((config, encoder, tokenizer))
            }
            (enc, _) if enc.is_dir() => {
                return Err(SdError::MissingComponent {
                    dir: dir.into(),
                    component: "tokenizer_2",
                })
            }
            _ => None,
        };
        let context_width =
            text_config.hidden_size + text_encoder_2.as_ref().map_or(0, |(config, _, _)| config.hidden_size);
        let pooled_width = text_encoder_2
            .as_ref()
            .and_then(|(config, _, _)| config.projection_dim.filter(|_| config.with_projection()));
        let cross = unet_config
            .cross_attention_dim
            .get(0, unet_config.block_out_channels.len(), "cross_attention_dim")
            .map_err(load("unet"))?;
        if cross != context_width {
            return Err(SdError::Mismatch(format!(
                "the UNet attends to {cross}-wide context but the text encoders produce {context_width}"
            )));
        }
        if unet.takes_added_conditions() != pooled_width {
            let width = |w: Option<usize>| w.map_or("no".to_string(), |w| format!("a {w}-wide"));
            return Err(SdError::Mismatch(format!(
                "the UNet takes {} pooled text embedding (SDXL's added conditions) but the text encoders \
                 give {} (text_encoder_2's projection)",
                width(unet.takes_added_conditions()),
                width(pooled_width)
            )));
        }
        let force_zeros_for_empty_prompt = flag("force_zeros_for_empty_prompt").unwrap_or(text_encoder_2.is_some());
        if unet_config.class_embed_type.is_some() || unet_config.num_class_embeds.is_some() {
            return Err(SdError::Mismatch(
                "the UNet expects class labels (class_embed_type / num_class_embeds), which a text-to-image \
                 pipeline does not give"
                    .into(),
            ));
        }
        // An inpainting UNet takes the mask and the masked image's latents besides the latent.
        let latent = vae_config.latent_channels;
        if unet_config.out_channels != latent || ![latent, 2 * latent + 1].contains(&unet_config.in_channels) {
            return Err(SdError::Mismatch(format!(
                "the UNet takes {} channels and returns {}, but the VAE's latents have {latent} (an inpainting \
                 UNet takes {})",
                unet_config.in_channels,
                unet_config.out_channels,
                2 * latent + 1
            )));
        }
        Ok(Self {
            unet,
            unet_config,
            vae,
            vae_config,
            text_encoder,
            tokenizer,
            text_encoder_2: text_encoder_2.map(|(_, encoder, tokenizer)| (encoder, tokenizer)),
            force_zeros_for_empty_prompt,
            guidance_scale: 8.5,
            resolution: None,
            clip_skip: 0,
            scheduler,
            schedule,
            controlnets: Vec::new(),
            control: Vec::new(),
        })
        .and_then(|sd| match dir.join("controlnet") {
            path if path.is_dir() => sd.with_controlnet(path),
            _ => Ok(sd),
        })
    }

    /// Adds the diffusers ControlNet folder at `dir` (e.g. lllyasviel/sd-controlnet-canny for
    /// SD 1.5), or a single ControlNet file in the original layout (`control_v11p_sd15_canny`
    /// as safetensors), to the pipeline's (several add their residuals, as diffusers'
    /// `MultiControlNetModel`); [`set_controls`](Self::set_controls) gives each its image. It
    /// must fit the UNet (its residuals, one per skip) and the VAE (its image scale), or the
    /// error says which.
    pub fn with_controlnet(mut self, dir: impl AsRef<Path>) -> Result<Self, SdError> {
        let device = self.unet.conv_in.weight.device();
        let load = |source| SdError::Load {
            component: "controlnet",
            source,
        };
        let path = dir.as_ref();
        let (config, controlnet) = match path.is_file() {
            // One file in the original layout: the base UNet's config with the file's
            // conditioning embedding.
            true => {
                let (config, map) = ldm_controlnet(path, &self.unet_config).map_err(load)?;
                let controlnet = config.init::<B>(&device).map_err(load)?;
                (config.clone(), load_safetensors(controlnet, path, &map).map_err(load)?)
            }
            false => load_controlnet::<B>(path, &device).map_err(load)?,
        };
        if controlnet.residual_channels() != self.unet.skip_channels() {
            return Err(SdError::Mismatch(format!(
                "the ControlNet's residuals have {:?} channels but the UNet's skips {:?}: a ControlNet of another \
                 base model",
                controlnet.residual_channels(),
                self.unet.skip_channels()
            )));
        }
        let cross = |c: &UNet2DConditionConfig| c.cross_attention_dim.get(0, 1, "cross_attention_dim").ok();
        if cross(&config.unet) != cross(&self.unet_config)
            || controlnet.takes_added_conditions() != self.unet.takes_added_conditions()
        {
            return Err(SdError::Mismatch(
                "the ControlNet's text conditioning (cross_attention_dim, SDXL's added conditions) is not the \
                 UNet's: a ControlNet of another base model"
                    .into(),
            ));
        }
        if controlnet.downscale_factor() != self.vae_factor() {
            return Err(SdError::Mismatch(format!(
                "the ControlNet reads images {}× the latent's size but the VAE's factor is {}",
                controlnet.downscale_factor(),
                self.vae_factor()
            )));
        }
        self.controlnets.push(controlnet);
        self.control.clear();
        Ok(self)
    }

    /// Conditions the pipeline's one ControlNet on `image` (`[rows, 3, h, w]` in `[0, 1]`,
    /// `[h, w]` = [`image_shape`](Self::image_shape), as diffusers' control image processor
    /// makes it: no normalisation to `[-1, 1]`) with the weight `scale` (diffusers'
    /// `controlnet_conditioning_scale`, 1 by default). The image stays trainable if it requires
    /// a gradient. With several ControlNets, [`set_controls`](Self::set_controls).
    pub fn set_control(&mut self, image: Tensor<B, 4>, scale: f64) -> Result<(), SdError> {
        self.set_controls(vec![(image, scale)])
    }

    /// Conditions each ControlNet, in order, on its image and scale (see
    /// [`set_control`](Self::set_control)); there must be one of each per ControlNet.
    pub fn set_controls(&mut self, controls: Vec<(Tensor<B, 4>, f64)>) -> Result<(), SdError> {
        if self.controlnets.len() != controls.len() {
            return Err(SdError::InputShape(format!(
                "{} control image(s) for {} ControlNet(s) (a controlnet/ folder, or with_controlnet)",
                controls.len(),
                self.controlnets.len()
            )));
        }
        let [h, w] = self.image_shape();
        for (controlnet, (image, scale)) in self.controlnets.iter().zip(&controls) {
            let dims = image.dims();
            if dims[1..] != [controlnet.conditioning_channels(), h, w] || dims[0] == 0 {
                return Err(SdError::InputShape(format!(
                    "the control image must be [rows, {}, {h}, {w}], got {dims:?}",
                    controlnet.conditioning_channels()
                )));
            }
            if !scale.is_finite() {
                return Err(SdError::InputShape(format!(
                    "the control scale must be finite, got {scale}"
                )));
            }
        }
        self.control = controls;
        Ok(())
    }

    /// The latent shape of one sample, `[channels, h, w]`: the [`resolution`](Self::resolution)
    /// over the VAE's factor, or the UNet's `sample_size`.
    pub fn latent_shape(&self) -> [usize; 3] {
        let c = self.unet_config.out_channels;
        if let Some([h, w]) = self.resolution {
            return [c, h / self.vae_factor(), w / self.vae_factor()];
        }
        let size = self
            .unet_config
            .sample_size
            .as_ref()
            .and_then(|s| s.get(0, 1, "sample_size").ok())
            .unwrap_or(64);
        [c, size, size]
    }

    /// Pixels per latent pixel, `2^(VAE blocks − 1)` (8 in SD).
    fn vae_factor(&self) -> usize {
        1 << (self.vae_config.block_out_channels.len().max(1) - 1)
    }

    /// Generates `height × width` images (diffusers' `height`, `width`; SDXL's size numbers
    /// follow). Both must be multiples of the VAE's factor times the UNet's downsampling, `2^(VAE
    /// blocks − 1) · 2^(UNet blocks − 1)` (64 in SD), or the error names the nearest that are.
    pub fn set_resolution(&mut self, height: usize, width: usize) -> Result<(), SdError> {
        let multiple = self.vae_factor() << (self.unet_config.block_out_channels.len().max(1) - 1);
        if height == 0 || width == 0 || !height.is_multiple_of(multiple) || !width.is_multiple_of(multiple) {
            let near = |v: usize| (v.div_ceil(multiple)).max(1) * multiple;
            return Err(SdError::Resolution {
                height,
                width,
                multiple,
                near_height: near(height),
                near_width: near(width),
            });
        }
        self.resolution = Some([height, width]);
        Ok(())
    }

    /// The images' `[height, width]` in pixels.
    pub fn image_shape(&self) -> [usize; 2] {
        let [_, h, w] = self.latent_shape();
        [h * self.vae_factor(), w * self.vae_factor()]
    }

    /// Whether the UNet is an inpainting one: more input channels than it returns (9 against 4
    /// in SD's inpainting checkpoints), the mask and the masked image's latents.
    pub fn is_inpainting(&self) -> bool {
        self.unet.conv_in.weight.dims()[1] > self.unet.conv_out.weight.dims()[0]
    }

    /// An inpainting UNet's conditions from `image` (`[1, 3, h, w]` in `[-1, 1]`, `[h, w]` =
    /// [`image_shape`](Self::image_shape)) and `mask` (`[1, 1, h, w]`, painted where ≥ 0.5), as
    /// diffusers' `StableDiffusionInpaintPipeline` prepares them: the mask binarised and taken
    /// at the latent's size (nearest), and the VAE's latents of the image with the painted part
    /// zeroed. Its posterior mean: diffusers samples the posterior with the pipeline's
    /// generator. For [`UnetEps::with_inpainting`]; differentiable in `image`.
    pub fn inpainting_conditions(
        &self,
        image: Tensor<B, 4>,
        mask: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>), SdError> {
        let [h, w] = self.image_shape();
        if image.dims() != [1, 3, h, w] || mask.dims() != [1, 1, h, w] {
            return Err(SdError::InputShape(format!(
                "inpainting takes an image [1, 3, {h}, {w}] and a mask [1, 1, {h}, {w}], got {:?} and {:?}",
                image.dims(),
                mask.dims()
            )));
        }
        let painted = mask.greater_equal_elem(0.5).float();
        let kept = painted.clone().neg().add_scalar(1.0);
        let latents = self.vae.encode_mean(image * kept);
        // torch's nearest: source index ⌊i · size / n⌋ along each axis.
        let device = latents.device();
        let nearest = |size: usize, n: usize| {
            let index: Vec<i64> = (0..n).map(|i| (i * size / n) as i64).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [n]), &device)
        };
        let [_, _, lh, lw] = latents.dims();
        let mask = painted.select(2, nearest(h, lh)).select(3, nearest(w, lw));
        Ok((mask, latents))
    }

    /// The decoded images' height (`latent height · 2^(VAE blocks − 1)`; their width too
    /// unless [`set_resolution`](Self::set_resolution) made them otherwise:
    /// [`image_shape`](Self::image_shape)).
    pub fn image_size(&self) -> usize {
        self.image_shape()[0]
    }

    /// A prompt as diffusers' pipeline encodes it, one row: CLIP's last hidden state
    /// (`[1, max_length, hidden]`); for SDXL both encoders' penultimate hidden states side by
    /// side and the second's projected pooled output. [`clip_skip`](Self::clip_skip) moves
    /// both back by that many layers.
    pub fn encode_prompt(&self, prompt: &str, device: &B::Device) -> Result<EncodedPrompt<B>, SdError> {
        self.encode_skipping(prompt, self.clip_skip, device)
    }

    fn encode_skipping(&self, prompt: &str, skip: usize, device: &B::Device) -> Result<EncodedPrompt<B>, SdError> {
        let tokenize = |tokenizer: &ClipTokenizer, component: &'static str| {
            let err = |source| SdError::Load { component, source };
            let ids = tokenizer.encode(prompt).map_err(err)?;
            let tokens = ids.iter().skip(1).take_while(|&&id| id != tokenizer.eos_id).count();
            Ok::<_, SdError>((tokenizer.encode_batch::<B>(&[prompt], device).map_err(err)?, tokens))
        };
        // The hidden state `back` layers before the last (`hidden_states` holds the
        // embeddings' output, then each layer's).
        let before_last = |states: &[Tensor<B, 3>], back: usize, component| {
            let layers = states.len() - 1;
            match layers.checked_sub(back) {
                Some(i) => Ok(states[i].clone()),
                None => Err(SdError::ClipSkip {
                    skip,
                    component,
                    layers,
                }),
            }
        };
        let (ids, tokens) = tokenize(&self.tokenizer, "tokenizer")?;
        let out = self.text_encoder.forward(ids);
        let Some((encoder_2, tokenizer_2)) = &self.text_encoder_2 else {
            let context = match skip {
                0 => out.last_hidden_state,
                _ => layer_norm(
                    &self.text_encoder.final_layer_norm,
                    before_last(&out.hidden_states, skip, "text_encoder")?,
                ),
            };
            return Ok(EncodedPrompt {
                context,
                text_embeds: None,
                tokens,
            });
        };
        let (ids_2, _) = tokenize(tokenizer_2, "tokenizer_2")?;
        let out_2 = encoder_2.forward(ids_2);
        Ok(EncodedPrompt {
            context: Tensor::cat(
                vec![
                    before_last(&out.hidden_states, skip + 1, "text_encoder")?,
                    before_last(&out_2.hidden_states, skip + 1, "text_encoder_2")?,
                ],
                2,
            ),
            text_embeds: out_2.text_embeds,
            tokens,
        })
    }

    /// The unconditional prompt of classifier-free guidance: the encoded "", or zeros where
    /// the pipeline forces them (SDXL). As in diffusers, `clip_skip` does not apply to it.
    pub fn negative_prompt(&self, device: &B::Device) -> Result<EncodedPrompt<B>, SdError> {
        self.encode_negative_prompt("", device)
    }

    /// A negative prompt (diffusers' `negative_prompt`), which classifier-free guidance steers
    /// away from: encoded as a prompt without `clip_skip`, as diffusers does; empty, the
    /// unconditional [`negative_prompt`](Self::negative_prompt).
    pub fn encode_negative_prompt(&self, text: &str, device: &B::Device) -> Result<EncodedPrompt<B>, SdError> {
        if !text.is_empty() {
            return self.encode_skipping(text, 0, device);
        }
        let empty = self.encode_skipping("", 0, device)?;
        if !self.force_zeros_for_empty_prompt {
            return Ok(empty);
        }
        Ok(EncodedPrompt {
            context: empty.context.zeros_like(),
            text_embeds: empty.text_embeds.map(|t| t.zeros_like()),
            tokens: 0,
        })
    }

    /// SDXL's size numbers for an uncropped image of the pipeline's size: `[h, w, 0, 0, h, w]`.
    pub fn time_ids(&self) -> [f64; 6] {
        let [h, w] = self.image_shape().map(|v| v as f64);
        [h, w, 0.0, 0.0, h, w]
    }

    /// Whether the UNet is told the guidance scale as a code (a latent consistency model,
    /// `time_cond_proj_dim`), so that diffusers runs it without classifier-free guidance.
    pub fn embeds_guidance(&self) -> bool {
        self.unet.takes_timestep_cond().is_some()
    }

    /// The ε-model of the UNet conditioned on `prompt` (`rows` rows; see [`UnetEps`]),
    /// converting v- or x₀-predictions as the scheduler config says, and for a latent
    /// consistency model told [`guidance_scale`](Self::guidance_scale), with the ControlNets and
    /// their images when [`set_control`](Self::set_control) gave them. Its conditioning is
    /// trainable as given (a tensor that requires a gradient) and constant otherwise.
    pub fn eps_model(&self, prompt: EncodedPrompt<B>) -> UnetEps<B> {
        let prediction = match self.scheduler.prediction_type.as_str() {
            "v_prediction" => UnetPrediction::V(self.schedule.clone()),
            "sample" => UnetPrediction::Sample(self.schedule.clone()),
            _ => UnetPrediction::Epsilon,
        };
        let trainable = prompt.context.is_require_grad();
        let mut model = UnetEps::new(self.unet.clone(), prompt.context).with_prediction(prediction);
        if let Some(pooled) = prompt.text_embeds {
            model = model.with_added_conditions(pooled, self.time_ids());
        }
        if self.embeds_guidance() {
            model = model.with_guidance_scale(self.guidance_scale);
        }
        if !trainable {
            model = model.frozen_conditioning();
        }
        for (controlnet, (image, scale)) in self.controlnets.iter().zip(&self.control) {
            let trainable = image.is_require_grad();
            model = model.with_control(controlnet.clone(), image.clone(), *scale);
            if let (Some(control), false) = (model.control.last_mut(), trainable) {
                control.image = control.image.clone().set_require_grad(false);
            }
        }
        crate::ode::materialized(model)
    }

    /// The sampler with the pipeline's timestep settings (spacing, `steps_offset`, noise
    /// levels, DPM-Solver++'s second-order update, and where the last step lands:
    /// `set_alpha_to_one` for DDIM and PLMS, `final_sigmas_type` for the others), as diffusers'
    /// `Scheduler.from_config(pipe.scheduler.config)`.
    pub fn sampler(&self, solver: SolverChoice, steps: usize, gradient: GradientChoice) -> Sampler {
        let mut sampler = solver.sampler(steps, gradient);
        let config = &self.scheduler;
        sampler.spacing = config.timestep_spacing;
        sampler.steps_offset = config.steps_offset;
        sampler.final_alpha_one = match solver {
            SolverChoice::Ddim => config.set_alpha_to_one.unwrap_or(true),
            SolverChoice::Plms => config.set_alpha_to_one.unwrap_or(false),
            // DEIS always ends on the schedule's smallest level.
            SolverChoice::Deis | SolverChoice::Deis3 => false,
            _ => config.final_sigmas_type != Some(FinalSigmas::SigmaMin),
        };
        let lcm_defaults = LcmOptions::default();
        sampler.lcm = LcmOptions {
            original_steps: config.original_inference_steps.unwrap_or(lcm_defaults.original_steps),
            timestep_scaling: config.timestep_scaling.unwrap_or(lcm_defaults.timestep_scaling),
        };
        // DPM-Solver++'s second-order update (UniPC's solver_type is its B(h), in its kind).
        if config.solver_type.as_deref() == Some("heun") {
            sampler = sampler.second_order(SecondOrder::Heun);
        }
        let levels = [
            (config.use_karras_sigmas, NoiseLevels::Karras),
            (config.use_exponential_sigmas, NoiseLevels::Exponential),
            (config.use_lu_lambdas, NoiseLevels::LuLambdas),
        ];
        match levels.into_iter().find(|(on, _)| *on) {
            Some((_, levels)) => sampler.noise_levels(levels),
            None => sampler,
        }
    }

    /// Fuses the LoRA checkpoint at `path` (diffusers/peft or kohya keys; LCM-LoRA, style
    /// LoRAs) into the UNet and text encoders, scaled by `scale`, as diffusers'
    /// `load_lora_weights` + `fuse_lora(lora_scale)`: `W += scale · (α/r) · B A`, α from the
    /// file's `.alpha` (else r). Every key must belong to one of them; returns the layers
    /// changed.
    pub fn fuse_lora(mut self, path: &Path, scale: f64) -> Result<(Self, usize), SdError> {
        let load = |source| SdError::Load {
            component: "LoRA",
            source,
        };
        let prefixes = |peft, kohya| LoraPrefixes { peft, kohya };
        let (unet, unet_fused) = fuse_lora(
            self.unet,
            path,
            prefixes("unet", &["lora_unet"]),
            &unet_key_map(),
            scale,
        )
        .map_err(load)?;
        self.unet = unet;
        let (text_encoder, te_fused) = fuse_lora(
            self.text_encoder,
            path,
            prefixes("text_encoder", &["lora_te", "lora_te1"]),
            &clip_key_map(),
            scale,
        )
        .map_err(load)?;
        self.text_encoder = text_encoder;
        let mut layers = unet_fused.layers + te_fused.layers;
        let mut leftover: HashSet<String> = unet_fused.other_keys.into_iter().collect();
        leftover.retain(|k| te_fused.other_keys.contains(k));
        if let Some((encoder, tokenizer)) = self.text_encoder_2 {
            let (encoder, fused) = fuse_lora(
                encoder,
                path,
                prefixes("text_encoder_2", &["lora_te2"]),
                &clip_key_map(),
                scale,
            )
            .map_err(load)?;
            layers += fused.layers;
            leftover.retain(|k| fused.other_keys.contains(k));
            self.text_encoder_2 = Some((encoder, tokenizer));
        }
        if !leftover.is_empty() {
            let mut keys: Vec<_> = leftover.into_iter().collect();
            keys.sort();
            return Err(load(LoadError::Lora {
                path: path.into(),
                message: format!(
                    "{} keys belong to no network of the pipeline, e.g. {}",
                    keys.len(),
                    keys[..keys.len().min(3)].join(", ")
                ),
            }));
        }
        Ok((self, layers))
    }

    /// Adds the textual-inversion embedding in the file at `path` (diffusers', A1111's or
    /// SDXL's layout, see [`TextualInversion`]) to the tokenizers and text encoders, as
    /// diffusers' `load_textual_inversion(path, token=token)`: prompts (and negative prompts)
    /// then name it by its token, which `token` overrides (default: the file's key in diffusers'
    /// layout, else the file's stem, as A1111 names embeddings). Returns the tokens added.
    pub fn load_textual_inversion(mut self, path: &Path, token: Option<&str>) -> Result<(Self, Vec<String>), SdError> {
        let load = |source| SdError::Load {
            component: "textual inversion",
            source,
        };
        let inversion = TextualInversion::read(path, token).map_err(load)?;
        let tables = inversion.tables.len();
        let encoders = 1 + usize::from(self.text_encoder_2.is_some());
        if tables != encoders {
            return Err(SdError::Mismatch(format!(
                "{}: {tables} embedding table(s) for {encoders} text encoder(s) (SDXL's files hold clip_l and \
                 clip_g)",
                path.display()
            )));
        }
        self.text_encoder =
            add_textual_inversion(&mut self.tokenizer, self.text_encoder, &inversion, 0).map_err(load)?;
        if let Some((encoder, mut tokenizer)) = self.text_encoder_2 {
            let encoder = add_textual_inversion(&mut tokenizer, encoder, &inversion, 1).map_err(load)?;
            self.text_encoder_2 = Some((encoder, tokenizer));
        }
        let tokens = inversion.tokens(0);
        Ok((self, tokens))
    }

    /// The pipeline with every network frozen (the tasks unfreeze what they train).
    pub fn frozen(self) -> Self {
        Self {
            unet: self.unet.no_grad(),
            vae: self.vae.no_grad(),
            text_encoder: self.text_encoder.no_grad(),
            text_encoder_2: self.text_encoder_2.map(|(e, t)| (e.no_grad(), t)),
            controlnets: self.controlnets.into_iter().map(Module::no_grad).collect(),
            ..self
        }
    }
}
