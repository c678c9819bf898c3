//! A torchvision ResNet as the tasks' judge: images in `[-1, 1]` → ImageNet preprocessing
//! (differentiable) → logits; its stage outputs are the features of style losses.

use std::path::Path;

use adjoint_dpm_models::load::{read_config, LoadError};
use adjoint_dpm_models::resnet::{imagenet_preprocess, load_resnet, ResNet, ResNetConfig};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::tasks::common::Classifier;

/// A ResNet classifier with its input resolution.
#[derive(Module, Debug)]
pub struct ImageNetClassifier<B: Backend> {
    /// The network.
    pub resnet: ResNet<B>,
    /// Side of the square input it sees (224 for ImageNet weights).
    pub input_size: usize,
}

impl<B: Backend> ImageNetClassifier<B> {
    /// Loads torchvision weights (`.pth`/`.pt` or `.safetensors`). The architecture is
    /// ResNet-50 unless a JSON [`ResNetConfig`] sits next to the file with the same stem
    /// (`model.json` for `model.safetensors`), as for small test networks.
    pub fn load(path: impl AsRef<Path>, input_size: usize, device: &B::Device) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let config_path = path.with_extension("json");
        let config: ResNetConfig = if config_path.is_file() {
            read_config(&config_path)?
        } else {
            ResNetConfig::resnet50()
        };
        let resnet = load_resnet(path, &config, device)?;
        Ok(Self { resnet, input_size })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.resnet.fc.weight.dims()[1]
    }

    fn preprocess(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let unit = images.add_scalar(1.0).mul_scalar(0.5);
        imagenet_preprocess(unit, [self.input_size, self.input_size])
    }
}

impl<B: Backend> Classifier<B> for ImageNetClassifier<B> {
    fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.resnet.forward(self.preprocess(images))
    }

    fn features(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        self.resnet.features(self.preprocess(images))
    }
}
