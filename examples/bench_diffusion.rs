//! Gradient time and peak memory of sampling, per sampler step count and gradient mode, on a
//! small diffusers-style UNet (random weights). Prints one JSON line per run; run one process
//! per configuration so that peak RSS is that configuration's:
//!
//! ```text
//! for n in 5 20 50 200; do for m in backprop checkpointed backsolve; do
//!   cargo run --release --example bench_diffusion -- --steps $n --gradient $m
//! done; done
//! ```
//!
//! Fields: `sample_s` (sampling without a graph), `grad_s` (sampling + backward of a loss on
//! x_0 to x_T, the conditioning and the weights; with `--frozen-weights` to x_T and the
//! conditioning only), their ratio (the floor is about 3: one forward, one recomputation and one
//! VJP per step), and the process's peak RSS in MiB.
//!
//! `--sampler` picks another sampler; the stochastic ones (`ddim-eta`, `euler-a`, `dpmpp2m-sde`,
//! `lcm`, `tcd`, `dpm2-a`) hold their step noise once, as a parameter of the step map, so their memory is the
//! deterministic sampler's plus the S noise tensors: compare with `ddim` at the same steps.
//! `--noise-grad` also differentiates to every step's noise (noise optimisation, as `guide`
//! does), which adds the noise's gradient.
//!
//! `--controlnet` adds a ControlNet of the UNet's shape on a control image (two networks a
//! step; the image's and the ControlNet's weights' gradients too).
//!
//! `--config sd15 --backend cuda` (with `--features cuda`) runs the Stable Diffusion 1.5 UNet
//! (random weights, 64×64×4 latent, 77×768 context): DESIGN.md §7 has PyTorch's figures for it.

use std::time::Instant;

use adjoint_dpm::diffusion::{NoiseSchedule, Sampler};
use adjoint_dpm::prelude::*;
use adjoint_dpm::tasks::UnetEps;
use adjoint_dpm_models::controlnet::ControlNetConfig;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::prelude::*;
use clap::{Parser, ValueEnum};

mod common;
use common::{finish, BackendName, UnetSize};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Backprop,
    Checkpointed,
    Recursive,
    Backsolve,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SamplerArg {
    Ddim,
    Heun,
    Dpmpp2m,
    Unipc,
    /// DDIM with η = 1.
    DdimEta,
    EulerA,
    Dpmpp2mSde,
    Plms,
    /// LCM (at most 50 steps, its distillation timesteps).
    Lcm,
    /// TCD with γ = 0.3 (at most 50 steps).
    Tcd,
    /// DEIS of order 3.
    Deis3,
    /// DPM2 (two network calls a step).
    Dpm2,
    /// DPM2 ancestral.
    Dpm2A,
}

#[derive(Parser, Debug)]
#[command(about = "Sampling-gradient time and memory vs steps; prints one JSON line")]
struct Args {
    /// Sampler steps N.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// The sampler.
    #[arg(long, value_enum, default_value = "ddim")]
    sampler: SamplerArg,
    #[arg(long, value_enum, default_value = "checkpointed")]
    gradient: Mode,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Latent height = width.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Which UNet (use `--size 64` with sd15).
    #[arg(long, value_enum, default_value = "tiny")]
    config: UnetSize,
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendName,
    /// Gradient to x_T and the conditioning only (no parameter VJPs).
    #[arg(long)]
    frozen_weights: bool,
    /// With a ControlNet of the UNet's shape (random weights) on a control image at 8 times
    /// the latent's size: the gradient also reaches the image and the ControlNet's weights.
    #[arg(long)]
    controlnet: bool,
    /// Also the gradient to a stochastic sampler's step noise.
    #[arg(long)]
    noise_grad: bool,
}

fn main() {
    let args = Args::parse();
    common::run_on!(args.backend, run, &args);
}

fn run<Inner: Backend>(args: &Args) -> Result<(), String> {
    type B<I> = Autodiff<I>;
    let device = Default::default();
    <Inner as Backend>::seed(&device, 0);
    let (config, _, context_dim) = args.config.config()?;
    let tokens = match args.config {
        UnetSize::Tiny => 4,
        UnetSize::Sd15 | UnetSize::Sdxl => 77,
    };
    let unet = config.init::<B<Inner>>(&device).map_err(|e| e.to_string())?;
    let context = Tensor::<B<Inner>, 3>::random(
        [args.batch, tokens, context_dim],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    // SDXL's added conditions: a pooled embedding per row, an uncropped 1024² image's sizes.
    let pooled = unet.takes_added_conditions().map(|width| {
        Tensor::<B<Inner>, 2>::random(
            [args.batch, width],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        )
    });
    let mut model = UnetEps::new(unet, context);
    if let Some(pooled) = pooled {
        model = model.with_added_conditions(pooled, [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]);
    }
    if args.controlnet {
        let control = ControlNetConfig {
            unet: config.clone(),
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            controlnet_conditioning_channel_order: "rgb".into(),
            global_pool_conditions: false,
        };
        let net = control.init::<B<Inner>>(&device).map_err(|e| e.to_string())?;
        let side = 8 * args.size;
        let image = Tensor::<B<Inner>, 4>::random(
            [1, 3, side, side],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        model = model.with_control(net, image, 1.0);
    }
    let model = adjoint_dpm::ode::materialized(model);
    let model = if args.frozen_weights {
        adjoint_dpm::ode::train_only(model, |path| !path.starts_with("unet."))
    } else {
        model
    };
    let schedule = NoiseSchedule::sd_scaled_linear();
    let mode = match args.gradient {
        Mode::Backprop => GradientMode::Backprop,
        Mode::Checkpointed => GradientMode::Checkpointed(Schedule::All),
        Mode::Recursive => GradientMode::Checkpointed(Schedule::Recursive),
        Mode::Backsolve => GradientMode::Backsolve(BacksolveOptions::default()),
    };
    let sampler = match args.sampler {
        SamplerArg::Ddim => Sampler::ddim(args.steps),
        SamplerArg::Heun => Sampler::heun(args.steps),
        SamplerArg::Dpmpp2m => Sampler::dpm_solver_pp_2m(args.steps),
        SamplerArg::Unipc => Sampler::unipc(args.steps),
        SamplerArg::DdimEta => Sampler::ddim(args.steps).eta(1.0),
        SamplerArg::EulerA => Sampler::euler_ancestral(args.steps),
        SamplerArg::Dpmpp2mSde => Sampler::dpm_solver_pp_2m_sde(args.steps),
        SamplerArg::Plms => Sampler::plms(args.steps),
        SamplerArg::Lcm => Sampler::lcm(args.steps),
        SamplerArg::Tcd => Sampler::tcd(args.steps),
        SamplerArg::Deis3 => Sampler::deis_third_order(args.steps),
        SamplerArg::Dpm2 => Sampler::dpm2(args.steps),
        SamplerArg::Dpm2A => Sampler::dpm2_ancestral(args.steps),
    }
    .gradient(mode);
    let shape = [args.batch, 4, args.size, args.size];
    let normal = || Tensor::<B<Inner>, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let x_t = normal();
    let noise: Vec<_> = (0..sampler.noise_count(&schedule).map_err(|e| e.to_string())?)
        .map(|_| normal())
        .collect();

    let inner = model.valid();
    let sample = || -> Result<f64, String> {
        let start = Instant::now();
        let noise = noise.iter().map(|n| n.clone().inner()).collect();
        let x0 = sampler
            .sample_inference_with_noise(&inner, &schedule, x_t.clone().inner(), noise)
            .map_err(|e| e.to_string())?;
        finish("sampling", x0)?;
        Ok(start.elapsed().as_secs_f64())
    };
    let gradient = || -> Result<f64, String> {
        let start = Instant::now();
        let leaf = x_t.clone().require_grad();
        let noise: Vec<_> = match args.noise_grad {
            true => noise.iter().map(|n| n.clone().require_grad()).collect(),
            false => noise.clone(),
        };
        let x0 = sampler
            .sample_with_noise(&model, &schedule, leaf.clone(), noise.clone())
            .map_err(|e| e.to_string())?;
        let grads = x0.powi_scalar(2).mean().backward();
        finish("the gradient", leaf.grad(&grads).ok_or("no gradient reached x_T")?)?;
        if let Some(first) = noise.first().filter(|_| args.noise_grad) {
            finish(
                "the noise's gradient",
                first.grad(&grads).ok_or("no gradient reached the first step's noise")?,
            )?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let median = |f: &dyn Fn() -> Result<f64, String>| -> Result<(f64, f64), String> {
        let warmup = f()?;
        let mut v = (0..args.reps.max(1)).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
        v.sort_by(f64::total_cmp);
        Ok((v[v.len() / 2], warmup))
    };
    let (sample_s, _) = median(&sample)?;
    let (grad_s, warmup_s) = median(&gradient)?;
    let line = serde_json::json!({
        "steps": args.steps, "sampler": format!("{:?}", args.sampler).to_lowercase(), "gradient": format!("{:?}", args.gradient).to_lowercase(),
        "config": format!("{:?}", args.config).to_lowercase(), "backend": format!("{:?}", args.backend).to_lowercase(),
        "frozen_weights": args.frozen_weights, "noise_grad": args.noise_grad, "controlnet": args.controlnet, "batch": args.batch, "size": args.size, "sample_s": sample_s, "grad_s": grad_s,
        "grad_over_sample": grad_s / sample_s, "warmup_s": warmup_s, "peak_rss_mib": adjoint_dpm::bench::peak_rss_mib(),
    });
    println!("{line}");
    Ok(())
}
