//! Task 4 through the library: LoRA adapters on the toy UNet's attention, trained through the
//! sampler so that samples take the style (Gram matrices of the classifier's features) of one
//! reference image.
//!
//! `cargo run --release --example finetune`

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
    let classifier = classifier.no_grad();
    let style = toy::dataset_of_class(toy::class_index("cross")?, 1, 7)?.images_tensor::<Ad>(&device);
    let style = StyleLoss::new(&classifier, style);
    let mut model = denoiser.unconditional();
    model.unet = model.unet.no_grad().with_lora(4, 4.0);
    model.context = model.context.set_require_grad(false);
    let model = adjoint_dpm::ode::materialized(model);
    let loss = |images: Tensor<Ad, 4>| style.loss(images);
    let tuning = Tuning {
        iters: 20,
        lr: 0.01,
        sampler: Sampler::ddim(10),
        step_noise_seed: 0,
        resume: None,
    };
    // One fixed batch of noise, so the curve shows the optimisation rather than the draws.
    let noise = Tensor::<Flex, 4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let (_, losses) = tune_through_sampling(
        model,
        &PixelSpace,
        &schedule,
        &tuning,
        &mut |_| noise.clone(),
        &loss,
        &mut |i, l| println!("iteration {i}: style loss {l:.5}"),
    )?;
    println!("style loss {:.5} -> {:.5}", losses[0], losses[losses.len() - 1]);
    Ok(())
}
