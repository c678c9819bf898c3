//! ControlNet: diffusers' `ControlNetModel`, a trainable copy of the UNet's input path that
//! reads a control image (edges, depth, pose...) and returns residuals for the UNet's skips and
//! mid block ([`ControlResiduals`]).
//!
//! Mirrors `src/diffusers/models/controlnets/controlnet.py` for the options SD 1.x, 2.x and
//! SDXL ControlNets use. The copy is built by the UNet's own config code
//! ([`UNet2DConditionConfig`]), so its blocks and keys are the UNet's; what is new is the
//! conditioning embedding (a small strided CNN from the image to the latent's size) and the
//! 1×1 "zero" convolutions that turn each skip into a residual.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::activation::silu_exact as silu;
use crate::embeddings::TimestepEmbedding;
use crate::load::{load_diffusers_dir, LoadError};
use crate::resnet_block::conv2d;
use crate::unet::{unet_key_map, ClassEmbedding, ControlResiduals, Embedders, UNet2DConditionConfig, UnetConditions};
use crate::unet_blocks::{DownBlock2D, UNetMidBlock2DCrossAttn};

/// diffusers' `ControlNetModel` config, deserialised from its `config.json`: the UNet's keys
/// (those of its input path; the rest keep their defaults) and the conditioning ones.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ControlNetConfig {
    /// The copied UNet's settings.
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
    /// Channels of the control image (3).
    #[serde(default = "ControlNetConfig::conditioning_channels")]
    pub conditioning_channels: usize,
    /// Widths of the conditioning embedding's stages; each stage after the first halves the
    /// image, so `n` stages shrink it by `2^(n−1)`, the VAE's factor.
    #[serde(default = "ControlNetConfig::conditioning_embedding_out_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `"rgb"`, or `"bgr"` for ControlNets trained on BGR images (the image's channels are
    /// flipped first).
    #[serde(default = "ControlNetConfig::channel_order")]
    pub controlnet_conditioning_channel_order: String,
    /// Whether the residuals are pooled to one value per channel (shuffle ControlNets, which
    /// diffusers then runs in guess mode): not supported.
    #[serde(default)]
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    fn conditioning_channels() -> usize {
        3
    }
    fn conditioning_embedding_out_channels() -> Vec<usize> {
        vec![16, 32, 96, 256]
    }
    fn channel_order() -> String {
        "rgb".into()
    }

    /// Rejects what this port does not implement, naming it.
    pub fn check(&self) -> Result<(), LoadError> {
        let unsupported = |what: String| Err(LoadError::Unsupported(format!("ControlNet {what}")));
        if self.global_pool_conditions {
            return unsupported(
                "global_pool_conditions (a shuffle ControlNet, which diffusers runs in guess mode)".into(),
            );
        }
        if !["rgb", "bgr"].contains(&self.controlnet_conditioning_channel_order.as_str()) {
            return unsupported(format!(
                "controlnet_conditioning_channel_order {:?}",
                self.controlnet_conditioning_channel_order
            ));
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return unsupported("conditioning_embedding_out_channels = []".into());
        }
        if self.unet.mid_block_type.is_none() {
            return unsupported("without a mid block (mid_block_type null)".into());
        }
        if self.unet.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim".into());
        }
        self.unet_config().check()
    }

    /// The UNet config as the copy is built from it: up blocks mirror the down blocks (a
    /// ControlNet has none; the UNet's checks want them), a 3×3 `conv_in`, no input centring.
    fn unet_config(&self) -> UNet2DConditionConfig {
        let mut unet = self.unet.clone();
        unet.up_block_types = unet
            .down_block_types
            .iter()
            .rev()
            .map(|kind| kind.replace("Down", "Up"))
            .collect();
        unet.conv_in_kernel = 3;
        unet.center_input_sample = false;
        unet
    }

    /// Builds a ControlNet with random weights (load real ones with [`load_controlnet`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ControlNetModel<B>, LoadError> {
        self.check()?;
        let unet = self.unet_config();
        let encoder = unet.init_encoder(device)?;
        let ch = &unet.block_out_channels;
        let mid_block = encoder
            .mid_block
            .ok_or_else(|| LoadError::Unsupported("ControlNet without a mid block".into()))?;
        let zero_conv = |c: usize| conv2d(c, c, 1, device);
        // One zero conv per skip tensor: conv_in's, each resnet's, each downsampler's.
        let mut skips = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            let layers = unet.layers_per_block.get(i, ch.len(), "layers_per_block")?;
            skips.extend(std::iter::repeat_n(c, layers + usize::from(i + 1 < ch.len())));
        }
        let stages = &self.conditioning_embedding_out_channels;
        let mut blocks = Vec::with_capacity(2 * stages.len());
        for pair in stages.windows(2) {
            blocks.push(conv2d(pair[0], pair[0], 3, device));
            blocks.push(
                Conv2dConfig::new([pair[0], pair[1]], [3, 3])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
            );
        }
        let last = stages[stages.len() - 1];
        Ok(ControlNetModel {
            conv_in: encoder.conv_in,
            time_embedding: encoder.time_embedding,
            class_embedding: encoder.class_embedding,
            add_embedding: encoder.add_embedding,
            controlnet_cond_embedding: ControlNetConditioningEmbedding {
                conv_in: conv2d(self.conditioning_channels, stages[0], 3, device),
                blocks,
                conv_out: conv2d(last, ch[0], 3, device),
            },
            down_blocks: encoder.down_blocks,
            controlnet_down_blocks: skips.into_iter().map(zero_conv).collect(),
            mid_block,
            controlnet_mid_block: zero_conv(ch[ch.len() - 1]),
            add_time_proj_dim: unet.addition_time_embed_dim.unwrap_or(0),
            time_proj_dim: ch[0],
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            bgr: self.controlnet_conditioning_channel_order == "bgr",
        })
    }
}

/// `ControlNetConditioningEmbedding`: the control image to the latent's size and the first
/// block's width, `conv_out(silu(…silu(blocks(silu(conv_in(image))))))`.
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding<B: Backend> {
    /// `conv_in`.
    pub conv_in: Conv2d<B>,
    /// `blocks.{i}`: pairs of a 3×3 convolution and a strided one that halves the image.
    pub blocks: Vec<Conv2d<B>>,
    /// `conv_out` (zero-initialised in training).
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ControlNetConditioningEmbedding<B> {
    /// # Shapes
    /// - image: `[batch, conditioning_channels, H, W]` → `[batch, c0, H/f, W/f]`
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = silu(self.conv_in.forward(image));
        for block in &self.blocks {
            h = silu(block.forward(h));
        }
        self.conv_out.forward(h)
    }
}

/// diffusers' `ControlNetModel`. Field names are the checkpoint keys; the input path's are the
/// UNet's ([`crate::unet::UNet2DConditionModel`]).
#[derive(Module, Debug)]
pub struct ControlNetModel<B: Backend> {
    /// Input convolution of the latent.
    pub conv_in: Conv2d<B>,
    /// MLP on the sinusoidal timestep code.
    pub time_embedding: TimestepEmbedding<B>,
    /// Optional class conditioning.
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// SDXL's MLP on the added conditions.
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// The control image's encoder, added to `conv_in`'s output.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding<B>,
    /// `down_blocks.{i}`, as the UNet's.
    pub down_blocks: Vec<DownBlock2D<B>>,
    /// `controlnet_down_blocks.{i}`: a 1×1 convolution per skip tensor.
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    /// `mid_block`, as the UNet's.
    pub mid_block: UNetMidBlock2DCrossAttn<B>,
    /// `controlnet_mid_block`: the 1×1 convolution of the mid block's output.
    pub controlnet_mid_block: Conv2d<B>,
    /// Width of the sinusoidal code of each added time id.
    pub add_time_proj_dim: usize,
    /// Width of the sinusoidal timestep code.
    pub time_proj_dim: usize,
    /// See [`UNet2DConditionConfig::flip_sin_to_cos`].
    pub flip_sin_to_cos: bool,
    /// See [`UNet2DConditionConfig::freq_shift`].
    pub freq_shift: f64,
    /// Whether the control image's channels are flipped first (BGR-trained ControlNets).
    pub bgr: bool,
}

impl<B: Backend> ControlNetModel<B> {
    /// The residuals for the UNet's skips and mid block, scaled by `conditioning_scale`
    /// (diffusers' `controlnet_conditioning_scale`).
    ///
    /// `conditions` are the UNet's other conditions (SDXL's added ones for an SDXL
    /// ControlNet); its `control` is not read.
    ///
    /// # Shapes
    /// - sample: `[batch, in_channels, h, w]`; timestep: `[batch]`
    /// - encoder_hidden_states: `[batch, tokens, cross_attention_dim]`
    /// - controlnet_cond: `[batch, conditioning_channels, f·h, f·w]` in `[0, 1]`, `f` the VAE's
    ///   factor (2 to the number of conditioning stages minus one)
    ///
    /// # Panics
    /// As [`crate::unet::UNet2DConditionModel::forward_conditioned`] for the conditions, and if
    /// the control image's size does not reach the latent's.
    ///
    /// # Example
    /// ```
    /// use adjoint_dpm_models::controlnet::ControlNetConfig;
    /// use burn::backend::Flex;
    /// use burn::tensor::Tensor;
    ///
    /// // A tiny ControlNet: its conditioning embedding halves a 16×16 image to the 8×8 latent.
    /// let config: ControlNetConfig = serde_json::from_str(
    ///     r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
    ///         "attention_head_dim": 2, "norm_num_groups": 4,
    ///         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    ///         "conditioning_embedding_out_channels": [4, 8]}"#,
    /// )?;
    /// let device = Default::default();
    /// let controlnet = config.init::<Flex>(&device)?;
    /// let residuals = controlnet.forward(
    ///     Tensor::ones([1, 4, 8, 8], &device),
    ///     Tensor::from_floats([500.0], &device),
    ///     Tensor::ones([1, 5, 8], &device),
    ///     Tensor::ones([1, 3, 16, 16], &device),
    ///     1.0,
    ///     &Default::default(),
    /// );
    /// // conv_in's skip, one per resnet, one for the downsampler: as the UNet's skips.
    /// assert_eq!(controlnet.residual_channels(), vec![8, 8, 8, 16]);
    /// assert_eq!(residuals.down.len(), 4);
    /// assert_eq!(residuals.mid.dims(), [1, 16, 4, 4]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        controlnet_cond: Tensor<B, 4>,
        conditioning_scale: f64,
        conditions: &UnetConditions<B>,
    ) -> ControlResiduals<B> {
        let controlnet_cond = match self.bgr {
            true => {
                let flip = Tensor::<B, 1, Int>::from_data(TensorData::from([2i64, 1, 0]), &controlnet_cond.device());
                controlnet_cond.select(1, flip)
            }
            false => controlnet_cond,
        };
        let emb = self.embedders().embed(timestep, conditions);
        let context = encoder_hidden_states;
        let mut h = self.conv_in.forward(sample) + self.controlnet_cond_embedding.forward(controlnet_cond);
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, res) = block.forward(h, &emb, &context);
            h = out;
            skips.extend(res);
        }
        let h = self.mid_block.forward(h, &emb, &context);
        ControlResiduals {
            down: skips
                .into_iter()
                .zip(&self.controlnet_down_blocks)
                .map(|(skip, conv)| conv.forward(skip).mul_scalar(conditioning_scale))
                .collect(),
            mid: self.controlnet_mid_block.forward(h).mul_scalar(conditioning_scale),
        }
    }

    /// The channels of the down residuals, in order: they must equal the UNet's
    /// [`skip_channels`](crate::unet::UNet2DConditionModel::skip_channels).
    pub fn residual_channels(&self) -> Vec<usize> {
        self.controlnet_down_blocks
            .iter()
            .map(|conv| conv.weight.dims()[0])
            .collect()
    }

    /// The width of the pooled text embedding its added conditions hold (an SDXL ControlNet),
    /// or `None`.
    pub fn takes_added_conditions(&self) -> Option<usize> {
        self.embedders().pooled_width()
    }

    /// The time-embedding layers, as the UNet's (same names, same computation).
    fn embedders(&self) -> Embedders<'_, B> {
        Embedders {
            time_embedding: &self.time_embedding,
            class_embedding: self.class_embedding.as_ref(),
            add_embedding: self.add_embedding.as_ref(),
            time_proj_dim: self.time_proj_dim,
            add_time_proj_dim: self.add_time_proj_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        }
    }

    /// The channels of the control image it reads.
    pub fn conditioning_channels(&self) -> usize {
        self.controlnet_cond_embedding.conv_in.weight.dims()[1]
    }

    /// The factor by which the control image is larger than the latent (the VAE's).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.controlnet_cond_embedding.blocks.len() / 2)
    }
}

/// Loads a diffusers ControlNet directory (`config.json` and
/// `diffusion_pytorch_model[.fp16].safetensors`, e.g. lllyasviel/sd-controlnet-canny, or a
/// pipeline's `controlnet/` folder).
pub fn load_controlnet<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<(ControlNetConfig, ControlNetModel<B>), LoadError> {
    load_diffusers_dir(
        dir.as_ref(),
        |config: &ControlNetConfig| config.init(device),
        &unet_key_map(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, rel_err, Io, TestAutodiffBackend};
    use crate::unet::load_unet;

    /// The ControlNet's residuals and their gradients w.r.t. the latent and the control image,
    /// and sd_tiny's UNet given them, against diffusers (controlnet_tiny, made by
    /// scripts/make_variant_fixtures.py).
    #[test]
    fn controlnet_matches_diffusers() {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let (_, controlnet) = load_controlnet::<B>(fixture("controlnet_tiny/controlnet"), &device).unwrap();
        let io = Io::open("controlnet_tiny/controlnet");
        let sample = io.float::<B, 4>("sample", &device).require_grad();
        let cond = io.float::<B, 4>("controlnet_cond", &device).require_grad();
        let timestep = io.float::<B, 1>("timestep", &device);
        let context = io.float::<B, 3>("encoder_hidden_states", &device);
        let scale = io.data("conditioning_scale").to_vec::<f32>().unwrap()[0] as f64;
        let residuals = controlnet.forward(
            sample.clone(),
            timestep.clone(),
            context.clone(),
            cond.clone(),
            scale,
            &Default::default(),
        );
        assert_eq!(controlnet.downscale_factor(), 2);
        let n = residuals.down.len();
        let mut loss = Tensor::<B, 1>::zeros([1], &device);
        let mut worst = 0f32;
        for (i, out) in residuals.down.iter().chain([&residuals.mid]).enumerate() {
            let name = if i == n { "mid".to_string() } else { format!("down_{i}") };
            let err = rel_err(&out.clone().into_data(), &io.data(&name));
            assert!(err < 1e-4, "{name}: relative error {err}");
            worst = worst.max(err);
            loss = loss
                + (out.clone() * io.float::<B, 4>(&format!("w_{name}"), &device))
                    .sum()
                    .reshape([1]);
        }
        let grads = loss.backward();
        let grad_sample = rel_err(&sample.grad(&grads).unwrap().into_data(), &io.data("grad_sample"));
        let grad_cond = rel_err(
            &cond.grad(&grads).unwrap().into_data(),
            &io.data("grad_controlnet_cond"),
        );
        assert!(grad_sample < 1e-3, "latent gradient: relative error {grad_sample}");
        assert!(grad_cond < 1e-3, "control image gradient: relative error {grad_cond}");
        eprintln!("controlnet: residuals {worst:.1e}, gradients {grad_sample:.1e} / {grad_cond:.1e}");

        let (_, unet) = load_unet::<B>(fixture("sd_tiny/unet"), &device).unwrap();
        assert_eq!(unet.skip_channels(), controlnet.residual_channels());
        // Two ControlNets add their residuals (diffusers' MultiControlNetModel).
        let twice = residuals.clone() + residuals.clone();
        let e = rel_err(
            &twice.mid.into_data(),
            &residuals.mid.clone().mul_scalar(2.0).into_data(),
        );
        assert!(e < 1e-7, "sum of residuals off by {e}");
        let conditions = UnetConditions {
            control: Some(residuals),
            ..Default::default()
        };
        let out = unet.forward_conditioned(sample, timestep.clone(), context.clone(), conditions);
        let err = rel_err(&out.into_data(), &io.data("unet_out"));
        assert!(err < 1e-4, "UNet with residuals: relative error {err}");
        eprintln!("UNet with residuals: {err:.1e}");
        // Without them the UNet gives another output: the residuals are not negligible.
        let plain = unet.forward(io.float("sample", &device), timestep, context, None);
        assert!(rel_err(&plain.into_data(), &io.data("unet_out")) > 1e-2);
    }

    #[test]
    fn unsupported_configs_are_named() {
        let parse = |extra: &str| -> ControlNetConfig {
            serde_json::from_str(&format!(
                r#"{{"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
                    "attention_head_dim": 2, "norm_num_groups": 4,
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]{extra}}}"#
            ))
            .unwrap()
        };
        assert!(parse("").check().is_ok());
        for (extra, named) in [
            (r#", "global_pool_conditions": true"#, "global_pool_conditions"),
            (r#", "controlnet_conditioning_channel_order": "gbr""#, "gbr"),
            (r#", "mid_block_type": "UNetMidBlock2D""#, "UNetMidBlock2D"),
            (r#", "mid_block_type": null"#, "mid block"),
        ] {
            let err = parse(extra).check().unwrap_err().to_string();
            assert!(err.contains(named), "{extra}: {err}");
        }
    }
}
