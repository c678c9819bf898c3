//! The Stable Diffusion denoiser: diffusers' `UNet2DConditionModel`.
//!
//! Mirrors `src/diffusers/models/unets/unet_2d_condition.py` at v0.35 for the options SD 1.x and
//! 2.x and SDXL use (positional time embedding, cross-attention down/mid/up blocks, conv or linear
//! transformer projections, optional class embedding, SDXL's `text_time` added conditions). [`UNet2DConditionConfig`] reads the
//! checkpoint's own `unet/config.json`; options outside that set are rejected with
//! [`LoadError::Unsupported`] instead of being silently ignored.

use std::fmt;
use std::path::Path;

use crate::activation::silu_exact as silu;
use crate::norm::group_norm;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::attention::Transformer2DConfig;
use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::load::{load_diffusers_dir, KeyMap, LoadError};
use crate::resnet_block::{conv2d, ResnetBlock2DConfig, TimeScaleShift};
use crate::unet_blocks::{BlockSettings, DownBlock2D, Layer, UNetMidBlock2DCrossAttn, UpBlock2D};

/// The part of the UNet's feature path a [`UnetSite`] is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `conv_in`.
    In,
    /// `down_blocks`.
    Down,
    /// `mid_block`.
    Mid,
    /// `up_blocks`.
    Up,
    /// `conv_out`.
    Out,
}

/// Where an activation shown by [`UNet2DConditionModel::forward_observed`] comes from. Displays
/// as its module path in diffusers, e.g. `down_blocks.1.attentions.0` or `conv_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetSite {
    /// The part of the feature path.
    pub stage: Stage,
    /// The block's index in `down_blocks` or `up_blocks` (0 elsewhere).
    pub block: usize,
    /// The layer.
    pub layer: Layer,
    /// The layer's index in its block (0 for samplers and convolutions).
    pub index: usize,
}

impl fmt::Display for UnetSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.layer {
            Layer::Conv => "conv",
            Layer::Resnet => "resnets",
            Layer::Attention => "attentions",
            Layer::Downsample => "downsamplers",
            Layer::Upsample => "upsamplers",
        };
        match self.stage {
            Stage::In => f.write_str("conv_in"),
            Stage::Out => f.write_str("conv_out"),
            Stage::Mid => write!(f, "mid_block.{list}.{}", self.index),
            Stage::Down => write!(f, "down_blocks.{}.{list}.{}", self.block, self.index),
            Stage::Up => write!(f, "up_blocks.{}.{list}.{}", self.block, self.index),
        }
    }
}

/// A config value that is either one value for every block or one per block (diffusers accepts
/// both for `attention_head_dim`, `layers_per_block`, `cross_attention_dim`...).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    All(T),
    /// One value per down block (up blocks use them reversed).
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for down block `i` of `n`, or an error naming `field` if the list is too short.
    pub fn get(&self, i: usize, n: usize, field: &str) -> Result<T, LoadError> {
        match self {
            PerBlock::All(v) => Ok(v.clone()),
            PerBlock::Each(vs) if vs.len() == n => Ok(vs[i].clone()),
            PerBlock::Each(vs) => Err(LoadError::Unsupported(format!(
                "`{field}` has {} entries for {n} blocks",
                vs.len()
            ))),
        }
    }
}

/// diffusers' `UNet2DConditionModel` config, deserialised from its `config.json`.
///
/// Field names and defaults are diffusers' (the defaults are SD 1.x's). Note diffusers'
/// naming quirk: `attention_head_dim` is the number of *heads* per block (diffusers issue
/// #2011); each head is `channels / attention_head_dim` wide.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent height/width the model was trained at (informational).
    pub sample_size: Option<PerBlock<usize>>,
    /// Input channels (4 latent channels).
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Whether to map the input `x ↦ 2x − 1` first.
    pub center_input_sample: bool,
    /// Order of the sinusoidal code: `[cos, sin]` when true.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal code.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, one per resolution.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` or none.
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, one per resolution, coarsest first.
    pub up_block_types: Vec<String>,
    /// Whether self-attention attends to the context instead (per block or for all).
    pub only_cross_attention: PerBlock<bool>,
    /// Channels per resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convs.
    pub downsample_padding: usize,
    /// Output divisor of the mid-block resnets.
    pub mid_block_scale_factor: f64,
    /// Dropout (unused at inference).
    pub dropout: f64,
    /// Activation; only `silu` is supported.
    pub act_fn: String,
    /// GroupNorm groups.
    pub norm_num_groups: Option<usize>,
    /// GroupNorm epsilon of the resnets and of `conv_norm_out`.
    pub norm_eps: f64,
    /// Width of the text context (768 in SD 1.x, 1024 in SD 2.x).
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention.
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Number of heads per block (sic, see the type doc).
    pub attention_head_dim: PerBlock<usize>,
    /// Must be unset (diffusers rejects it too).
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Unsupported when true.
    pub dual_cross_attention: bool,
    /// Linear instead of 1×1-conv transformer projections (SD 2.x).
    pub use_linear_projection: bool,
    /// `null` (table of `num_class_embeds` when set) or `"timestep"`.
    pub class_embed_type: Option<String>,
    /// `null`, or `"text_time"` (SDXL: the pooled text embedding and six size/crop numbers,
    /// [`AddedConditions`]); others are unsupported.
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal code of each `text_time` number (256 in SDXL).
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text embedding's width plus six codes
    /// (2816 = 1280 + 6 · 256 in SDXL).
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Size of the class-embedding table.
    pub num_class_embeds: Option<usize>,
    /// fp16 numerics only; irrelevant in f32 (SDXL writes `null`).
    #[serde(deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    /// How resnets apply the time embedding.
    pub resnet_time_scale_shift: TimeScaleShift,
    /// Only `positional` is supported.
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 · block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// Unsupported when set.
    pub time_embedding_act_fn: Option<String>,
    /// Unsupported when set.
    pub timestep_post_act: Option<String>,
    /// Width of the guidance-scale code a latent consistency model is conditioned on
    /// (`timestep_cond`, [`crate::embeddings::guidance_scale_embedding`]; 256 in LCM-distilled
    /// SD 1.5).
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// Unsupported when set.
    pub encoder_hid_dim: Option<usize>,
    /// Only `default` is supported.
    pub attention_type: String,
    /// Unsupported when true.
    pub class_embeddings_concat: bool,
    /// Unsupported when true.
    pub resnet_skip_time_act: bool,
    /// Only 1 is supported.
    pub resnet_out_scale_factor: f64,
    /// Unsupported when set.
    pub cross_attention_norm: Option<String>,
    /// Mid-block `only_cross_attention` (defaults to the global bool).
    pub mid_block_only_cross_attention: Option<bool>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(1),
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: TimeScaleShift::Default,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            encoder_hid_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            cross_attention_norm: None,
            mid_block_only_cross_attention: None,
        }
    }
}

/// A bool that a config may also write as `null` (false).
fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// The block kind a `*_block_types` entry names.
fn has_cross_attention(kind: &str, allowed: [&str; 2]) -> Result<bool, LoadError> {
    match kind {
        k if k == allowed[0] => Ok(true),
        k if k == allowed[1] => Ok(false),
        other => Err(LoadError::Unsupported(format!(
            "block type {other:?} (supported: {allowed:?})"
        ))),
    }
}

impl UNet2DConditionConfig {
    /// The UNet of Stable Diffusion 1.5: `unet/config.json` of runwayml/stable-diffusion-v1-5
    /// (859.5M parameters), kept verbatim in `models/configs/sd15_unet.json`.
    pub fn sd15() -> Self {
        serde_json::from_str(include_str!("../configs/sd15_unet.json")).expect("the shipped SD 1.5 config parses")
    }

    /// The UNet of SDXL: `unet/config.json` of stabilityai/stable-diffusion-xl-base-1.0
    /// (2.57B parameters; its added conditions take a 1280-wide pooled text embedding), kept
    /// verbatim in `models/configs/sdxl_unet.json`.
    pub fn sdxl() -> Self {
        serde_json::from_str(include_str!("../configs/sdxl_unet.json")).expect("the shipped SDXL config parses")
    }

    /// Rejects options this implementation does not have.
    pub fn check(&self) -> Result<(), LoadError> {
        let unsupported = |what: &str| Err(LoadError::Unsupported(what.to_string()));
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(LoadError::Unsupported(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn other than silu");
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type other than positional");
        }
        if self.attention_type != "default" {
            return unsupported("attention_type other than default");
        }
        if self.norm_num_groups.is_none() {
            return unsupported("norm_num_groups = null");
        }
        if self.num_attention_heads.is_some() {
            return unsupported("num_attention_heads (diffusers rejects it too)");
        }
        if self.dual_cross_attention
            || self.class_embeddings_concat
            || self.resnet_skip_time_act
            || self.resnet_out_scale_factor != 1.0
        {
            return unsupported(
                "dual_cross_attention, class_embeddings_concat, resnet_skip_time_act or resnet_out_scale_factor != 1",
            );
        }
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (None, _, _) => {}
            (Some("text_time"), Some(code), Some(input)) if input > 6 * code => {}
            (Some("text_time"), code, input) => {
                return Err(LoadError::Unsupported(format!(
                    "addition_embed_type \"text_time\" needs addition_time_embed_dim and a \
                     projection_class_embeddings_input_dim above 6 times it (got {code:?} and {input:?})"
                )))
            }
            (Some(other), _, _) => return Err(LoadError::Unsupported(format!("addition_embed_type {other:?}"))),
        }
        if self.encoder_hid_dim.is_some()
            || self.time_embedding_act_fn.is_some()
            || self.timestep_post_act.is_some()
            || self.cross_attention_norm.is_some()
        {
            return unsupported("encoder_hid_dim, time_embedding_act_fn, timestep_post_act or cross_attention_norm");
        }
        match self.class_embed_type.as_deref() {
            None | Some("timestep") => {}
            Some(other) => return Err(LoadError::Unsupported(format!("class_embed_type {other:?}"))),
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => return Err(LoadError::Unsupported(format!("mid_block_type {other:?}"))),
        }
        for kind in &self.down_block_types {
            has_cross_attention(kind, ["CrossAttnDownBlock2D", "DownBlock2D"])?;
        }
        for kind in &self.up_block_types {
            has_cross_attention(kind, ["CrossAttnUpBlock2D", "UpBlock2D"])?;
        }
        Ok(())
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(4 * self.block_out_channels[0])
    }

    fn block_settings(&self, i: usize, layers: usize, only_cross: bool) -> Result<BlockSettings, LoadError> {
        let n = self.block_out_channels.len();
        let groups = self.norm_num_groups.unwrap_or(32);
        Ok(BlockSettings {
            resnet: ResnetBlock2DConfig {
                in_channels: 0,
                out_channels: 0,
                temb_channels: Some(self.time_embed_dim()),
                groups,
                eps: self.norm_eps,
                output_scale_factor: 1.0,
                time_scale_shift: self.resnet_time_scale_shift,
            },
            transformer: Transformer2DConfig {
                channels: 0,
                heads: self.attention_head_dim.get(i, n, "attention_head_dim")?,
                layers,
                cross_attention_dim: self.cross_attention_dim.get(i, n, "cross_attention_dim")?,
                norm_num_groups: groups,
                use_linear_projection: self.use_linear_projection,
                only_cross_attention: only_cross,
            },
        })
    }

    /// Builds a UNet with random weights (load real ones with [`load_unet`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>, LoadError> {
        self.check()?;
        let encoder = self.init_encoder(device)?;
        let n = self.block_out_channels.len();
        let ch = &self.block_out_channels;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let cross = has_cross_attention(kind, ["CrossAttnUpBlock2D", "UpBlock2D"])?;
            let r = n - 1 - i; // the matching down block
            let s = self.block_settings(
                r,
                self.transformer_layers_per_block
                    .get(r, n, "transformer_layers_per_block")?,
                self.only_cross_attention.get(r, n, "only_cross_attention")?,
            )?;
            let prev_out = ch[(r + 1).min(n - 1)];
            let c_in = ch[r.saturating_sub(1)];
            up_blocks.push(UpBlock2D::new(
                &s,
                c_in,
                ch[r],
                prev_out,
                self.layers_per_block.get(r, n, "layers_per_block")? + 1,
                cross,
                i == n - 1,
                device,
            ));
        }
        Ok(UNet2DConditionModel {
            conv_in: encoder.conv_in,
            time_embedding: encoder.time_embedding,
            class_embedding: encoder.class_embedding,
            add_embedding: encoder.add_embedding,
            add_time_proj_dim: self.addition_time_embed_dim.unwrap_or(0),
            down_blocks: encoder.down_blocks,
            mid_block: encoder.mid_block,
            up_blocks,
            conv_norm_out: GroupNormConfig::new(self.norm_num_groups.unwrap_or(32), ch[0])
                .with_epsilon(self.norm_eps)
                .init(device),
            conv_out: conv2d(ch[0], self.out_channels, self.conv_out_kernel, device),
            time_proj_dim: ch[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            center_input_sample: self.center_input_sample,
        })
    }

    /// The input path, embeddings to mid block, which a ControlNet copies
    /// ([`crate::controlnet`]); the config is assumed checked.
    pub(crate) fn init_encoder<B: Backend>(&self, device: &B::Device) -> Result<EncoderParts<B>, LoadError> {
        let n = self.block_out_channels.len();
        let ch = &self.block_out_channels;
        let t_dim = self.time_embed_dim();
        let only_cross = |i| self.only_cross_attention.get(i, n, "only_cross_attention");
        let layers = |i| self.layers_per_block.get(i, n, "layers_per_block");
        let t_layers = |i| {
            self.transformer_layers_per_block
                .get(i, n, "transformer_layers_per_block")
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let cross = has_cross_attention(kind, ["CrossAttnDownBlock2D", "DownBlock2D"])?;
            let s = self.block_settings(i, t_layers(i)?, only_cross(i)?)?;
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            down_blocks.push(DownBlock2D::new(
                &s,
                c_in,
                ch[i],
                layers(i)?,
                cross,
                i == n - 1,
                self.downsample_padding,
                device,
            ));
        }

        let mid_block = match self.mid_block_type {
            Some(_) => {
                let mid_only_cross = self
                    .mid_block_only_cross_attention
                    .unwrap_or(matches!(self.only_cross_attention, PerBlock::All(true)));
                let mut s = self.block_settings(n - 1, t_layers(n - 1)?, mid_only_cross)?;
                s.resnet.output_scale_factor = self.mid_block_scale_factor;
                Some(UNetMidBlock2DCrossAttn::new(&s, ch[n - 1], device))
            }
            None => None,
        };

        let class_embedding = match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, Some(classes)) => Some(ClassEmbedding::Table(EmbeddingConfig::new(classes, t_dim).init(device))),
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(ch[0], t_dim, device))),
            _ => None,
        };
        let add_embedding = match (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (Some(_), Some(input)) if self.addition_embed_type.is_some() => {
                Some(TimestepEmbedding::new(input, t_dim, device))
            }
            _ => None,
        };
        Ok(EncoderParts {
            conv_in: conv2d(self.in_channels, ch[0], self.conv_in_kernel, device),
            time_embedding: match self.time_cond_proj_dim {
                Some(cond) => TimestepEmbedding::new(ch[0], t_dim, device).with_cond_proj(cond, device),
                None => TimestepEmbedding::new(ch[0], t_dim, device),
            },
            class_embedding,
            add_embedding,
            down_blocks,
            mid_block,
        })
    }
}

/// What [`UNet2DConditionConfig::init_encoder`] builds: the UNet's fields of the same names.
pub(crate) struct EncoderParts<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub class_embedding: Option<ClassEmbedding<B>>,
    pub add_embedding: Option<TimestepEmbedding<B>>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
}

/// The time embedding with every condition added, which the UNet and a ControlNet compute
/// alike from their own (same-named) layers.
pub(crate) struct Embedders<'a, B: Backend> {
    pub time_embedding: &'a TimestepEmbedding<B>,
    pub class_embedding: Option<&'a ClassEmbedding<B>>,
    pub add_embedding: Option<&'a TimestepEmbedding<B>>,
    pub time_proj_dim: usize,
    pub add_time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl<B: Backend> Embedders<'_, B> {
    /// The width of the pooled text embedding the added conditions hold (the MLP's input less
    /// the six size codes), or `None` without an `add_embedding`.
    pub(crate) fn pooled_width(&self) -> Option<usize> {
        self.add_embedding
            .map(|mlp| mlp.linear_1.weight.dims()[0] - 6 * self.add_time_proj_dim)
    }

    /// The time embedding `[batch, time_embed_dim]` of `timestep` under `conditions` (all but
    /// the ControlNet residuals, which this does not read).
    ///
    /// # Panics
    /// As [`UNet2DConditionModel::forward_conditioned`].
    pub(crate) fn embed(&self, timestep: Tensor<B, 1>, conditions: &UnetConditions<B>) -> Tensor<B, 2> {
        let code = |x: Tensor<B, 1>, dim| timestep_embedding(x, dim, self.flip_sin_to_cos, self.freq_shift);
        let t_code = code(timestep, self.time_proj_dim);
        let mut emb = match conditions.timestep_cond.clone() {
            Some(cond) => self.time_embedding.forward_cond(t_code, cond),
            None => self.time_embedding.forward(t_code),
        };
        match (self.class_embedding, conditions.class_labels.clone()) {
            (Some(ClassEmbedding::Table(table)), Some(labels)) => {
                emb = emb + table.weight.val().select(0, labels);
            }
            (Some(ClassEmbedding::Timestep(mlp)), Some(labels)) => {
                emb = emb + mlp.forward(code(labels.float(), self.time_proj_dim));
            }
            (None, None) => {}
            (Some(_), None) => panic!("this UNet has a class embedding: pass class_labels"),
            (None, Some(_)) => panic!("this UNet has no class embedding: class_labels must be None"),
        }
        match (self.add_embedding, conditions.added.clone()) {
            (Some(mlp), Some(added)) => {
                let [b, ids] = added.time_ids.dims();
                let codes = code(added.time_ids.reshape([b * ids]), self.add_time_proj_dim)
                    .reshape([b, ids * self.add_time_proj_dim]);
                emb = emb + mlp.forward(Tensor::cat(vec![added.text_embeds, codes], 1));
            }
            (None, None) => {}
            (Some(_), None) => panic!("this UNet has an add_embedding (SDXL): pass its added conditions"),
            (None, Some(_)) => panic!("this UNet has no add_embedding: added conditions must be None"),
        }
        emb
    }
}

/// The optional class-conditioning input of the UNet (`class_embedding.*` keys).
// One per model: the variant size difference costs nothing, and burn modules cannot be boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum ClassEmbedding<B: Backend> {
    /// `num_class_embeds` learned vectors (`class_embed_type: null`).
    Table(Embedding<B>),
    /// Class labels encoded like timesteps (`class_embed_type: "timestep"`).
    Timestep(TimestepEmbedding<B>),
}

/// SDXL's added conditions (diffusers' `added_cond_kwargs` for `addition_embed_type:
/// "text_time"`): encoded like timesteps and through `add_embedding`, they join the time
/// embedding.
///
/// # Shapes
/// - text_embeds: `[batch, pooled width]`, the second text encoder's projected pooled output
/// - time_ids: `[batch, 6]`, `[original h, original w, crop top, crop left, target h, target w]`
///   in pixels
#[derive(Debug, Clone)]
pub struct AddedConditions<B: Backend> {
    /// The pooled text embedding.
    pub text_embeds: Tensor<B, 2>,
    /// The size and crop numbers.
    pub time_ids: Tensor<B, 2>,
}

/// What conditions the UNet besides the text context: diffusers' `class_labels`,
/// `timestep_cond` and `added_cond_kwargs`. Each is required, or refused, by the model's config;
/// [`Default`] is none of them.
#[derive(Debug, Clone)]
pub struct UnetConditions<B: Backend> {
    /// Class labels, `[batch]`, for a model with a class embedding.
    pub class_labels: Option<Tensor<B, 1, Int>>,
    /// A latent consistency model's guidance-scale code, `[batch, time_cond_proj_dim]`
    /// ([`crate::embeddings::guidance_scale_embedding`]); optional for a model with
    /// `time_cond_proj_dim` (as in diffusers), refused by one without.
    pub timestep_cond: Option<Tensor<B, 2>>,
    /// SDXL's added conditions.
    pub added: Option<AddedConditions<B>>,
    /// A ControlNet's residuals, added to the skips and the mid block's output
    /// (diffusers' `down_block_additional_residuals`, `mid_block_additional_residual`).
    pub control: Option<ControlResiduals<B>>,
}

/// What a ControlNet ([`crate::controlnet::ControlNetModel`]) adds to the UNet: one residual
/// per skip tensor ([`UNet2DConditionModel::skip_channels`]) and one to the mid block's output.
/// Several ControlNets add their sum (`a + b`), as diffusers' `MultiControlNetModel`.
#[derive(Debug, Clone)]
pub struct ControlResiduals<B: Backend> {
    /// `[batch, skip channels, h_i, w_i]`, in the order of the skips.
    pub down: Vec<Tensor<B, 4>>,
    /// `[batch, mid channels, h, w]`.
    pub mid: Tensor<B, 4>,
}

/// The residuals of two ControlNets together.
///
/// # Panics
/// If their counts or shapes differ.
impl<B: Backend> std::ops::Add for ControlResiduals<B> {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        assert_eq!(self.down.len(), other.down.len(), "ControlNet residual counts differ");
        Self {
            down: self.down.into_iter().zip(other.down).map(|(a, b)| a + b).collect(),
            mid: self.mid + other.mid,
        }
    }
}

impl<B: Backend> Default for UnetConditions<B> {
    fn default() -> Self {
        Self {
            class_labels: None,
            timestep_cond: None,
            added: None,
            control: None,
        }
    }
}

/// diffusers' `UNet2DConditionModel`: predicts the noise (or v) of a latent at a timestep,
/// conditioned on a text context. Field names are the checkpoint keys.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// MLP on the sinusoidal timestep code.
    pub time_embedding: TimestepEmbedding<B>,
    /// Optional class conditioning, added to the time embedding.
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// SDXL's MLP on the added conditions ([`AddedConditions`]), added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// Width of the sinusoidal code of each added time id (`addition_time_embed_dim`).
    pub add_time_proj_dim: usize,
    /// `down_blocks.{i}`, finest first.
    pub down_blocks: Vec<DownBlock2D<B>>,
    /// `mid_block`.
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    /// `up_blocks.{i}`, coarsest first.
    pub up_blocks: Vec<UpBlock2D<B>>,
    /// Final GroupNorm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
    /// Width of the sinusoidal timestep code (`block_out_channels[0]`).
    pub time_proj_dim: usize,
    /// See [`UNet2DConditionConfig::flip_sin_to_cos`].
    pub flip_sin_to_cos: bool,
    /// See [`UNet2DConditionConfig::freq_shift`].
    pub freq_shift: f64,
    /// See [`UNet2DConditionConfig::center_input_sample`].
    pub center_input_sample: bool,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// The denoiser output (noise, or v for v-prediction checkpoints).
    ///
    /// `timestep` is float so that it can be fractional and, if needed, differentiated.
    /// `class_labels` is required exactly when the model has a class embedding.
    ///
    /// # Shapes
    /// - sample: `[batch, in_channels, h, w]`, `h` and `w` divisible by `2^(blocks−1)`
    /// - timestep: `[batch]`
    /// - encoder_hidden_states: `[batch, tokens, cross_attention_dim]`
    /// - class_labels: `[batch]`
    /// - output: `[batch, out_channels, h, w]`
    ///
    /// # Panics
    /// If `class_labels` is given to a model without class embedding or missing for one with,
    /// or if the model takes [`AddedConditions`] (SDXL; use [`forward_added`](Self::forward_added)).
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        class_labels: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 4> {
        self.forward_added(sample, timestep, encoder_hidden_states, class_labels, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions, which a model with an
    /// `add_embedding` (`addition_embed_type: "text_time"`) requires and any other refuses.
    ///
    /// # Panics
    /// As [`forward`](Self::forward), and if `added` is given to a model without
    /// `add_embedding`, missing for one with, or of the wrong width
    /// ([`takes_added_conditions`](Self::takes_added_conditions) says which).
    ///
    /// # Example
    /// ```
    /// use adjoint_dpm_models::unet::{AddedConditions, UNet2DConditionConfig};
    /// use burn::backend::Flex;
    /// use burn::tensor::Tensor;
    ///
    /// // A tiny SDXL-shaped UNet: a 12-wide pooled text embedding and six 4-wide codes.
    /// let config: UNet2DConditionConfig = serde_json::from_str(
    ///     r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
    ///         "attention_head_dim": 2, "norm_num_groups": 4, "use_linear_projection": true,
    ///         "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    ///         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    ///         "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
    ///         "projection_class_embeddings_input_dim": 36}"#,
    /// )?;
    /// let device = Default::default();
    /// let unet = config.init::<Flex>(&device)?;
    /// assert_eq!(unet.takes_added_conditions(), Some(12));
    /// let added = AddedConditions {
    ///     text_embeds: Tensor::ones([1, 12], &device),
    ///     time_ids: Tensor::from_floats([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]], &device),
    /// };
    /// let eps = unet.forward_added(
    ///     Tensor::ones([1, 4, 8, 8], &device),
    ///     Tensor::from_floats([500.0], &device),
    ///     Tensor::ones([1, 5, 8], &device),
    ///     None,
    ///     Some(added),
    /// );
    /// assert_eq!(eps.dims(), [1, 4, 8, 8]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_added(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        class_labels: Option<Tensor<B, 1, Int>>,
        added: Option<AddedConditions<B>>,
    ) -> Tensor<B, 4> {
        let conditions = UnetConditions {
            class_labels,
            added,
            ..UnetConditions::default()
        };
        self.forward_conditioned(sample, timestep, encoder_hidden_states, conditions)
    }

    /// [`forward`](Self::forward) with every optional condition ([`UnetConditions`]): a
    /// latent consistency model's guidance-scale code (`timestep_cond`) among them.
    ///
    /// # Panics
    /// As [`forward_added`](Self::forward_added), and if `timestep_cond` is given to a model
    /// without `time_cond_proj_dim`
    /// ([`takes_timestep_cond`](Self::takes_timestep_cond) says which).
    ///
    /// # Example
    /// ```
    /// use adjoint_dpm_models::embeddings::guidance_scale_embedding;
    /// use adjoint_dpm_models::unet::{UNet2DConditionConfig, UnetConditions};
    /// use burn::backend::Flex;
    /// use burn::tensor::{DType, Tensor};
    ///
    /// // A tiny LCM-shaped UNet, conditioned on an 8-wide guidance-scale code.
    /// let config: UNet2DConditionConfig = serde_json::from_str(
    ///     r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "cross_attention_dim": 8,
    ///         "attention_head_dim": 2, "norm_num_groups": 4, "time_cond_proj_dim": 8,
    ///         "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    ///         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}"#,
    /// )?;
    /// let device = Default::default();
    /// let unet = config.init::<Flex>(&device)?;
    /// assert_eq!(unet.takes_timestep_cond(), Some(8));
    /// let w = guidance_scale_embedding::<Flex>(8.5, 1, 8, &device, DType::F32);
    /// let conditions = UnetConditions { timestep_cond: Some(w), ..Default::default() };
    /// let eps = unet.forward_conditioned(
    ///     Tensor::ones([1, 4, 8, 8], &device),
    ///     Tensor::from_floats([500.0], &device),
    ///     Tensor::ones([1, 5, 8], &device),
    ///     conditions,
    /// );
    /// assert_eq!(eps.dims(), [1, 4, 8, 8]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_conditioned(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        conditions: UnetConditions<B>,
    ) -> Tensor<B, 4> {
        self.forward_observed(sample, timestep, encoder_hidden_states, conditions, &mut |_, _| {})
    }

    /// The layers [`Embedders::embed`] uses.
    pub(crate) fn embedders(&self) -> Embedders<'_, B> {
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

    /// The channels of the skip tensors the down blocks pass to the up blocks, in order
    /// (`conv_in`'s, then each down block's): what a ControlNet's residuals must match
    /// ([`ControlResiduals`]).
    pub fn skip_channels(&self) -> Vec<usize> {
        let mut channels = vec![self.conv_in.weight.dims()[0]];
        for block in &self.down_blocks {
            channels.extend(block.resnets.iter().map(|r| r.conv2.weight.dims()[0]));
            channels.extend(block.downsamplers.iter().map(|d| d.conv.weight.dims()[0]));
        }
        channels
    }

    /// The width of the guidance-scale code the model can be conditioned on
    /// (`time_cond_proj_dim`), or `None`.
    pub fn takes_timestep_cond(&self) -> Option<usize> {
        self.time_embedding.cond_proj.as_ref().map(|proj| proj.weight.dims()[0])
    }

    /// The width of the pooled text embedding the model's added conditions hold, or `None`
    /// when it takes none.
    pub fn takes_added_conditions(&self) -> Option<usize> {
        self.embedders().pooled_width()
    }

    /// [`forward`](Self::forward), showing `observe` the output of every layer of the feature
    /// path (`conv_in`, each resnet, transformer, down- and upsampler, `conv_out`) with where it
    /// comes from, in the order computed: to see where activations grow past a dtype's range or
    /// turn non-finite (`examples/bench_unet.rs --trace`).
    ///
    /// # Panics
    /// As [`forward`](Self::forward).
    ///
    /// # Example
    /// ```
    /// use adjoint_dpm_models::unet::UNet2DConditionConfig;
    /// use burn::backend::Flex;
    /// use burn::tensor::Tensor;
    ///
    /// let config: UNet2DConditionConfig = serde_json::from_str(
    ///     r#"{"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    ///         "attention_head_dim": 4, "norm_num_groups": 8,
    ///         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    ///         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#,
    /// )?;
    /// let device = Default::default();
    /// let unet = config.init::<Flex>(&device)?;
    /// let mut largest = Vec::new();
    /// unet.forward_observed(
    ///     Tensor::ones([1, 4, 16, 16], &device),
    ///     Tensor::from_floats([500.0], &device),
    ///     Tensor::ones([1, 8, 32], &device),
    ///     Default::default(),
    ///     &mut |site, h| largest.push((site.to_string(), h.clone().abs().max().into_scalar())),
    /// );
    /// assert_eq!(largest.first().map(|(site, _)| site.as_str()), Some("conv_in"));
    /// assert_eq!(largest.last().map(|(site, _)| site.as_str()), Some("conv_out"));
    /// assert!(largest.iter().all(|(_, max)| max.is_finite()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_observed(
        &self,
        sample: Tensor<B, 4>,
        timestep: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        conditions: UnetConditions<B>,
        observe: &mut dyn FnMut(UnetSite, &Tensor<B, 4>),
    ) -> Tensor<B, 4> {
        // 0. center the input if the config asks for it.
        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        // 1. time embedding, with the class, LCM and SDXL conditions.
        let emb = self.embedders().embed(timestep, &conditions);
        let context = encoder_hidden_states;
        let site = |stage, block, layer, index| UnetSite {
            stage,
            block,
            layer,
            index,
        };
        // 2. pre-process.
        let mut h = self.conv_in.forward(sample);
        observe(site(Stage::In, 0, Layer::Conv, 0), &h);
        // 3. down.
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward_observed(h, &emb, &context, &mut |layer, index, t| {
                observe(site(Stage::Down, i, layer, index), t)
            });
            h = out;
            skips.extend(res);
        }
        let control = conditions.control;
        if let Some(control) = &control {
            assert_eq!(
                control.down.len(),
                skips.len(),
                "the ControlNet gives {} down residuals, the UNet has {} skips",
                control.down.len(),
                skips.len()
            );
            skips = skips
                .into_iter()
                .zip(control.down.iter().cloned())
                .map(|(skip, residual)| skip + residual)
                .collect();
        }
        // 4. mid.
        if let Some(mid) = &self.mid_block {
            h = mid.forward_observed(h, &emb, &context, &mut |layer, index, t| {
                observe(site(Stage::Mid, 0, layer, index), t)
            });
        }
        if let Some(control) = control {
            h = h + control.mid;
        }
        // 5. up, consuming the skips in reverse.
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward_observed(h, &mut skips, &emb, &context, &mut |layer, index, t| {
                observe(site(Stage::Up, i, layer, index), t)
            });
        }
        // 6. post-process.
        let out = self.conv_out.forward(silu(group_norm(&self.conv_norm_out, h)));
        observe(site(Stage::Out, 0, Layer::Conv, 0), &out);
        out
    }
}

/// The rename table from diffusers UNet keys to [`UNet2DConditionModel`] paths: Python list
/// indices that are not lists here (`to_out.0`, `ff.net.0`/`ff.net.2`, `downsamplers.0`,
/// `upsamplers.0`).
pub fn unet_key_map() -> KeyMap {
    KeyMap::new()
        .rename(r"\.to_out\.0\.", ".to_out.")
        .rename(r"\.ff\.net\.0\.", ".ff.geglu.")
        .rename(r"\.ff\.net\.2\.", ".ff.out.")
        .rename(r"\.downsamplers\.0\.", ".downsamplers.")
        .rename(r"\.upsamplers\.0\.", ".upsamplers.")
}

/// Loads a diffusers UNet directory (`config.json` and
/// `diffusion_pytorch_model[.fp16].safetensors`, as in a pipeline's `unet/` folder).
pub fn load_unet<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<(UNet2DConditionConfig, UNet2DConditionModel<B>), LoadError> {
    load_diffusers_dir(
        dir.as_ref(),
        |config: &UNet2DConditionConfig| config.init(device),
        &unet_key_map(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, rel_err, Io, TestAutodiffBackend};
    use burn::tensor::DType;

    /// Loads a fixture UNet through [`load_unet`], runs it on the fixture inputs with autodiff
    /// and returns the relative errors of the output and of the input gradient.
    fn parity(dir: &str) -> (f32, f32) {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let (_, unet) = load_unet::<B>(fixture(dir), &device).expect("fixture loads");
        let io = Io::open(dir);
        let sample = io.float::<B, 4>("sample", &device).require_grad();
        let labels = unet
            .class_embedding
            .as_ref()
            .map(|_| io.int::<B, 1>("class_labels", &device));
        let out = unet.forward(
            sample.clone(),
            io.float("timestep", &device),
            io.float("encoder_hidden_states", &device),
            labels,
        );
        let loss = (out.clone() * io.float::<B, 4>("w", &device)).sum();
        let grads = loss.backward();
        let grad = sample.grad(&grads).expect("sample gradient");
        (
            rel_err(&out.into_data(), &io.data("out")),
            rel_err(&grad.into_data(), &io.data("grad_sample")),
        )
    }

    /// `forward_observed` shows every layer of the feature path, in order, under diffusers'
    /// names, and its last activation is the output.
    #[test]
    fn forward_observed_shows_every_layer_in_order() {
        type B = crate::testing::TestBackend;
        let device = Default::default();
        let (_, unet) = load_unet::<B>(fixture("unet_tiny"), &device).expect("fixture loads");
        let io = Io::open("unet_tiny");
        let mut seen = Vec::new();
        let mut last = None;
        let out = unet.forward_observed(
            io.float("sample", &device),
            io.float("timestep", &device),
            io.float("encoder_hidden_states", &device),
            UnetConditions {
                class_labels: Some(io.int("class_labels", &device)),
                ..Default::default()
            },
            &mut |site, t| {
                seen.push(site.to_string());
                last = Some(t.clone());
            },
        );
        let expected = [
            "conv_in",
            "down_blocks.0.resnets.0",
            "down_blocks.0.attentions.0",
            "down_blocks.0.downsamplers.0",
            "down_blocks.1.resnets.0",
            "mid_block.resnets.0",
            "mid_block.attentions.0",
            "mid_block.resnets.1",
            "up_blocks.0.resnets.0",
            "up_blocks.0.resnets.1",
            "up_blocks.0.upsamplers.0",
            "up_blocks.1.resnets.0",
            "up_blocks.1.attentions.0",
            "up_blocks.1.resnets.1",
            "up_blocks.1.attentions.1",
            "conv_out",
        ];
        assert_eq!(seen, expected);
        let last = last.expect("conv_out was shown");
        assert_eq!(last.into_data(), out.into_data());
    }

    #[test]
    fn unet_tiny_matches_diffusers() {
        let (out, grad) = parity("unet_tiny");
        eprintln!("unet_tiny: output rel err {out:.2e}, input-gradient rel err {grad:.2e}");
        assert!(out <= 1e-4, "output rel err {out}");
        assert!(grad <= 1e-3, "gradient rel err {grad}");
    }

    #[test]
    fn unet_linear_projection_fp16_weights_match_diffusers() {
        let (out, grad) = parity("unet_tiny_linear_fp16");
        eprintln!("unet_tiny_linear_fp16: output rel err {out:.2e}, input-gradient rel err {grad:.2e}");
        assert!(out <= 1e-4, "output rel err {out}");
        assert!(grad <= 1e-3, "gradient rel err {grad}");
    }

    /// SDXL's `text_time` added conditions: output, input gradient and pooled-embedding
    /// gradient against diffusers, plus the errors around them.
    #[test]
    fn unet_sdxl_added_conditions_match_diffusers() {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let (config, unet) = load_unet::<B>(fixture("sdxl_tiny/unet"), &device).expect("fixture loads");
        assert_eq!(unet.takes_added_conditions(), Some(24));
        let io = Io::open("sdxl_tiny/unet");
        let sample = io.float::<B, 4>("sample", &device).require_grad();
        let text_embeds = io.float::<B, 2>("text_embeds", &device).require_grad();
        let added = AddedConditions {
            text_embeds: text_embeds.clone(),
            time_ids: io.float("time_ids", &device),
        };
        let out = unet.forward_added(
            sample.clone(),
            io.float("timestep", &device),
            io.float("encoder_hidden_states", &device),
            None,
            Some(added),
        );
        let grads = (out.clone() * io.float::<B, 4>("w", &device)).sum().backward();
        let errs = [
            ("out", rel_err(&out.into_data(), &io.data("out"))),
            (
                "grad_sample",
                rel_err(&sample.grad(&grads).unwrap().into_data(), &io.data("grad_sample")),
            ),
            (
                "grad_text_embeds",
                rel_err(
                    &text_embeds.grad(&grads).unwrap().into_data(),
                    &io.data("grad_text_embeds"),
                ),
            ),
        ];
        for (name, err) in errs {
            eprintln!("sdxl_tiny/unet: {name} rel err {err:.2e}");
            assert!(err <= if name == "out" { 1e-4 } else { 1e-3 }, "{name} rel err {err}");
        }
        // The config's checks: text_time needs both widths, other kinds are refused.
        let mut bad = config.clone();
        bad.addition_time_embed_dim = None;
        assert!(bad.check().unwrap_err().to_string().contains("addition_time_embed_dim"));
        bad = config.clone();
        bad.addition_embed_type = Some("image".into());
        assert!(bad.check().unwrap_err().to_string().contains("\"image\""));
        // A UNet without add_embedding takes none.
        let (_, plain) = load_unet::<B>(fixture("unet_tiny"), &device).unwrap();
        assert_eq!(plain.takes_added_conditions(), None);
    }

    /// A latent consistency model's guidance-scale code (`time_cond_proj_dim`): the code, the
    /// output and the gradients w.r.t. the sample and the code against diffusers.
    #[test]
    fn unet_lcm_guidance_code_matches_diffusers() {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let (_, unet) = load_unet::<B>(fixture("lcm_tiny/unet"), &device).expect("fixture loads");
        assert_eq!(unet.takes_timestep_cond(), Some(16));
        let io = Io::open("lcm_tiny/unet");
        // diffusers' get_guidance_scale_embedding of the scales 8.5 and 2.
        let codes: Vec<_> = [8.5, 2.0]
            .iter()
            .map(|&scale| crate::embeddings::guidance_scale_embedding::<B>(scale, 1, 16, &device, DType::F32))
            .collect();
        let code = Tensor::cat(codes, 0);
        let code_err = rel_err(&code.clone().into_data(), &io.data("timestep_cond"));
        let sample = io.float::<B, 4>("sample", &device).require_grad();
        let code = code.require_grad();
        let conditions = UnetConditions {
            timestep_cond: Some(code.clone()),
            ..Default::default()
        };
        let out = unet.forward_conditioned(
            sample.clone(),
            io.float("timestep", &device),
            io.float("encoder_hidden_states", &device),
            conditions,
        );
        let grads = (out.clone() * io.float::<B, 4>("w", &device)).sum().backward();
        let errs = [
            ("timestep_cond", code_err),
            ("out", rel_err(&out.into_data(), &io.data("out"))),
            (
                "grad_sample",
                rel_err(&sample.grad(&grads).unwrap().into_data(), &io.data("grad_sample")),
            ),
            (
                "grad_timestep_cond",
                rel_err(&code.grad(&grads).unwrap().into_data(), &io.data("grad_timestep_cond")),
            ),
        ];
        for (name, err) in errs {
            eprintln!("lcm_tiny/unet: {name} rel err {err:.2e}");
            assert!(
                err <= if name.starts_with("grad") { 1e-3 } else { 1e-4 },
                "{name} rel err {err}"
            );
        }
        // Without the code the UNet runs on (as diffusers'), and differs.
        let plain = unet.forward(
            io.float("sample", &device),
            io.float("timestep", &device),
            io.float("encoder_hidden_states", &device),
            None,
        );
        assert!(rel_err(&plain.into_data(), &io.data("out")) > 1e-2);
        let (_, sd) = load_unet::<B>(fixture("unet_tiny"), &device).unwrap();
        assert_eq!(sd.takes_timestep_cond(), None);
    }

    /// `unet/config.json` of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
    /// and stabilityai/stable-diffusion-xl-base-1.0 parse, pass the checks and pick the right head counts.
    #[test]
    fn sd_configs_parse() {
        let sd15 = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
            "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
        let sd21 = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
            "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false, "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
            "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "use_linear_projection": true, "upcast_attention": true}"#;
        let cxl = UNet2DConditionConfig::sdxl();
        cxl.check().unwrap();
        assert_eq!(cxl.projection_class_embeddings_input_dim, Some(2816));
        assert_eq!(cxl.transformer_layers_per_block.get(2, 3, "").unwrap(), 10);
        let c15: UNet2DConditionConfig = serde_json::from_str(sd15).unwrap();
        let c21: UNet2DConditionConfig = serde_json::from_str(sd21).unwrap();
        c15.check().unwrap();
        c21.check().unwrap();
        assert_eq!(c15.cross_attention_dim, PerBlock::All(768));
        assert_eq!(c15.attention_head_dim.get(3, 4, "").unwrap(), 8);
        assert_eq!(c21.attention_head_dim.get(1, 4, "").unwrap(), 10);
        assert!(c21.use_linear_projection && !c15.use_linear_projection);
        assert_eq!(c21.time_embed_dim(), 1280);
    }

    #[test]
    fn unsupported_config_is_an_error() {
        let mut cfg = UNet2DConditionConfig {
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(1536),
            ..Default::default()
        };
        assert!(matches!(cfg.check(), Err(LoadError::Unsupported(_))));
        cfg.addition_embed_type = None;
        cfg.down_block_types[0] = "SimpleCrossAttnDownBlock2D".into();
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
        cfg = UNet2DConditionConfig {
            attention_head_dim: PerBlock::Each(vec![5, 10]),
            ..Default::default()
        };
        let err = cfg
            .init::<crate::testing::TestBackend>(&Default::default())
            .unwrap_err();
        assert!(err.to_string().contains("attention_head_dim"), "{err}");
    }
}
