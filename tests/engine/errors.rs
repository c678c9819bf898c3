//! Every way user input can fail is a typed error, never a panic.

use adjoint_dpm::ode::tableau;
use adjoint_dpm::prelude::*;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{Ad, F64};
use crate::fields::{Kind, Toy};

fn solve(kind: Kind, solver: Solver, z0: [[f64; 2]; 2], times: &[f64]) -> adjoint_dpm::Result<Solution<F64, 2>> {
    let device = Default::default();
    let z0 = Tensor::<F64, 2>::from_data(TensorData::from(z0), &device);
    NeuralOde::new(Toy::<F64>::new(kind, &device))
        .solver(solver)
        .integrate(z0, times)
}

const Z: [[f64; 2]; 2] = [[1.0, 0.5], [0.2, -0.3]];

#[test]
fn grid_errors_name_the_entry() {
    let rk4 = Solver::rk4(10);
    assert_eq!(
        solve(Kind::Decay, rk4, Z, &[0.0]).unwrap_err(),
        Error::GridTooShort { len: 1 }
    );
    assert_eq!(
        solve(Kind::Decay, rk4, Z, &[]).unwrap_err(),
        Error::GridTooShort { len: 0 }
    );
    let e = solve(Kind::Decay, rk4, Z, &[0.0, f64::INFINITY]).unwrap_err();
    assert!(matches!(e, Error::NonFiniteTime { index: 1, value } if value.is_infinite()));
    assert_eq!(
        solve(Kind::Decay, rk4, Z, &[0.0, 1.0, 1.0]).unwrap_err(),
        Error::NonMonotoneGrid {
            index: 2,
            prev: 1.0,
            next: 1.0
        }
    );
    assert!(Error::NonMonotoneGrid {
        index: 2,
        prev: 1.0,
        next: 1.0
    }
    .to_string()
    .contains("index 2: 1 then 1"));
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let e = solve(Kind::WrongShape, Solver::rk4(4), Z, &[0.0, 1.0]).unwrap_err();
    assert_eq!(
        e,
        Error::ShapeMismatch {
            expected: vec![2, 2],
            got: vec![1, 2]
        }
    );
}

#[test]
fn non_finite_states_report_time_and_step() {
    let e = solve(Kind::Decay, Solver::rk4(4), [[f64::NAN, 0.0], [0.0, 0.0]], &[0.0, 1.0]).unwrap_err();
    assert_eq!(e, Error::NonFiniteState { t: 0.0, step: 0 });
    // z' = z² from z0 = 1 blows up at t = 1; Euler with h = 0.5 overflows in a handful of steps.
    let e = solve(
        Kind::Blowup,
        Solver::fixed_dt(&tableau::EULER, 0.5),
        [[1.0, 1.0], [1.0, 1.0]],
        &[0.0, 100.0],
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::NonFiniteState { step, .. } if step > 3 && step < 20),
        "{e:?}"
    );
}

#[test]
fn step_size_underflow_names_dt_and_dt_min() {
    let solver = Solver::dopri5(1e-12, 1e-12).dt0(1.0).dt_min(0.5);
    let e = solve(Kind::Decay, solver, Z, &[0.0, 10.0]).unwrap_err();
    assert!(
        matches!(e, Error::StepSizeUnderflow { dt_min, .. } if dt_min == 0.5),
        "{e:?}"
    );
}

#[test]
fn max_steps_exceeded_names_the_limit() {
    let e = solve(Kind::Decay, Solver::dopri5(1e-10, 1e-10).max_steps(5), Z, &[0.0, 10.0]).unwrap_err();
    assert!(matches!(e, Error::MaxStepsExceeded { max_steps: 5, .. }), "{e:?}");
}

#[test]
fn invalid_options_are_refused() {
    for (solver, name) in [
        (Solver::rk4(0), "steps"),
        (Solver::fixed_dt(&tableau::RK4, -1.0), "dt"),
        (Solver::dopri5(-1.0, 1e-6), "rtol"),
        (Solver::dopri5(1e-6, 0.0), "atol"),
        (Solver::dopri5(1e-6, 1e-6).max_steps(0), "max_steps"),
        (Solver::dopri5(1e-6, 1e-6).dt0(f64::NAN), "dt0"),
        (Solver::dopri5(1e-6, 1e-6).dt_max(f64::NAN), "dt_max"),
        (Solver::dopri5(1e-6, 1e-6).dt_min(0.1).dt_max(0.01), "dt_max"),
    ] {
        assert!(
            matches!(solve(Kind::Decay, solver, Z, &[0.0, 1.0]), Err(Error::InvalidOption { name: n, .. }) if n == name),
            "{name}"
        );
    }
    // A hand-written tableau whose dense output has a row too few.
    static SHORT_DENSE: tableau::ButcherTableau = tableau::ButcherTableau {
        name: "short-dense",
        dense: Some(&[&[1.0, -0.5]]),
        ..tableau::HEUN
    };
    assert!(matches!(
        solve(Kind::Decay, Solver::adaptive(&SHORT_DENSE, 1e-6, 1e-6), Z, &[0.0, 0.5, 1.0]),
        Err(Error::InvalidOption { name: "tableau", value, .. }) if value == "short-dense"
    ));
    let e = solve(Kind::Decay, Solver::adaptive(&tableau::RK4, 1e-6, 1e-6), Z, &[0.0, 1.0]).unwrap_err();
    assert_eq!(e, Error::NoErrorEstimate { method: "rk4" });
}

#[test]
fn a_failing_backward_pass_poisons_gradients_and_says_why() {
    // The forward solve fits in 30 steps; the continuous adjoint at a much tighter tolerance does
    // not, so the backward pass fails: gradients are NaN and the reason is kept.
    let device = Default::default();
    let z0 = Tensor::<Ad, 2>::from_data(TensorData::from(Z), &device).require_grad();
    let bs = BacksolveOptions {
        rtol: 1e-13,
        atol: 1e-13,
        seminorm: false,
    };
    let ode = NeuralOde::new(Toy::<Ad>::new(Kind::Spiral, &device))
        .solver(Solver::dopri5(1e-3, 1e-3).max_steps(30))
        .gradient(GradientMode::Backsolve(bs));
    let sol = ode.solve(z0.clone(), &[0.0, 5.0]).unwrap();
    let grads = sol.last().sum().backward();
    let g: Vec<f64> = z0.grad(&grads).unwrap().into_data().to_vec().unwrap();
    assert!(g.iter().all(|x| x.is_nan()));
    assert!(matches!(sol.backward_error(), Some(Error::Backward(e)) if matches!(*e, Error::MaxStepsExceeded { .. })));
}

/// A device failure met at one of the solver's host reads is returned, naming the read and
/// carrying the backend's reason. No CPU backend fails a read, so only the message is checked
/// here; the reads themselves go through `try_into_scalar` / `try_into_data`.
#[test]
fn backend_error_names_the_read_and_the_reason() {
    let e = Error::Backend {
        reading: "a step's error norm",
        reason: "Invalid vector size. Got 16 which should not be >8".into(),
    };
    let message = e.to_string();
    assert!(
        message.contains("read a step's error norm back to the host"),
        "{message}"
    );
    assert!(
        message.ends_with("Invalid vector size. Got 16 which should not be >8"),
        "{message}"
    );
}
