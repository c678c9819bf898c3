//! A diffusers UNet with its conditioning held as a parameter: the shape of a text-conditioned
//! Stable Diffusion denoiser, as an [`EpsModel`].

use adjoint_dpm_models::controlnet::ControlNetModel;
use adjoint_dpm_models::embeddings::guidance_scale_embedding;
use adjoint_dpm_models::unet::{AddedConditions, UNet2DConditionModel, UnetConditions};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::diffusion::{DiffusionError, EpsModel, NoiseSchedule};

/// What the UNet predicts (diffusers' `prediction_type`); [`UnetEps`] always returns ε.
#[derive(Debug, Clone, Default)]
pub enum UnetPrediction {
    /// The noise ε (SD 1.x, SD 2.x base).
    #[default]
    Epsilon,
    /// `v = α ε − σ x_0` (SD 2.x 768): `ε = σ x + α v`.
    V(NoiseSchedule),
    /// The clean sample x_0: `ε = (x − α x_0)/σ`.
    Sample(NoiseSchedule),
}

/// ε(x, t) = UNet(x, t, context), and for SDXL also of the pooled text embedding and the size
/// numbers ([`with_added_conditions`](Self::with_added_conditions)), for a latent consistency
/// model of the guidance scale's code ([`with_guidance_scale`](Self::with_guidance_scale)), for
/// an inpainting UNet of the mask and the masked image's latents, concatenated to its input
/// ([`with_inpainting`](Self::with_inpainting)), and of a ControlNet's residuals from a control
/// image ([`with_control`](Self::with_control)). Freeze `unet` (`no_grad`)
/// and keep `context` trainable to differentiate w.r.t. the text embedding (embedding
/// inversion); freeze `context` to tune weights.
///
/// The context holds `r` rows that split the batch into `r` equal consecutive groups: one row
/// for any batch, one per sample, or `[uncond; cond]` under [`crate::diffusion::Cfg`] (which
/// calls the model on `[x; x]`).
///
/// # Panics
/// `eps` panics when the batch is not a multiple of the context's rows: the model fixes its
/// conditioning per group of samples. [`EpsModel::check_batch`] says so first as an error, and
/// the samplers call it before their first step.
#[derive(Module, Debug)]
pub struct UnetEps<B: Backend> {
    /// The noise-prediction UNet.
    pub unet: UNet2DConditionModel<B>,
    /// `[rows, tokens, cross_attention_dim]` (e.g. `[1, 77, 768]` CLIP text embeddings).
    pub context: Param<Tensor<B, 3>>,
    /// What the UNet predicts.
    #[module(skip)]
    pub prediction: UnetPrediction,
    /// SDXL's pooled text embedding, `[rows, width]`, one row per context row (`None` for a
    /// UNet without `add_embedding`).
    pub text_embeds: Option<Param<Tensor<B, 2>>>,
    /// SDXL's size and crop numbers, `[original h, original w, crop top, crop left, target h,
    /// target w]`, the same for every row.
    #[module(skip)]
    pub time_ids: [f64; 6],
    /// When set, only these token positions of the context receive gradients (the tokens an
    /// embedding inversion learns); the rest act as constants.
    #[module(skip)]
    pub trainable_tokens: Option<(usize, usize)>,
    /// The guidance scale a latent consistency model is told as a code (`timestep_cond`),
    /// for a UNet with `time_cond_proj_dim`.
    #[module(skip)]
    pub guidance_scale: Option<f64>,
    /// An inpainting UNet's extra input channels, `[rows, 1 + latent channels, h, w]`: the
    /// mask (1 where the image is to be painted) and the masked image's latents. Trainable
    /// unless frozen (an attack on the image to be edited trains the latents).
    pub inpaint: Option<Param<Tensor<B, 4>>>,
    /// ControlNets with their control images; their residuals add up (diffusers'
    /// `MultiControlNetModel`).
    pub control: Vec<Control<B>>,
}

/// A ControlNet with the control image it reads, for [`UnetEps::with_control`].
#[derive(Module, Debug)]
pub struct Control<B: Backend> {
    /// The ControlNet (trainable unless frozen: `no_grad`).
    pub net: ControlNetModel<B>,
    /// `[rows, conditioning channels, H, W]` in `[0, 1]`, at the image's size (the latent's
    /// times the VAE's factor). Trainable unless frozen.
    pub image: Param<Tensor<B, 4>>,
    /// diffusers' `controlnet_conditioning_scale`: the residuals' weight.
    pub scale: f64,
}

impl<B: Backend> UnetEps<B> {
    /// An ε-prediction UNet with `context` as its (trainable, unless frozen) conditioning.
    pub fn new(unet: UNet2DConditionModel<B>, context: Tensor<B, 3>) -> Self {
        Self {
            unet,
            context: Param::from_tensor(context),
            prediction: UnetPrediction::Epsilon,
            text_embeds: None,
            time_ids: [0.0; 6],
            trainable_tokens: None,
            guidance_scale: None,
            inpaint: None,
            control: Vec::new(),
        }
    }

    /// Adds a ControlNet's residuals to the UNet's skips and mid block, as diffusers'
    /// `StableDiffusionControlNetPipeline` (and its SDXL, img2img and inpainting variants) do:
    /// `controlnet` reads the latent (without an inpainting UNet's extra channels), the text
    /// context and `image` (`[rows, 3, H, W]` in `[0, 1]`, the image's size; rows tiled over the
    /// batch as [`with_inpainting`](Self::with_inpainting)'s), and its residuals are weighted by
    /// `scale`. The image and the ControlNet's weights are trainable as given, unless frozen:
    /// the exact adjoint reaches both. Called again, it adds another ControlNet, whose
    /// residuals add to the first's, as diffusers' `MultiControlNetModel` sums them.
    ///
    /// # Panics
    /// `eps` panics if the image's size is not the latent's times the ControlNet's
    /// [`downscale_factor`](ControlNetModel::downscale_factor)
    /// ([`StableDiffusion::set_control`] checks it is the pipeline's); [`EpsModel::check_batch`]
    /// says first, as an error, when the ControlNet does not fit the UNet.
    ///
    /// [`StableDiffusion::set_control`]: crate::tasks::StableDiffusion::set_control
    pub fn with_control(mut self, controlnet: ControlNetModel<B>, image: Tensor<B, 4>, scale: f64) -> Self {
        self.control.push(Control {
            // Clones of a lazily initialised weight would each draw their own.
            net: crate::ode::materialized(controlnet),
            image: Param::from_tensor(image),
            scale,
        });
        self
    }

    /// Conditions an inpainting UNet (`in_channels` 9: the latent, the mask, the masked image's
    /// latents, as diffusers' `StableDiffusionInpaintPipeline` concatenates them) on `mask`
    /// (`[rows, 1, h, w]`, 1 where the image is to be painted, at the latent's size) and
    /// `masked_image_latents` (`[rows, c, h, w]`). Their `rows` are tiled over the batch
    /// (`i % rows`: one row for every sample, or one per sample, also under classifier-free
    /// guidance's `[x; x]`). Trainable as given, unless frozen.
    ///
    /// # Panics
    /// If `mask` and `masked_image_latents` differ in rows or size; and `eps` does if that size
    /// is not the sample's ([`StableDiffusion::inpainting_conditions`] makes both at the
    /// latent's size).
    ///
    /// [`StableDiffusion::inpainting_conditions`]: crate::tasks::StableDiffusion::inpainting_conditions
    pub fn with_inpainting(mut self, mask: Tensor<B, 4>, masked_image_latents: Tensor<B, 4>) -> Self {
        self.inpaint = Some(Param::from_tensor(Tensor::cat(vec![mask, masked_image_latents], 1)));
        self
    }

    /// Tells a latent consistency model (a UNet with `time_cond_proj_dim`) the guidance scale
    /// `scale` through its guidance-scale code, as diffusers' pipelines do for such a UNet
    /// (which they then run without classifier-free guidance).
    pub fn with_guidance_scale(mut self, scale: f64) -> Self {
        self.guidance_scale = Some(scale);
        self
    }

    /// Adds SDXL's conditions: `text_embeds` (`[rows, width]`, the second text encoder's
    /// projected pooled output, a row per context row; trainable unless frozen) and the
    /// `time_ids` of every row (for an image of side s, uncropped: `[s, s, 0, 0, s, s]`).
    pub fn with_added_conditions(mut self, text_embeds: Tensor<B, 2>, time_ids: [f64; 6]) -> Self {
        self.text_embeds = Some(Param::from_tensor(text_embeds));
        self.time_ids = time_ids;
        self
    }

    /// The model with its conditioning (context and pooled embedding) constant: what tuning
    /// the weights, or sampling, wants.
    pub fn frozen_conditioning(mut self) -> Self {
        self.context = self.context.set_require_grad(false);
        self.text_embeds = self.text_embeds.map(|p| p.set_require_grad(false));
        self.inpaint = self.inpaint.map(|p| p.set_require_grad(false));
        for control in &mut self.control {
            control.image = control.image.clone().set_require_grad(false);
        }
        self
    }

    /// Rows tiled over the batch, `i % rows` (one row for every sample, or one per sample,
    /// also under classifier-free guidance's `[x; x]`).
    fn tiled(rows: Tensor<B, 4>, batch: usize) -> Tensor<B, 4> {
        let n = rows.dims()[0];
        if n == batch {
            return rows;
        }
        let index: Vec<i64> = (0..batch).map(|i| (i % n) as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch]), &rows.device());
        rows.select(0, index)
    }

    /// Repeats each of `rows` conditioning rows over its group of `batch / rows` samples.
    fn per_sample<const D: usize>(rows: Tensor<B, D>, batch: usize) -> Tensor<B, D> {
        let n = rows.dims()[0];
        if n == batch {
            return rows;
        }
        let index: Vec<i64> = (0..batch).map(|i| (i / (batch / n)) as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch]), &rows.device());
        rows.select(0, index)
    }

    /// Sets what the UNet predicts.
    pub fn with_prediction(mut self, prediction: UnetPrediction) -> Self {
        self.prediction = prediction;
        self
    }

    /// Restricts the context's gradient to token positions `start..end`.
    pub fn with_trainable_tokens(mut self, start: usize, end: usize) -> Self {
        self.trainable_tokens = Some((start, end));
        self
    }

    /// The context as the UNet sees it, one row per sample.
    ///
    /// # Panics
    /// If the batch is not a multiple of the context's rows (a programming error).
    fn context_for(&self, batch: usize) -> Tensor<B, 3> {
        let mut context = self.context.val();
        let tokens = context.dims()[1];
        if let Some((start, end)) = self.trainable_tokens {
            let (start, end) = (start.min(tokens), end.min(tokens));
            let keep: Vec<f32> = (0..tokens)
                .map(|i| if (start..end).contains(&i) { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::<B, 1>::from_data(TensorData::new(keep, [tokens]), (&context.device(), context.dtype()))
                .reshape([1, tokens, 1]);
            context = context.clone().detach() * (mask.clone().neg().add_scalar(1.0)) + context * mask;
        }
        if let Err(e) = self.check_batch(batch) {
            panic!("{e}");
        }
        Self::per_sample(context, batch)
    }

    /// SDXL's added conditions, one row per sample, for a UNet that takes them.
    fn added_for(&self, batch: usize, device: &B::Device) -> Option<AddedConditions<B>> {
        let text_embeds = Self::per_sample(self.text_embeds.as_ref()?.val(), batch);
        let ids: Vec<f64> = (0..batch).flat_map(|_| self.time_ids).collect();
        let time_ids = Tensor::<B, 2>::from_data(TensorData::new(ids, [batch, 6]), (device, text_embeds.dtype()));
        Some(AddedConditions { text_embeds, time_ids })
    }
}

impl<B: Backend> EpsModel<B, 4> for UnetEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        let time = t.clone();
        let t = if t.dims()[0] == batch {
            t
        } else {
            t.repeat_dim(0, batch)
        };
        let context = self.context_for(batch);
        let added = self.added_for(batch, &x.device());
        let control = self.control.iter().map(|c| {
            let image = Self::tiled(c.image.val(), batch);
            let conditions = UnetConditions {
                added: added.clone(),
                ..UnetConditions::default()
            };
            c.net
                .forward(x.clone(), t.clone(), context.clone(), image, c.scale, &conditions)
        });
        let control = control.reduce(|a, b| a + b);
        let conditions = UnetConditions {
            added,
            timestep_cond: self
                .guidance_scale
                .zip(self.unet.takes_timestep_cond())
                .map(|(scale, width)| guidance_scale_embedding(scale, batch, width, &x.device(), x.dtype())),
            class_labels: None,
            control,
        };
        let input = match &self.inpaint {
            Some(extra) => Tensor::cat(vec![x.clone(), Self::tiled(extra.val(), batch)], 1),
            None => x.clone(),
        };
        let out = self.unet.forward_conditioned(input, t, context, conditions);
        let at = |schedule: &NoiseSchedule| {
            let t: f64 = time.clone().narrow(0, 0, 1).into_scalar().elem();
            (schedule.alpha(t), schedule.sigma(t))
        };
        match &self.prediction {
            UnetPrediction::Epsilon => out,
            UnetPrediction::V(schedule) => {
                let (alpha, sigma) = at(schedule);
                x.mul_scalar(sigma) + out.mul_scalar(alpha)
            }
            UnetPrediction::Sample(schedule) => {
                let (alpha, sigma) = at(schedule);
                (x - out.mul_scalar(alpha)).div_scalar(sigma)
            }
        }
    }

    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        let rows = self.context.val().dims()[0];
        if !batch.is_multiple_of(rows) {
            return Err(DiffusionError::BatchMismatch {
                batch,
                reason: format!("the context has {rows} rows, and a batch must be a multiple of that"),
            });
        }
        let unet_in = self.unet.conv_in.weight.dims()[1];
        let unet_out = self.unet.conv_out.weight.dims()[0];
        let extra = self.inpaint.as_ref().map(|p| p.val().dims());
        match extra {
            Some(dims) if unet_out + dims[1] != unet_in || !batch.is_multiple_of(dims[0]) => {
                return Err(DiffusionError::ConditioningShape {
                    name: "the inpainting channels (mask and masked image latents; their rows must divide the batch)",
                    expected: vec![dims[0], unet_in.saturating_sub(unet_out), dims[2], dims[3]],
                    got: dims.to_vec(),
                })
            }
            None if unet_in != unet_out => {
                return Err(DiffusionError::ConditioningShape {
                    name: "the inpainting channels (the UNet takes more input channels than it returns: \
                           UnetEps::with_inpainting)",
                    expected: vec![1, unet_in.saturating_sub(unet_out)],
                    got: vec![],
                })
            }
            _ => {}
        }
        for control in &self.control {
            let dims = control.image.val().dims();
            let channels = control.net.conditioning_channels();
            if dims[1] != channels || !batch.is_multiple_of(dims[0]) {
                return Err(DiffusionError::ConditioningShape {
                    name: "the control image (its rows must divide the batch)",
                    expected: vec![dims[0], channels, dims[2], dims[3]],
                    got: dims.to_vec(),
                });
            }
            if control.net.residual_channels() != self.unet.skip_channels() {
                return Err(DiffusionError::ConditioningShape {
                    name: "the ControlNet's residuals (channels per skip: not this UNet's ControlNet)",
                    expected: self.unet.skip_channels(),
                    got: control.net.residual_channels(),
                });
            }
        }
        if let (Some(scale), None) = (self.guidance_scale, self.unet.takes_timestep_cond()) {
            return Err(DiffusionError::BadGuidance {
                reason: format!(
                    "guidance scale {scale} given as a code (timestep_cond), but the UNet has no time_cond_proj_dim"
                ),
            });
        }
        let given = self.text_embeds.as_ref().map(|p| p.val().dims());
        match (self.unet.takes_added_conditions(), given) {
            (None, None) => Ok(()),
            (Some(width), Some(dims)) if dims == [rows, width] => Ok(()),
            (None, Some(dims)) => Err(DiffusionError::ConditioningShape {
                name: "text_embeds (the UNet has no add_embedding)",
                expected: vec![],
                got: dims.to_vec(),
            }),
            (Some(width), got) => Err(DiffusionError::ConditioningShape {
                name: "text_embeds (SDXL's pooled text embedding, a row per context row)",
                expected: vec![rows, width],
                got: got.map(|d| d.to_vec()).unwrap_or_default(),
            }),
        }
    }
}
