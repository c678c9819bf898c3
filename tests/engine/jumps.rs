//! Jump times (`NeuralOde::jump_times`): a forcing that switches sign, solved and differentiated
//! in every mode against its closed form; the exact modes equal Backprop across jumps; bad
//! jump times are typed errors.

use adjoint_dpm::prelude::*;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use proptest::prelude::*;

use crate::common::{cases_from_env, rel_err, to_vec, Ad, F64};

/// dz/dt = a·u(t) − k z + c sin z (bounded: no blow-up either way in time), where the forcing u is +1 before the first switch time and
/// changes sign at each one.
#[derive(Module, Debug)]
pub struct Switched<B: Backend> {
    pub a: Param<Tensor<B, 1>>,
    pub k: Param<Tensor<B, 1>>,
    pub c: f64,
    pub switches: Vec<f64>,
}

impl<B: Backend> Switched<B> {
    fn new(a: f64, k: f64, c: f64, switches: &[f64], device: &B::Device) -> Self {
        let param = |v: f64| Param::from_tensor(Tensor::from_data(TensorData::from([v]), device));
        Self {
            a: param(a),
            k: param(k),
            c,
            switches: switches.to_vec(),
        }
    }
}

impl<B: Backend> Dynamics<B, 2> for Switched<B> {
    fn f(&self, t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut u = t.ones_like();
        for &s in &self.switches {
            // 1 before s, −1 from s on.
            u = u * t.clone().greater_equal_elem(s).float().mul_scalar(-2.0).add_scalar(1.0);
        }
        let forcing = (u * self.a.val()).unsqueeze::<2>();
        forcing - z.clone() * self.k.val().unsqueeze::<2>() + z.sin().mul_scalar(self.c)
    }
}

/// z(T) for dz/dt = a·u(t) − k z from z(T0) = z0, one switch at `s` (T0 < s).
fn exact(t0: f64, z0: f64, a: f64, k: f64, s: f64, t: f64) -> f64 {
    let relax = |z: f64, level: f64, dt: f64| level + (z - level) * (-k * dt).exp();
    if t <= s {
        relax(z0, a / k, t - t0)
    } else {
        relax(relax(z0, a / k, s - t0), -a / k, t - s)
    }
}

const SWITCH: f64 = 1.0;
const Z0: [f64; 2] = [0.3, -0.5];
const WEIGHTS: [f64; 4] = [0.0, 1.0, -0.7, 0.4];

/// L = Σ_k w_k Σ_b z_b(T_k)², in closed form.
fn exact_loss(times: &[f64], z0: [f64; 2], a: f64, k: f64) -> f64 {
    times
        .iter()
        .zip(WEIGHTS)
        .map(|(&t, w)| {
            w * z0
                .iter()
                .map(|&z| exact(times[0], z, a, k, SWITCH, t).powi(2))
                .sum::<f64>()
        })
        .sum()
}

/// dL/d(z0_0, z0_1, a, k, T_0, …, T_3) of the closed form, by central differences.
fn exact_grads(times: &[f64], a: f64, k: f64) -> Vec<f64> {
    let eps = 1e-6;
    let mut inputs = vec![Z0[0], Z0[1], a, k];
    inputs.extend_from_slice(times);
    (0..inputs.len())
        .map(|i| {
            let at = |d: f64| {
                let mut x = inputs.clone();
                x[i] += d;
                exact_loss(&x[4..], [x[0], x[1]], x[2], x[3])
            };
            (at(eps) - at(-eps)) / (2.0 * eps)
        })
        .collect()
}

/// The same gradients from a solve; the times' gradients when `with_times`.
fn solved_grads(ode: &NeuralOde<Switched<Ad>>, times: &[f64], with_times: bool) -> (Vec<f64>, Stats) {
    let device = Default::default();
    let z0 = Tensor::<Ad, 2>::from_data(TensorData::new(Z0.to_vec(), [2, 1]), &device).require_grad();
    let t = Tensor::<Ad, 1>::from_data(TensorData::from(times), &device);
    let t = if with_times { t.require_grad() } else { t };
    let solution = ode.solve_with_times(z0.clone(), t.clone()).unwrap();
    let loss = solution
        .states()
        .into_iter()
        .zip(WEIGHTS)
        .map(|(z, w)| z.powi_scalar(2).sum().mul_scalar(w))
        .reduce(|a, b| a + b)
        .unwrap();
    let grads = loss.backward();
    let mut out = to_vec(z0.grad(&grads).unwrap());
    out.extend(to_vec(ode.dynamics.a.grad(&grads).unwrap()));
    out.extend(to_vec(ode.dynamics.k.grad(&grads).unwrap()));
    if with_times {
        out.extend(to_vec(t.grad(&grads).unwrap()));
    }
    (out, solution.stats())
}

fn modes() -> Vec<GradientMode> {
    vec![
        GradientMode::Backprop,
        GradientMode::Checkpointed(Schedule::All),
        GradientMode::Checkpointed(Schedule::Every(3)),
        GradientMode::Checkpointed(Schedule::Recursive),
        GradientMode::Backsolve(BacksolveOptions {
            rtol: 1e-11,
            atol: 1e-11,
            seminorm: false,
        }),
    ]
}

#[test]
fn adaptive_solves_told_of_a_jump_land_on_it_and_reject_fewer_steps() {
    let device = Default::default();
    let z0 = Tensor::<F64, 2>::from_data(TensorData::new(Z0.to_vec(), [2, 1]), &device);
    let times = [0.0, 0.6, 1.7, 2.5];
    for solver in [
        Solver::bosh3(1e-8, 1e-8),
        Solver::dopri5(1e-8, 1e-8),
        Solver::tsit5(1e-8, 1e-8),
        Solver::dopri8(1e-8, 1e-8),
    ] {
        for interpolate in [true, false] {
            let solver = solver.interpolate(interpolate);
            let field = || Switched::<F64>::new(0.8, 1.3, 0.0, &[SWITCH], &device);
            let told = NeuralOde::new(field()).solver(solver).jump_times(&[SWITCH]);
            let blind = NeuralOde::new(field()).solver(solver);
            let (told, blind) = (
                told.integrate(z0.clone(), &times).unwrap(),
                blind.integrate(z0.clone(), &times).unwrap(),
            );
            let name = solver.tableau.name;
            for (k, &t) in times.iter().enumerate() {
                let want: Vec<f64> = Z0.iter().map(|&z| exact(0.0, z, 0.8, 1.3, SWITCH, t)).collect();
                let e = rel_err(&to_vec(told.state(k)), &want);
                assert!(e < 2e-7, "{name} (interpolate {interpolate}) at t = {t}: error {e:e}");
            }
            let (told, blind) = (told.stats(), blind.stats());
            assert!(
                told.rejected_steps < blind.rejected_steps && told.nfe_forward < blind.nfe_forward,
                "{name} (interpolate {interpolate}): told {told:?}, blind {blind:?}"
            );
        }
    }
}

#[test]
fn gradients_across_a_jump_match_the_closed_form_in_every_mode() {
    let device = Default::default();
    let (a, k) = (0.8, 1.3);
    let times = [0.0, 0.6, 1.7, 2.5];
    let want = exact_grads(&times, a, k);
    for interpolate in [true, false] {
        for mode in modes() {
            let ode = NeuralOde::new(Switched::<Ad>::new(a, k, 0.0, &[SWITCH], &device))
                .solver(Solver::dopri5(1e-10, 1e-10).interpolate(interpolate))
                .gradient(mode)
                .jump_times(&[SWITCH]);
            let (got, _) = solved_grads(&ode, &times, true);
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-7,
                "{mode:?} (interpolate {interpolate}): {got:?}, want {want:?} ({e:e})"
            );
        }
    }
}

#[test]
fn fixed_steps_with_a_jump_among_the_outputs_keep_their_order() {
    // RK4's last stage of the step ending at the jump sees f from before it: without that the
    // step would carry an O(h) error, 1e-3 here.
    let device = Default::default();
    let (a, k) = (0.8, 1.3);
    let times = [0.0, SWITCH, 2.5];
    let want = &exact_grads(&times, a, k)[..4];
    for mode in modes() {
        let ode = NeuralOde::new(Switched::<Ad>::new(a, k, 0.0, &[SWITCH], &device))
            .solver(Solver::rk4(200))
            .gradient(mode)
            .jump_times(&[SWITCH]);
        let (got, _) = solved_grads(&ode, &times, false);
        let e = rel_err(&got, want);
        assert!(e < 1e-7, "{mode:?}: {got:?}, want {want:?} ({e:e})");
    }
}

#[test]
fn bad_jump_times_are_typed_errors() {
    let device = Default::default();
    let z0 = Tensor::<F64, 2>::zeros([1, 1], &device);
    let field = || Switched::<F64>::new(1.0, 1.0, 0.0, &[SWITCH], &device);
    let message =
        |ode: NeuralOde<Switched<F64>>, times: &[f64]| ode.integrate(z0.clone(), times).unwrap_err().to_string();
    let e = message(NeuralOde::new(field()).jump_times(&[f64::NAN]), &[0.0, 2.0]);
    assert!(e.contains("jump_times") && e.contains("NaN"), "{e}");
    let e = message(
        NeuralOde::new(field()).solver(Solver::rk4(10)).jump_times(&[1.0]),
        &[0.0, 2.0],
    );
    assert!(e.contains("jump_times = 1") && e.contains("output times"), "{e}");
    let e = message(
        NeuralOde::new(field())
            .solver(Solver::rk4(10).interpolate(true))
            .jump_times(&[1.0]),
        &[0.0, 1.0, 2.0],
    );
    assert!(e.contains("jump_times = 1") && e.contains("interpolate(true)"), "{e}");
    // Outside the solve's open span a jump changes nothing, for fixed steps too.
    for jumps in [[0.0], [2.0], [5.0]] {
        let ode = NeuralOde::new(field()).solver(Solver::rk4(10)).jump_times(&jumps);
        assert!(ode.integrate(z0.clone(), &[0.0, 2.0]).is_ok());
    }
}

prop_compose! {
    /// Switch times inside a random grid, forward or backward in time.
    fn jumpy()(n_times in 2usize..5, n_jumps in 1usize..4, backward in any::<bool>(), seed in any::<u64>())
        -> (Vec<f64>, Vec<f64>) {
        let mut rng = seed;
        let mut next = move || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((rng >> 11) as f64) / ((1u64 << 53) as f64) };
        let mut times = vec![0.0];
        for _ in 1..n_times { let last = times[times.len() - 1]; times.push(last + 0.3 + 0.5 * next()); }
        let span = times[times.len() - 1];
        let mut jumps: Vec<f64> = (0..n_jumps).map(|_| span * (0.05 + 0.9 * next())).collect();
        if backward {
            times.iter_mut().for_each(|t| *t = 1.0 - *t);
            jumps.iter_mut().for_each(|t| *t = 1.0 - *t);
        }
        (times, jumps)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases_from_env(16), ..ProptestConfig::default() })]

    /// Checkpointed (every schedule) equals Backprop across random jumps, times included.
    #[test]
    fn checkpointed_equals_backprop_across_jumps(
        (times, jumps) in jumpy(),
        solver in prop_oneof![Just(Solver::bosh3(1e-6, 1e-6)), Just(Solver::dopri5(1e-7, 1e-7)), Just(Solver::tsit5(1e-7, 1e-7))],
        interpolate in any::<bool>(),
        schedule in prop_oneof![Just(Schedule::All), (1usize..4).prop_map(Schedule::Every), Just(Schedule::Recursive)],
    ) {
        let device = Default::default();
        let grads = |mode| {
            let ode = NeuralOde::new(Switched::<Ad>::new(0.9, 0.7, 0.3, &jumps, &device))
                .solver(solver.interpolate(interpolate))
                .gradient(mode)
                .jump_times(&jumps);
            solved_grads(&ode, &times, true).0
        };
        let (reference, exact) = (grads(GradientMode::Backprop), grads(GradientMode::Checkpointed(schedule)));
        let e = rel_err(&exact, &reference);
        prop_assert!(e <= 1e-10, "{exact:?} vs {reference:?} ({e:e})");
    }
}

#[test]
fn an_event_after_a_jump_and_its_gradients_match_the_closed_form() {
    // z rises towards a/k until the switch at 1, then falls towards −a/k and crosses 0 at
    // t* = 1 + ln((z1 + a/k)/(a/k))/k, with z1 = z(1).
    let t_star = |z0: f64, a: f64, k: f64| {
        let z1 = exact(0.0, z0, a, k, SWITCH, SWITCH);
        SWITCH + ((z1 + a / k) / (a / k)).ln() / k
    };
    let (z0, a, k) = (0.2, 0.8, 1.3);
    let eps = 1e-6;
    let fd = |d: [f64; 3]| {
        (t_star(z0 + eps * d[0], a + eps * d[1], k + eps * d[2])
            - t_star(z0 - eps * d[0], a - eps * d[1], k - eps * d[2]))
            / (2.0 * eps)
    };
    let want = [fd([1.0, 0.0, 0.0]), fd([0.0, 1.0, 0.0]), fd([0.0, 0.0, 1.0])];
    let device = Default::default();
    for mode in modes() {
        let ode = NeuralOde::new(Switched::<Ad>::new(a, k, 0.0, &[SWITCH], &device))
            .solver(Solver::tsit5(1e-10, 1e-10))
            .gradient(mode)
            .jump_times(&[SWITCH]);
        let z = Tensor::<Ad, 2>::from_data(TensorData::from([[z0]]), &device).require_grad();
        let hit = ode
            .solve_until(z.clone(), 0.0, 5.0, |_t, z: Tensor<Ad, 2>| z.reshape([1]))
            .unwrap()
            .expect("z crosses 0 after the switch");
        let t = to_vec(hit.time.clone())[0];
        assert!((t - t_star(z0, a, k)).abs() < 1e-8, "{mode:?}: t* = {t}");
        let grads = hit.time.backward();
        let got = [
            to_vec(z.grad(&grads).unwrap())[0],
            to_vec(ode.dynamics.a.grad(&grads).unwrap())[0],
            to_vec(ode.dynamics.k.grad(&grads).unwrap())[0],
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 1e-7,
                "{mode:?}: dt*/d(z0, a, k) = {got:?}, want {want:?}"
            );
        }
    }
}
