//! Attention blocks of the UNet and the VAE.
//!
//! Mirrors diffusers v0.35: `models/attention_processor.py` (`Attention` with
//! `AttnProcessor2_0`), `models/attention.py` (`BasicTransformerBlock`, `FeedForward`),
//! `models/activations.py` (`GEGLU`) and `models/transformers/transformer_2d.py`
//! (`Transformer2DModel`, continuous input). Checkpoint keys `to_out.0` and `ff.net.{0,2}` are
//! Python list indices; [`unet_key_map`](crate::unet::unet_key_map) renames them to the fields
//! below.

use crate::norm::{group_norm, layer_norm};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;

use crate::activation::gelu_exact;
use crate::layout::contiguous;
use crate::resnet_block::conv2d;

/// Multi-head scaled dot-product attention on `[batch, tokens, heads·dim_head]` tensors.
///
/// Uses burn's fused `attention` op (flash attention on GPU backends, decomposed ops under
/// autodiff). `is_causal` masks future positions (CLIP's text encoder).
///
/// # Shapes
/// - q: `[batch, lq, heads·d]`, k and v: `[batch, lk, heads·d]`
/// - output: `[batch, lq, heads·d]`
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    is_causal: bool,
) -> Tensor<B, 3> {
    let split = |x: Tensor<B, 3>| {
        let [b, l, c] = x.dims();
        x.reshape([b, l, heads, c / heads]).swap_dims(1, 2)
    };
    let [b, lq, c] = q.dims();
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    attention(split(q), split(k), split(v), None, None, options)
        .swap_dims(1, 2)
        .reshape([b, lq, c])
}

/// diffusers `Attention`: `to_q`, `to_k`, `to_v`, `to_out.0`, and, in the VAE, a `group_norm`
/// applied to a 4-D input with a residual connection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key projection (from the context in cross-attention).
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// Output projection (`to_out.0` in checkpoints).
    pub to_out: Linear<B>,
    /// GroupNorm on spatial input (VAE mid-block attention only).
    pub group_norm: Option<GroupNorm<B>>,
    /// Low-rank adapters, when attached ([`Attention::with_lora`]); never in checkpoints.
    pub lora: Option<crate::lora::AttentionLora<B>>,
    /// Number of heads.
    pub heads: usize,
}

/// Settings of an [`Attention`] layer.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Width of the queries and of the output.
    pub query_dim: usize,
    /// Width of the context (keys and values); `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Whether q/k/v have biases (false in the UNet, true in the VAE).
    pub qkv_bias: bool,
    /// `(groups, eps)` of the VAE's GroupNorm, if any.
    pub group_norm: Option<(usize, f64)>,
}

impl AttentionConfig {
    /// Builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let ctx = self.cross_attention_dim.unwrap_or(self.query_dim);
        let proj = |i: usize, o: usize, bias: bool| LinearConfig::new(i, o).with_bias(bias).init(device);
        Attention {
            to_q: proj(self.query_dim, inner, self.qkv_bias),
            to_k: proj(ctx, inner, self.qkv_bias),
            to_v: proj(ctx, inner, self.qkv_bias),
            to_out: proj(inner, self.query_dim, true),
            group_norm: self.group_norm.map(|(groups, eps)| {
                GroupNormConfig::new(groups, self.query_dim)
                    .with_epsilon(eps)
                    .init(device)
            }),
            lora: None,
            heads: self.heads,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// Attention of `x` over `context` (over `x` itself when `None`).
    ///
    /// # Shapes
    /// - x: `[batch, tokens, query_dim]`
    /// - context: `[batch, context_tokens, cross_attention_dim]`
    /// - output: `[batch, tokens, query_dim]`
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let context = context.unwrap_or_else(|| x.clone());
        let (mut q, mut k, mut v) = (
            self.to_q.forward(x.clone()),
            self.to_k.forward(context.clone()),
            self.to_v.forward(context.clone()),
        );
        if let Some(lora) = &self.lora {
            q = q + lora.q.forward(x);
            k = k + lora.k.forward(context.clone());
            v = v + lora.v.forward(context);
        }
        let heads = multi_head_attention(q, k, v, self.heads, false);
        match &self.lora {
            Some(lora) => self.to_out.forward(heads.clone()) + lora.out.forward(heads),
            None => self.to_out.forward(heads),
        }
    }

    /// Self-attention over the pixels of a feature map, with the GroupNorm and residual of
    /// diffusers' VAE attention (`residual_connection=True`, `rescale_output_factor=1`).
    ///
    /// # Shapes
    /// - x: `[batch, c, h, w]`
    /// - output: `[batch, c, h, w]`
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => group_norm(norm, x.clone()),
            None => x.clone(),
        };
        let tokens = normed.reshape([b, c, h * w]).swap_dims(1, 2);
        let out = self.forward(tokens, None);
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers `GEGLU`: `proj` produces `[hidden, gate]`; the output is `hidden · gelu(gate)`
/// (exact erf GELU).
#[derive(Module, Debug)]
pub struct GeGlu<B: Backend> {
    /// `ff.net.0.proj`: `dim → 2·inner`.
    pub proj: Linear<B>,
}

impl<B: Backend> GeGlu<B> {
    /// # Shapes
    /// - x: `[batch, tokens, dim]`
    /// - output: `[batch, tokens, inner]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.proj.forward(x);
        let [hidden, gate]: [Tensor<B, 3>; 2] = h.chunk(2, 2).try_into().expect("chunk(2) gives two halves");
        contiguous(hidden) * gelu_exact(contiguous(gate))
    }
}

/// diffusers `FeedForward` with `activation_fn="geglu"`: GEGLU, then a linear layer.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `ff.net.0`.
    pub geglu: GeGlu<B>,
    /// `ff.net.2`: `inner → dim`.
    pub out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Builds `dim → 4·dim (GEGLU) → dim`.
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = 4 * dim;
        Self {
            geglu: GeGlu {
                proj: LinearConfig::new(dim, 2 * inner).init(device),
            },
            out: LinearConfig::new(inner, dim).init(device),
        }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]`
    /// - output: `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.out.forward(self.geglu.forward(x))
    }
}

/// diffusers `BasicTransformerBlock` (`norm_type="layer_norm"`): pre-norm self-attention,
/// cross-attention on the context, and a GEGLU feed-forward, each with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// LayerNorm before `attn1`.
    pub norm1: LayerNorm<B>,
    /// Self-attention (cross-attention when `only_cross_attention`).
    pub attn1: Attention<B>,
    /// LayerNorm before `attn2`.
    pub norm2: LayerNorm<B>,
    /// Cross-attention on the context.
    pub attn2: Attention<B>,
    /// LayerNorm before the feed-forward.
    pub norm3: LayerNorm<B>,
    /// Feed-forward.
    pub ff: FeedForward<B>,
    /// Whether `attn1` attends to the context as well.
    pub only_cross_attention: bool,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// Builds a block of width `dim = heads · dim_head`.
    pub fn new(
        dim: usize,
        heads: usize,
        cross_attention_dim: usize,
        only_cross_attention: bool,
        device: &B::Device,
    ) -> Self {
        let attn = |ctx: Option<usize>| {
            AttentionConfig {
                query_dim: dim,
                cross_attention_dim: ctx,
                heads,
                dim_head: dim / heads,
                qkv_bias: false,
                group_norm: None,
            }
            .init(device)
        };
        let norm = || LayerNormConfig::new(dim).init(device);
        Self {
            norm1: norm(),
            attn1: attn(only_cross_attention.then_some(cross_attention_dim)),
            norm2: norm(),
            attn2: attn(Some(cross_attention_dim)),
            norm3: norm(),
            ff: FeedForward::new(dim, device),
            only_cross_attention,
        }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]`
    /// - context: `[batch, context_tokens, cross_attention_dim]`
    /// - output: `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        let ctx1 = self.only_cross_attention.then(|| context.clone());
        let x = self.attn1.forward(layer_norm(&self.norm1, x.clone()), ctx1) + x;
        let x = self.attn2.forward(layer_norm(&self.norm2, x.clone()), Some(context)) + x;
        self.ff.forward(layer_norm(&self.norm3, x.clone())) + x
    }
}

/// `proj_in`/`proj_out` of a [`Transformer2DModel`]: a 1×1 conv (SD 1.x) or a linear layer
/// (SD 2.x, `use_linear_projection`). Loading skips enum variant names, so both variants read
/// the checkpoint's `proj_in.weight`.
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// 1×1 convolution.
    Conv(Conv2d<B>),
    /// Linear layer on the tokens.
    Linear(Linear<B>),
}

/// diffusers `Transformer2DModel` on continuous (feature-map) input: GroupNorm, `proj_in`,
/// a stack of [`BasicTransformerBlock`]s over the `h·w` tokens, `proj_out`, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    /// GroupNorm (eps 1e-6).
    pub norm: GroupNorm<B>,
    /// Input projection.
    pub proj_in: Projection<B>,
    /// `transformer_blocks.{i}`.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Output projection.
    pub proj_out: Projection<B>,
}

/// Settings of a [`Transformer2DModel`].
#[derive(Debug, Clone)]
pub struct Transformer2DConfig {
    /// Channels of the feature map (also the inner width: `heads · dim_head`).
    pub channels: usize,
    /// Number of heads.
    pub heads: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Width of the context.
    pub cross_attention_dim: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Linear (true) or 1×1 conv (false) projections.
    pub use_linear_projection: bool,
    /// Whether self-attention attends to the context.
    pub only_cross_attention: bool,
}

impl Transformer2DConfig {
    /// Builds the model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Transformer2DModel<B> {
        let c = self.channels;
        let proj = || {
            if self.use_linear_projection {
                Projection::Linear(LinearConfig::new(c, c).init(device))
            } else {
                Projection::Conv(conv2d(c, c, 1, device))
            }
        };
        Transformer2DModel {
            norm: GroupNormConfig::new(self.norm_num_groups, c)
                .with_epsilon(1e-6)
                .init(device),
            proj_in: proj(),
            transformer_blocks: (0..self.layers)
                .map(|_| {
                    BasicTransformerBlock::new(
                        c,
                        self.heads,
                        self.cross_attention_dim,
                        self.only_cross_attention,
                        device,
                    )
                })
                .collect(),
            proj_out: proj(),
        }
    }
}

impl<B: Backend> Transformer2DModel<B> {
    /// # Shapes
    /// - x: `[batch, c, h, w]`
    /// - context: `[batch, context_tokens, cross_attention_dim]`
    /// - output: `[batch, c, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>, context: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let normed = group_norm(&self.norm, x.clone());
        let to_tokens = |t: Tensor<B, 4>| contiguous(t.reshape([b, c, h * w]).swap_dims(1, 2));
        let to_map = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        // 1. proj_in (before flattening for the conv variant, after it for the linear one).
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(normed)),
            Projection::Linear(linear) => linear.forward(to_tokens(normed)),
        };
        // 2. transformer blocks.
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        // 3. proj_out, back to a feature map, residual.
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_map(tokens)),
            Projection::Linear(linear) => to_map(linear.forward(tokens)),
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, ElementConversion};

    /// softmax(QKᵀ/√d)V from tensor ops: the reference the attention op's gradient must equal.
    fn composed<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = q.dims()[3] as f64;
        softmax(q.matmul(k.swap_dims(2, 3)).div_scalar(d.sqrt()), 3).matmul(v)
    }

    /// Gradients of Σ w ⊙ attention(q, k, v) for q, k, v (None where not tracked), through
    /// burn's attention op and through the composition.
    #[allow(clippy::type_complexity)]
    fn both<B: burn::tensor::backend::AutodiffBackend>(
        shape_q: [usize; 4],
        shape_kv: [usize; 4],
        tracked: [bool; 3],
    ) -> (Vec<Option<Vec<f64>>>, Vec<Option<Vec<f64>>>, f64) {
        let device = Default::default();
        let draw = |s: [usize; 4]| Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (draw(shape_q), draw(shape_kv), draw(shape_kv));
        let w = draw(shape_q);
        let grads_of = |f: &dyn Fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>| {
            let leaf = |x: &Tensor<B, 4>, t: bool| match t {
                true => x.clone().detach().require_grad(),
                false => x.clone().detach(),
            };
            let (q, k, v) = (leaf(&q, tracked[0]), leaf(&k, tracked[1]), leaf(&v, tracked[2]));
            let loss = (f(q.clone(), k.clone(), v.clone()) * w.clone()).sum();
            let value: f64 = loss.clone().into_scalar().elem();
            let grads = loss.backward();
            let g = [q, k, v].map(|x| x.grad(&grads).map(|g| g.into_data().iter::<f64>().collect::<Vec<_>>()));
            (g.to_vec(), value)
        };
        let op = |q, k, v| attention(q, k, v, None, None, AttentionModuleOptions::default());
        let (got, value_op) = grads_of(&op);
        let (want, value_ref) = grads_of(&composed);
        (got, want, (value_op - value_ref).abs() / value_ref.abs().max(1.0))
    }

    fn max_rel(got: &[f64], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    fn check(got: &[Option<Vec<f64>>], want: &[Option<Vec<f64>>], tracked: [bool; 3], tol: f64) {
        for (i, name) in ["query", "key", "value"].iter().enumerate() {
            match (&got[i], &want[i]) {
                (Some(g), Some(w)) => {
                    let e = max_rel(g, w);
                    assert!(e < tol, "d/d{name}: {e:e} from the composed attention's");
                }
                (None, None) => assert!(!tracked[i]),
                (g, _) => panic!("d/d{name}: present {} against the reference's", g.is_some()),
            }
        }
    }

    #[test]
    fn attention_gradients_equal_the_composed_softmax_in_f64() {
        type B = Autodiff<NdArray<f64>>;
        // The vendored burn-autodiff gives attention its own backward, in blocks of 2^18
        // weights but at least 64 query rows: small self-attention (one block), cross-attention
        // over 1000 keys with only Q or only K and V tracked (19 blocks of 131 rows and one of
        // 11), and self-attention in 39 blocks of 64 rows and one of 4.
        for (q, kv, tracked) in [
            ([2, 3, 10, 4], [2, 3, 10, 4], [true, true, true]),
            ([1, 2, 2500, 8], [1, 2, 1000, 8], [true, false, false]),
            ([1, 2, 2500, 8], [1, 2, 1000, 8], [false, true, true]),
            ([1, 2, 2500, 4], [1, 2, 2048, 4], [true, true, true]),
        ] {
            let (got, want, value) = both::<B>(q, kv, tracked);
            assert!(value < 1e-12, "{q:?}: value {value:e} from the composed attention's");
            check(&got, &want, tracked, 1e-10);
        }
    }

    #[test]
    fn attention_gradients_on_flex_match_in_f32() {
        // 4·1100·1000 weights: the blocked backward.
        let (got, want, value) = both::<Autodiff<Flex>>([1, 4, 1100, 16], [1, 4, 1000, 16], [true; 3]);
        assert!(value < 1e-5, "value {value:e}");
        check(&got, &want, [true; 3], 1e-4);
    }
}
