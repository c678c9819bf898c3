//! Dense output: adaptive solves read interior output times off the step that contains them.
//! The steps do not depend on the outputs, the interpolant has its declared order, and every
//! gradient mode differentiates it (exact modes to rounding, against finite differences too).

use adjoint_dpm::ode::{tableau, ButcherTableau};
use adjoint_dpm::prelude::*;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{backsolve_errors, check_central_differences, grads_of, rel_err, to_vec, Act, Ad, Mlp, F64};
use crate::fields::{spiral_exact, Kind, Toy};

const Z0: [f64; 2] = [1.0, 0.5];

fn spiral(solver: Solver, times: &[f64]) -> Solution<F64, 2> {
    let device = Default::default();
    let z0 = Tensor::<F64, 2>::from_data(TensorData::from([Z0]), &device);
    NeuralOde::new(Toy::<F64>::new(Kind::Spiral, &device))
        .solver(solver)
        .integrate(z0, times)
        .unwrap()
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// Largest distance from the exact spiral over all outputs.
fn max_error(solution: &Solution<F64, 2>) -> f64 {
    let start = solution.times()[0];
    solution
        .times()
        .iter()
        .enumerate()
        .map(|(k, &t)| {
            let z = to_vec(solution.state(k));
            let exact = spiral_exact(Z0, t - start);
            ((z[0] - exact[0]).powi(2) + (z[1] - exact[1]).powi(2)).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn outputs_do_not_change_the_steps() {
    for make in [
        Solver::bosh3 as fn(f64, f64) -> Solver,
        Solver::dopri5,
        Solver::tsit5,
        Solver::dopri8,
    ] {
        for backward in [false, true] {
            let mut dense = linspace(0.0, 5.0, 1001);
            if backward {
                dense.reverse();
            }
            let ends = [dense[0], dense[1000]];
            let tol = 1e-6;
            let solver = make(tol, tol);
            let coarse = spiral(solver, &ends);
            let fine = spiral(solver, &dense);
            let name = solver.tableau.name;
            assert_eq!(coarse.stats(), fine.stats(), "{name}: 1001 outputs changed the steps");
            assert_eq!(to_vec(coarse.last()), to_vec(fine.last()), "{name}: final state moved");
            // Stepping to every output instead takes at least one step per interval (so small
            // that its error is far smaller). The bound allows for global error growing past the
            // local tolerance over [0, 5].
            let stepped = spiral(solver.interpolate(false), &dense);
            assert!(stepped.stats().accepted_steps >= 1000, "{name}: {:?}", stepped.stats());
            let (error, stepped_error) = (max_error(&fine), max_error(&stepped));
            assert!(
                error < 50.0 * tol && stepped_error < 50.0 * tol,
                "{name}: error {error:e} interpolated, {stepped_error:e} stepped, at tolerance {tol:e}"
            );
        }
    }
}

#[test]
fn dense_output_local_error_has_its_order() {
    // One step of size h (dt0 = h and a tolerance no step can fail, or one uniform fixed step)
    // with outputs inside it: the interpolant's local error is O(h^(p+1)) for one of order p.
    let cases: [(&'static ButcherTableau, f64); 8] = [
        (&tableau::EULER, 1.0),
        (&tableau::MIDPOINT, 2.0),
        (&tableau::RK4, 3.0),
        (&tableau::HEUN, 2.0),
        (&tableau::BOSH3, 3.0),
        (&tableau::DOPRI5, 4.0),
        (&tableau::TSIT5, 4.0),
        (&tableau::DOPRI8, 5.0),
    ];
    for (tab, order) in cases {
        let error = |h: f64| {
            let solver = if tab.is_adaptive() {
                Solver::adaptive(tab, 1e30, 1e30).dt0(h)
            } else {
                Solver::fixed(tab, 1).interpolate(true)
            };
            let solution = spiral(solver, &[0.0, 0.3 * h, 0.7 * h, h]);
            assert_eq!(solution.stats().accepted_steps, 1, "{}", tab.name);
            [1, 2]
                .iter()
                .map(|&k| {
                    let z = to_vec(solution.state(k));
                    let exact = spiral_exact(Z0, solution.times()[k]);
                    ((z[0] - exact[0]).powi(2) + (z[1] - exact[1]).powi(2)).sqrt()
                })
                .fold(0.0, f64::max)
        };
        let slope = (error(0.4) / error(0.2)).log2();
        assert!(
            (slope - (order + 1.0)).abs() <= 0.4,
            "{}: local interpolation error shrinks as h^{slope:.2}, expected h^{}",
            tab.name,
            order + 1.0
        );
    }
}

/// A grid with several outputs inside most steps.
const TIMES: [f64; 8] = [0.0, 0.11, 0.2, 0.43, 0.5, 0.77, 0.9, 1.3];

#[test]
fn checkpointed_equals_backprop_through_interpolation() {
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(3, &[2, 6, 2], Act::Tanh, true, &device);
    let z0 = [0.3, -0.5, 0.9, 0.1];
    for solver in [
        Solver::bosh3(1e-2, 1e-4),
        Solver::dopri5(1e-4, 1e-6),
        Solver::tsit5(1e-4, 1e-6),
        Solver::adaptive(&tableau::HEUN, 1e-1, 1e-3),
        Solver::rk4(3).interpolate(true),
        Solver::midpoint(4).interpolate(true),
    ] {
        // The solve really interpolates: fewer steps than intervals.
        let steps = spiral(solver, &TIMES).stats().accepted_steps;
        assert!(steps < TIMES.len() - 1, "{}: {steps} steps", solver.tableau.name);
        let reference = grads_of(&model, solver, GradientMode::Backprop, &z0, 2, &TIMES);
        for schedule in [Schedule::All, Schedule::Every(2), Schedule::Recursive] {
            let exact = grads_of(&model, solver, GradientMode::Checkpointed(schedule), &z0, 2, &TIMES);
            assert!((exact.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs());
            for (name, a, b) in [
                ("z0", &exact.z0, &reference.z0),
                ("θ", &exact.theta, &reference.theta),
                ("T", &exact.times, &reference.times),
            ] {
                let e = rel_err(a, b);
                assert!(e <= 1e-10, "{} {schedule:?}: {name} off by {e:e}", solver.tableau.name);
            }
        }
    }
}

#[test]
fn interpolated_gradients_match_central_differences() {
    // dt0 and a tolerance no step can fail make the steps independent of the inputs (each grows
    // by the controller's maximum factor), so finite differences see the same discretisation:
    // steps [0, 0.1], [0.1, 1.0], [1.0, 1.3], with six outputs read off the dense output.
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(5, &[2, 5, 2], Act::Softplus, true, &device);
    let z0 = [0.4, -0.2, -0.7, 0.6];
    // Interior output times only move their own interpolated state.
    let interior: Vec<usize> = (1..TIMES.len() - 1).collect();
    for tab in [&tableau::BOSH3, &tableau::DOPRI5, &tableau::TSIT5, &tableau::DOPRI8] {
        let solver = Solver::adaptive(tab, 1e30, 1e30).dt0(0.1);
        assert_eq!(spiral(solver, &TIMES).stats().accepted_steps, 3);
        for mode in [GradientMode::Backprop, GradientMode::Checkpointed(Schedule::All)] {
            let g = grads_of(&model, solver, mode, &z0, 2, &TIMES);
            if let Err(e) = check_central_differences(&model, solver, &g, &z0, 2, &TIMES, &interior) {
                panic!("{} {mode:?} {e}", tab.name);
            }
        }
    }
}

#[test]
fn backsolve_through_interpolated_outputs_converges() {
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(4, &[2, 8, 2], Act::Tanh, true, &device);
    let z0 = [0.3, -0.5, 0.9, 0.1];
    let exact = grads_of(
        &model,
        Solver::dopri5(1e-11, 1e-11).interpolate(false),
        GradientMode::Checkpointed(Schedule::All),
        &z0,
        2,
        &TIMES,
    );
    let tolerances = [1e-4, 1e-6, 1e-8];
    let errors = backsolve_errors(&model, |tol| Solver::tsit5(tol, tol), &z0, &TIMES, &tolerances, &exact);
    for (error, tol) in errors.iter().zip(tolerances) {
        assert!(*error < 10.0 * tol, "error {error:e} at tolerance {tol:e} ({errors:?})");
    }
    assert!(errors[2] < errors[0] / 100.0, "no convergence: {errors:?}");
}

#[test]
fn backsolve_runs_through_outputs_the_loss_ignores() {
    // A loss on the last state only: outputs in between get zero cotangents, and the reverse
    // solve no longer stops at them; the gradient and its cost equal those of a two-time solve.
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(6, &[2, 8, 2], Act::Tanh, true, &device);
    let options = BacksolveOptions {
        rtol: 1e-7,
        atol: 1e-7,
        seminorm: true,
    };
    let run = |times: &[f64]| {
        let ode = NeuralOde::new(model.clone())
            .solver(Solver::tsit5(1e-7, 1e-7))
            .gradient(GradientMode::Backsolve(options));
        let z0 = Tensor::<Ad, 2>::from_data(TensorData::from([[0.3, -0.5], [0.9, 0.1]]), &device).require_grad();
        let solution = ode.solve(z0.clone(), times).unwrap();
        let grads = solution.last().powi_scalar(2).sum().backward();
        let w = ode.dynamics.layers[0].weight.grad(&grads).unwrap();
        (to_vec(z0.grad(&grads).unwrap()), to_vec(w), solution.stats())
    };
    let (z_all, w_all, stats_all) = run(&TIMES);
    let (z_two, w_two, stats_two) = run(&[TIMES[0], TIMES[7]]);
    assert!(rel_err(&z_all, &z_two) < 1e-14 && rel_err(&w_all, &w_two) < 1e-14);
    assert_eq!(
        stats_all.nfe_backward, stats_two.nfe_backward,
        "{stats_all:?} vs {stats_two:?}"
    );
    // A loss that uses an interior output still stops there, and its gradient differs.
    let ode = NeuralOde::new(model.clone())
        .solver(Solver::tsit5(1e-7, 1e-7))
        .gradient(GradientMode::Backsolve(options));
    let z0 = Tensor::<Ad, 2>::from_data(TensorData::from([[0.3, -0.5], [0.9, 0.1]]), &device).require_grad();
    let solution = ode.solve(z0.clone(), &TIMES).unwrap();
    let grads = (solution.last().powi_scalar(2).sum() + solution.state(3).sum()).backward();
    assert!(solution.stats().nfe_backward > stats_all.nfe_backward);
    assert!(rel_err(&to_vec(z0.grad(&grads).unwrap()), &z_all) > 1e-3);
}

#[test]
fn uniform_fixed_steps_ignore_the_outputs() {
    // RK4 with 100 steps and 1001 output times: 100 steps (not 1000), the same steps and final
    // state as with 2 output times, and interior states within the interpolant's error.
    let dense = linspace(0.0, 5.0, 1001);
    let uniform = Solver::rk4(100).interpolate(true);
    let fine = spiral(uniform, &dense);
    let coarse = spiral(Solver::rk4(100), &[0.0, 5.0]);
    assert_eq!(fine.stats(), coarse.stats());
    assert_eq!(fine.stats().accepted_steps, 100);
    assert_eq!(to_vec(fine.last()), to_vec(coarse.last()));
    let stepped = spiral(Solver::rk4(100), &dense);
    assert_eq!(stepped.stats().accepted_steps, 1000);
    // Step 0.05: RK4's global error ~1e-7, its third-order interpolant's local error ~1e-7 too.
    let error = max_error(&fine);
    assert!(error < 1e-6, "uniform RK4 interpolated error {error:e}");
}

#[test]
fn uniform_gradients_match_central_differences_for_every_time() {
    // Uniform steps scale with the span, so the end times are differentiated exactly too.
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(8, &[2, 5, 2], Act::Tanh, true, &device);
    let z0 = [0.4, -0.2, -0.7, 0.6];
    let every: Vec<usize> = (0..TIMES.len()).collect();
    for solver in [Solver::rk4(3).interpolate(true), Solver::midpoint(5).interpolate(true)] {
        for mode in [GradientMode::Backprop, GradientMode::Checkpointed(Schedule::Every(2))] {
            let g = grads_of(&model, solver, mode, &z0, 2, &TIMES);
            if let Err(e) = check_central_differences(&model, solver, &g, &z0, 2, &TIMES, &every) {
                panic!("{} {mode:?} {e}", solver.tableau.name);
            }
        }
    }
}

#[test]
fn interpolants_match_diffrax() {
    // tests/fixtures/dense_diffrax.json (scripts/dense_reference.py): one step of dz/dt = z²,
    // read at 0.3h and 0.7h by diffrax 0.7.2's Tsit5 (Tsitouras' polynomials), Bosh3 (cubic
    // Hermite), Dopri5 and Dopri8, whose interpolants are the ones used here too: they agree to
    // rounding (measured 2e-15 at most).
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dense_diffrax.json"
    ))
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let h = fixture["h"].as_f64().unwrap();
    let device = Default::default();
    for (name, tab) in [
        ("tsit5", &tableau::TSIT5),
        ("bosh3", &tableau::BOSH3),
        ("dopri5", &tableau::DOPRI5),
        ("dopri8", &tableau::DOPRI8),
    ] {
        let z0 = Tensor::<F64, 2>::from_data(TensorData::from([[0.5, -0.3]]), &device);
        let ode =
            NeuralOde::new(Toy::<F64>::new(Kind::Blowup, &device)).solver(Solver::fixed(tab, 1).interpolate(true));
        let solution = ode.integrate(z0, &[0.0, 0.3 * h, 0.7 * h, h]).unwrap();
        let want = fixture["states"][name].as_array().unwrap();
        for (k, row) in want.iter().enumerate() {
            let want: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = to_vec(solution.state(k + 1));
            assert!(
                rel_err(&got, &want) < 1e-14,
                "{name} output {k}: {got:?} vs diffrax {want:?}"
            );
        }
    }
}
