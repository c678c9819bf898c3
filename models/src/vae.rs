//! The Stable Diffusion autoencoder: diffusers' `AutoencoderKL` (Kingma & Welling 2014, as
//! trained by Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models").
//!
//! Mirrors `src/diffusers/models/autoencoders/autoencoder_kl.py` and `vae.py` (`Encoder`,
//! `Decoder`) with `unet_2d_blocks.py` (`DownEncoderBlock2D`, `UpDecoderBlock2D`,
//! `UNetMidBlock2D` with attention) at v0.35. The decoder maps scaled latents to images in
//! `[-1, 1]`; the encoder returns the posterior mean (scaled), which is what image inputs and
//! stylisation targets need.

use std::path::Path;

use crate::activation::silu_exact as silu;
use crate::norm::group_norm;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionConfig};
use crate::load::{load_diffusers_dir, KeyMap, LoadError};
use crate::resnet_block::{conv2d, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, TimeScaleShift, Upsample2D};

/// GroupNorm epsilon used throughout the VAE (diffusers hard-codes 1e-6).
const VAE_EPS: f64 = 1e-6;

/// diffusers' `AutoencoderKL` config, deserialised from its `config.json` (diffusers' names and
/// defaults).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Output image channels.
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Activation; only `silu` is supported.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Image size the model was trained at (informational).
    pub sample_size: usize,
    /// Latents are `scaling_factor · (z − shift_factor)` (0.18215 in SD 1.x/2.x).
    pub scaling_factor: f64,
    /// Latent shift (SD 3 / Flux); none in SD 1.x/2.x.
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention layer.
    pub mid_block_add_attention: bool,
    /// fp16 numerics only; irrelevant in f32.
    pub force_upcast: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Rejects options this implementation does not have.
    pub fn check(&self) -> Result<(), LoadError> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(LoadError::Unsupported(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.act_fn != "silu" {
            return Err(LoadError::Unsupported(format!("VAE act_fn {:?}", self.act_fn)));
        }
        let bad = |types: &[String], ok: &str| types.iter().find(|t| *t != ok).cloned();
        if let Some(t) =
            bad(&self.down_block_types, "DownEncoderBlock2D").or_else(|| bad(&self.up_block_types, "UpDecoderBlock2D"))
        {
            return Err(LoadError::Unsupported(format!("VAE block type {t:?}")));
        }
        Ok(())
    }

    fn resnet<B: Backend>(&self, c_in: usize, c_out: usize, device: &B::Device) -> ResnetBlock2D<B> {
        ResnetBlock2DConfig {
            in_channels: c_in,
            out_channels: c_out,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_EPS,
            output_scale_factor: 1.0,
            time_scale_shift: TimeScaleShift::Default,
        }
        .init(device)
    }

    fn mid_block<B: Backend>(&self, channels: usize, device: &B::Device) -> VaeMidBlock<B> {
        VaeMidBlock {
            resnets: (0..2).map(|_| self.resnet(channels, channels, device)).collect(),
            attentions: if self.mid_block_add_attention {
                vec![AttentionConfig {
                    query_dim: channels,
                    cross_attention_dim: None,
                    heads: 1,
                    dim_head: channels,
                    qkv_bias: true,
                    group_norm: Some((self.norm_num_groups, VAE_EPS)),
                }
                .init(device)]
            } else {
                Vec::new()
            },
        }
    }

    fn norm_out<B: Backend>(&self, channels: usize, device: &B::Device) -> GroupNorm<B> {
        GroupNormConfig::new(self.norm_num_groups, channels)
            .with_epsilon(VAE_EPS)
            .init(device)
    }

    /// Builds the autoencoder with random weights (load real ones with [`load_vae`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>, LoadError> {
        self.check()?;
        let ch = &self.block_out_channels;
        let n = ch.len();
        let l = self.latent_channels;

        let down_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                VaeBlock {
                    resnets: (0..self.layers_per_block)
                        .map(|j| self.resnet(if j == 0 { c_in } else { ch[i] }, ch[i], device))
                        .collect(),
                    downsamplers: (i + 1 < n).then(|| Downsample2D::new(ch[i], 0, device)),
                    upsamplers: None,
                }
            })
            .collect();
        let encoder = Encoder {
            conv_in: conv2d(self.in_channels, ch[0], 3, device),
            down_blocks,
            mid_block: self.mid_block(ch[n - 1], device),
            conv_norm_out: self.norm_out(ch[n - 1], device),
            conv_out: conv2d(ch[n - 1], 2 * l, 3, device),
        };

        let up_blocks = (0..n)
            .map(|i| {
                let r = n - 1 - i;
                let prev = ch[(r + 1).min(n - 1)];
                VaeBlock {
                    resnets: (0..=self.layers_per_block)
                        .map(|j| self.resnet(if j == 0 { prev } else { ch[r] }, ch[r], device))
                        .collect(),
                    downsamplers: None,
                    upsamplers: (i + 1 < n).then(|| Upsample2D::new(ch[r], device)),
                }
            })
            .collect();
        let decoder = Decoder {
            conv_in: conv2d(l, ch[n - 1], 3, device),
            mid_block: self.mid_block(ch[n - 1], device),
            up_blocks,
            conv_norm_out: self.norm_out(ch[0], device),
            conv_out: conv2d(ch[0], self.out_channels, 3, device),
        };

        Ok(AutoencoderKL {
            encoder,
            quant_conv: self.use_quant_conv.then(|| conv2d(2 * l, 2 * l, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv2d(l, l, 1, device)),
            decoder,
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift_factor.unwrap_or(0.0),
        })
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, self-attention, resnet (no time embedding).
#[derive(Module, Debug)]
pub struct VaeMidBlock<B: Backend> {
    /// `resnets.0`, `resnets.1`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `attentions.0` (single-head, GroupNorm, residual); empty without mid attention.
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> VaeMidBlock<B> {
    /// # Shapes
    /// - x: `[batch, c, h, w]` → output: `[batch, c, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x, None);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = resnet.forward(attn.forward_spatial(h), None);
        }
        if self.attentions.is_empty() {
            h = self.resnets[1].forward(h, None);
        }
        h
    }
}

/// `DownEncoderBlock2D` (with `downsamplers`) or `UpDecoderBlock2D` (with `upsamplers`).
#[derive(Module, Debug)]
pub struct VaeBlock<B: Backend> {
    /// `resnets.{i}`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Encoder: stride-2 conv with asymmetric padding, except in the last block.
    pub downsamplers: Option<Downsample2D<B>>,
    /// Decoder: nearest ×2 and conv, except in the last block.
    pub upsamplers: Option<Upsample2D<B>>,
}

impl<B: Backend> VaeBlock<B> {
    /// # Shapes
    /// - x: `[batch, c_in, h, w]` → output: `[batch, c_out, h', w']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(h, None);
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(h);
        }
        if let Some(up) = &self.upsamplers {
            h = up.forward(h);
        }
        h
    }
}

/// diffusers `Encoder` (`double_z=True`): image → posterior mean and log-variance.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// Input conv.
    pub conv_in: Conv2d<B>,
    /// `down_blocks.{i}`.
    pub down_blocks: Vec<VaeBlock<B>>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// Final GroupNorm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output conv to `2 · latent_channels`.
    pub conv_out: Conv2d<B>,
}

/// diffusers `Decoder`: latent → image.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Input conv.
    pub conv_in: Conv2d<B>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// `up_blocks.{i}`, coarsest first.
    pub up_blocks: Vec<VaeBlock<B>>,
    /// Final GroupNorm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output conv.
    pub conv_out: Conv2d<B>,
}

/// diffusers `AutoencoderKL`; field names are the checkpoint keys.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    /// Image → latent moments.
    pub encoder: Encoder<B>,
    /// 1×1 conv on the moments.
    pub quant_conv: Option<Conv2d<B>>,
    /// 1×1 conv on the latent before decoding.
    pub post_quant_conv: Option<Conv2d<B>>,
    /// Latent → image.
    pub decoder: Decoder<B>,
    /// See [`AutoencoderKLConfig::scaling_factor`].
    pub scaling_factor: f64,
    /// See [`AutoencoderKLConfig::shift_factor`] (0 when absent).
    pub shift_factor: f64,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Decodes latents as the diffusion model produces them (scaled), as diffusers pipelines do
    /// with `vae.decode(latents / scaling_factor + shift_factor)`.
    ///
    /// # Shapes
    /// - latents: `[batch, latent_channels, h, w]`
    /// - output: `[batch, out_channels, h·2^(blocks−1), w·2^(blocks−1)]`, roughly in `[-1, 1]`
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        // 1. unscale, post-quant conv.
        let z = latents / self.scaling_factor + self.shift_factor;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        // 2. decoder: conv_in, mid, up blocks, norm-act-conv.
        let d = &self.decoder;
        let mut h = d.mid_block.forward(d.conv_in.forward(z));
        for block in &d.up_blocks {
            h = block.forward(h);
        }
        d.conv_out.forward(silu(group_norm(&d.conv_norm_out, h)))
    }

    /// The scaled posterior mean of an image, i.e. the deterministic latent diffusion works in.
    ///
    /// # Shapes
    /// - image: `[batch, in_channels, H, W]`, values in `[-1, 1]`
    /// - output: `[batch, latent_channels, H/2^(blocks−1), W/2^(blocks−1)]`
    pub fn encode_mean(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(image);
        for block in &e.down_blocks {
            h = block.forward(h);
        }
        let h = e
            .conv_out
            .forward(silu(group_norm(&e.conv_norm_out, e.mid_block.forward(h))));
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(h),
            None => h,
        };
        let [b, c2, hh, ww] = moments.dims();
        let mean = moments.slice([0..b, 0..c2 / 2, 0..hh, 0..ww]);
        (mean - self.shift_factor) * self.scaling_factor
    }
}

/// diffusers VAE key renames: list indices (`to_out.0`, `downsamplers.0`, `upsamplers.0`) and
/// the pre-0.14 attention names (`query`, `key`, `value`, `proj_attn`) still found in some files.
pub fn vae_key_map() -> KeyMap {
    KeyMap::new()
        .rename(r"\.to_out\.0\.", ".to_out.")
        .rename(r"\.downsamplers\.0\.", ".downsamplers.")
        .rename(r"\.upsamplers\.0\.", ".upsamplers.")
        .rename(r"\.attentions\.0\.query\.", ".attentions.0.to_q.")
        .rename(r"\.attentions\.0\.key\.", ".attentions.0.to_k.")
        .rename(r"\.attentions\.0\.value\.", ".attentions.0.to_v.")
        .rename(r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.")
}

/// Loads a diffusers VAE directory (`config.json` and
/// `diffusion_pytorch_model[.fp16].safetensors`, as in a pipeline's `vae/` folder).
pub fn load_vae<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<(AutoencoderKLConfig, AutoencoderKL<B>), LoadError> {
    load_diffusers_dir(
        dir.as_ref(),
        |config: &AutoencoderKLConfig| config.init(device),
        &vae_key_map(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, rel_err, Io, TestAutodiffBackend};

    #[test]
    fn vae_tiny_decoder_matches_diffusers() {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let (_, vae) = load_vae::<B>(fixture("vae_tiny"), &device).expect("fixture loads");
        let io = Io::open("vae_tiny");
        let latents = io.float::<B, 4>("latents", &device).require_grad();
        let out = vae.decode(latents.clone());
        let grads = (out.clone() * io.float::<B, 4>("w", &device)).sum().backward();
        let grad = latents.grad(&grads).expect("latent gradient");
        let (out, grad) = (
            rel_err(&out.into_data(), &io.data("out")),
            rel_err(&grad.into_data(), &io.data("grad_latents")),
        );
        eprintln!("vae_tiny decode: output rel err {out:.2e}, input-gradient rel err {grad:.2e}");
        assert!(out <= 1e-4, "output rel err {out}");
        assert!(grad <= 1e-3, "gradient rel err {grad}");
    }

    #[test]
    fn vae_tiny_encoder_matches_diffusers() {
        type B = crate::testing::TestBackend;
        let device = Default::default();
        let (_, vae) = load_vae::<B>(fixture("vae_tiny"), &device).expect("fixture loads");
        let io = Io::open("vae_tiny");
        let image = io.float::<B, 4>("image", &device);
        let mean = vae.encode_mean(image * 2.0 - 1.0);
        let err = rel_err(&mean.into_data(), &io.data("encoded_mean"));
        eprintln!("vae_tiny encode: posterior-mean rel err {err:.2e}");
        assert!(err <= 1e-4, "rel err {err}");
    }

    #[test]
    fn sd_vae_config_parses() {
        // vae/config.json of runwayml/stable-diffusion-v1-5.
        let json = r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
        let cfg: AutoencoderKLConfig = serde_json::from_str(json).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert!(cfg.use_post_quant_conv && cfg.mid_block_add_attention);
    }
}
