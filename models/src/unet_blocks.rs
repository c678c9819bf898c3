//! Down, mid and up blocks of the UNet.
//!
//! Mirrors diffusers `src/diffusers/models/unets/unet_2d_blocks.py` at v0.35:
//! `CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn` and
//! `CrossAttnUpBlock2D`/`UpBlock2D`. A block with and without cross-attention is one struct
//! whose `attentions` list is empty in the plain variant: the checkpoint keys are then the same.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::attention::{Transformer2DConfig, Transformer2DModel};
use crate::resnet_block::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// Which layer of a UNet produced an activation that
/// [`UNet2DConditionModel::forward_observed`](crate::unet::UNet2DConditionModel::forward_observed)
/// shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `conv_in`, or `conv_out` (after the final GroupNorm and SiLU).
    Conv,
    /// A block's `resnets.{i}`.
    Resnet,
    /// A block's `attentions.{i}` (a [`Transformer2DModel`]).
    Attention,
    /// A down block's `downsamplers.0`.
    Downsample,
    /// An up block's `upsamplers.0`.
    Upsample,
}

/// What every block of one UNet shares.
#[derive(Debug, Clone)]
pub(crate) struct BlockSettings {
    /// Template for the resnets; channels are overwritten per resnet.
    pub resnet: ResnetBlock2DConfig,
    /// Template for the transformers; channels and layers are overwritten per block.
    pub transformer: Transformer2DConfig,
}

impl BlockSettings {
    fn resnet<B: Backend>(&self, c_in: usize, c_out: usize, device: &B::Device) -> ResnetBlock2D<B> {
        ResnetBlock2DConfig {
            in_channels: c_in,
            out_channels: c_out,
            ..self.resnet.clone()
        }
        .init(device)
    }

    fn transformer<B: Backend>(&self, channels: usize, device: &B::Device) -> Transformer2DModel<B> {
        Transformer2DConfig {
            channels,
            ..self.transformer.clone()
        }
        .init(device)
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    /// `resnets.{i}`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `attentions.{i}`, one after each resnet; empty in a plain `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel<B>>,
    /// `downsamplers.0`, absent in the last block.
    pub downsamplers: Option<Downsample2D<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    /// Builds `layers` resnets `c_in → c_out`, each followed by a transformer when
    /// `cross_attention`, and a stride-2 conv unless `last`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        c_in: usize,
        c_out: usize,
        layers: usize,
        cross_attention: bool,
        last: bool,
        downsample_padding: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|i| s.resnet(if i == 0 { c_in } else { c_out }, c_out, device))
                .collect(),
            attentions: if cross_attention {
                (0..layers).map(|_| s.transformer(c_out, device)).collect()
            } else {
                Vec::new()
            },
            downsamplers: (!last).then(|| Downsample2D::new(c_out, downsample_padding, device)),
        }
    }

    /// Returns the output and the skip tensors (one per resnet, plus the downsampled output).
    ///
    /// # Shapes
    /// - x: `[batch, c_in, h, w]`, temb: `[batch, temb]`, context: `[batch, l, d]`
    /// - output: `[batch, c_out, h/2, w/2]` (`h, w` in the last block)
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        self.forward_observed(x, temb, context, &mut |_, _, _| {})
    }

    /// [`forward`](Self::forward), showing `observe` each layer's output with the layer's kind
    /// and index in the block.
    pub fn forward_observed(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        observe: &mut dyn FnMut(Layer, usize, &Tensor<B, 4>),
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut h = x;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(h, Some(temb.clone()));
            observe(Layer::Resnet, i, &h);
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(h, context.clone());
                observe(Layer::Attention, i, &h);
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(h);
            observe(Layer::Downsample, 0, &h);
            skips.push(h.clone());
        }
        (h, skips)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    /// `resnets.{i}`: one more than `attentions`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `attentions.{i}`.
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// Builds the one-attention mid block of SD at `channels`.
    pub(crate) fn new(s: &BlockSettings, channels: usize, device: &B::Device) -> Self {
        Self {
            resnets: (0..2).map(|_| s.resnet(channels, channels, device)).collect(),
            attentions: vec![s.transformer(channels, device)],
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]` → output: `[batch, c, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        self.forward_observed(x, temb, context, &mut |_, _, _| {})
    }

    /// [`forward`](Self::forward), showing `observe` each layer's output with the layer's kind
    /// and index in the block.
    pub fn forward_observed(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        observe: &mut dyn FnMut(Layer, usize, &Tensor<B, 4>),
    ) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x, Some(temb.clone()));
        observe(Layer::Resnet, 0, &h);
        for (i, (attn, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            h = attn.forward(h, context.clone());
            observe(Layer::Attention, i, &h);
            h = resnet.forward(h, Some(temb.clone()));
            observe(Layer::Resnet, i + 1, &h);
        }
        h
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    /// `resnets.{i}`: each takes the previous output concatenated with one skip tensor.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `attentions.{i}`; empty in a plain `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel<B>>,
    /// `upsamplers.0`, absent in the last block.
    pub upsamplers: Option<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// Builds `layers` resnets. The first takes `prev_out + skip` channels, where the skip of
    /// the last resnet comes from the matching down block's input (`c_in`), the others from its
    /// output (`c_out`), as in diffusers' `res_skip_channels`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        c_in: usize,
        c_out: usize,
        prev_out: usize,
        layers: usize,
        cross_attention: bool,
        last: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|i| {
                    let skip = if i == layers - 1 { c_in } else { c_out };
                    let input = if i == 0 { prev_out } else { c_out };
                    s.resnet(input + skip, c_out, device)
                })
                .collect(),
            attentions: if cross_attention {
                (0..layers).map(|_| s.transformer(c_out, device)).collect()
            } else {
                Vec::new()
            },
            upsamplers: (!last).then(|| Upsample2D::new(c_out, device)),
        }
    }

    /// Consumes the last `resnets.len()` entries of `skips` (last first).
    ///
    /// # Shapes
    /// - x: `[batch, prev_out, h, w]` → output: `[batch, c_out, 2h, 2w]` (`h, w` in the last block)
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        skips: &mut Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        self.forward_observed(x, skips, temb, context, &mut |_, _, _| {})
    }

    /// [`forward`](Self::forward), showing `observe` each layer's output with the layer's kind
    /// and index in the block.
    pub fn forward_observed(
        &self,
        x: Tensor<B, 4>,
        skips: &mut Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        observe: &mut dyn FnMut(Layer, usize, &Tensor<B, 4>),
    ) -> Tensor<B, 4> {
        let mut h = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet keeps one skip per up-block resnet");
            h = resnet.forward(Tensor::cat(vec![h, skip], 1), Some(temb.clone()));
            observe(Layer::Resnet, i, &h);
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(h, context.clone());
                observe(Layer::Attention, i, &h);
            }
        }
        if let Some(up) = &self.upsamplers {
            h = up.forward(h);
            observe(Layer::Upsample, 0, &h);
        }
        h
    }
}
