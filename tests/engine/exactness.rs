//! The exact modes differentiate the discretised solve: Checkpointed (every schedule) equals
//! Backprop through the solver, and both equal central finite differences.

use adjoint_dpm::ode::{tableau, StepControl};
use adjoint_dpm::prelude::*;
use proptest::prelude::*;

use crate::common::{backsolve_errors, cases_from_env, check_central_differences, grads_of, rel_err, Act, Ad, Mlp};

fn solver_strategy() -> impl Strategy<Value = Solver> {
    prop_oneof![
        (1usize..12).prop_map(Solver::euler),
        (1usize..8).prop_map(Solver::midpoint),
        (1usize..8).prop_map(Solver::heun),
        (1usize..6).prop_map(Solver::rk4),
        (1usize..4).prop_map(|n| Solver::fixed(&tableau::DOPRI5, n)),
        (1usize..3).prop_map(|n| Solver::fixed(&tableau::DOPRI8, n)),
        Just(Solver::bosh3(1e-4, 1e-6)),
        Just(Solver::dopri5(1e-5, 1e-7)),
        Just(Solver::tsit5(1e-5, 1e-7)),
        Just(Solver::dopri8(1e-6, 1e-8)),
    ]
}

fn schedule_strategy() -> impl Strategy<Value = Schedule> {
    prop_oneof![
        Just(Schedule::All),
        (1usize..5).prop_map(Schedule::Every),
        Just(Schedule::Recursive)
    ]
}

prop_compose! {
    /// dim, widths, activation, time dependence, batch·dim initial values, a monotone grid.
    fn problem()(dim in 1usize..4, hidden in 2usize..7, depth in 1usize..3, act in 0u8..3,
                 timed in any::<bool>(), batch in 1usize..4, n_times in 2usize..5,
                 backward in any::<bool>(), seed in any::<u64>())
        -> (Vec<usize>, Act, bool, usize, Vec<f64>, Vec<f64>) {
        let mut widths = vec![dim];
        widths.extend(std::iter::repeat_n(hidden, depth));
        widths.push(dim);
        let act = [Act::Tanh, Act::Softplus, Act::Sin][act as usize];
        let mut rng = seed;
        let mut next = move || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((rng >> 11) as f64) / ((1u64 << 53) as f64) };
        let z0: Vec<f64> = (0..batch * dim).map(|_| next() * 2.0 - 1.0).collect();
        let mut times = vec![0.0];
        for _ in 1..n_times { let last = times[times.len() - 1]; times.push(last + 0.2 + 0.5 * next()); }
        if backward { times.iter_mut().for_each(|t| *t = 1.0 - *t); }
        (widths, act, timed, dim, z0, times)
    }
}

proptest! {
    // 24 cases by default; PROPTEST_CASES=N runs N (a longer search, outside CI).
    #![proptest_config(ProptestConfig { cases: cases_from_env(24), .. ProptestConfig::default() })]

    #[test]
    fn checkpointed_equals_backprop_f64(
        (widths, act, timed, dim, z0, times) in problem(),
        solver in solver_strategy(),
        schedule in schedule_strategy(),
    ) {
        let model = Mlp::<Ad>::new(&widths, act, timed, &Default::default());
        let reference = grads_of(&model, solver, GradientMode::Backprop, &z0, dim, &times);
        let exact = grads_of(&model, solver, GradientMode::Checkpointed(schedule), &z0, dim, &times);
        prop_assert!((exact.loss - reference.loss).abs() <= 1e-12 * reference.loss.abs().max(1.0));
        for (name, a, b) in [("z0", &exact.z0, &reference.z0), ("θ", &exact.theta, &reference.theta), ("T", &exact.times, &reference.times)] {
            let e = rel_err(a, b);
            prop_assert!(e <= 1e-10, "{} off by {:e} ({:?}, {:?})", name, e, solver.tableau.name, schedule);
        }
    }

    #[test]
    fn exact_gradients_match_central_differences(
        (widths, act, timed, dim, z0, times) in problem(),
        solver in solver_strategy().prop_filter("finite differences need fixed steps", |s| !matches!(s.control, StepControl::Adaptive(_))),
    ) {
        let model = Mlp::<Ad>::new(&widths, act, timed, &Default::default());
        let g = grads_of(&model, solver, GradientMode::Checkpointed(Schedule::All), &z0, dim, &times);
        let checked = check_central_differences(&model, solver, &g, &z0, dim, &times, &[0, times.len() - 1]);
        prop_assert!(checked.is_ok(), "{}", checked.unwrap_err());
    }
}

#[test]
fn backsolve_converges_as_tolerance_tightens() {
    // Seeded weights, three fields: the error at a loose tolerance can be small by luck (a few
    // large steps whose errors cancel), so the assertions are a bound that scales with the
    // tolerance and a trend over decades, not strict decrease between neighbours.
    for seed in [1, 2, 3] {
        backsolve_converges_for(seed);
    }
}

fn backsolve_converges_for(seed: u64) {
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(seed, &[2, 8, 2], Act::Tanh, true, &device);
    let z0 = [0.3, -0.5, 0.9, 0.1];
    let times = [0.0, 0.7, 1.5];
    let exact = grads_of(
        &model,
        Solver::dopri5(1e-11, 1e-11),
        GradientMode::Checkpointed(Schedule::All),
        &z0,
        2,
        &times,
    );
    let tolerances = [1e-3, 1e-5, 1e-7, 1e-9];
    let errors = backsolve_errors(&model, |tol| Solver::dopri5(tol, tol), &z0, &times, &tolerances, &exact);
    for (error, tol) in errors.iter().zip(tolerances) {
        assert!(
            *error < 10.0 * tol,
            "seed {seed}: backsolve error {error:e} at tolerance {tol:e} (all: {errors:?})"
        );
    }
    assert!(
        errors[3] < errors[1] / 100.0 && errors[2] < errors[0] / 10.0,
        "seed {seed}: backsolve error did not shrink with the tolerance: {errors:?}"
    );
}

#[test]
fn checkpointed_equals_backprop_f32() {
    // Flex, not NdArray<f32>: burn keeps one default float type per device, and NdArray<f32>
    // shares its device with the f64 checks in this binary.
    use burn::backend::{Autodiff, Flex};
    use burn::prelude::*;
    type B32 = Autodiff<Flex>;
    let device = Default::default();
    let model = Mlp::<B32>::new(&[3, 16, 16, 3], Act::Tanh, true, &device);
    let run = |mode| {
        let ode = NeuralOde::new(model.clone()).solver(Solver::rk4(20)).gradient(mode);
        let z0 = Tensor::<B32, 2>::random([4, 3], burn::tensor::Distribution::Default, &device);
        let z0 = z0.clone().require_grad();
        let sol = ode.solve(z0.clone(), &[0.0, 0.5, 1.0]).unwrap();
        let grads = sol.last().powi_scalar(2).sum().backward();
        let w = ode.dynamics.layers[1].weight.grad(&grads).unwrap();
        (
            crate::common::to_vec(z0.grad(&grads).unwrap()),
            crate::common::to_vec(w),
        )
    };
    // Same z0 for both: seed the backend RNG identically.
    let (z_bp, w_bp) = crate::common::with_rng(Some(7), || run(GradientMode::Backprop));
    let (z_ck, w_ck) = crate::common::with_rng(Some(7), || run(GradientMode::Checkpointed(Schedule::Every(3))));
    assert!(rel_err(&z_ck, &z_bp) < 1e-5 && rel_err(&w_ck, &w_bp) < 1e-5);
}

#[test]
fn computed_time_tensors_get_gradients_in_every_mode() {
    // Times computed from a tracked leaf (here: a learnable time scale) are not leaves
    // themselves; every mode must still differentiate through them.
    use burn::prelude::*;
    use burn::tensor::TensorData;
    let device = Default::default();
    let model = Mlp::<Ad>::new(&[2, 5, 2], Act::Tanh, true, &device);
    let grads_for = |mode| {
        let ode = NeuralOde::new(model.clone()).solver(Solver::rk4(8)).gradient(mode);
        let scale = Tensor::<Ad, 1>::from_data(TensorData::from([1.5f64]), &device).require_grad();
        let times = Tensor::<Ad, 1>::from_data(TensorData::from([0.0f64, 0.4, 1.0]), &device) * scale.clone();
        let z0 = Tensor::<Ad, 2>::from_data(TensorData::from([[0.3f64, -0.2]]), &device);
        let solution = ode.solve_with_times(z0, times).unwrap();
        let grads = crate::common::test_loss(&solution).backward();
        crate::common::to_vec(scale.grad(&grads).expect("the time scale has a gradient"))[0]
    };
    let reference = grads_for(GradientMode::Backprop);
    let exact = grads_for(GradientMode::Checkpointed(Schedule::All));
    assert!(
        reference != 0.0 && (exact - reference).abs() <= 1e-10 * reference.abs(),
        "{exact} vs {reference}"
    );
}

#[test]
fn differentiating_the_times_leaves_the_steps_unchanged() {
    // Backprop with tracked output times computes with their values exactly as a plain solve
    // does: the same steps and the same states to the bit. (Before, it formed h·Σ c_i k_i where
    // a plain solve forms Σ (c_i h) k_i; Dopri8's error estimate, a difference of O(1) terms
    // that is about 1e-13 here, took the rounding difference up to 4e-5 relative, its steps
    // moved by 4e-6, and Backprop with time gradients disagreed with Checkpointed at 1e-11 on
    // this problem, with these weights, found by the proptest.)
    use burn::prelude::*;
    use burn::tensor::TensorData;
    let device = Default::default();
    let model = Mlp::<Ad>::seeded(4, &[2, 3, 2], Act::Sin, true, &device);
    let z0 = [
        -0.9420825200096665,
        0.14134612547346204,
        -0.5016448409237431,
        0.20203737335571081,
    ];
    let times = [1.0, 0.5030180667997883, -0.09591234467894494, -0.6859888920850874];
    for solver in [Solver::dopri8(1e-6, 1e-8), Solver::dopri5(1e-6, 1e-8), Solver::rk4(7)] {
        let run = |tracked: bool| {
            let ode = NeuralOde::new(model.clone())
                .solver(solver)
                .gradient(GradientMode::Backprop);
            let z = Tensor::<Ad, 2>::from_data(TensorData::new(z0.to_vec(), [2, 2]), &device).require_grad();
            let t = Tensor::<Ad, 1>::from_data(TensorData::new(times.to_vec(), [4]), &device);
            let solution = ode
                .solve_with_times(z, if tracked { t.require_grad() } else { t })
                .unwrap();
            let states: Vec<Vec<f64>> = (0..times.len())
                .map(|k| crate::common::to_vec(solution.state(k)))
                .collect();
            (states, solution.stats().accepted_steps, solution.stats().rejected_steps)
        };
        assert_eq!(run(true), run(false), "{}", solver.tableau.name);
    }
}
