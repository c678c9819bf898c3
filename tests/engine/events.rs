//! Terminal events: the event time and state, and their gradients in every mode, against closed
//! forms and finite differences; bad event functions give typed errors.

use adjoint_dpm::ode::tableau;
use adjoint_dpm::prelude::*;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{rel_err, to_vec, Act, Ad, Mlp};
use crate::fields::{Kind, Toy};

fn modes() -> [GradientMode; 4] {
    [
        GradientMode::Backprop,
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Checkpointed(Schedule::Recursive),
        GradientMode::Backsolve(BacksolveOptions {
            rtol: 1e-11,
            atol: 1e-11,
            seminorm: true,
        }),
    ]
}

/// dz/dt = −k z from z0 until g = z + 0.1 t − c crosses 0; loss t* + 3 z(t*). The threshold `c`
/// is a tracked leaf the event function captures, so it gets its gradient too.
fn decay_event(mode: GradientMode, z0: f64, k: f64, c: f64) -> (f64, f64, [f64; 3]) {
    let device = Default::default();
    let mut toy = Toy::<Ad>::new(Kind::Decay, &device);
    toy.k = Param::from_tensor(Tensor::from_data(TensorData::from([k]), &device));
    let ode = NeuralOde::new(toy).solver(Solver::dopri5(1e-11, 1e-11)).gradient(mode);
    let z = Tensor::<Ad, 2>::from_data(TensorData::from([[z0]]), &device).require_grad();
    let c = Tensor::<Ad, 1>::from_data(TensorData::from([c]), &device).require_grad();
    let hit = ode
        .solve_until(z.clone(), 0.0, 10.0, |t: Tensor<Ad, 1>, z: Tensor<Ad, 2>| {
            z.reshape([1]) + t.mul_scalar(0.1) - c.clone()
        })
        .unwrap()
        .expect("the event happens");
    let t_star = to_vec(hit.time.clone())[0];
    let loss = hit.time.clone() + hit.state.clone().reshape([1]).mul_scalar(3.0);
    let grads = loss.backward();
    let dz0 = to_vec(z.grad(&grads).unwrap())[0];
    let dk = to_vec(ode.dynamics.k.grad(&grads).unwrap())[0];
    let dc = to_vec(c.grad(&grads).expect("the captured threshold has a gradient"))[0];
    (t_star, to_vec(hit.state)[0], [dz0, dk, dc])
}

#[test]
fn event_time_and_state_gradients_match_the_closed_form() {
    let (z0, k, c): (f64, f64, f64) = (2.0, 1.3, 0.6);
    // t* solves G(t) = z0 e^{−kt} + 0.1 t − c = 0 (Newton).
    let mut t: f64 = 1.0;
    for _ in 0..50 {
        let g = z0 * (-k * t).exp() + 0.1 * t - c;
        let dg = -k * z0 * (-k * t).exp() + 0.1;
        t -= g / dg;
    }
    let z_star = z0 * (-k * t).exp();
    let g_t = -k * z_star + 0.1;
    // Implicit function theorem, then z(t*) = z0 e^{−k t*} moved along with t*.
    let dt_dz0 = -(-k * t).exp() / g_t;
    let dt_dk = t * z_star / g_t;
    let dt_dc = 1.0 / g_t;
    let dz_dz0 = (-k * t).exp() - k * z_star * dt_dz0;
    let dz_dk = -t * z_star - k * z_star * dt_dk;
    let dz_dc = -k * z_star * dt_dc;
    let want = [dt_dz0 + 3.0 * dz_dz0, dt_dk + 3.0 * dz_dk, dt_dc + 3.0 * dz_dc];
    for mode in modes() {
        let (t_star, z, got) = decay_event(mode, z0, k, c);
        assert!((t_star - t).abs() < 1e-9, "{mode:?}: t* = {t_star}, want {t}");
        assert!((z - z_star).abs() < 1e-9, "{mode:?}: z(t*) = {z}, want {z_star}");
        let e = rel_err(&got, &want);
        // 1e-11 measured (the solver's tolerance).
        assert!(e < 1e-9, "{mode:?}: gradient {got:?}, want {want:?} ({e:e})");
    }
}

/// The event of the MLP tests: `g = t − 1 − 0.3 tanh(z₀₀)` crosses 0 for t in [0.7, 1.3] whatever
/// the field does, and depends on both t and the state.
fn mlp_g(t: Tensor<Ad, 1>, z: Tensor<Ad, 2>) -> Tensor<Ad, 1> {
    t.sub_scalar(1.0) - z.narrow(0, 0, 1).narrow(1, 0, 1).reshape([1]).tanh().mul_scalar(0.3)
}

/// An MLP field in 2-D until [`mlp_g`] crosses 0; loss 0.7 t* + Σ z(t*)².
fn mlp_event(model: &Mlp<Ad>, mode: GradientMode, z0: &[f64]) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    let device = Default::default();
    let ode = NeuralOde::new(model.clone())
        .solver(Solver::tsit5(1e-10, 1e-10))
        .gradient(mode);
    let z = Tensor::<Ad, 2>::from_data(TensorData::new(z0.to_vec(), [z0.len() / 2, 2]), &device).require_grad();
    let hit = ode
        .solve_until(z.clone(), 0.0, 2.0, mlp_g)
        .unwrap()
        .expect("the event happens");
    let loss = hit.time.clone().mul_scalar(0.7) + hit.state.clone().powi_scalar(2).sum();
    let value = to_vec(loss.clone())[0];
    let grads = loss.backward();
    let layer = &ode.dynamics.layers[0];
    (
        value,
        to_vec(hit.time),
        to_vec(z.grad(&grads).unwrap()),
        to_vec(layer.weight.grad(&grads).unwrap()),
    )
}

#[test]
fn event_gradients_agree_across_modes_and_with_finite_differences() {
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(11, &[2, 6, 2], Act::Tanh, true, &device);
    let z0 = [0.3, 0.1, -0.4, 0.5];
    let (loss, t, dz0, dw) = mlp_event(&model, GradientMode::Backprop, &z0);
    assert!((0.7..=1.3).contains(&t[0]), "t* = {}", t[0]);
    for mode in &modes()[1..] {
        let (l, t2, dz, w) = mlp_event(&model, *mode, &z0);
        assert!((l - loss).abs() < 1e-9 && (t2[0] - t[0]).abs() < 1e-12, "{mode:?}");
        let tol = if matches!(mode, GradientMode::Backsolve(_)) {
            1e-6
        } else {
            1e-10
        };
        assert!(rel_err(&dz, &dz0) < tol, "{mode:?}: dz0 {dz:?} vs {dz0:?}");
        assert!(rel_err(&w, &dw) < tol, "{mode:?}: dW off by {:e}", rel_err(&w, &dw));
    }
    // Central differences of the whole event solve (event located anew each time).
    let loss_at = |z: &[f64]| -> f64 {
        let ode = NeuralOde::new(model.clone()).solver(Solver::tsit5(1e-10, 1e-10));
        let z = Tensor::<Ad, 2>::from_data(TensorData::new(z.to_vec(), [2, 2]), &device);
        let hit = ode.solve_until(z, 0.0, 2.0, mlp_g).unwrap().unwrap();
        to_vec(hit.time.mul_scalar(0.7) + hit.state.powi_scalar(2).sum())[0]
    };
    let eps = 1e-5;
    for i in 0..z0.len() {
        let (mut up, mut down) = (z0.to_vec(), z0.to_vec());
        up[i] += eps;
        down[i] -= eps;
        let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * eps);
        assert!(
            (fd - dz0[i]).abs() < 1e-5 * dz0[i].abs().max(1.0),
            "dL/dz0[{i}]: FD {fd} vs {}",
            dz0[i]
        );
    }
}

#[test]
fn no_crossing_is_none_and_bad_events_are_typed_errors() {
    let device = Default::default();
    let ode = NeuralOde::new(Toy::<Ad>::new(Kind::Decay, &device)).solver(Solver::dopri5(1e-8, 1e-8));
    let z = Tensor::<Ad, 2>::from_data(TensorData::from([[1.0f64]]), &device);
    let above = |_t, z: Tensor<Ad, 2>| z.reshape([1]).add_scalar(1.0);
    assert!(ode.solve_until(z.clone(), 0.0, 3.0, above).unwrap().is_none());
    let at_start = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sub_scalar(1.0);
    assert_eq!(
        ode.solve_until(z.clone(), 0.0, 3.0, at_start).unwrap_err(),
        Error::EventAtStart { t0: 0.0, index: 0 }
    );
    let two_at_start = |_t, z: Tensor<Ad, 2>| {
        Tensor::cat(
            vec![z.clone().reshape([1]).add_scalar(1.0), z.reshape([1]).sub_scalar(1.0)],
            0,
        )
    };
    assert_eq!(
        ode.solve_until(z.clone(), 0.0, 3.0, two_at_start).unwrap_err(),
        Error::EventAtStart { t0: 0.0, index: 1 }
    );
    let empty = |_t, z: Tensor<Ad, 2>| Tensor::<Ad, 1>::from_data(TensorData::new(Vec::<f64>::new(), [0]), &z.device());
    assert!(matches!(
        ode.solve_until(z.clone(), 0.0, 3.0, empty).unwrap_err(),
        Error::BadEventValue { got, .. } if got == "shape [0]"
    ));
    // One condition at the start, two afterwards.
    let widening = |t: Tensor<Ad, 1>, z: Tensor<Ad, 2>| {
        let g = z.reshape([1]).add_scalar(1.0);
        match t.into_scalar() == 0.0 {
            true => g,
            false => g.repeat_dim(0, 2),
        }
    };
    assert!(matches!(
        ode.solve_until(z.clone(), 0.0, 3.0, widening).unwrap_err(),
        Error::BadEventValue { got, .. } if got == "shape [2] after [1]"
    ));
    let nan = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sqrt().sub_scalar(2.0).mul_scalar(f64::NAN);
    assert!(matches!(
        ode.solve_until(z.clone(), 0.0, 3.0, nan).unwrap_err(),
        Error::BadEventValue { got, .. } if got == "NaN"
    ));
    // g = −(t − 1)² touches 0 at t = 1 without changing sign: no event (or, should a step end
    // exactly there, a typed error: the event time has no derivative).
    let touch = |t: Tensor<Ad, 1>, _z: Tensor<Ad, 2>| t.sub_scalar(1.0).powi_scalar(2).neg();
    let e = ode.solve_until(z.clone(), 0.0, 3.0, touch);
    assert!(
        matches!(e, Ok(None) | Err(Error::TangentialEvent { .. })),
        "a touching event is not a crossing: {e:?}"
    );
    let two_starts = Tensor::<Ad, 1>::from_data(TensorData::from([0.0f64, 1.0]), &device);
    assert!(matches!(
        ode.solve_until_from(z.clone(), two_starts, 3.0, Crossing::Any, above)
            .unwrap_err(),
        Error::InvalidOption { name: "start", .. }
    ));
    let fixed = NeuralOde::new(Toy::<Ad>::new(Kind::Decay, &device)).solver(Solver::rk4(10));
    assert_eq!(
        fixed.solve_until(z.clone(), 0.0, 3.0, above).unwrap_err(),
        Error::EventNeedsAdaptiveSolver { method: "rk4" }
    );
    // Directions: z = e^{−t} falls through 0.5; a rising crossing never comes.
    let start = || Tensor::<Ad, 1>::from_data(TensorData::from([0.0f64]), &device);
    let half = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sub_scalar(0.5);
    let falling = ode
        .solve_until_from(z.clone(), start(), 3.0, Crossing::Falling, half)
        .unwrap();
    let t: f64 = falling.unwrap().time.into_scalar();
    assert!((t - 2f64.ln()).abs() < 1e-7);
    assert!(ode
        .solve_until_from(z.clone(), start(), 3.0, Crossing::Rising, half)
        .unwrap()
        .is_none());
    // A directed crossing may start on the event surface; an undirected one may not.
    let one = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sub_scalar(1.0);
    assert!(ode
        .solve_until_from(z.clone(), start(), 3.0, Crossing::Rising, one)
        .unwrap()
        .is_none());
    // Backward in time: z = e^{−t} reaches 2 at t = −ln 2.
    let two = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sub_scalar(2.0);
    let t: f64 = ode
        .solve_until(z.clone(), 0.0, -3.0, two)
        .unwrap()
        .unwrap()
        .time
        .into_scalar();
    assert!((t + 2f64.ln()).abs() < 1e-7, "backward: t* = {t}");
    let heun =
        NeuralOde::new(Toy::<Ad>::new(Kind::Decay, &device)).solver(Solver::adaptive(&tableau::HEUN, 1e-6, 1e-6));
    let half = |_t, z: Tensor<Ad, 2>| z.reshape([1]).sub_scalar(0.5);
    let t: f64 = heun.solve_until(z, 0.0, 3.0, half).unwrap().unwrap().time.into_scalar();
    assert!((t - 2f64.ln()).abs() < 1e-3, "heun: t* = {t}");
}

/// dz/dt for z = [height, velocity] under gravity.
#[derive(burn::module::Module, Clone, Debug)]
struct Gravity {}

impl<B: Backend> Dynamics<B, 2> for Gravity {
    fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
        let v = z.clone().narrow(1, 1, 1);
        Tensor::cat(vec![v.clone(), v.zeros_like().sub_scalar(9.81)], 1)
    }
}

#[test]
fn chained_events_carry_gradients_through_every_segment() {
    // Dropped from h0, bouncing with restitution e: impacts at t1 = sqrt(2 h0 / g) and
    // t2 = t1 (1 + 2e), so dt2/dh0 = (1 + 2e) / sqrt(2 g h0) and dt2/de = 2 t1.
    let (h0, e, g): (f64, f64, f64) = (3.0, 0.7, 9.81);
    let t1 = (2.0 * h0 / g).sqrt();
    let device = Default::default();
    for mode in modes() {
        let ode = NeuralOde::new(Gravity {})
            .solver(Solver::tsit5(1e-10, 1e-12))
            .gradient(mode);
        let ground = |_t, z: Tensor<Ad, 2>| z.narrow(1, 0, 1).reshape([1]);
        let z0 = Tensor::<Ad, 2>::from_data(TensorData::from([[h0, 0.0]]), &device).require_grad();
        let restitution = Tensor::<Ad, 1>::from_data(TensorData::from([e]), &device).require_grad();
        let first = ode.solve_until(z0.clone(), 0.0, 10.0, ground).unwrap().unwrap();
        let v = first.state.clone().narrow(1, 1, 1) * restitution.clone().unsqueeze::<2>().neg();
        // The second segment starts on the ground: only a falling crossing ends it.
        let z1 = Tensor::cat(vec![first.state.clone().narrow(1, 0, 1), v], 1);
        let second = ode
            .solve_until_from(z1, first.time.clone(), 10.0, Crossing::Falling, ground)
            .unwrap()
            .unwrap();
        let t2 = to_vec(second.time.clone())[0];
        assert!((t2 - t1 * (1.0 + 2.0 * e)).abs() < 1e-8, "{mode:?}: t2 = {t2}");
        let grads = second.time.backward();
        let dh0 = to_vec(z0.grad(&grads).unwrap())[0];
        let de = to_vec(restitution.grad(&grads).unwrap())[0];
        let want = [(1.0 + 2.0 * e) / (2.0 * g * h0).sqrt(), 2.0 * t1];
        assert!(
            rel_err(&[dh0, de], &want) < 1e-7,
            "{mode:?}: {:?} vs {want:?}",
            [dh0, de]
        );
    }
}

#[test]
fn the_first_of_several_event_conditions_ends_the_solve() {
    // Thrown up from h0 with speed v0 between a floor (height 0) and a ceiling at H, a captured
    // leaf: g = [height, H − height]. A fast throw hits the ceiling at the first root of
    // h0 + v0 t − g t²/2 = H, a slow one falls back to the floor. Either way, with v* the speed
    // at the event, dt*/dh0 = −1/v*, dt*/dv0 = −t*/v* and (ceiling) dt*/dH = 1/v*.
    let (h0, ceiling, g): (f64, f64, f64) = (1.0, 3.0, 9.81);
    let device = Default::default();
    for (v0, index) in [(8.0, 1), (5.0, 0)] {
        let t = match index {
            1 => (v0 - (v0 * v0 - 2.0 * g * (ceiling - h0)).sqrt()) / g,
            _ => (v0 + (v0 * v0 + 2.0 * g * h0).sqrt()) / g,
        };
        let v = v0 - g * t;
        let want = [-1.0 / v, -t / v, if index == 1 { 1.0 / v } else { 0.0 }];
        for mode in modes() {
            let ode = NeuralOde::new(Gravity {})
                .solver(Solver::tsit5(1e-10, 1e-12))
                .gradient(mode);
            let z0 = Tensor::<Ad, 2>::from_data(TensorData::from([[h0, v0]]), &device).require_grad();
            let top = Tensor::<Ad, 1>::from_data(TensorData::from([ceiling]), &device).require_grad();
            let walls = |_t, z: Tensor<Ad, 2>| {
                let height = z.narrow(1, 0, 1).reshape([1]);
                Tensor::cat(vec![height.clone(), top.clone() - height], 0)
            };
            let hit = ode.solve_until(z0.clone(), 0.0, 10.0, walls).unwrap().unwrap();
            assert_eq!(hit.index, index, "{mode:?}, v0 = {v0}");
            let t_star = to_vec(hit.time.clone())[0];
            assert!(
                (t_star - t).abs() < 1e-8,
                "{mode:?}, v0 = {v0}: t* = {t_star}, want {t}"
            );
            let height = to_vec(hit.state.clone().narrow(1, 0, 1))[0];
            let wall = if index == 1 { ceiling } else { 0.0 };
            assert!((height - wall).abs() < 1e-8, "{mode:?}: height {height} at the event");
            let grads = hit.time.backward();
            let dz0 = to_vec(z0.grad(&grads).unwrap());
            let d_top = top.grad(&grads).map_or(0.0, |d| to_vec(d)[0]);
            let got = [dz0[0], dz0[1], d_top];
            // Tsit5 is exact on a parabola: 4e-16 measured. (Before the vendored burn-autodiff's
            // patch 4, the division by ġ alone was 1e-8 off.)
            assert!(rel_err(&got, &want) < 1e-12, "{mode:?}, v0 = {v0}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn of_two_conditions_crossing_in_one_step_the_earlier_root_wins() {
    // One step covers [0, 1] (dt0 and a tolerance no step fails); g = [t − 0.5, t − 0.3]
    // crosses in both components there, the second first.
    let device = Default::default();
    let ode = NeuralOde::new(Toy::<Ad>::new(Kind::Decay, &device)).solver(Solver::tsit5(1e30, 1e30).dt0(1.0));
    let z = Tensor::<Ad, 2>::from_data(TensorData::from([[1.0f64]]), &device);
    let both = |t: Tensor<Ad, 1>, _z| Tensor::cat(vec![t.clone().sub_scalar(0.5), t.sub_scalar(0.3)], 0);
    let hit = ode.solve_until(z, 0.0, 3.0, both).unwrap().unwrap();
    assert_eq!(hit.index, 1);
    let t: f64 = hit.time.into_scalar();
    assert!((t - 0.3).abs() < 1e-12, "t* = {t}");
}
