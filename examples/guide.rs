//! Task 1 through the library: steer samples of the embedded toy model's *unconditional* model
//! to a class by optimising their initial noise through the exact adjoint of DDIM.
//!
//! `cargo run --release --example guide` (about a minute on 2 cores).

use adjoint_dpm::diffusion::Sampler;
use adjoint_dpm::tasks::{guided_sampling, GuidedSampling, PixelSpace};
use adjoint_dpm::toy;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let (denoiser, classifier, schedule) = toy::load_default::<Autodiff<Flex>>(&device)?;
    let x_t = Tensor::<Flex, 4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let task = GuidedSampling {
        target: toy::class_index("ring")?,
        iters: 30,
        lr: 0.05,
        prior_weight: 0.1,
        sampler: Sampler::ddim(20),
        step_noise_seed: 0,
        resume: None,
    };
    let run = guided_sampling(
        &denoiser.unconditional(),
        &classifier,
        &PixelSpace,
        &schedule,
        x_t,
        &task,
        &mut |i, loss| println!("iteration {i}: loss {loss:.4}"),
    )?;
    println!(
        "classified as ring: {:.0}% -> {:.0}%",
        100.0 * run.report.target_rate_before,
        100.0 * run.report.target_rate_after
    );
    Ok(())
}
