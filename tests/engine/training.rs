//! Gradients reach burn's optimizers and respect frozen parameters.

use adjoint_dpm::prelude::*;
use burn::module::Param;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;

use crate::common::{grads_of, param_grads, to_vec, Act, Ad, Mlp, P1};

#[test]
fn frozen_params_receive_no_grad() {
    let device = Default::default();
    let mut model = Mlp::<Ad>::new(&[2, 6, 2], Act::Tanh, true, &device);
    model.layers[0].weight = model.layers[0].weight.clone().set_require_grad(false);
    let z0 = [0.3, -0.2, 0.5, 0.1];
    for mode in [
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Backsolve(BacksolveOptions::default()),
    ] {
        let ode = NeuralOde::new(model.clone()).solver(Solver::rk4(8)).gradient(mode);
        let z = Tensor::<Ad, 2>::from_data(burn::tensor::TensorData::new(z0.to_vec(), [2, 2]), &device).require_grad();
        let grads = ode.solve(z, &[0.0, 1.0]).unwrap().last().sum().backward();
        assert!(
            ode.dynamics.layers[0].weight.grad(&grads).is_none(),
            "{mode:?}: frozen weight got a gradient"
        );
        assert!(ode.dynamics.layers[0].bias.as_ref().unwrap().grad(&grads).is_some());
        assert!(ode.dynamics.layers[1].weight.grad(&grads).is_some());
    }
    // The trainable ones still equal Backprop's.
    let exact = grads_of(
        &model,
        Solver::rk4(8),
        GradientMode::Checkpointed(Schedule::All),
        &z0,
        2,
        &[0.0, 1.0],
    );
    let reference = grads_of(&model, Solver::rk4(8), GradientMode::Backprop, &z0, 2, &[0.0, 1.0]);
    assert!(crate::common::rel_err(&exact.theta, &reference.theta) < 1e-10);
    let _ = param_grads;
}

/// A parameter computed from a tracked tensor (`Param::initialized(id, 2·w)`, as a stochastic
/// sampler's noise is held) is part of θ: its gradient reaches `w` in every mode, as twice the
/// gradient of a plain parameter with the same values, and Checkpointed equals Backprop. (Before,
/// only leaves counted, and such a parameter was silently frozen.)
#[test]
fn computed_params_pass_their_gradient_on() {
    use burn::module::ParamId;
    let device = Default::default();
    let model = Mlp::<Ad>::new(&[2, 6, 2], Act::Tanh, true, &device);
    let half = model.layers[0].weight.val().inner().mul_scalar(0.5);
    let z0 = Tensor::<Ad, 2>::from_data(
        burn::tensor::TensorData::new(vec![0.3, -0.2, 0.5, 0.1], [2, 2]),
        &device,
    );
    let loss_grads = |ode: &NeuralOde<Mlp<Ad>>| {
        let sol = ode.solve(z0.clone(), &[0.0, 1.0]).unwrap();
        sol.last().powi_scalar(2).sum().backward()
    };
    let mut reference = None;
    for mode in [
        GradientMode::Backprop,
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Checkpointed(Schedule::Recursive),
        GradientMode::Backsolve(BacksolveOptions::default()),
    ] {
        let w = Tensor::<Ad, 2>::from_inner(half.clone()).require_grad();
        let mut computed = model.clone();
        computed.layers[0].weight = Param::initialized(ParamId::new(), w.clone().mul_scalar(2.0));
        let grads = loss_grads(&NeuralOde::new(computed).solver(Solver::rk4(8)).gradient(mode));
        let got = to_vec(w.grad(&grads).expect("the computed parameter's source gets a gradient"));
        // The same solve with the plain parameter: d/dw = 2 d/dweight.
        let plain = NeuralOde::new(model.clone()).solver(Solver::rk4(8)).gradient(mode);
        let grads = loss_grads(&plain);
        let twice: Vec<f64> = to_vec(plain.dynamics.layers[0].weight.grad(&grads).unwrap())
            .iter()
            .map(|g| 2.0 * g)
            .collect();
        assert!(crate::common::rel_err(&got, &twice) < 1e-12, "{mode:?}");
        match (&reference, mode) {
            (None, _) => reference = Some(got),
            // Backsolve is exact to its tolerances only.
            (Some(r), GradientMode::Backsolve(_)) => assert!(crate::common::rel_err(&got, r) < 1e-4, "{mode:?}"),
            (Some(r), _) => assert!(crate::common::rel_err(&got, r) < 1e-10, "{mode:?}"),
        }
    }
}

#[test]
fn untracked_solves_keep_no_states() {
    let device = Default::default();
    let model = Mlp::<Ad>::new(&[2, 4, 2], Act::Tanh, false, &device).no_grad();
    let ode = NeuralOde::new(model).solver(Solver::rk4(50));
    let sol = ode.solve(Tensor::<Ad, 2>::ones([3, 2], &device), &[0.0, 1.0]).unwrap();
    assert_eq!(sol.stored_states(), 0);
    let tracked = NeuralOde::new(Mlp::<Ad>::new(&[2, 4, 2], Act::Tanh, false, &device)).solver(Solver::rk4(50));
    for (schedule, states) in [(Schedule::All, 50), (Schedule::Every(10), 5), (Schedule::Recursive, 1)] {
        let sol = tracked
            .clone()
            .gradient(GradientMode::Checkpointed(schedule))
            .solve(Tensor::<Ad, 2>::ones([3, 2], &device), &[0.0, 1.0])
            .unwrap();
        assert_eq!(sol.stored_states(), states, "{schedule:?}");
    }
}

#[test]
fn adam_fits_the_spiral_through_the_adjoint() {
    let p = P1::load();
    let device = Default::default();
    let mut model = p.model::<Ad>(&device);
    // Start away from the reference weights.
    model.layers[1].weight = Param::from_tensor(model.layers[1].weight.val().mul_scalar(0.5).detach());
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let ode = NeuralOde::new(model.clone())
            .solver(Solver::rk4(100))
            .gradient(GradientMode::Checkpointed(Schedule::All));
        let sol = ode.solve(p.z0::<Ad>(&device), &p.ts).unwrap();
        let loss = p.loss(&sol, &device);
        losses.push(to_vec(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &ode.dynamics);
        model = optim.step(1e-2, ode.dynamics, grads);
    }
    assert!(losses[7] < 0.9 * losses[0], "Adam did not reduce the loss: {losses:?}");
}

/// The ready-made MLP field's tanh (built from vectorisable ops) equals burn's tanh and has its
/// derivative 1 − tanh², also where `exp(2x)` would overflow and near 0.
#[test]
fn mlp_field_tanh_is_tanh() {
    let device = Default::default();
    // Large enough for the vectorised formula (small tensors use burn's tanh).
    let mut xs = vec![-1e3, -30.0, -19.9, -3.0, -0.5, -1e-9, 0.0, 1e-9, 0.7, 4.0, 21.0, 800.0];
    xs.extend((0..5000).map(|i| -25.0 + 50.0 * i as f64 / 4999.0));
    let x = Tensor::<Ad, 1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &device).require_grad();
    let y = adjoint_dpm::ode::mlp::tanh(x.clone());
    let grads = y.clone().sum().backward();
    let got = y.into_data().to_vec::<f64>().unwrap();
    let dgot = x.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap();
    for ((&x, y), dy) in xs.iter().zip(got).zip(dgot) {
        let x: f64 = x;
        let (want, dwant) = (x.tanh(), 1.0 - x.tanh().powi(2));
        assert!((y - want).abs() <= 4.5e-16, "tanh({x}) = {y}, want {want}");
        assert!((dy - dwant).abs() <= 1e-15, "tanh'({x}) = {dy}, want {dwant}");
    }
}

/// `MlpField`'s gradients on tensors large enough for its vectorised tanh (batch 64 × width 64),
/// inside a solve, in every mode: dL/dz0 and dL/d(bias) against central differences.
#[test]
fn mlp_field_large_batches_match_finite_differences() {
    use adjoint_dpm::ode::mlp::MlpFieldConfig;

    let device = Default::default();
    let field = crate::common::with_rng(Some(7), || {
        adjoint_dpm::ode::materialized(MlpFieldConfig::new(vec![2, 64, 64, 2]).init::<Ad>(&device))
    });
    let (batch, dim) = (64, 2);
    assert!(
        batch * 64 >= 4096,
        "the hidden activations must take the vectorised path"
    );
    let z0: Vec<f64> = (0..batch * dim).map(|i| ((i as f64) * 0.37).sin()).collect();
    let times = [0.0, 0.5, 1.0];
    let loss_at = |field: &adjoint_dpm::ode::mlp::MlpField<crate::common::F64>, z0: &[f64]| -> f64 {
        let ode = NeuralOde::new(field.clone()).solver(Solver::rk4(6));
        let z = Tensor::<crate::common::F64, 2>::from_data(TensorData::new(z0.to_vec(), [batch, dim]), &device);
        ode.integrate(z, &times).unwrap().last().square().sum().into_scalar()
    };
    let inner = burn::module::AutodiffModule::valid(&field);
    let h = 1e-5;
    for mode in [
        GradientMode::Backprop,
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Backsolve(BacksolveOptions {
            rtol: 1e-10,
            atol: 1e-10,
            ..Default::default()
        }),
    ] {
        let ode = NeuralOde::new(field.clone()).solver(Solver::rk4(6)).gradient(mode);
        let z = Tensor::<Ad, 2>::from_data(TensorData::new(z0.clone(), [batch, dim]), &device).require_grad();
        let grads = ode.solve(z.clone(), &times).unwrap().last().square().sum().backward();
        let gz = to_vec(z.grad(&grads).unwrap());
        let gb = to_vec(ode.dynamics.layers[1].bias.as_ref().unwrap().grad(&grads).unwrap());
        for i in [0, 17, 101] {
            let (mut up, mut down) = (z0.clone(), z0.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss_at(&inner, &up) - loss_at(&inner, &down)) / (2.0 * h);
            assert!(
                (gz[i] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{mode:?} dL/dz0[{i}] = {}, fd {fd}",
                gz[i]
            );
        }
        for j in [0, 33] {
            let nudge = |eps: f64| {
                let mut f = inner.clone();
                let bias = f.layers[1].bias.take().unwrap().val();
                let mut e = vec![0.0; 64];
                e[j] = eps;
                f.layers[1].bias = Some(burn::module::Param::from_tensor(
                    bias + Tensor::from_data(TensorData::new(e, [64]), &device),
                ));
                f
            };
            let fd = (loss_at(&nudge(h), &z0) - loss_at(&nudge(-h), &z0)) / (2.0 * h);
            assert!(
                (gb[j] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{mode:?} dL/db[{j}] = {}, fd {fd}",
                gb[j]
            );
        }
    }
}
