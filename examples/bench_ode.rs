//! Times forward + gradient of any MLP neural ODE and prints one JSON line, so runs can be set
//! side by side with torchdiffeq or diffrax on the same machine.
//!
//! ```text
//! # P2, RK4 with 100 steps, exact checkpointed gradient:
//! cargo run --release --example bench_ode -- --widths 64,256,256,64 --batch 256 --solver rk4 --steps 100
//! # P2 with Dopri5 at 1e-6 and the continuous adjoint, f64 on ndarray:
//! cargo run --release --example bench_ode -- --widths 64,256,256,64 --batch 256 --solver dopri5 \
//!     --rtol 1e-6 --atol 1e-6 --gradient backsolve --backend ndarray --dtype f64
//! ```
//!
//! Output fields: median/min seconds per forward+gradient, NFE forward/backward, steps, peak RSS
//! of the process (VmHWM, MiB) — the peak over the whole run, warm-up included.

use std::time::Instant;

use adjoint_dpm::ode::mlp::{Activation, MlpFieldConfig};
use adjoint_dpm::ode::ButcherTableau;
use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::AutodiffModule;
use burn::prelude::*;
use clap::{Parser, ValueEnum};

// Only `finish` is used here, not the backend macro.
#[allow(unused_imports, unused_macros)]
mod common;
use common::finish;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// No gradient: the forward solve alone, on the inner backend (the floor under every mode).
    None,
    Backprop,
    Checkpointed,
    Recursive,
    Backsolve,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendName {
    Flex,
    Ndarray,
    /// Needs `--features cuda`.
    Cuda,
    /// Needs `--features wgpu` (Vulkan; Mesa's lavapipe runs it on the CPU, with the same
    /// cubecl fusion and per-op dispatch as CUDA).
    Wgpu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DType {
    F32,
    F64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Act {
    Tanh,
    Softplus,
    Relu,
}

#[derive(Parser, Debug)]
#[command(about = "Forward + gradient timing of an MLP neural ODE; prints one JSON line")]
struct Args {
    /// Layer widths, input to output (the first and last are the state dimension).
    #[arg(long, value_delimiter = ',', default_value = "64,256,256,64")]
    widths: Vec<usize>,
    #[arg(long, value_enum, default_value = "tanh")]
    activation: Act,
    /// Feed z³ to the MLP (P1's dynamics).
    #[arg(long)]
    cube: bool,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 0.0)]
    t0: f64,
    #[arg(long, default_value_t = 1.0)]
    t1: f64,
    /// Number of output times (evenly spaced, t0 and t1 included); the loss is the mean square
    /// of every output state after the first.
    #[arg(long, default_value_t = 2)]
    outputs: usize,
    /// euler, midpoint, heun, rk4, bosh3, dopri5, tsit5, dopri8.
    #[arg(long, default_value = "rk4")]
    solver: String,
    /// Fixed steps over [t0, t1] (fixed-step solvers).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Tolerances (adaptive solvers).
    #[arg(long, default_value_t = 1e-6)]
    rtol: f64,
    #[arg(long, default_value_t = 1e-6)]
    atol: f64,
    /// PI step-size controller coefficients (adaptive solvers; see `Solver::pi_coefficients`).
    #[arg(long, default_value_t = 0.0)]
    pcoeff: f64,
    #[arg(long, default_value_t = 1.0)]
    icoeff: f64,
    /// Adaptive solvers: step to every output time instead of interpolating inside steps
    /// (`Solver::interpolate(false)`).
    #[arg(long)]
    step_to_outputs: bool,
    #[arg(long, value_enum, default_value = "checkpointed")]
    gradient: Mode,
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendName,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DType,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Also report the relative difference of dL/dz0 from Backprop's (a smoke test of the
    /// adjoint on a new backend).
    #[arg(long)]
    check: bool,
}

fn main() {
    let args = Args::parse();
    let result = match (args.backend, args.dtype) {
        (BackendName::Flex, DType::F32) => run::<Flex>(&args),
        (BackendName::Flex, DType::F64) => Err("flex is f32 only here; use --backend ndarray --dtype f64".into()),
        (BackendName::Ndarray, DType::F32) => run::<NdArray<f32>>(&args),
        (BackendName::Ndarray, DType::F64) => run::<NdArray<f64>>(&args),
        #[cfg(feature = "cuda-base")]
        (BackendName::Cuda, DType::F32) => run::<burn::backend::Cuda>(&args),
        (BackendName::Cuda, _) => Err("cuda needs --features cuda and --dtype f32".into()),
        #[cfg(feature = "wgpu-untuned")]
        (BackendName::Wgpu, DType::F32) => run::<burn::backend::Wgpu>(&args),
        (BackendName::Wgpu, _) => Err("wgpu needs --features wgpu and --dtype f32".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run<B: Backend>(args: &Args) -> Result<(), String> {
    let device = B::Device::default();
    let tableau = ButcherTableau::by_name(&args.solver).ok_or(format!("unknown solver {}", args.solver))?;
    let solver = if tableau.is_adaptive() && !matches!(args.solver.as_str(), "heun") {
        Solver::adaptive(tableau, args.rtol, args.atol)
            .pi_coefficients(args.pcoeff, args.icoeff)
            .interpolate(!args.step_to_outputs)
    } else {
        Solver::fixed(tableau, args.steps)
    };
    let mode = match args.gradient {
        Mode::None | Mode::Backprop => GradientMode::Backprop,
        Mode::Checkpointed => GradientMode::Checkpointed(Schedule::All),
        Mode::Recursive => GradientMode::Checkpointed(Schedule::Recursive),
        Mode::Backsolve => GradientMode::Backsolve(BacksolveOptions {
            rtol: args.rtol,
            atol: args.atol,
            seminorm: true,
        }),
    };
    let activation = match args.activation {
        Act::Tanh => Activation::Tanh,
        Act::Softplus => Activation::Softplus,
        Act::Relu => Activation::Relu,
    };
    let dim = *args.widths.first().ok_or("--widths is empty")?;
    B::seed(&device, 0);
    let field = MlpFieldConfig::new(args.widths.clone())
        .with_activation(activation)
        .with_cube_input(args.cube)
        .init::<Autodiff<B>>(&device);
    let field = adjoint_dpm::ode::materialized(field);
    let ode = NeuralOde::new(field).solver(solver).gradient(mode);
    let n = args.outputs.max(2);
    let times: Vec<f64> = (0..n)
        .map(|i| args.t0 + (args.t1 - args.t0) * i as f64 / (n - 1) as f64)
        .collect();
    let z0 = Tensor::<Autodiff<B>, 2>::random([args.batch, dim], burn::tensor::Distribution::Normal(0.0, 1.0), &device)
        .require_grad();

    let forward_only = NeuralOde::new(ode.dynamics.valid()).solver(solver);
    let once = || -> Result<(f64, Stats), String> {
        let start = Instant::now();
        if matches!(args.gradient, Mode::None) {
            let sol = forward_only
                .integrate(z0.clone().inner(), &times)
                .map_err(|e| e.to_string())?;
            finish("the solve", sol.last())?;
            return Ok((start.elapsed().as_secs_f64(), sol.stats()));
        }
        let sol = ode.solve(z0.clone(), &times).map_err(|e| e.to_string())?;
        let loss = sol
            .stacked()
            .narrow(0, args.batch, args.batch * (n - 1))
            .powi_scalar(2)
            .mean();
        let grads = loss.backward();
        // Read one gradient back so asynchronous backends have finished.
        finish("the gradient", z0.grad(&grads).ok_or("no gradient reached z0")?)?;
        Ok((start.elapsed().as_secs_f64(), sol.stats()))
    };
    let rel_diff = if args.check {
        let grad = |mode| -> Result<Vec<f64>, String> {
            let sol = ode
                .clone()
                .gradient(mode)
                .solve(z0.clone(), &times)
                .map_err(|e| e.to_string())?;
            let grads = sol
                .stacked()
                .narrow(0, args.batch, args.batch * (n - 1))
                .powi_scalar(2)
                .mean()
                .backward();
            let g = z0.grad(&grads).ok_or("no gradient reached z0")?;
            g.into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .map_err(|e| format!("{e:?}"))
        };
        let (a, b) = (grad(mode)?, grad(GradientMode::Backprop)?);
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        Some(num / den.max(f64::MIN_POSITIVE))
    } else {
        None
    };
    let (warmup, _) = once()?;
    let mut samples = Vec::with_capacity(args.reps);
    let mut stats = Stats::default();
    for _ in 0..args.reps.max(1) {
        let (s, st) = once()?;
        samples.push(s);
        stats = st;
    }
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    let line = serde_json::json!({
        "widths": args.widths, "batch": args.batch, "t0": args.t0, "t1": args.t1, "outputs": n,
        "solver": args.solver, "steps": args.steps, "rtol": args.rtol, "atol": args.atol,
        "pcoeff": args.pcoeff, "icoeff": args.icoeff, "interpolate": solver.interpolates(),
        "gradient": format!("{:?}", args.gradient).to_lowercase(),
        "backend": format!("{:?}", args.backend).to_lowercase(), "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "median_s": median, "min_s": samples[0], "max_s": samples[samples.len() - 1], "warmup_s": warmup, "reps": samples.len(),
        "nfe_forward": stats.nfe_forward, "nfe_backward": stats.nfe_backward,
        "accepted_steps": stats.accepted_steps, "rejected_steps": stats.rejected_steps,
        "peak_rss_mib": adjoint_dpm::bench::peak_rss_mib(), "rel_diff_vs_backprop": rel_diff,
    });
    println!("{line}");
    Ok(())
}
