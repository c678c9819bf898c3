//! Runge–Kutta stepping: one pure step from a tableau, and the loops that walk a time grid with
//! fixed or adaptive steps.
//!
//! By default an adaptive solve steps as the tolerance allows and reads the states at interior
//! output times off the dense output of the step that contains them (as torchdiffeq and diffrax
//! do): a dense grid of outputs then costs no extra steps. `StepControl::Uniform` does the same
//! with even fixed steps. Other fixed-step solves, and adaptive ones asked to, hit every output
//! time exactly (a step never crosses one). Either way the outputs are differentiable functions
//! of the steps' stages, so the exact discrete adjoint differentiates precisely what was computed.

use burn::tensor::{backend::Backend, Tensor};
use serde::Serialize;

use crate::error::{read_scalar, Error, Result};
use crate::ode::controller::PiController;
use crate::ode::grid::TimeGrid;
use crate::ode::state::{weighted_sum, OdeState, Time, VectorField};
use crate::ode::tableau::{self, ButcherTableau};

/// How a solver chooses its steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepControl {
    /// This many steps over the whole grid, shared among its intervals by length (at least one
    /// each).
    Steps(usize),
    /// This many even steps over the whole grid, whatever the output times; the states at
    /// output times inside a step are read off its dense output (torchdiffeq's fixed-grid
    /// solvers with `step_size`, diffrax's `ConstantStepSize`). Set by
    /// [`Solver::interpolate`] on a `Steps` solver; a method without a dense output takes it as
    /// `Steps`.
    Uniform(usize),
    /// Steps of at most this size; each interval between output times is split evenly.
    Dt(f64),
    /// This many even steps in every interval between output times (a sampler's grid: one step
    /// per interval).
    PerInterval(usize),
    /// Error-controlled steps.
    Adaptive(Tolerances),
}

/// Tolerances and limits of adaptive stepping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// First step size; `None` picks one from two evaluations of f (Hairer's heuristic).
    pub dt0: Option<f64>,
    /// Most steps (accepted + rejected) one solve may take.
    pub max_steps: usize,
    /// Smallest step size allowed before giving up.
    pub dt_min: f64,
    /// Largest step size allowed (∞: no limit).
    pub dt_max: f64,
    /// Proportional coefficient of the PI step-size controller (diffrax's `pcoeff`).
    pub pcoeff: f64,
    /// Integral coefficient of the PI step-size controller (diffrax's `icoeff`).
    pub icoeff: f64,
    /// Read interior output times off the dense output instead of stepping to each of them
    /// ([`Solver::interpolate`]).
    pub interpolate: bool,
}

impl Tolerances {
    /// `rtol`, `atol`, automatic first step, at most 100 000 steps, `dt_min` = 1e-12, the
    /// I controller of torchdiffeq and diffrax ([`Solver::pi_coefficients`]) and interior outputs
    /// interpolated ([`Solver::interpolate`]).
    pub fn new(rtol: f64, atol: f64) -> Self {
        Self {
            rtol,
            atol,
            dt0: None,
            max_steps: 100_000,
            dt_min: 1e-12,
            dt_max: f64::INFINITY,
            pcoeff: 0.0,
            icoeff: 1.0,
            interpolate: true,
        }
    }
}

/// An explicit Runge–Kutta method and how it steps.
///
/// ```
/// use adjoint_dpm::ode::Solver;
/// let fixed = Solver::rk4(100);                       // 100 steps over the grid
/// let adaptive = Solver::dopri5(1e-6, 1e-6).max_steps(10_000);
/// assert!(fixed.validate().is_ok() && adaptive.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solver {
    /// The method.
    pub tableau: &'static ButcherTableau,
    /// Its step control.
    pub control: StepControl,
}

impl Solver {
    /// A fixed-step solver taking `steps` steps over the whole grid.
    pub fn fixed(tableau: &'static ButcherTableau, steps: usize) -> Self {
        Self {
            tableau,
            control: StepControl::Steps(steps),
        }
    }

    /// A fixed-step solver with steps of at most `dt`.
    pub fn fixed_dt(tableau: &'static ButcherTableau, dt: f64) -> Self {
        Self {
            tableau,
            control: StepControl::Dt(dt),
        }
    }

    /// An adaptive solver; the method must have an embedded error estimate.
    pub fn adaptive(tableau: &'static ButcherTableau, rtol: f64, atol: f64) -> Self {
        Self {
            tableau,
            control: StepControl::Adaptive(Tolerances::new(rtol, atol)),
        }
    }

    /// Forward Euler with `steps` steps.
    pub fn euler(steps: usize) -> Self {
        Self::fixed(&tableau::EULER, steps)
    }

    /// Explicit midpoint with `steps` steps.
    pub fn midpoint(steps: usize) -> Self {
        Self::fixed(&tableau::MIDPOINT, steps)
    }

    /// Heun with `steps` steps.
    pub fn heun(steps: usize) -> Self {
        Self::fixed(&tableau::HEUN, steps)
    }

    /// Classical RK4 with `steps` steps.
    pub fn rk4(steps: usize) -> Self {
        Self::fixed(&tableau::RK4, steps)
    }

    /// Adaptive Bogacki–Shampine 3(2).
    pub fn bosh3(rtol: f64, atol: f64) -> Self {
        Self::adaptive(&tableau::BOSH3, rtol, atol)
    }

    /// Adaptive Dormand–Prince 5(4).
    pub fn dopri5(rtol: f64, atol: f64) -> Self {
        Self::adaptive(&tableau::DOPRI5, rtol, atol)
    }

    /// Adaptive Tsitouras 5(4).
    pub fn tsit5(rtol: f64, atol: f64) -> Self {
        Self::adaptive(&tableau::TSIT5, rtol, atol)
    }

    /// Adaptive Prince–Dormand 8(7), for tight tolerances: 13 evaluations of f a step, with a
    /// fifth-order dense output.
    ///
    /// ```
    /// use adjoint_dpm::ode::Solver;
    /// assert!(Solver::dopri8(1e-10, 1e-12).validate().is_ok());
    /// ```
    pub fn dopri8(rtol: f64, atol: f64) -> Self {
        Self::adaptive(&tableau::DOPRI8, rtol, atol)
    }

    fn map_tolerances(mut self, f: impl FnOnce(&mut Tolerances)) -> Self {
        if let StepControl::Adaptive(tol) = &mut self.control {
            f(tol);
        }
        self
    }

    /// Sets the step limit of an adaptive solver (no effect on fixed steps).
    pub fn max_steps(self, max_steps: usize) -> Self {
        self.map_tolerances(|t| t.max_steps = max_steps)
    }

    /// Sets the smallest allowed step of an adaptive solver.
    pub fn dt_min(self, dt_min: f64) -> Self {
        self.map_tolerances(|t| t.dt_min = dt_min)
    }

    /// Caps the step size of an adaptive solver, e.g. so that it cannot step over a short
    /// feature of the dynamics that its error estimate would not see (diffrax's `dtmax`).
    ///
    /// ```
    /// use adjoint_dpm::ode::Solver;
    /// assert!(Solver::tsit5(1e-6, 1e-6).dt_max(0.1).validate().is_ok());
    /// assert!(Solver::tsit5(1e-6, 1e-6).dt_max(0.0).validate().is_err());
    /// ```
    pub fn dt_max(self, dt_max: f64) -> Self {
        self.map_tolerances(|t| t.dt_max = dt_max)
    }

    /// Sets the first step of an adaptive solver.
    pub fn dt0(self, dt0: f64) -> Self {
        self.map_tolerances(|t| t.dt0 = Some(dt0))
    }

    /// Sets the coefficients of the PI step-size controller of an adaptive solver (no effect on
    /// fixed steps), named as in diffrax's `PIDController`: with an error estimate of order k, a
    /// step whose scaled error is `err` (after one of error `err_prev`) is followed by one
    /// `0.9 · err^-(pcoeff + icoeff)/k · err_prev^(pcoeff/k)` times as long. The default (0, 1) is the plain I controller, the
    /// default of torchdiffeq and diffrax, so that a tolerance means the same steps here as
    /// there; diffrax recommends it for smooth problems, which most neural ODEs are. (0.2, 0.65)
    /// is Hairer's DOPRI5 code (β = 0.04): steadier, with fewer rejected steps, and
    /// more accurate at the same tolerance for a few more steps (P2 of `benches/ode_grad.rs`,
    /// Dopri5 at tolerance 1e-6: 26 evaluations of f against 20). Less sensitive controllers
    /// such as (0.4, 0.3) suit problems whose error estimate jumps (mildly stiff ones), but grow
    /// the step slowly (32 evaluations on P2).
    ///
    /// ```
    /// use adjoint_dpm::ode::Solver;
    /// let smooth = Solver::dopri5(1e-6, 1e-6).pi_coefficients(0.4, 0.3);
    /// assert!(smooth.validate().is_ok());
    /// assert!(Solver::dopri5(1e-6, 1e-6).pi_coefficients(0.0, 0.0).validate().is_err());
    /// ```
    pub fn pi_coefficients(self, pcoeff: f64, icoeff: f64) -> Self {
        self.map_tolerances(|t| {
            t.pcoeff = pcoeff;
            t.icoeff = icoeff;
        })
    }

    /// Whether interior output times are read off the dense output of the step that contains
    /// them (`true`) or steps are shortened to land on each of them (`false`).
    ///
    /// Adaptive solvers interpolate by default, as torchdiffeq and diffrax do: 1000 output times
    /// then cost no more steps than two. `false` is diffrax's `step_ts`. Fixed-step solvers land
    /// on every output time by default (`Steps(n)` shares its n steps among the intervals, at
    /// least one each); `true` makes `Steps(n)` [`StepControl::Uniform`]: n even steps over the
    /// whole grid, so RK4 with 100 steps and 1000 output times takes 100 steps, not 1000. `Dt`
    /// and `PerInterval` always land on every output time, and so does a method without a dense
    /// output. The interpolant is one order below the method (fourth order for Dopri5 and Tsit5,
    /// third for RK4), and every gradient mode differentiates it exactly like the steps.
    ///
    /// ```
    /// use adjoint_dpm::ode::{Solver, StepControl};
    /// let dense = Solver::tsit5(1e-6, 1e-6);
    /// assert!(dense.interpolates());
    /// assert!(!dense.interpolate(false).interpolates());
    /// assert!(!Solver::rk4(100).interpolates());
    /// let uniform = Solver::rk4(100).interpolate(true);
    /// assert!(uniform.interpolates() && uniform.control == StepControl::Uniform(100));
    /// ```
    pub fn interpolate(mut self, on: bool) -> Self {
        self.control = match self.control {
            StepControl::Steps(n) if on => StepControl::Uniform(n),
            StepControl::Uniform(n) if !on => StepControl::Steps(n),
            StepControl::Adaptive(tol) => StepControl::Adaptive(Tolerances { interpolate: on, ..tol }),
            other => other,
        };
        self
    }

    /// Whether interior output times are interpolated rather than stepped to.
    pub fn interpolates(&self) -> bool {
        let asked = match self.control {
            StepControl::Adaptive(tol) => tol.interpolate,
            StepControl::Uniform(_) => true,
            _ => false,
        };
        asked && self.tableau.dense.is_some()
    }

    /// Checks the options; solves call it first.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, value: f64, rule| {
            Err(Error::InvalidOption {
                name,
                value: value.to_string(),
                rule,
            })
        };
        if let Err(rule) = self.tableau.check_shape() {
            return Err(Error::InvalidOption {
                name: "tableau",
                value: self.tableau.name.to_string(),
                rule,
            });
        }
        match self.control {
            StepControl::Steps(0) | StepControl::Uniform(0) | StepControl::PerInterval(0) => {
                bad("steps", 0.0, "take at least one step")
            }
            StepControl::Steps(_) | StepControl::Uniform(_) | StepControl::PerInterval(_) => Ok(()),
            StepControl::Dt(dt) if !(dt.is_finite() && dt > 0.0) => bad("dt", dt, "must be finite and > 0"),
            StepControl::Dt(_) => Ok(()),
            StepControl::Adaptive(tol) => {
                if !self.tableau.is_adaptive() {
                    return Err(Error::NoErrorEstimate {
                        method: self.tableau.name,
                    });
                }
                if !(tol.rtol.is_finite() && tol.rtol >= 0.0) {
                    return bad("rtol", tol.rtol, "must be finite and >= 0");
                }
                if !(tol.atol.is_finite() && tol.atol > 0.0) {
                    return bad("atol", tol.atol, "must be finite and > 0");
                }
                if !(tol.dt_min.is_finite() && tol.dt_min >= 0.0) {
                    return bad("dt_min", tol.dt_min, "must be finite and >= 0");
                }
                if !(tol.dt_max > 0.0 && tol.dt_max >= tol.dt_min) {
                    return bad("dt_max", tol.dt_max, "must be > 0 and >= dt_min");
                }
                if let Some(dt0) = tol.dt0 {
                    if !(dt0.is_finite() && dt0 > 0.0) {
                        return bad("dt0", dt0, "must be finite and > 0");
                    }
                }
                if !(tol.pcoeff.is_finite() && tol.pcoeff >= 0.0) {
                    return bad("pcoeff", tol.pcoeff, "must be finite and >= 0");
                }
                if !(tol.icoeff.is_finite() && tol.icoeff > 0.0) {
                    return bad("icoeff", tol.icoeff, "must be finite and > 0");
                }
                if tol.max_steps == 0 {
                    return bad("max_steps", 0.0, "allow at least one step");
                }
                Ok(())
            }
        }
    }

    /// Number of fixed steps on interval `k` of `grid` (`None` when adaptive).
    pub(crate) fn fixed_steps(&self, grid: &TimeGrid, k: usize) -> Option<usize> {
        let times = grid.times();
        let len = (times[k + 1] - times[k]).abs();
        match self.control {
            StepControl::Steps(n) | StepControl::Uniform(n) => {
                Some(((n as f64) * len / grid.span().abs()).round().max(1.0) as usize)
            }
            StepControl::Dt(dt) => Some(((len / dt) - 1e-9).ceil().max(1.0) as usize),
            StepControl::PerInterval(n) => Some(n),
            StepControl::Adaptive(_) => None,
        }
    }
}

/// Work done by a solve, forward and backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Evaluations of f in the forward solve.
    pub nfe_forward: usize,
    /// Vector-Jacobian products of f in the backward pass (each one forward + one backward of f).
    pub nfe_backward: usize,
    /// Accepted forward steps.
    pub accepted_steps: usize,
    /// Rejected forward steps.
    pub rejected_steps: usize,
    /// Accepted steps of the backward pass (replayed steps for the discrete adjoint, reverse
    /// steps for the continuous one).
    pub backward_steps: usize,
}

/// Step counters of one integration.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub nfe: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// One accepted step, from `t0` to `t1`, of the leg of the solve between grid times `from` and
/// `to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Span {
    /// Grid index of the leg's start.
    pub from: usize,
    /// Grid index of the leg's end.
    pub to: usize,
    pub t0: f64,
    pub t1: f64,
    /// Grid indices `dense.0..dense.1` of the output times interpolated inside this step.
    pub dense: (usize, usize),
    /// Whether the step starts / ends on a jump time of the dynamics: its stage there sees f
    /// from the step's side ([`Time::nudged`]).
    pub jumps: (bool, bool),
    /// The jump times, if any, that bound the stretch of the leg this step lies in (`None`: the
    /// leg's own end): the step keeps its place between them when the output times move.
    pub anchors: (Option<f64>, Option<f64>),
}

impl Span {
    /// Start time and size of this step. With `times` (the grid as a tracked tensor) they are
    /// tensors that move with the grid: `T_from + s·(T_to − T_from)` with the step's fractions `s`
    /// of its leg fixed, which is how output times are differentiated. Jump times stay where
    /// they are: a step between jumps is a fraction of the stretch between them.
    pub(crate) fn times<B: Backend>(&self, times: Option<&(Tensor<B, 1>, Vec<f64>)>) -> (Time<B>, Time<B>) {
        let plain = (Time::Value(self.t0), Time::Value(self.t1 - self.t0));
        let (Some((times, grid)), (None, _) | (_, None)) = (times, self.anchors) else {
            // Untracked, or between two jumps, which do not move.
            return plain;
        };
        let end = |anchor: Option<f64>, k: usize| match anchor {
            Some(jump) => (
                jump,
                Tensor::from_data(burn::tensor::TensorData::from([jump]), (&times.device(), times.dtype())),
            ),
            None => (grid[k], times.clone().narrow(0, k, 1)),
        };
        let ((ta, start), (tb, stop)) = (end(self.anchors.0, self.from), end(self.anchors.1, self.to));
        let (s0, s1) = ((self.t0 - ta) / (tb - ta), (self.t1 - ta) / (tb - ta));
        let length = stop - start.clone();
        // The values of the plain solve, exactly, with the expressions' derivatives attached.
        let exact = |value: f64, expr: Tensor<B, 1>| {
            let base = Tensor::from_data(burn::tensor::TensorData::from([value]), (&expr.device(), expr.dtype()));
            Time::Tensor(base + (expr.clone() - expr.detach()), value)
        };
        (
            exact(self.t0, start + length.clone().mul_scalar(s0)),
            exact(self.t1 - self.t0, length.mul_scalar(s1 - s0)),
        )
    }

    /// Whether the step ends on its leg's end, whose state is then an output.
    pub(crate) fn ends_leg(&self, grid: &[f64]) -> bool {
        self.t1 == grid[self.to]
    }
}

/// The result of one Runge–Kutta step.
pub(crate) struct StepOut<S> {
    /// The new state.
    pub y: S,
    /// The local error estimate, for methods that have one.
    pub err: Option<S>,
    /// The stages: f at the step's start first (reusable after a rejection), f at the new state
    /// last for FSAL methods (reusable after an acceptance).
    pub ks: Vec<S>,
}

/// `h · Σ coef_i · k_i` over the non-zero coefficients, `None` when all are zero. `h`'s value is
/// folded into the coefficients (one pass over the state fewer than scaling the sum); a tracked
/// `h` adds `(h − h̄)·Σ coef_i k_i`, zero in value, for its gradient, so that the value is the
/// plain solve's to the bit.
fn combine<B: Backend, S: OdeState<B>>(coefs: &[f64], ks: &[S], h: &Time<B>) -> Option<S> {
    let sum = weighted_sum(coefs, ks, h.value())?;
    let slope = matches!(h, Time::Tensor(..))
        .then(|| weighted_sum(coefs, ks, 1.0))
        .flatten();
    Some(with_tracked_h(sum, slope, h))
}

/// `sum` (h's value folded in) plus `(h − h̄)·slope` when h is tracked: zero in value, h's
/// gradient in the graph.
fn with_tracked_h<B: Backend, S: OdeState<B>>(sum: S, slope: Option<S>, h: &Time<B>) -> S {
    match (slope, h) {
        (Some(slope), Time::Tensor(t, _)) => {
            sum.add(&slope.scale_time(&Time::Tensor(t.clone() - t.clone().detach(), 0.0)))
        }
        _ => sum,
    }
}

/// `y + h · Σ coef_i · k_i` (just `y` when every coefficient is zero).
fn advance<B: Backend, S: OdeState<B>>(y: &S, coefs: &[f64], ks: &[S], h: &Time<B>) -> S {
    match combine(coefs, ks, h) {
        Some(incr) => y.add(&incr),
        None => y.clone(),
    }
}

/// One explicit Runge–Kutta step of size `h` from `(t, y)`. `k1`, when given, is f(t, y).
/// `jumps` says whether the step starts / ends on a jump time ([`Span::jumps`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rk_step<B: Backend, V: VectorField<B>>(
    field: &V,
    tab: &ButcherTableau,
    t: &Time<B>,
    h: &Time<B>,
    y: &V::State,
    k1: Option<V::State>,
    jumps: (bool, bool),
    counters: &mut Counters,
) -> Result<StepOut<V::State>> {
    let s = tab.stages();
    let (t0, t1) = (t.value(), t.value() + h.value());
    // A stage on a jump time (c = 0 at the start, c = 1 at the end) sees f from inside the step.
    let stage_time = |c: f64| {
        if c == 0.0 {
            if jumps.0 {
                t.nudged(t1, y.time_dtype())
            } else {
                t.clone()
            }
        } else if c == 1.0 && jumps.1 {
            t.offset(1.0, h).nudged(t0, y.time_dtype())
        } else {
            t.offset(c, h)
        }
    };
    let mut ks: Vec<V::State> = Vec::with_capacity(s);
    let k1 = match k1 {
        Some(k) => k,
        None => {
            counters.nfe += 1;
            field.eval(&stage_time(0.0), y)?
        }
    };
    // Stage states are built from the field's view of the state, except the last stage of an
    // FSAL method, which is the new state itself.
    let y_view = y.field_view();
    let mut views = vec![k1.field_view()];
    ks.push(k1);
    let mut y_last_stage = None;
    for i in 1..s {
        let fsal_last = tab.is_fsal() && i == s - 1;
        let yi = if fsal_last {
            advance(y, tab.a[i - 1], &ks, h)
        } else {
            advance(&y_view, tab.a[i - 1], &views, h)
        };
        counters.nfe += 1;
        let k = field.eval(&stage_time(tab.c[i]), &yi)?;
        views.push(k.field_view());
        ks.push(k);
        if fsal_last {
            y_last_stage = Some(yi);
        }
    }
    let y_new = match y_last_stage {
        Some(y_last) => y_last,
        None => advance(y, tab.b, &ks, h),
    };
    let err = tab.b_err.and_then(|b_err| {
        let err_ks: Vec<_> = ks.iter().map(OdeState::error_view).collect();
        combine(b_err, &err_ks, h)
    });
    Ok(StepOut { y: y_new, err, ks })
}

/// The dense output `y + h Σ b_i(θ) k_i` of a step from `y` with stages `ks`, at fraction `theta`.
pub(crate) fn interpolate<B: Backend, S: OdeState<B>>(
    tab: &ButcherTableau,
    y: &S,
    ks: &[S],
    h: &Time<B>,
    theta: f64,
) -> S {
    advance(y, &interpolant_weights(tab, theta), ks, h)
}

/// The dense output's weights `b_i(θ)`; a solver interpolates only with a tableau that has them
/// ([`Solver::interpolates`]).
fn interpolant_weights(tab: &ButcherTableau, theta: f64) -> Vec<f64> {
    tab.dense_weights(theta)
        .expect("only methods with a dense output interpolate")
}

/// The states at the output times `span.dense` inside an accepted step from `y` with stages `ks`
/// (`t` and `h` as the step was taken): `y + h Σ b_i(θ) k_i`. With `times` (the grid as a tracked
/// tensor) each also moves with its own output time: the value is unchanged, and `dL/dT_k` gets
/// `dy/dθ · dθ/dT_k` with `dy/dθ = h Σ b_i'(θ) k_i`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_states<B: Backend, S: OdeState<B>>(
    tab: &ButcherTableau,
    span: &Span,
    grid: &[f64],
    y: &S,
    ks: &[S],
    t: &Time<B>,
    h: &Time<B>,
    times: Option<&Tensor<B, 1>>,
) -> Vec<S> {
    let outputs = span.dense.0..span.dense.1;
    let thetas: Vec<f64> = outputs
        .clone()
        .map(|k| (grid[k] - span.t0) / (span.t1 - span.t0))
        .collect();
    let weights = |factor: f64| -> Vec<Vec<f64>> {
        thetas
            .iter()
            .map(|&theta| interpolant_weights(tab, theta).iter().map(|c| c * factor).collect())
            .collect()
    };
    // `y + h Σ b_i(θ) k_i` for every output at once, h's value folded into the weights as in
    // `combine`; a tracked h adds `(h − h̄) Σ b_i(θ) k_i`, zero in value.
    let sums = S::weighted_sums(ks, &weights(h.value()));
    let slopes_h = match h {
        Time::Tensor(..) => S::weighted_sums(ks, &weights(1.0)),
        Time::Value(_) => vec![None; thetas.len()],
    };
    outputs
        .zip(thetas.iter())
        .zip(sums.into_iter().zip(slopes_h))
        .map(|((k, &theta), (sum, slope_h))| {
            let mut state = match sum {
                Some(sum) => y.add(&with_tracked_h(sum, slope_h, h)),
                None => y.clone(),
            };
            if let Some(times) = times {
                // t and h are plain numbers in a stretch between two jump times.
                let theta_t = (times.clone().narrow(0, k, 1) - t.to_tensor(times)) / h.to_tensor(times);
                let moved = theta_t.clone() - theta_t.detach();
                let slopes = tab.dense_weight_slopes(theta).expect("a dense output has slopes");
                if let Some(dy_dtheta) = combine(&slopes, ks, h) {
                    state = state.add(&dy_dtheta.scale_time(&Time::Tensor(moved, 0.0)));
                }
            }
            state
        })
        .collect()
}

/// Scaled RMS norm of an error estimate.
fn rms_error<B: Backend, S: OdeState<B>>(err: &S, y0: &S, y1: &S, rtol: f64, atol: f64) -> Result<f64> {
    let (sum, n) = err.error_sq_sum(y0, y1, rtol, atol);
    let sum = read_scalar(sum, "a step's error norm")?;
    Ok((sum / n.max(1) as f64).sqrt())
}

/// Hairer's starting step: two evaluations of f, returns (h0 with sign, f(t0, y0)).
fn initial_step<B: Backend, V: VectorField<B>>(
    field: &V,
    order: u32,
    t0: f64,
    y0: &V::State,
    direction: f64,
    tol: &Tolerances,
    counters: &mut Counters,
) -> Result<(f64, V::State)> {
    counters.nfe += 1;
    let f0 = field.eval(&Time::Value(t0), y0)?;
    let d0 = rms_error(y0, y0, y0, tol.rtol, tol.atol)?;
    let d1 = rms_error(&f0, y0, y0, tol.rtol, tol.atol)?;
    let h0 = if d0 < 1e-5 || d1 < 1e-5 || !(d0.is_finite() && d1.is_finite()) {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let y1 = y0.add(&f0.scale(direction * h0));
    counters.nfe += 1;
    let f1 = field.eval(&Time::Value(t0 + direction * h0), &y1)?;
    let d2 = rms_error(&f1.add(&f0.scale(-1.0)), y0, y0, tol.rtol, tol.atol)? / h0;
    let dmax = d1.max(d2);
    let h1 = if dmax <= 1e-15 || !dmax.is_finite() {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / dmax).powf(1.0 / f64::from(order + 1))
    };
    Ok((direction * (100.0 * h0).min(h1), f0))
}

/// Carries step-size state from one leg of a solve to the next.
pub(crate) struct Stepper<'a, B: Backend, V: VectorField<B>> {
    pub field: &'a V,
    pub solver: Solver,
    pub counters: Counters,
    controller: PiController,
    h: Option<f64>,
    k1: Option<V::State>,
    /// The grid as a tracked tensor, when steps must carry time gradients (Backprop).
    time_leaf: Option<(Tensor<B, 1>, Vec<f64>)>,
    /// Sees every accepted adaptive step and may end the leg there (terminal events).
    watch: Option<Box<Watch<'a, V::State>>>,
    /// Times where the dynamics jump, ascending: steps end on them and reuse no stage across.
    jumps: Vec<f64>,
}

/// Looks at an accepted step (its span, start state, new state and stages) and returns whether
/// the solve stops after it.
pub(crate) type Watch<'a, S> = dyn FnMut(&Span, &S, &S, &[S]) -> Result<bool> + 'a;

impl<'a, B: Backend, V: VectorField<B>> Stepper<'a, B, V> {
    pub(crate) fn new(field: &'a V, solver: Solver) -> Self {
        Self {
            field,
            solver,
            counters: Counters::default(),
            controller: match solver.control {
                StepControl::Adaptive(tol) => PiController::new(solver.tableau.embedded_order, tol.pcoeff, tol.icoeff),
                // Fixed steps never consult the controller.
                _ => PiController::new(solver.tableau.embedded_order, 0.0, 1.0),
            },
            h: None,
            k1: None,
            time_leaf: None,
            watch: None,
            jumps: Vec::new(),
        }
    }

    /// Steps end on each of `jumps` (finite, any order) and take no stage across one.
    pub(crate) fn with_jumps(mut self, jumps: &[f64]) -> Self {
        self.jumps = jumps.to_vec();
        self.jumps.sort_by(f64::total_cmp);
        self.jumps.dedup();
        self
    }

    fn is_jump(&self, t: f64) -> bool {
        self.jumps.binary_search_by(|j| j.total_cmp(&t)).is_ok()
    }

    /// The first jump time strictly between `t` and `tb`, going from `t` towards `tb`.
    fn next_jump(&self, t: f64, tb: f64) -> Option<f64> {
        if tb > t {
            let i = self.jumps.partition_point(|&j| j <= t);
            self.jumps.get(i).copied().filter(|&j| j < tb)
        } else {
            let i = self.jumps.partition_point(|&j| j < t);
            i.checked_sub(1).map(|i| self.jumps[i]).filter(|&j| j > tb)
        }
    }

    /// Lets `watch` see every accepted adaptive step and stop the leg after one.
    pub(crate) fn with_watch(mut self, watch: Box<Watch<'a, V::State>>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Steps take their times from `times` (the values of `grid`), so that they carry gradients.
    pub(crate) fn with_time_leaf(mut self, times: Tensor<B, 1>, grid: &TimeGrid) -> Self {
        self.time_leaf = Some((times, grid.times().to_vec()));
        self
    }

    /// Forgets the reusable first stage (the state was changed from outside).
    pub(crate) fn reset_state(&mut self) {
        self.k1 = None;
    }

    /// Integrates the leg from `grid[from]` to `grid[to]` (either direction). With `fixed_steps`,
    /// takes that many even steps; otherwise adapts. Pushes the states at the grid times strictly
    /// between `from` and `to` onto `outputs`, read off the dense output (only an interpolating
    /// solver is given such a leg). Calls `on_step` with each accepted step and the state it
    /// started from.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn leg(
        &mut self,
        grid: &[f64],
        from: usize,
        to: usize,
        mut y: V::State,
        fixed_steps: Option<usize>,
        outputs: &mut Vec<V::State>,
        on_step: &mut dyn FnMut(Span, &V::State),
    ) -> Result<V::State> {
        let tab = self.solver.tableau;
        let (ta, tb) = (grid[from], grid[to]);
        // Grid indices of the outputs to interpolate, in solve order (none for a one-interval leg).
        let mut next_dense = from + 1;
        let dense_until = |next: usize, t1: f64| {
            let mut end = next;
            while end < to && (grid[end] - t1) * (tb - ta) <= 0.0 {
                end += 1;
            }
            end
        };
        if let Some(n) = fixed_steps {
            let h = (tb - ta) / n as f64;
            for j in 0..n {
                let t0 = ta + j as f64 * h;
                let t1 = if j + 1 == n { tb } else { ta + (j + 1) as f64 * h };
                let dense_end = dense_until(next_dense, t1);
                let span = Span {
                    from,
                    to,
                    t0,
                    t1,
                    dense: (next_dense, dense_end),
                    jumps: (self.is_jump(t0), self.is_jump(t1)),
                    anchors: (None, None),
                };
                let (t, h) = span.times(self.time_leaf.as_ref());
                let out = rk_step(
                    self.field,
                    tab,
                    &t,
                    &h,
                    &y,
                    self.k1.take(),
                    span.jumps,
                    &mut self.counters,
                )?;
                if !out.y.finiteness_probe()?.is_finite() {
                    return Err(Error::NonFiniteState {
                        t: t1,
                        step: self.counters.accepted + 1,
                    });
                }
                let leaf = self.time_leaf.as_ref().map(|(times, _)| times);
                outputs.extend(dense_states(tab, &span, grid, &y, &out.ks, &t, &h, leaf));
                next_dense = dense_end;
                on_step(span, &y);
                self.counters.accepted += 1;
                let mut ks = out.ks;
                self.k1 = if tab.is_fsal() && !span.jumps.1 { ks.pop() } else { None };
                y = out.y;
            }
            return Ok(y);
        }
        let StepControl::Adaptive(tol) = self.solver.control else {
            unreachable!("fixed step counts are computed for fixed controls")
        };
        let direction = (tb - ta).signum();
        let mut h = match (self.h, tol.dt0) {
            (Some(h), _) => h.abs() * direction,
            (None, Some(dt0)) => dt0 * direction,
            (None, None) => {
                let (h, f0) = initial_step(self.field, tab.order, ta, &y, direction, &tol, &mut self.counters)?;
                // f0 was evaluated at a plain time: reusable unless steps carry time gradients.
                if self.time_leaf.is_none() {
                    self.k1 = Some(f0);
                }
                h
            }
        };
        let mut t = ta;
        let mut last_bad = false;
        // The last jump time passed in this leg.
        let mut after_jump = None;
        while (tb - t) * direction > 0.0 {
            h = h.signum() * h.abs().min(tol.dt_max);
            if self.counters.accepted + self.counters.rejected >= tol.max_steps {
                return Err(Error::MaxStepsExceeded {
                    t,
                    max_steps: tol.max_steps,
                });
            }
            if h.abs() < tol.dt_min || t + h == t {
                return Err(if last_bad {
                    Error::NonFiniteState {
                        t,
                        step: self.counters.accepted,
                    }
                } else {
                    Error::StepSizeUnderflow {
                        t,
                        dt: h.abs(),
                        dt_min: tol.dt_min,
                    }
                });
            }
            let next_jump = self.next_jump(t, tb);
            let target = next_jump.unwrap_or(tb);
            let remaining = target - t;
            // Land exactly on the leg's end or the next jump; stretch a step that would leave a
            // sliver.
            let last = h.abs() >= remaining.abs() * (1.0 - 1e-10);
            let h_try = if last { remaining } else { h };
            let t1 = if last { target } else { t + h_try };
            let dense_end = dense_until(next_dense, t1);
            let span = Span {
                from,
                to,
                t0: t,
                t1,
                dense: (next_dense, dense_end),
                jumps: (self.is_jump(t), self.is_jump(t1)),
                anchors: (after_jump, next_jump),
            };
            let (t_step, h_step) = span.times(self.time_leaf.as_ref());
            let out = rk_step(
                self.field,
                tab,
                &t_step,
                &h_step,
                &y,
                self.k1.take(),
                span.jumps,
                &mut self.counters,
            )?;
            let err = out
                .err
                .as_ref()
                .map(|e| rms_error(e, &y, &out.y, tol.rtol, tol.atol))
                .transpose()?
                .unwrap_or(0.0);
            let (accept, h_next) = self.controller.adapt(err, h_try);
            last_bad = !err.is_finite();
            let mut ks = out.ks;
            if accept {
                outputs.extend(dense_states(
                    tab,
                    &span,
                    grid,
                    &y,
                    &ks,
                    &t_step,
                    &h_step,
                    self.time_leaf.as_ref().map(|(times, _)| times),
                ));
                on_step(span, &y);
                self.counters.accepted += 1;
                if let Some(watch) = self.watch.as_mut() {
                    if watch(&span, &y, &out.y, &ks)? {
                        return Ok(out.y);
                    }
                }
                self.k1 = if tab.is_fsal() && !span.jumps.1 { ks.pop() } else { None };
                if span.jumps.1 {
                    after_jump = Some(t1);
                }
                y = out.y;
                t = t1;
                next_dense = dense_end;
            } else {
                self.counters.rejected += 1;
                self.k1 = Some(ks.swap_remove(0));
            }
            h = h_next;
        }
        self.h = Some(h);
        Ok(y)
    }
}

/// Integrates over the whole grid; returns the state at every grid time (the first is `y0`).
/// An interpolating solver takes one leg over the whole grid (n even steps for `Uniform(n)`),
/// others one leg per interval.
pub(crate) fn integrate<B: Backend, V: VectorField<B>>(
    stepper: &mut Stepper<'_, B, V>,
    grid: &TimeGrid,
    y0: V::State,
    on_step: &mut dyn FnMut(Span, &V::State),
) -> Result<Vec<V::State>> {
    let times = grid.times();
    if !y0.finiteness_probe()?.is_finite() {
        return Err(Error::NonFiniteState { t: times[0], step: 0 });
    }
    let last = times.len() - 1;
    let mut outputs = Vec::with_capacity(times.len());
    outputs.push(y0.clone());
    if stepper.solver.interpolates() {
        let n = match stepper.solver.control {
            StepControl::Uniform(n) => Some(n),
            _ => None,
        };
        let y = stepper.leg(times, 0, last, y0, n, &mut outputs, on_step)?;
        outputs.push(y);
        return Ok(outputs);
    }
    let mut y = y0;
    for k in 0..last {
        let n = stepper.solver.fixed_steps(grid, k);
        y = stepper.leg(times, k, k + 1, y, n, &mut outputs, on_step)?;
        outputs.push(y.clone());
    }
    Ok(outputs)
}
