//! Low-rank adapters (LoRA, Hu et al. 2021) on the attention projections.
//!
//! `W x` becomes `W x + (α/r) · B A x` with `A: in → r`, `B: r → out`, `B` starting at zero so
//! that an adapted network starts equal to the original. Freeze the network (`no_grad`) before
//! attaching adapters and only the adapters train: the fine-tuning of DESIGN.md §5 with a few
//! thousand parameters instead of all of them.

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::attention::Attention;
use crate::unet::UNet2DConditionModel;

/// One adapter: `(α/r) · up(down(x))`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `A`: input width → rank.
    pub down: Linear<B>,
    /// `B`: rank → output width; zero at initialisation.
    pub up: Linear<B>,
    /// α/r.
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// An adapter for a `d_in → d_out` projection.
    pub fn new(d_in: usize, d_out: usize, rank: usize, alpha: f64, device: &B::Device) -> Self {
        Self {
            down: LinearConfig::new(d_in, rank).with_bias(false).init(device),
            up: LinearConfig::new(rank, d_out)
                .with_bias(false)
                .with_initializer(Initializer::Zeros)
                .init(device),
            scale: alpha / rank as f64,
        }
    }

    /// The adapter's contribution for `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.up.forward(self.down.forward(x)).mul_scalar(self.scale)
    }
}

/// Adapters on the four projections of one [`Attention`].
#[derive(Module, Debug)]
pub struct AttentionLora<B: Backend> {
    /// On `to_q`.
    pub q: Lora<B>,
    /// On `to_k`.
    pub k: Lora<B>,
    /// On `to_v`.
    pub v: Lora<B>,
    /// On `to_out.0`.
    pub out: Lora<B>,
}

fn adapter_for<B: Backend>(linear: &Linear<B>, rank: usize, alpha: f64) -> Lora<B> {
    let [d_in, d_out] = linear.weight.dims();
    Lora::new(d_in, d_out, rank, alpha, &linear.weight.device())
}

impl<B: Backend> Attention<B> {
    /// This layer with fresh adapters of rank `rank` on q, k, v and out.
    pub fn with_lora(mut self, rank: usize, alpha: f64) -> Self {
        self.lora = Some(AttentionLora {
            q: adapter_for(&self.to_q, rank, alpha),
            k: adapter_for(&self.to_k, rank, alpha),
            v: adapter_for(&self.to_v, rank, alpha),
            out: adapter_for(&self.to_out, rank, alpha),
        });
        self
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Attaches adapters of rank `rank` to every attention layer (self- and cross-attention of
    /// every transformer block in the down, mid and up blocks).
    pub fn with_lora(mut self, rank: usize, alpha: f64) -> Self {
        let mid = self.mid_block.iter_mut().flat_map(|m| m.attentions.iter_mut());
        let down = self.down_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut());
        let up = self.up_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut());
        for transformer in down.chain(mid).chain(up) {
            for block in transformer.transformer_blocks.iter_mut() {
                block.attn1 = block.attn1.clone().with_lora(rank, alpha);
                block.attn2 = block.attn2.clone().with_lora(rank, alpha);
            }
        }
        self
    }
}
