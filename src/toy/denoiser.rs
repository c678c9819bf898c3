//! The class-conditional toy denoiser: diffusers' `UNet2DConditionModel` (the Stable Diffusion
//! code, a tiny config) conditioned through cross-attention on a learned class embedding.

use adjoint_dpm_models::load::LoadError;
use adjoint_dpm_models::unet::{PerBlock, UNet2DConditionConfig, UNet2DConditionModel};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::data::check_class;
use super::{ScheduleName, ToyError, NUM_CLASSES};
use crate::diffusion::{DiffusionError, EpsModel, NoiseSchedule};

/// Architecture of [`ToyDenoiser`]: the UNet config and the patch size.
///
/// With `patch = p > 1` the image is folded into `p × p` patches before the UNet (pixel
/// unshuffle: `[b, 3, 32, 32]` → `[b, 3p², 32/p, 32/p]`) and unfolded after it, as patch-based
/// diffusion models do (DiT, Simple Diffusion). The fold is a fixed permutation of the pixels,
/// so the diffusion still runs in pixel space; the UNet just works at a lower resolution, which
/// is what makes training on two CPU cores affordable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenoiserConfig {
    /// The UNet (diffusers' config.json fields); its in/out channels are `3 · patch²`.
    pub unet: UNet2DConditionConfig,
    /// Patch size (1, 2 or 4: a divisor of 32).
    #[serde(default = "one")]
    pub patch: usize,
    /// What the UNet predicts ([`Conditioned`] always returns ε).
    #[serde(default)]
    pub prediction: Prediction,
    /// The noise schedule (v-prediction needs it to convert to ε).
    #[serde(default)]
    pub schedule: ScheduleName,
}

/// The UNet's prediction target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε.
    #[default]
    Epsilon,
    /// `v = α ε − σ x_0` (Salimans & Ho 2022): unit-scale targets at every noise level, and
    /// `ε = σ x_t + α v` is the identity where the image is pure noise, so training starts from a
    /// sensible model.
    V,
}

fn one() -> usize {
    1
}

impl Default for DenoiserConfig {
    /// The shipped architecture: 4×4 patches (an 8×8×48 UNet input), channels [64, 64], one
    /// resnet per block, cross-attention at 4×4 and in the mid block, 32-wide class embeddings,
    /// v-prediction on the DDPM linear schedule.
    fn default() -> Self {
        Self::unet(4, &[64, 64], 32, 8, 4)
    }
}

impl DenoiserConfig {
    /// A v-prediction UNet (DDPM linear schedule) for 32×32 RGB folded into `patch × patch`
    /// patches, with `channels` per resolution (the first without attention), `embedding_dim`-wide
    /// context, `groups` GroupNorm groups and `heads` attention heads.
    pub fn unet(patch: usize, channels: &[usize], embedding_dim: usize, groups: usize, heads: usize) -> Self {
        let n = channels.len();
        let down = (0..n)
            .map(|i| if i == 0 { "DownBlock2D" } else { "CrossAttnDownBlock2D" }.to_string())
            .collect();
        let up = (0..n)
            .map(|i| if i + 1 == n { "UpBlock2D" } else { "CrossAttnUpBlock2D" }.to_string())
            .collect();
        Self {
            patch,
            prediction: Prediction::V,
            schedule: ScheduleName::default(),
            unet: UNet2DConditionConfig {
                sample_size: Some(PerBlock::All(super::IMAGE_SIZE / patch.max(1))),
                in_channels: 3 * patch * patch,
                out_channels: 3 * patch * patch,
                down_block_types: down,
                up_block_types: up,
                block_out_channels: channels.to_vec(),
                layers_per_block: PerBlock::All(1),
                norm_num_groups: Some(groups),
                cross_attention_dim: PerBlock::All(embedding_dim),
                attention_head_dim: PerBlock::All(heads),
                ..UNet2DConditionConfig::default()
            },
        }
    }

    /// Width of the class embedding (the UNet's `cross_attention_dim`).
    pub fn embedding_dim(&self) -> Result<usize, ToyError> {
        let n = self.unet.block_out_channels.len();
        self.unet
            .cross_attention_dim
            .get(0, n, "cross_attention_dim")
            .map_err(ToyError::from)
    }

    /// Checks the patch size against the UNet's channels.
    pub fn check(&self) -> Result<(), ToyError> {
        let p = self.patch;
        if p == 0 || !super::IMAGE_SIZE.is_multiple_of(p) {
            return Err(ToyError::InvalidOption {
                name: "denoiser.patch",
                value: p.to_string(),
                rule: "must divide the image size 32",
            });
        }
        if self.unet.in_channels != 3 * p * p || self.unet.out_channels != 3 * p * p {
            return Err(ToyError::InvalidOption {
                name: "denoiser.unet.in_channels/out_channels",
                value: format!("{}/{}", self.unet.in_channels, self.unet.out_channels),
                rule: "must both be 3 · patch²",
            });
        }
        Ok(())
    }

    /// Builds the denoiser with random weights (embedding rows ~ N(0, 1)).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ToyDenoiser<B>, ToyError> {
        self.check()?;
        let unet = self.unet.init(device).map_err(ToyError::from)?;
        let dim = self.embedding_dim()?;
        let table = Tensor::random([NUM_CLASSES + 1, dim], Distribution::Normal(0.0, 1.0), device);
        Ok(crate::ode::materialized(ToyDenoiser {
            unet,
            class_embedding: Param::from_tensor(table),
            patch: self.patch,
            prediction: self.prediction,
            schedule: self.schedule.schedule(),
        }))
    }
}

impl From<LoadError> for ToyError {
    fn from(e: LoadError) -> Self {
        ToyError::Model(e.to_string())
    }
}

/// The class-conditional denoiser: a UNet and a class-embedding table whose rows are the
/// [`super::CLASSES`] and whose **last** row ([`super::NULL_CLASS`]) is the null (unconditional)
/// class used for classifier-free guidance.
#[derive(Module, Debug)]
pub struct ToyDenoiser<B: Backend> {
    /// The ε-prediction UNet (`class_labels` unused: conditioning is its cross-attention context).
    pub unet: UNet2DConditionModel<B>,
    /// `[N + 1, D]` class embeddings; row N is the null class.
    pub class_embedding: Param<Tensor<B, 2>>,
    /// Patch size of the pixel (un)shuffle around the UNet (see [`DenoiserConfig`]).
    pub patch: usize,
    /// What the UNet predicts.
    #[module(skip)]
    pub prediction: Prediction,
    /// The noise schedule the model was trained with.
    #[module(skip)]
    pub schedule: NoiseSchedule,
}

/// Folds `[b, c, h, w]` into `[b, c·p², h/p, w/p]` (PyTorch's `pixel_unshuffle`).
pub fn pixel_unshuffle<B: Backend>(x: Tensor<B, 4>, p: usize) -> Tensor<B, 4> {
    if p == 1 {
        return x;
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / p, p, w / p, p])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * p * p, h / p, w / p])
}

/// Unfolds `[b, c·p², h, w]` into `[b, c, h·p, w·p]` (PyTorch's `pixel_shuffle`).
pub fn pixel_shuffle<B: Backend>(x: Tensor<B, 4>, p: usize) -> Tensor<B, 4> {
    if p == 1 {
        return x;
    }
    let [b, cpp, h, w] = x.dims();
    let c = cpp / (p * p);
    x.reshape([b, c, p, p, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([b, c, h * p, w * p])
}

impl<B: Backend> ToyDenoiser<B> {
    /// The UNet's raw prediction (ε or v, see [`Prediction`]) for per-sample timesteps and class
    /// rows (`N` = null class): what training regresses.
    ///
    /// # Shapes
    /// - x: `[b, 3, 32, 32]`, t: `[b]` (continuous, 0..=999), rows: `[b]` → `[b, 3, 32, 32]`
    pub fn forward(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, rows: Tensor<B, 1, Int>) -> Tensor<B, 4> {
        let b = rows.dims()[0];
        let table = self.class_embedding.val();
        let dim = table.dims()[1];
        let context = table.select(0, rows).reshape([b, 1, dim]);
        let out = self.unet.forward(pixel_unshuffle(x, self.patch), t, context, None);
        pixel_shuffle(out, self.patch)
    }

    /// The embedding rows for `labels` (`None` = null class), as a `[b, 1, D]` context.
    fn context(&self, labels: &[Option<usize>]) -> Result<Tensor<B, 3>, ToyError> {
        if labels.is_empty() {
            return Err(ToyError::EmptyBatch);
        }
        let rows = labels
            .iter()
            .map(|l| match *l {
                Some(c) => check_class(c).map(|_| c as i64),
                None => Ok(super::NULL_CLASS as i64),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let table = self.class_embedding.val();
        let dim = table.dims()[1];
        let b = rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &table.device());
        // Detached copy: the context is a new parameter, not a view of the table.
        Ok(table.select(0, idx).detach().reshape([b, 1, dim]))
    }

    /// Fixes the conditioning, one row per sample (`None` = null class). The result implements
    /// [`EpsModel`] and carries the context as a trainable parameter (embedding inversion trains
    /// it; freeze the UNet with `.unet.no_grad()` for that). A one-row context is shared by any
    /// batch.
    pub fn conditioned(&self, labels: &[Option<usize>]) -> Result<Conditioned<B>, ToyError> {
        Ok(crate::ode::materialized(Conditioned {
            unet: self.unet.clone(),
            context: Param::from_tensor(self.context(labels)?),
            patch: self.patch,
            prediction: self.prediction,
            schedule: self.schedule.clone(),
        }))
    }

    /// Same, for classifier-free guidance: context rows `[null…; labels…]`, to be wrapped in
    /// [`crate::diffusion::Cfg`] (which calls the model on `[x; x]`).
    pub fn conditioned_for_guidance(&self, labels: &[usize]) -> Result<Conditioned<B>, ToyError> {
        let rows: Vec<Option<usize>> = labels
            .iter()
            .map(|_| None)
            .chain(labels.iter().map(|&l| Some(l)))
            .collect();
        self.conditioned(&rows)
    }

    /// The unconditional model (null class), shared by any batch size.
    pub fn unconditional(&self) -> Conditioned<B> {
        self.conditioned(&[None]).expect("the null class is always valid")
    }
}

/// The denoiser with its conditioning fixed: the UNet and a `[b, 1, D]` context parameter.
#[derive(Module, Debug)]
pub struct Conditioned<B: Backend> {
    /// The UNet.
    pub unet: UNet2DConditionModel<B>,
    /// Context rows, one per sample (or one for the whole batch).
    pub context: Param<Tensor<B, 3>>,
    /// Patch size of the pixel (un)shuffle around the UNet.
    pub patch: usize,
    /// What the UNet predicts.
    #[module(skip)]
    pub prediction: Prediction,
    /// The noise schedule the model was trained with.
    #[module(skip)]
    pub schedule: NoiseSchedule,
}

impl<B: Backend> EpsModel<B, 4> for Conditioned<B> {
    /// ε at the shared timestep `t` (`[1]`, or one equal entry per sample). For a v-prediction
    /// UNet the conversion `ε = σ(t) x + α(t) v` reads `t` on the host: gradients reach x, the
    /// context and the weights, and reach `t` only through the UNet's time embedding.
    ///
    /// # Panics
    /// If the batch is neither the context's row count nor any batch for a one-row context
    /// ([`ToyDenoiser::conditioned`] fixes the batch). [`EpsModel::check_batch`] says so first
    /// as an error, and the samplers call it before their first step.
    fn eps(&self, x: Tensor<B, 4>, t: Tensor<B, 1>) -> Tensor<B, 4> {
        let b = x.dims()[0];
        let context = self.context.val();
        if let Err(e) = self.check_batch(b) {
            panic!("{e}");
        }
        // One row per sample, or one row for all of them.
        let context = if context.dims()[0] == b {
            context
        } else {
            context.repeat_dim(0, b)
        };
        let time = t.clone();
        let t = if t.dims()[0] == b { t } else { t.repeat_dim(0, b) };
        let out = pixel_shuffle(
            self.unet
                .forward(pixel_unshuffle(x.clone(), self.patch), t, context, None),
            self.patch,
        );
        match self.prediction {
            Prediction::Epsilon => out,
            Prediction::V => {
                // ε = σ x_t + α v, at the (shared) timestep.
                let t: f64 = time.into_data().convert::<f64>().to_vec::<f64>().expect("a timestep")[0];
                x.mul_scalar(self.schedule.sigma(t)) + out.mul_scalar(self.schedule.alpha(t))
            }
        }
    }

    fn check_batch(&self, batch: usize) -> Result<(), DiffusionError> {
        let rows = self.context.val().dims()[0];
        if rows != 1 && rows != batch {
            return Err(DiffusionError::BatchMismatch {
                batch,
                reason: format!("the model was conditioned for {rows} samples (one context row each)"),
            });
        }
        Ok(())
    }
}
