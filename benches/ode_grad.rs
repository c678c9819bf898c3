//! Forward + gradient time of the two reference problems of DESIGN.md §6, for each gradient
//! mode, on the CPU f32 backend (flex). Memory and cross-library comparisons: the `bench_ode`
//! example prints JSON for the same problems (see README).
//!
//! P1 spiral: dz/dt = MLP(z³), MLP 2-50-tanh-2, batch 16, outputs at 2.5·k, k = 0..10.
//! P2 wide: MLP 64-256-tanh-256-tanh-64, batch 256, t ∈ [0, 1], L = mean(z(1)²).
//! P1 dense: P1's field with 1001 output times on [0, 25], Dopri5 interpolating inside steps
//! against stepping to every output time.

use adjoint_dpm::ode::mlp::MlpFieldConfig;
use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

type B = Autodiff<Flex>;

fn modes() -> [(&'static str, GradientMode); 3] {
    [
        ("backprop", GradientMode::Backprop),
        ("checkpointed", GradientMode::Checkpointed(Schedule::All)),
        (
            "backsolve",
            GradientMode::Backsolve(BacksolveOptions {
                rtol: 1e-6,
                atol: 1e-6,
                seminorm: true,
            }),
        ),
    ]
}

fn bench_problem(
    c: &mut Criterion,
    name: &str,
    widths: Vec<usize>,
    cube: bool,
    batch: usize,
    times: Vec<f64>,
    solvers: [(&str, Solver); 2],
) {
    let device = Default::default();
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    let field = MlpFieldConfig::new(widths.clone())
        .with_cube_input(cube)
        .init::<B>(&device);
    let z0 = Tensor::<B, 2>::random(
        [batch, widths[0]],
        burn::tensor::Distribution::Normal(0.0, 0.5),
        &device,
    )
    .require_grad();
    for (solver_name, solver) in solvers {
        for (mode_name, mode) in modes() {
            let ode = NeuralOde::new(field.clone()).solver(solver).gradient(mode);
            group.bench_function(BenchmarkId::new(solver_name, mode_name), |b| {
                b.iter(|| {
                    let sol = ode.solve(z0.clone(), &times).expect("solve");
                    let loss = sol
                        .stacked()
                        .narrow(0, batch, batch * (times.len() - 1))
                        .powi_scalar(2)
                        .mean();
                    let grads = loss.backward();
                    z0.grad(&grads).expect("gradient").sum().into_scalar()
                })
            });
        }
    }
    group.finish();
}

fn p1(c: &mut Criterion) {
    let times: Vec<f64> = (0..=10).map(|k| 2.5 * k as f64).collect();
    bench_problem(
        c,
        "p1_spiral",
        vec![2, 50, 2],
        true,
        16,
        times,
        [
            ("rk4_100", Solver::rk4(100)),
            ("dopri5_1e-6", Solver::dopri5(1e-6, 1e-6)),
        ],
    );
}

fn p2(c: &mut Criterion) {
    bench_problem(
        c,
        "p2_wide",
        vec![64, 256, 256, 64],
        false,
        256,
        vec![0.0, 1.0],
        [
            ("rk4_100", Solver::rk4(100)),
            ("dopri5_1e-6", Solver::dopri5(1e-6, 1e-6)),
        ],
    );
}

fn p1_dense(c: &mut Criterion) {
    let times: Vec<f64> = (0..=1000).map(|k| 0.025 * k as f64).collect();
    bench_problem(
        c,
        "p1_dense_1001",
        vec![2, 50, 2],
        true,
        16,
        times,
        [
            ("dopri5_interpolated", Solver::dopri5(1e-6, 1e-6)),
            ("dopri5_stepped", Solver::dopri5(1e-6, 1e-6).interpolate(false)),
        ],
    );
}

criterion_group!(benches, p1, p2, p1_dense);
criterion_main!(benches);
