//! The convolutional blocks shared by the UNet and the VAE.
//!
//! Mirrors diffusers `src/diffusers/models/resnet.py` (`ResnetBlock2D`),
//! `downsampling.py` (`Downsample2D`) and `upsampling.py` (`Upsample2D`) at v0.35, for the
//! options Stable Diffusion uses (SiLU, conv down/up-sampling, nearest ×2 upsampling).

use crate::activation::silu_exact as silu;
use crate::norm::group_norm;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A `k×k` convolution with `(k-1)/2` zero padding and stride 1 (PyTorch `padding=k//2`).
pub(crate) fn conv2d<B: Backend>(c_in: usize, c_out: usize, kernel: usize, device: &B::Device) -> Conv2d<B> {
    let p = (kernel - 1) / 2;
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

/// How the time embedding enters a [`ResnetBlock2D`] (diffusers `resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeScaleShift {
    /// `h + proj(temb)` before `norm2` (SD 1.x/2.x).
    Default,
    /// `norm2(h)·(1 + scale) + shift`, with `proj(temb)` split into scale and shift.
    ScaleShift,
}

/// Settings of one [`ResnetBlock2D`].
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for a block without one (the VAE's).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (diffusers `resnet_groups`, 32 in SD).
    pub groups: usize,
    /// GroupNorm epsilon (diffusers `resnet_eps`: UNet `norm_eps`=1e-5, VAE 1e-6).
    pub eps: f64,
    /// The output is divided by this (diffusers `output_scale_factor`, 1 in SD).
    pub output_scale_factor: f64,
    /// How the time embedding is applied.
    pub time_scale_shift: TimeScaleShift,
}

impl ResnetBlock2DConfig {
    /// Builds the block; `conv_shortcut` exists only when the channel count changes.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let (c_in, c_out) = (self.in_channels, self.out_channels);
        let temb_out = match self.time_scale_shift {
            TimeScaleShift::Default => c_out,
            TimeScaleShift::ScaleShift => 2 * c_out,
        };
        ResnetBlock2D {
            norm1: GroupNormConfig::new(self.groups, c_in)
                .with_epsilon(self.eps)
                .init(device),
            conv1: conv2d(c_in, c_out, 3, device),
            time_emb_proj: self.temb_channels.map(|t| LinearConfig::new(t, temb_out).init(device)),
            norm2: GroupNormConfig::new(self.groups, c_out)
                .with_epsilon(self.eps)
                .init(device),
            conv2: conv2d(c_out, c_out, 3, device),
            conv_shortcut: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, device)),
            output_scale_factor: self.output_scale_factor,
            scale_shift: self.time_scale_shift == TimeScaleShift::ScaleShift,
        }
    }
}

/// diffusers `ResnetBlock2D`: two GroupNorm–SiLU–conv stages, the time embedding added in
/// between, and a (1×1 conv) skip connection.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    /// First GroupNorm.
    pub norm1: GroupNorm<B>,
    /// First 3×3 conv.
    pub conv1: Conv2d<B>,
    /// Projection of the (SiLU-activated) time embedding; absent in the VAE.
    pub time_emb_proj: Option<Linear<B>>,
    /// Second GroupNorm.
    pub norm2: GroupNorm<B>,
    /// Second 3×3 conv.
    pub conv2: Conv2d<B>,
    /// 1×1 conv on the skip path when `in_channels != out_channels`.
    pub conv_shortcut: Option<Conv2d<B>>,
    /// Divisor of the output.
    pub output_scale_factor: f64,
    /// Whether the time embedding is a scale and shift of `norm2`'s output.
    pub scale_shift: bool,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// # Shapes
    /// - x: `[batch, in_channels, h, w]`
    /// - temb: `[batch, temb_channels]` (ignored when the block has no `time_emb_proj`)
    /// - output: `[batch, out_channels, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(group_norm(&self.norm1, x.clone())));
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(silu(t)).unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3)),
            _ => None,
        };
        let h = match (temb, self.scale_shift) {
            (Some(t), false) => group_norm(&self.norm2, h + t),
            (Some(t), true) => {
                let [scale, shift] = t.chunk(2, 1).try_into().expect("two chunks");
                group_norm(&self.norm2, h) * (scale + 1.0) + shift
            }
            (None, _) => group_norm(&self.norm2, h),
        };
        let h = self.conv2.forward(silu(h));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with `use_conv=True`: a stride-2 3×3 conv. With `padding = 0`
/// (the VAE encoder's), the input is first padded by one on the right and bottom.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// `downsamplers.0.conv`.
    pub conv: Conv2d<B>,
    /// Whether to pad right/bottom by one before the (unpadded) conv.
    pub asymmetric_pad: bool,
}

impl<B: Backend> Downsample2D<B> {
    /// Builds the conv with diffusers' `padding` argument (1 in the UNet, 0 in the VAE).
    pub fn new(channels: usize, padding: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
                .init(device),
            asymmetric_pad: padding == 0,
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]`
    /// - output: `[batch, c, ceil(h/2), ceil(w/2)]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.asymmetric_pad {
            x.pad((0, 1, 0, 1), burn::tensor::ops::PadMode::Constant(0.0))
        } else {
            x
        };
        self.conv.forward(x)
    }
}

/// Nearest-neighbour ×2 upsampling, written as broadcast + reshape so that it is exact and
/// differentiable on every backend.
///
/// # Shapes
/// - x: `[batch, c, h, w]`
/// - output: `[batch, c, 2h, 2w]`
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

/// diffusers `Upsample2D` with `use_conv=True`: nearest ×2, then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// `upsamplers.0.conv`.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    /// Builds the conv.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, device),
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]`
    /// - output: `[batch, c, 2h, 2w]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(upsample_nearest2x(x))
    }
}
