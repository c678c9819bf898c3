//! P1 (the spiral) against the diffrax/torchdiffeq reference gradients.

use adjoint_dpm::prelude::*;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::Autodiff;

use crate::common::{rel_err, to_vec, F64, P1};

fn run(p: &P1, solver: Solver, mode: GradientMode) -> (f64, Vec<f64>, Vec<f64>, Stats) {
    run_on::<NoCheckpointing>(p, solver, mode)
}

/// `run` on burn's autodiff backend with the checkpointing strategy `C`.
fn run_on<C: CheckpointStrategy>(p: &P1, solver: Solver, mode: GradientMode) -> (f64, Vec<f64>, Vec<f64>, Stats) {
    let device = Default::default();
    let ode = NeuralOde::new(p.model::<Autodiff<F64, C>>(&device))
        .solver(solver)
        .gradient(mode);
    let z0 = p.z0::<Autodiff<F64, C>>(&device).require_grad();
    let sol = ode.solve(z0.clone(), &p.ts).unwrap();
    let loss = p.loss(&sol, &device);
    let loss_value = to_vec(loss.clone())[0];
    let grads = loss.backward();
    assert_eq!(sol.backward_error(), None);
    let gp = P1::flat_param_grad(&ode.dynamics, &grads);
    let gz = to_vec(z0.grad(&grads).unwrap());
    (loss_value, gp, gz, sol.stats())
}

#[test]
fn exact_modes_reproduce_the_rk4_100_reference() {
    let p = P1::load();
    for mode in [
        GradientMode::Backprop,
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Checkpointed(Schedule::Every(7)),
        GradientMode::Checkpointed(Schedule::Recursive),
    ] {
        let (loss, gp, gz, stats) = run(&p, Solver::rk4(100), mode);
        assert!(
            (loss - p.rk4_loss).abs() / p.rk4_loss < 1e-12,
            "{mode:?}: loss {loss} vs {}",
            p.rk4_loss
        );
        let (ep, ez) = (rel_err(&gp, &p.rk4_gp), rel_err(&gz, &p.rk4_gz));
        assert!(
            ep < 1e-10 && ez < 1e-10,
            "{mode:?}: dL/dθ off by {ep:e}, dL/dz0 by {ez:e}"
        );
        assert_eq!(stats.accepted_steps, 100);
        assert_eq!(stats.nfe_forward, 400);
    }
}

/// burn's `BalancedCheckpointing` strategy recomputes memory-bound ops (the RK combinations,
/// tanh, the cube) in the backward pass instead of storing them: the vendored burn-autodiff's
/// patch 5 (saved states and stop nodes indexed by node) must find every one of them.
#[test]
fn balanced_checkpointing_reproduces_the_rk4_100_reference() {
    let p = P1::load();
    for mode in [GradientMode::Backprop, GradientMode::Checkpointed(Schedule::Every(7))] {
        let (_, gp, gz, _) = run_on::<BalancedCheckpointing>(&p, Solver::rk4(100), mode);
        let (ep, ez) = (rel_err(&gp, &p.rk4_gp), rel_err(&gz, &p.rk4_gz));
        assert!(
            ep < 1e-10 && ez < 1e-10,
            "{mode:?}: dL/dθ off by {ep:e}, dL/dz0 by {ez:e}"
        );
    }
}

#[test]
fn backsolve_rk4_differs_from_the_discrete_gradient_by_its_reverse_error() {
    // diffrax and torchdiffeq both put the continuous adjoint of RK4-100 2.7% from the exact
    // gradient of the discretisation.
    let p = P1::load();
    let (_, gp, _, stats) = run(
        &p,
        Solver::rk4(100),
        GradientMode::Backsolve(BacksolveOptions::default()),
    );
    let e = rel_err(&gp, &p.rk4_gp);
    assert!((0.02..0.035).contains(&e), "backsolve off the discrete gradient by {e}");
    assert_eq!(stats.backward_steps, 100);
    assert_eq!(stats.nfe_backward, 400);
}

#[test]
fn tight_adaptive_solves_approach_the_continuous_gradient() {
    // The exact discrete gradient of a tolerance-1e-10 solve (2e-8 off). At 1e-9 the default I
    // controller, like torchdiffeq's, lands 1.4e-5 off, and Hairer's PI controller 1.2e-6.
    let p = P1::load();
    let (loss, gp, gz, _) = run(
        &p,
        Solver::dopri5(1e-10, 1e-10),
        GradientMode::Checkpointed(Schedule::All),
    );
    assert!(
        (loss - p.exact_loss).abs() / p.exact_loss < 1e-6,
        "loss {loss} vs {}",
        p.exact_loss
    );
    let (ep, ez) = (rel_err(&gp, &p.exact_gp), rel_err(&gz, &p.exact_gz));
    assert!(ep < 1e-6 && ez < 1e-6, "dL/dθ off by {ep:e}, dL/dz0 by {ez:e}");
    let bs = BacksolveOptions {
        rtol: 1e-9,
        atol: 1e-9,
        seminorm: true,
    };
    let (_, gp, gz, _) = run(&p, Solver::dopri5(1e-9, 1e-9), GradientMode::Backsolve(bs));
    let (ep, ez) = (rel_err(&gp, &p.exact_gp), rel_err(&gz, &p.exact_gz));
    assert!(
        ep < 1e-5 && ez < 1e-5,
        "backsolve: dL/dθ off by {ep:e}, dL/dz0 by {ez:e}"
    );
}
