//! Task 2 through the library: for each sample of the toy model, noise within an ℓ∞ ball around
//! its x_T whose sample the classifier labels differently, with AdjointDPM gradients.
//!
//! `cargo run --release --example audit`

use adjoint_dpm::diffusion::Sampler;
use adjoint_dpm::ode::{BacksolveOptions, GradientMode};
use adjoint_dpm::tasks::{audit, Audit, PixelSpace};
use adjoint_dpm::toy;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let (denoiser, classifier, schedule) = toy::load_default::<Autodiff<Flex>>(&device)?;
    let x_t = Tensor::<Flex, 4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let task = Audit {
        epsilon: 0.2,
        iters: 20,
        lr: 0.05,
        closeness_weight: 1.0,
        sampler: Sampler::ddim(20).gradient(GradientMode::Backsolve(BacksolveOptions::default())),
        step_noise_seed: 0,
        resume: None,
    };
    let run = audit(
        &denoiser.unconditional(),
        &classifier,
        &PixelSpace,
        &schedule,
        x_t,
        &task,
        &mut |i, loss| println!("iteration {i}: loss {loss:.4}"),
    )?;
    let r = &run.report;
    println!(
        "label changed for {:.0}% of samples at ε = {}, mean RMS image change {:.3}",
        100.0 * r.success_rate,
        r.epsilon,
        r.mean_image_rms
    );
    Ok(())
}
