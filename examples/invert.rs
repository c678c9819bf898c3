//! Task 3 through the library: learn a new conditioning embedding (starting from the null class)
//! whose samples take the appearance of one reference image (the classifier's pooled features:
//! [`StyleLoss::appearance`]); the UNet stays frozen, only the embedding trains.
//!
//! `cargo run --release --example invert`

use adjoint_dpm::diffusion::Sampler;
use adjoint_dpm::tasks::{tune_through_sampling, PixelSpace, StyleLoss, Tuning};
use adjoint_dpm::toy;
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::{Distribution, Tensor};

type Ad = Autodiff<Flex>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let (denoiser, classifier, schedule) = toy::load_default::<Ad>(&device)?;
    let reference = toy::dataset_of_class(toy::class_index("square")?, 1, 7)?.images_tensor::<Ad>(&device);
    let mut model = denoiser.unconditional();
    model.unet = model.unet.no_grad();
    let tuning = Tuning {
        iters: 20,
        lr: 0.2,
        sampler: Sampler::ddim(10),
        step_noise_seed: 0,
        resume: None,
    };
    let appearance = StyleLoss::appearance(&classifier, reference);
    let loss = |images: Tensor<Ad, 4>| appearance.loss(images);
    let (model, losses) = tune_through_sampling(
        model,
        &PixelSpace,
        &schedule,
        &tuning,
        &mut |_| Tensor::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device),
        &loss,
        &mut |i, l| println!("iteration {i}: loss {l:.4}"),
    )?;
    println!(
        "loss {:.4} -> {:.4}; the learned embedding is model.context ({:?})",
        losses[0],
        losses[losses.len() - 1],
        model.context.val().dims()
    );
    Ok(())
}
