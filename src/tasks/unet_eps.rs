//! A diffusers UNet with its conditioning held as a parameter: the shape of a text-conditioned
//! Stable Diffusion denoiser, as an [`EpsModel`].

use adjoint_dpm_models::unet::UNet2DConditionModel;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::diffusion::EpsModel;

/// ε(x, t) = UNet(x, t, context). Freeze `unet` (`no_grad`) and keep `context` trainable to
/// differentiate w.r.t. the text embedding (embedding inversion); freeze `context` to tune
/// weights. The context has one row per sample, or one row for any batch.
#[derive(Module, Debug)]
pub struct UnetEps<B: Backend> {
    /// The noise-prediction UNet.
    pub unet: UNet2DConditionModel<B>,
    /// `[rows, tokens, cross_attention_dim]` (e.g. `[1, 77, 768]` CLIP text embeddings).
    pub context: Param<Tensor<B, 3>>,
}

impl<B: Backend> EpsModel<B, 4> for UnetEps<B> {
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        let context = self.context.val();
        let context = if context.dims()[0] == batch {
            context
        } else {
            context.repeat_dim(0, batch)
        };
        self.unet.forward(x, t.repeat_dim(0, batch), context, None)
    }
}
