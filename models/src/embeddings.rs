//! Timestep embeddings of the diffusion UNet.
//!
//! Mirrors diffusers `src/diffusers/models/embeddings.py` (`get_timestep_embedding`, `Timesteps`,
//! `TimestepEmbedding`) at v0.35: a sinusoidal code of the (possibly fractional) timestep, then a
//! two-layer MLP.

use crate::activation::silu_exact as silu;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Sinusoidal timestep code (DDPM / "Attention is all you need" positions).
///
/// Frequencies are `exp(-ln(10000)·i / (half − freq_shift))` for `i < half = dim/2`; the code is
/// `[sin(t·f), cos(t·f)]`, or `[cos, sin]` when `flip_sin_to_cos` (as SD checkpoints use).
/// The frequencies are host constants built in the dtype of `timesteps`; the output is
/// differentiable with respect to `timesteps`.
///
/// # Shapes
/// - timesteps: `[batch]`
/// - output: `[batch, dim]`
pub fn timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<B, 2> {
    let half = dim / 2;
    // f32 arithmetic in diffusers' order, so the codes agree to the last bit or two.
    let log_max = -(10000f64.ln() as f32);
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (log_max * i as f32 / denom).exp()).collect();
    let device = timesteps.device();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), (&device, timesteps.dtype()));
    let args = timesteps.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim::<2>(0);
    let (first, second) = if flip_sin_to_cos {
        (args.clone().cos(), args.sin())
    } else {
        (args.clone().sin(), args.cos())
    };
    let emb = Tensor::cat(vec![first, second], 1);
    if dim % 2 == 1 {
        let [b, _] = emb.dims();
        let pad = Tensor::zeros([b, 1], (&device, emb.dtype()));
        Tensor::cat(vec![emb, pad], 1)
    } else {
        emb
    }
}

/// The guidance-scale code of a latent consistency model's UNet (`time_cond_proj_dim`, LCM's
/// w-conditioning): the sinusoidal code of `1000 (scale − 1)` with frequencies
/// `exp(−ln(10000)·i/(dim/2 − 1))`, `[sin, cos]`, one row per sample, as diffusers'
/// `get_guidance_scale_embedding` computes it (in f32, then cast to `dtype`: it is a constant).
///
/// # Shapes
/// - output: `[batch, dim]`
pub fn guidance_scale_embedding<B: Backend>(
    scale: f64,
    batch: usize,
    dim: usize,
    device: &B::Device,
    dtype: burn::tensor::DType,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let w = (scale - 1.0) as f32 * 1000.0;
    // diffusers: log(10000)/(half − 1), then exp(arange · −that), all f32.
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args
        .iter()
        .map(|a| a.sin())
        .chain(args.iter().map(|a| a.cos()))
        .collect();
    row.resize(dim, 0.0);
    let rows: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
    Tensor::from_data(TensorData::new(rows, [batch, dim]), (device, dtype))
}

/// The MLP after the sinusoidal code: `linear_2(silu(linear_1(x + cond_proj(c))))` (diffusers
/// `TimestepEmbedding` with `act_fn="silu"`, no post activation, and a condition projection when
/// the UNet has `time_cond_proj_dim`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// `time_embedding.linear_1`.
    pub linear_1: Linear<B>,
    /// `time_embedding.linear_2`.
    pub linear_2: Linear<B>,
    /// `time_embedding.cond_proj` (no bias): projects a latent consistency model's
    /// guidance-scale code onto the sinusoidal code.
    pub cond_proj: Option<Linear<B>>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Builds the MLP `in_channels → time_embed_dim → time_embed_dim`.
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(in_channels, time_embed_dim).init(device),
            linear_2: LinearConfig::new(time_embed_dim, time_embed_dim).init(device),
            cond_proj: None,
        }
    }

    /// Adds the bias-free projection of a `cond_dim`-wide condition onto the input.
    pub fn with_cond_proj(mut self, cond_dim: usize, device: &B::Device) -> Self {
        let in_channels = self.linear_1.weight.dims()[0];
        self.cond_proj = Some(LinearConfig::new(cond_dim, in_channels).with_bias(false).init(device));
        self
    }

    /// # Shapes
    /// - x: `[batch, in_channels]`
    /// - output: `[batch, time_embed_dim]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }

    /// [`forward`](Self::forward) with the condition projected and added to `x` first.
    ///
    /// # Panics
    /// If there is no `cond_proj`.
    ///
    /// # Shapes
    /// - condition: `[batch, cond_dim]`
    pub fn forward_cond(&self, x: Tensor<B, 2>, condition: Tensor<B, 2>) -> Tensor<B, 2> {
        let proj = self
            .cond_proj
            .as_ref()
            .expect("this time embedding has no cond_proj (time_cond_proj_dim unset)");
        self.forward(x + proj.forward(condition))
    }
}
