//! torchvision's ResNet (He et al. 2015, "Deep Residual Learning for Image Recognition"), for
//! classifier losses on generated images, with ImageNet preprocessing as differentiable ops.
//!
//! Mirrors `torchvision/models/resnet.py` (v0.19+): `BasicBlock`, `Bottleneck` (stride on the
//! 3×3 conv, "ResNet v1.5"), `ResNet._make_layer` and `_forward_impl`. BatchNorm is always in
//! eval mode ([`FrozenBatchNorm2d`]: running statistics, even under autodiff), since the network
//! is a frozen judge, never trained here. [`ResNetConfig::stem_width`] (64 in torchvision) is
//! the knob that makes tiny test versions.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::{interpolate, max_pool2d};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::load::{load_pytorch, load_safetensors, KeyMap, LoadError};

/// Residual block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum BlockKind {
    /// Two 3×3 convs (ResNet-18/34), expansion 1.
    Basic,
    /// 1×1, 3×3, 1×1 convs (ResNet-50/101/152), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes` (torchvision `block.expansion`).
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Architecture of a torchvision ResNet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ResNetConfig {
    /// Block kind.
    pub block: BlockKind,
    /// Blocks in `layer1..layer4`.
    pub layers: [usize; 4],
    /// Channels of the stem; stage `i` has `stem_width · 2^i` planes (64 in torchvision).
    pub stem_width: usize,
    /// Groups of the 3×3 convs (ResNeXt; 1 for ResNet).
    pub groups: usize,
    /// torchvision `width_per_group` (64 for ResNet; 128 for Wide ResNet).
    pub width_per_group: usize,
    /// Classifier outputs.
    pub num_classes: usize,
}

impl ResNetConfig {
    /// torchvision `resnet18`.
    pub fn resnet18() -> Self {
        Self {
            block: BlockKind::Basic,
            layers: [2, 2, 2, 2],
            stem_width: 64,
            groups: 1,
            width_per_group: 64,
            num_classes: 1000,
        }
    }

    /// torchvision `resnet50`.
    pub fn resnet50() -> Self {
        Self {
            block: BlockKind::Bottleneck,
            layers: [3, 4, 6, 3],
            ..Self::resnet18()
        }
    }

    /// Builds the network with random weights (load real ones with [`load_resnet`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResNet<B> {
        let mut in_planes = self.stem_width;
        let mut stage = |i: usize| {
            let planes = self.stem_width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let blocks: Vec<Block<B>> = (0..self.layers[i])
                .map(|j| {
                    let block = self.block(in_planes, planes, if j == 0 { stride } else { 1 }, device);
                    in_planes = planes * self.block.expansion();
                    block
                })
                .collect();
            blocks
        };
        let (layer1, layer2, layer3, layer4) = (stage(0), stage(1), stage(2), stage(3));
        ResNet {
            conv1: conv(3, self.stem_width, 7, 2, 3, 1, device),
            bn1: FrozenBatchNorm2d::new(self.stem_width, device),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new((self.stem_width << 3) * self.block.expansion(), self.num_classes).init(device),
        }
    }

    fn block<B: Backend>(&self, in_planes: usize, planes: usize, stride: usize, device: &B::Device) -> Block<B> {
        let out = planes * self.block.expansion();
        let downsample = (stride != 1 || in_planes != out).then(|| Downsample {
            conv: conv(in_planes, out, 1, stride, 0, 1, device),
            bn: FrozenBatchNorm2d::new(out, device),
        });
        match self.block {
            BlockKind::Basic => Block {
                conv1: conv(in_planes, planes, 3, stride, 1, 1, device),
                bn1: FrozenBatchNorm2d::new(planes, device),
                conv2: conv(planes, planes, 3, 1, 1, 1, device),
                bn2: FrozenBatchNorm2d::new(planes, device),
                conv3: None,
                bn3: None,
                downsample,
            },
            BlockKind::Bottleneck => {
                let width = planes * self.width_per_group / 64 * self.groups;
                Block {
                    conv1: conv(in_planes, width, 1, 1, 0, 1, device),
                    bn1: FrozenBatchNorm2d::new(width, device),
                    conv2: conv(width, width, 3, stride, 1, self.groups, device),
                    bn2: FrozenBatchNorm2d::new(width, device),
                    conv3: Some(conv(width, out, 1, 1, 0, 1, device)),
                    bn3: Some(FrozenBatchNorm2d::new(out, device)),
                    downsample,
                }
            }
        }
    }
}

/// A bias-free conv as torchvision's `conv1x1`/`conv3x3`/stem.
fn conv<B: Backend>(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_groups(groups)
        .with_bias(false)
        .init(device)
}

/// BatchNorm in eval mode: `(x − running_mean) / sqrt(running_var + 1e-5) · weight + bias`.
///
/// burn's `BatchNorm` switches to batch statistics whenever autodiff is on, which would change
/// the function we differentiate; this one never does. Field names are torchvision's.
#[derive(Module, Debug)]
pub struct FrozenBatchNorm2d<B: Backend> {
    /// Scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift.
    pub bias: Param<Tensor<B, 1>>,
    /// Running mean (a buffer in PyTorch).
    pub running_mean: Param<Tensor<B, 1>>,
    /// Running variance (a buffer in PyTorch).
    pub running_var: Param<Tensor<B, 1>>,
}

impl<B: Backend> FrozenBatchNorm2d<B> {
    /// Identity statistics for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        let p = |v: f32| Param::from_tensor(Tensor::full([channels], v, device));
        Self {
            weight: p(1.0),
            bias: p(0.0),
            running_mean: p(0.0),
            running_var: p(1.0),
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]` → output: `[batch, c, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let scale = self.weight.val() / (self.running_var.val() + 1e-5).sqrt();
        let shift = self.bias.val() - self.running_mean.val() * scale.clone();
        let c = scale.dims()[0];
        x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
    }
}

/// The projection shortcut (torchvision `downsample`: `Sequential(conv1x1, BatchNorm2d)`).
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// `downsample.0`.
    pub conv: Conv2d<B>,
    /// `downsample.1`.
    pub bn: FrozenBatchNorm2d<B>,
}

/// A `BasicBlock` (no `conv3`/`bn3`) or a `Bottleneck`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// First conv (3×3 basic, 1×1 bottleneck).
    pub conv1: Conv2d<B>,
    /// Its BatchNorm.
    pub bn1: FrozenBatchNorm2d<B>,
    /// Second conv (3×3, carries the stride).
    pub conv2: Conv2d<B>,
    /// Its BatchNorm.
    pub bn2: FrozenBatchNorm2d<B>,
    /// Bottleneck's expanding 1×1 conv.
    pub conv3: Option<Conv2d<B>>,
    /// Its BatchNorm.
    pub bn3: Option<FrozenBatchNorm2d<B>>,
    /// Projection shortcut when the shape changes.
    pub downsample: Option<Downsample<B>>,
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// - x: `[batch, in, h, w]` → output: `[batch, planes·expansion, h/stride, w/stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let mut h = self.bn2.forward(self.conv2.forward(h));
        if let (Some(conv3), Some(bn3)) = (&self.conv3, &self.bn3) {
            h = bn3.forward(conv3.forward(relu(h)));
        }
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x)),
            None => x,
        };
        relu(h + identity)
    }
}

/// torchvision `ResNet`; field names are the state-dict keys.
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    /// 7×7 stride-2 stem conv.
    pub conv1: Conv2d<B>,
    /// Stem BatchNorm.
    pub bn1: FrozenBatchNorm2d<B>,
    /// Stage 1 (stride 1).
    pub layer1: Vec<Block<B>>,
    /// Stage 2 (stride 2).
    pub layer2: Vec<Block<B>>,
    /// Stage 3 (stride 2).
    pub layer3: Vec<Block<B>>,
    /// Stage 4 (stride 2).
    pub layer4: Vec<Block<B>>,
    /// Classifier.
    pub fc: Linear<B>,
}

impl<B: Backend> ResNet<B> {
    /// Logits of a normalised image batch (see [`imagenet_preprocess`]).
    ///
    /// # Shapes
    /// - x: `[batch, 3, h, w]` → output: `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        // 1. stem: conv, bn, relu, 3×3 stride-2 max pool (inputs are ≥ 0 after relu, so zero
        //    padding equals PyTorch's −∞ padding).
        let h = relu(self.bn1.forward(self.conv1.forward(x)));
        let mut h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
        // 2. the four stages.
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            h = block.forward(h);
        }
        // 3. global average pool and classifier.
        let [b, c, _, _] = h.dims();
        let pooled = h.mean_dim(3).mean_dim(2).reshape([b, c]);
        self.fc.forward(pooled)
    }
}

impl<B: Backend> ResNet<B> {
    /// The outputs of the four stages (`layer1` … `layer4`) of a normalised image batch: the
    /// feature maps style (Gram-matrix) losses compare.
    ///
    /// # Shapes
    /// - x: `[batch, 3, h, w]` → stage i: `[batch, stem_width · 2^i · expansion, h/2^(i+2), w/2^(i+2)]`
    pub fn features(&self, x: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        let h = relu(self.bn1.forward(self.conv1.forward(x)));
        let mut h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut out = Vec::with_capacity(4);
        for stage in [&self.layer1, &self.layer2, &self.layer3, &self.layer4] {
            for block in stage {
                h = block.forward(h);
            }
            out.push(h.clone());
        }
        out
    }
}

/// ImageNet channel means (torchvision's `Normalize`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Differentiable ImageNet preprocessing: bilinear resize to `size` (half-pixel centres,
/// `align_corners=False`, no antialiasing: PyTorch's `F.interpolate` default), then
/// per-channel normalisation. torchvision's eval transform is `Resize(256)` + `CenterCrop(224)`;
/// for generated square images a direct resize to 224 is the usual differentiable stand-in.
///
/// # Shapes
/// - image: `[batch, 3, h, w]`, values in `[0, 1]`
/// - output: `[batch, 3, size[0], size[1]]`
pub fn imagenet_preprocess<B: Backend>(image: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let options = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false);
    let x = interpolate(image, size, options);
    let (device, dtype) = (x.device(), x.dtype());
    let stat = |v: [f32; 3]| {
        Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [3]), (&device, dtype)).reshape([1, 3, 1, 1])
    };
    (x - stat(IMAGENET_MEAN)) / stat(IMAGENET_STD)
}

/// torchvision key renames: `downsample.0`/`.1` are the shortcut's conv and BatchNorm;
/// `num_batches_tracked` is a training counter we do not keep.
pub fn resnet_key_map() -> KeyMap {
    KeyMap::new()
        .rename(r"\.downsample\.0\.", ".downsample.conv.")
        .rename(r"\.downsample\.1\.", ".downsample.bn.")
        .ignore(r"num_batches_tracked$")
}

/// Loads torchvision weights (a `.pth`/`.pt` state dict, or `.safetensors`) into a ResNet of
/// architecture `config`.
pub fn load_resnet<B: Backend>(
    path: impl AsRef<Path>,
    config: &ResNetConfig,
    device: &B::Device,
) -> Result<ResNet<B>, LoadError> {
    let path = path.as_ref();
    let model = config.init(device);
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt" | "bin") => load_pytorch(model, path, None, &resnet_key_map()),
        _ => load_safetensors(model, path, &resnet_key_map()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, rel_err, Io, TestAutodiffBackend};

    fn tiny(block: BlockKind, layers: [usize; 4]) -> ResNetConfig {
        ResNetConfig {
            block,
            layers,
            stem_width: 8,
            groups: 1,
            width_per_group: 64,
            num_classes: 10,
        }
    }

    fn parity(dir: &str, weights: &str, config: ResNetConfig) -> (f32, f32) {
        type B = TestAutodiffBackend;
        let device = Default::default();
        let net = load_resnet::<B>(fixture(&format!("{dir}/{weights}")), &config, &device).expect("fixture loads");
        let io = Io::open(dir);
        let image = io.float::<B, 4>("image", &device).require_grad();
        let out = net.forward(imagenet_preprocess(image.clone(), [64, 64]));
        let grads = (out.clone() * io.float::<B, 2>("w", &device)).sum().backward();
        let grad = image.grad(&grads).expect("image gradient");
        (
            rel_err(&out.into_data(), &io.data("out")),
            rel_err(&grad.into_data(), &io.data("grad_image")),
        )
    }

    #[test]
    fn resnet_tiny_matches_torchvision() {
        let (out, grad) = parity(
            "resnet_tiny_bottleneck",
            "model.safetensors",
            tiny(BlockKind::Bottleneck, [1, 2, 1, 1]),
        );
        eprintln!("resnet_tiny_bottleneck: output rel err {out:.2e}, input-gradient rel err {grad:.2e}");
        assert!(out <= 1e-4, "output rel err {out}");
        assert!(grad <= 1e-3, "gradient rel err {grad}");
    }

    #[test]
    fn resnet_basic_from_pth_matches_torchvision() {
        let (out, grad) = parity("resnet_tiny_basic", "model.pth", tiny(BlockKind::Basic, [2, 1, 1, 1]));
        eprintln!("resnet_tiny_basic (.pth): output rel err {out:.2e}, input-gradient rel err {grad:.2e}");
        assert!(out <= 1e-4, "output rel err {out}");
        assert!(grad <= 1e-3, "gradient rel err {grad}");
    }

    #[test]
    fn presets_have_torchvision_shapes() {
        type B = crate::testing::TestBackend;
        let r50 = ResNetConfig::resnet50().init::<B>(&Default::default());
        assert_eq!(r50.fc.weight.dims(), [2048, 1000]);
        assert_eq!(r50.layer3.len(), 6);
        assert_eq!(r50.layer1[0].conv3.as_ref().unwrap().weight.dims(), [256, 64, 1, 1]);
        let r18 = ResNetConfig::resnet18().init::<B>(&Default::default());
        assert_eq!(r18.fc.weight.dims(), [512, 1000]);
        assert!(r18.layer1[0].downsample.is_none() && r18.layer2[0].downsample.is_some());
    }
}
