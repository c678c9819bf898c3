//! Terminal events: solve until `g(t, z)` changes sign, and differentiate where that happens.
//!
//! `g` has one component per event condition (a floor and a ceiling, say); the first component
//! to change sign ends the solve. The event time `t*` is located on the inner backend, step by
//! step, by root finding on the dense output of the step in which a component changes sign
//! (every component that does, the earliest root winning). The solve from `t0` to `t*` is then run
//! again under the chosen [`GradientMode`](crate::ode::GradientMode), and two terms that add
//! nothing to the values give `t*` and `z(t*)` their gradients (torchdiffeq's `odeint_event`,
//! diffrax's `Event`): by the implicit function theorem on `g(t*, z(t*; p)) = 0`,
//! `dt*/dp = −(∂g/∂z · ∂z/∂p) / ġ` with `ġ = ∂g/∂t + ∂g/∂z · f` at the event, and
//! `dz(t*)/dp = ∂z/∂p + f · dt*/dp`.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{read_scalar, read_values, Error, Result};
use crate::ode::dynamics::{Dynamics, DynamicsField};
use crate::ode::grid::TimeGrid;
use crate::ode::neural_ode::{NeuralOde, Solution};
use crate::ode::solver::{interpolate, Solver, StepControl, Stepper};
use crate::ode::state::{Time, VectorField};

/// Where a terminal event happened, with gradients.
#[derive(Debug, Clone)]
pub struct EventHit<B: Backend, const D: usize> {
    /// The event time `t*`, `[1]`: tracked, so a loss on it differentiates `z0` and `θ`.
    pub time: Tensor<B, 1>,
    /// `z(t*)`: tracked, including how it moves with `t*`.
    pub state: Tensor<B, D>,
    /// Which component of the event function changed sign (0 when it has one).
    pub index: usize,
    /// The differentiated solve from `t0` to `t*` (its states do not include the `t*` term of
    /// `state`; use `state`).
    pub solution: Solution<B, D>,
}

/// Which sign changes of the event function count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crossing {
    /// Either way; the event function must be non-zero at the start.
    #[default]
    Any,
    /// From positive to zero or negative only (a falling height). The start may sit on zero or
    /// below it: after a bounce, the next segment starts on the ground.
    Falling,
    /// From negative to zero or positive only.
    Rising,
}

impl Crossing {
    /// Whether `g` going from `before` to `after` over a step is such a crossing.
    fn crosses(self, before: f64, after: f64) -> bool {
        match self {
            Crossing::Any => before != 0.0 && (after == 0.0 || after.signum() != before.signum()),
            Crossing::Falling => before > 0.0 && after <= 0.0,
            Crossing::Rising => before < 0.0 && after >= 0.0,
        }
    }
}

/// Most iterations of the root finder (each one evaluation of the event function).
const MAX_ROOT_ITERATIONS: usize = 100;

impl<M> NeuralOde<M> {
    /// Solves from `t0` towards `t_max` until the event function `g(t, z)` changes sign; `None`
    /// when it does not before `t_max`. `g` returns one value per event condition, shape `[k]`
    /// (`[1]` for one): the first component to change sign ends the solve, and
    /// [`EventHit::index`] says which. The event time and state
    /// carry gradients with respect to `z0` and the dynamics' parameters in every gradient mode.
    /// Needs an adaptive solver (events are located by root finding on its dense output, to
    /// rounding).
    ///
    /// `g` may capture tensors. A captured leaf (a module's `Param`, or a tensor marked
    /// `require_grad()`) gets its gradient too: `dt*/dp = −(∂g/∂p)/ġ`, a learnable threshold,
    /// say. Compute anything derived from such a leaf inside `g` rather than capturing the
    /// result: locating the event runs backward passes through `g`, and burn frees the graph of
    /// a non-leaf tensor after the first backward through it, so a captured non-leaf tracked
    /// tensor would pass no gradient on to its leaves.
    ///
    /// ```
    /// use adjoint_dpm::prelude::*;
    /// use burn::backend::{Autodiff, NdArray};
    /// use burn::prelude::*;
    ///
    /// /// A falling ball: z = [height, velocity].
    /// #[derive(Module, Clone, Debug)]
    /// struct Gravity {}
    /// impl<B: Backend> Dynamics<B, 2> for Gravity {
    ///     fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
    ///         let v = z.clone().narrow(1, 1, 1);
    ///         Tensor::cat(vec![v.clone(), v.zeros_like().sub_scalar(9.81)], 1)
    ///     }
    /// }
    ///
    /// type B = Autodiff<NdArray<f64>>;
    /// let device = Default::default();
    /// let ode = NeuralOde::new(Gravity {}).solver(Solver::tsit5(1e-8, 1e-10));
    /// let z0 = Tensor::<B, 2>::from_data([[10.0, 0.0]], &device).require_grad();
    /// // Hits the ground where the height crosses 0.
    /// let hit = ode
    ///     .solve_until(z0.clone(), 0.0, 10.0, |_t, z: Tensor<B, 2>| z.narrow(1, 0, 1).reshape([1]))
    ///     .unwrap()
    ///     .expect("it lands before t = 10");
    /// let t: f64 = hit.time.clone().into_scalar();
    /// assert!((t - (2.0 * 10.0 / 9.81f64).sqrt()).abs() < 1e-7);
    /// // dt*/dh0 = 1 / sqrt(2 g h0).
    /// let grads = hit.time.backward();
    /// let dt_dh0: f64 = z0.grad(&grads).unwrap().narrow(1, 0, 1).into_scalar();
    /// assert!((dt_dh0 - 1.0 / (2.0 * 9.81 * 10.0f64).sqrt()).abs() < 1e-6);
    /// ```
    pub fn solve_until<B, C, G, const D: usize>(
        &self,
        z0: Tensor<Autodiff<B, C>, D>,
        t0: f64,
        t_max: f64,
        event: G,
    ) -> Result<Option<EventHit<Autodiff<B, C>, D>>>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
        M::InnerModule: Dynamics<B, D>,
        G: Fn(Tensor<Autodiff<B, C>, 1>, Tensor<Autodiff<B, C>, D>) -> Tensor<Autodiff<B, C>, 1>,
    {
        let t0 = Tensor::from_data(TensorData::from([t0]), (&z0.device(), z0.dtype()));
        self.solve_until_from(z0, t0, t_max, Crossing::Any, event)
    }

    /// [`solve_until`](Self::solve_until) from a start time given as a `[1]` tensor, which may be
    /// tracked: the previous event's time, when events are chained (a bouncing ball), so that
    /// gradients flow through every segment; `crossing` says which sign changes count
    /// ([`Crossing::Falling`] lets a segment start on the event surface).
    ///
    /// ```
    /// use adjoint_dpm::prelude::*;
    /// use burn::backend::{Autodiff, NdArray};
    /// use burn::prelude::*;
    ///
    /// #[derive(Module, Clone, Debug)]
    /// struct Gravity {}
    /// impl<B: Backend> Dynamics<B, 2> for Gravity {
    ///     fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
    ///         let v = z.clone().narrow(1, 1, 1);
    ///         Tensor::cat(vec![v.clone(), v.zeros_like().sub_scalar(9.81)], 1)
    ///     }
    /// }
    ///
    /// type B = Autodiff<NdArray<f64>>;
    /// let device = Default::default();
    /// let ode = NeuralOde::new(Gravity {}).solver(Solver::tsit5(1e-9, 1e-10));
    /// let ground = |_t, z: Tensor<B, 2>| z.narrow(1, 0, 1).reshape([1]);
    /// let z0 = Tensor::<B, 2>::from_data([[10.0, 0.0]], &device).require_grad();
    /// let first = ode.solve_until(z0.clone(), 0.0, 10.0, ground).unwrap().unwrap();
    /// // Bounce: keep 80% of the speed, reverse it. The next segment starts on the ground, so
    /// // only a falling crossing ends it.
    /// let z1 = first.state.clone() * Tensor::<B, 2>::from_data([[1.0, -0.8]], &device);
    /// let second = ode
    ///     .solve_until_from(z1, first.time.clone(), 10.0, Crossing::Falling, ground)
    ///     .unwrap()
    ///     .unwrap();
    /// // t2 = t1 (1 + 2·0.8), so dt2/dh0 = 2.6 / sqrt(2 g h0).
    /// let grads = second.time.backward();
    /// let dt2_dh0: f64 = z0.grad(&grads).unwrap().narrow(1, 0, 1).into_scalar();
    /// assert!((dt2_dh0 - 2.6 / (2.0 * 9.81 * 10.0f64).sqrt()).abs() < 1e-6);
    /// ```
    pub fn solve_until_from<B, C, G, const D: usize>(
        &self,
        z0: Tensor<Autodiff<B, C>, D>,
        start: Tensor<Autodiff<B, C>, 1>,
        t_max: f64,
        crossing: Crossing,
        event: G,
    ) -> Result<Option<EventHit<Autodiff<B, C>, D>>>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
        M::InnerModule: Dynamics<B, D>,
        G: Fn(Tensor<Autodiff<B, C>, 1>, Tensor<Autodiff<B, C>, D>) -> Tensor<Autodiff<B, C>, 1>,
    {
        let dims = start.dims();
        if dims != [1] {
            return Err(Error::InvalidOption {
                name: "start",
                value: format!("shape {dims:?}"),
                rule: "the start time is one value, shape [1]",
            });
        }
        let t0 = read_scalar(start.clone(), "the start time")?;
        let solver = self.solver_config();
        solver.validate()?;
        if !matches!(solver.control, StepControl::Adaptive(_)) || solver.tableau.dense.is_none() {
            return Err(Error::EventNeedsAdaptiveSolver {
                method: solver.tableau.name,
            });
        }
        TimeGrid::new(&[t0, t_max])?;
        let device = z0.device();
        let dtype = z0.dtype();
        let time = |t: f64| Tensor::<Autodiff<B, C>, 1>::from_data(TensorData::from([t]), (&device, dtype));
        // The event function's values on untracked tensors, checked: as many at every call as
        // at the first.
        let components = std::cell::Cell::new(None);
        let value = |t: f64, z: &Tensor<B, D>| -> Result<Vec<f64>> {
            let g = event(time(t), Tensor::from_inner(z.clone()));
            let [k] = g.dims();
            let k_first = components.get().unwrap_or(k);
            components.set(Some(k_first));
            if k == 0 || k != k_first {
                let got = match k == k_first {
                    true => "shape [0]".to_string(),
                    false => format!("shape [{k}] after [{k_first}]"),
                };
                return Err(Error::BadEventValue { t, got });
            }
            let g = read_values(g, "the event function's values")?;
            match g.iter().find(|v| !v.is_finite()) {
                Some(v) => Err(Error::BadEventValue { t, got: v.to_string() }),
                None => Ok(g),
            }
        };
        let inner = self.dynamics.valid();
        let jumps = self.jumps_in(&[t0, t_max])?;
        let located = locate(
            &inner,
            (solver, &jumps),
            z0.clone().inner(),
            (t0, t_max),
            crossing,
            &value,
        )?;
        let Some((t_star, index)) = located else {
            return Ok(None);
        };
        // The triggering component alone, as the implicit function theorem sees it.
        let event = |t, z| event(t, z).narrow(0, index, 1);

        // The differentiated solve to t*, then the implicit-function terms.
        let times = Tensor::cat(vec![start, time(t_star)], 0);
        let solution = self.solve_with_times(z0, times)?;
        let z_star = solution.last();
        let z_inner = z_star.clone().inner();
        let field = DynamicsField { module: &inner };
        let f_star = field.eval(&Time::Value(t_star), &z_inner)?;
        let slope = event_slope(&event, time(t_star), &z_inner, &f_star)?;
        if !(slope.is_finite() && slope != 0.0) {
            return Err(Error::TangentialEvent { t: t_star, slope });
        }
        let g = event(time(t_star), z_star.clone());
        let t_tracked = time(t_star) - (g.clone() - g.detach()).div_scalar(slope);
        let moved = t_tracked.clone() - t_tracked.clone().detach();
        let state = z_star + Tensor::from_inner(f_star) * moved.reshape([1; D]);
        Ok(Some(EventHit {
            time: t_tracked,
            state,
            index,
            solution,
        }))
    }
}

/// `ġ = ∂g/∂t + ∂g/∂z · f` at `(t, z)`, from one backward pass of the event function.
fn event_slope<B, C, G, const D: usize>(
    event: &G,
    t: Tensor<Autodiff<B, C>, 1>,
    z: &Tensor<B, D>,
    f: &Tensor<B, D>,
) -> Result<f64>
where
    B: Backend,
    C: CheckpointStrategy,
    G: Fn(Tensor<Autodiff<B, C>, 1>, Tensor<Autodiff<B, C>, D>) -> Tensor<Autodiff<B, C>, 1>,
{
    let t = t.require_grad();
    let z = Tensor::<Autodiff<B, C>, D>::from_inner(z.clone()).require_grad();
    let grads = event(t.clone(), z.clone()).sum().backward();
    let dg_dt = match t.grad(&grads) {
        Some(g) => read_scalar(g, "the event function's time derivative")?,
        None => 0.0,
    };
    let along = match z.grad(&grads) {
        Some(g) => read_scalar((g * f.clone()).sum(), "the event function's slope along z")?,
        None => 0.0,
    };
    Ok(dg_dt + along)
}

/// The event function's components at `(t, z)` on the inner backend, checked.
type EventValues<'a, B, const D: usize> = dyn Fn(f64, &Tensor<B, D>) -> Result<Vec<f64>> + 'a;

/// The first time in `(t0, t_max]` where a component of `value(t, z(t))` changes sign, and
/// which component, found on the dense output of the step where it does; `None` when none does.
fn locate<B: Backend, I: Dynamics<B, D>, const D: usize>(
    inner: &I,
    (solver, jumps): (Solver, &[f64]),
    z0: Tensor<B, D>,
    (t0, t_max): (f64, f64),
    crossing: Crossing,
    value: &EventValues<B, D>,
) -> Result<Option<(f64, usize)>> {
    let g0 = value(t0, &z0)?;
    if let Some(index) = g0.iter().position(|&g| g == 0.0).filter(|_| crossing == Crossing::Any) {
        return Err(Error::EventAtStart { t0, index });
    }
    let tab = solver.tableau;
    let field = DynamicsField { module: inner };
    let mut found = None;
    {
        let found = &mut found;
        let mut g_prev = g0;
        let watch = move |span: &crate::ode::solver::Span,
                          y: &Tensor<B, D>,
                          y_new: &Tensor<B, D>,
                          ks: &[Tensor<B, D>]|
              -> Result<bool> {
            let g1 = value(span.t1, y_new)?;
            let g_start = std::mem::replace(&mut g_prev, g1);
            let h = span.t1 - span.t0;
            let mut first: Option<(f64, usize)> = None;
            for (i, (&before, &after)) in g_start.iter().zip(&g_prev).enumerate() {
                if !crossing.crosses(before, after) {
                    continue;
                }
                let at = |theta: f64| {
                    let z = interpolate(tab, y, ks, &Time::Value(h), theta);
                    Ok(value(span.t0 + theta * h, &z)?[i])
                };
                let theta = bracketed_root(&at, before, after)?;
                if first.is_none_or(|(earliest, _)| theta < earliest) {
                    first = Some((theta, i));
                }
            }
            let Some((theta, i)) = first else {
                return Ok(false);
            };
            *found = Some((span.t0 + theta * h, i));
            Ok(true)
        };
        let mut stepper = Stepper::new(&field, solver)
            .with_jumps(jumps)
            .with_watch(Box::new(watch));
        stepper.leg(&[t0, t_max], 0, 1, z0, None, &mut Vec::new(), &mut |_, _| {})?;
    }
    match found {
        Some((t, index)) if t == t0 => Err(Error::EventAtStart { t0, index }),
        found => Ok(found),
    }
}

/// A root of `phi` in `(0, 1]` given `phi(0) = g0` and `phi(1) = g1` of opposite signs (or
/// `g1 = 0`): the Illinois variant of regula falsi, to rounding.
fn bracketed_root(phi: &dyn Fn(f64) -> Result<f64>, g0: f64, g1: f64) -> Result<f64> {
    let (mut a, mut fa, mut b, mut fb) = (0.0, g0, 1.0, g1);
    if fb == 0.0 {
        return Ok(1.0);
    }
    let mut side = 0i8;
    for _ in 0..MAX_ROOT_ITERATIONS {
        let c = (a * fb - b * fa) / (fb - fa);
        // Fall back to bisection when the secant leaves the bracket by rounding.
        let c = if c > a && c < b { c } else { 0.5 * (a + b) };
        if c <= a || c >= b {
            break;
        }
        let fc = phi(c)?;
        if fc == 0.0 {
            return Ok(c);
        }
        if fc.signum() == fa.signum() {
            a = c;
            fa = fc;
            if side == -1 {
                fb *= 0.5;
            }
            side = -1;
        } else {
            b = c;
            fb = fc;
            if side == 1 {
                fa *= 0.5;
            }
            side = 1;
        }
        if b - a <= 4.0 * f64::EPSILON {
            break;
        }
    }
    Ok(if fa.abs() < fb.abs() { a } else { b })
}
