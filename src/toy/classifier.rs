//! The toy classifier: a small ResNet with GroupNorm (no batch statistics, so training, eval and
//! autodiff compute the same function).

use adjoint_dpm_models::norm::group_norm;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::NUM_CLASSES;

/// Architecture of [`ToyClassifier`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Channels of the three stages (16×16, 8×8, 4×4).
    pub widths: [usize; 3],
    /// GroupNorm groups (must divide every width).
    pub groups: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            widths: [16, 32, 64],
            groups: 8,
        }
    }
}

impl ClassifierConfig {
    /// Builds the network with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ToyClassifier<B> {
        let [w0, w1, w2] = self.widths;
        ToyClassifier {
            stem: conv3(3, w0, 2, device),
            stem_norm: GroupNormConfig::new(self.groups, w0).init(device),
            stage1: ResBlock::new(w0, w0, 1, self.groups, device),
            stage2: ResBlock::new(w0, w1, 2, self.groups, device),
            stage3: ResBlock::new(w1, w2, 2, self.groups, device),
            fc: LinearConfig::new(w2, NUM_CLASSES).init(device),
        }
    }
}

fn conv3<B: Backend>(c_in: usize, c_out: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// A pre-activation residual block: `x + conv(silu(norm(conv(silu(norm(x))))))`, with a strided
/// 1×1 projection on the shortcut when the shape changes.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    /// First norm.
    pub norm1: GroupNorm<B>,
    /// First conv (carries the stride).
    pub conv1: Conv2d<B>,
    /// Second norm.
    pub norm2: GroupNorm<B>,
    /// Second conv.
    pub conv2: Conv2d<B>,
    /// Shortcut projection when channels or resolution change.
    pub shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResBlock<B> {
    fn new(c_in: usize, c_out: usize, stride: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            norm1: GroupNormConfig::new(groups, c_in).init(device),
            conv1: conv3(c_in, c_out, stride, device),
            norm2: GroupNormConfig::new(groups, c_out).init(device),
            conv2: conv3(c_out, c_out, 1, device),
            shortcut: (c_in != c_out || stride != 1).then(|| {
                Conv2dConfig::new([c_in, c_out], [1, 1])
                    .with_stride([stride, stride])
                    .init(device)
            }),
        }
    }

    /// # Shapes
    /// `[b, c_in, h, w]` → `[b, c_out, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(group_norm(&self.norm1, x.clone())));
        let h = self.conv2.forward(silu(group_norm(&self.norm2, h)));
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}

/// A small classifier of the toy images: a strided stem (16²), three residual stages (16², 8²,
/// 4²), global average pooling, a linear head over [`super::CLASSES`].
#[derive(Module, Debug)]
pub struct ToyClassifier<B: Backend> {
    /// 3×3 stem conv.
    pub stem: Conv2d<B>,
    /// Stem norm.
    pub stem_norm: GroupNorm<B>,
    /// Stage at the stem's resolution.
    pub stage1: ResBlock<B>,
    /// Stage at half resolution.
    pub stage2: ResBlock<B>,
    /// Stage at quarter resolution.
    pub stage3: ResBlock<B>,
    /// Linear head.
    pub fc: Linear<B>,
}

impl<B: Backend> ToyClassifier<B> {
    /// Intermediate feature maps, finest first: the stem's and each stage's output
    /// (`[b, 16, 16, 16]`, `[b, 16, 16, 16]`, `[b, 32, 8, 8]`, `[b, 64, 4, 4]` by default), for
    /// Gram-matrix style losses.
    ///
    /// # Shapes
    /// - images: `[b, 3, 32, 32]`, values in `[-1, 1]`
    pub fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        let stem = silu(group_norm(&self.stem_norm, self.stem.forward(images)));
        let s1 = self.stage1.forward(stem.clone());
        let s2 = self.stage2.forward(s1.clone());
        let s3 = self.stage3.forward(s2.clone());
        vec![stem, s1, s2, s3]
    }

    /// Class logits.
    ///
    /// # Shapes
    /// - images: `[b, 3, 32, 32]`, values in `[-1, 1]`
    /// - output: `[b, N]` (N = number of classes)
    pub fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let last = self.features(images).pop().expect("three stages");
        self.head(last)
    }

    fn head(&self, features: Tensor<B, 4>) -> Tensor<B, 2> {
        let [b, c, _, _] = features.dims();
        let pooled = silu(features).mean_dim(3).mean_dim(2).reshape([b, c]);
        self.fc.forward(pooled)
    }

    /// The predicted class of each image.
    pub fn predict(&self, images: Tensor<B, 4>) -> Vec<usize> {
        let [b, _, _, _] = images.dims();
        let idx = self.logits(images).argmax(1).reshape([b]);
        idx.into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("integer indices")
            .into_iter()
            .map(|i| i as usize)
            .collect()
    }
}
