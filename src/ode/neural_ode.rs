//! The user-facing solve: `NeuralOde::new(f).solver(..).gradient(..).solve(z0, &times)`.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::{read_values, Error, Result};
use crate::ode::dynamics::{Dynamics, DynamicsField};
use crate::ode::gradient::GradientMode;
use crate::ode::grid::TimeGrid;
use crate::ode::op::{record_forward, solve_op, Report};
use crate::ode::solver::{integrate, Solver, Stats, StepControl, Stepper};

/// A neural ODE: dynamics, a solver and a way to differentiate the solve.
///
/// ```
/// use adjoint_dpm::prelude::*;
/// use burn::backend::{Autodiff, NdArray};
/// use burn::nn::{Linear, LinearConfig};
/// use burn::prelude::*;
///
/// #[derive(Module, Debug)]
/// struct Field<B: Backend> { linear: Linear<B> }
///
/// impl<B: Backend> Dynamics<B, 2> for Field<B> {
///     fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
///         self.linear.forward(z).tanh()
///     }
/// }
///
/// type B = Autodiff<NdArray<f64>>;
/// let device = Default::default();
/// let ode = NeuralOde::new(Field::<B> { linear: LinearConfig::new(2, 2).init(&device) })
///     .solver(Solver::dopri5(1e-6, 1e-8))
///     .gradient(GradientMode::Checkpointed(Schedule::All));
/// let z0 = Tensor::<B, 2>::ones([4, 2], &device).require_grad();
/// let solution = ode.solve(z0.clone(), &[0.0, 0.5, 1.0]).unwrap();
/// let loss = solution.state(2).powi_scalar(2).mean();
/// let grads = loss.backward();
/// let dz0 = z0.grad(&grads).unwrap();               // dL/dz0
/// let dw = ode.dynamics.linear.weight.grad(&grads); // dL/dθ, ready for an optimizer
/// assert_eq!(dz0.dims(), [4, 2]);
/// assert!(dw.is_some());
/// ```
#[derive(Debug, Clone)]
pub struct NeuralOde<M> {
    /// The dynamics f(t, z; θ).
    pub dynamics: M,
    solver: Solver,
    gradient: GradientMode,
    jumps: Vec<f64>,
}

impl<M> NeuralOde<M> {
    /// Dopri5 at rtol = atol = 1e-6, exact checkpointed gradients.
    pub fn new(dynamics: M) -> Self {
        Self {
            dynamics,
            solver: Solver::dopri5(1e-6, 1e-6),
            gradient: GradientMode::default(),
            jumps: Vec::new(),
        }
    }

    /// Sets the solver.
    pub fn solver(mut self, solver: Solver) -> Self {
        self.solver = solver;
        self
    }

    /// Sets how the solve is differentiated.
    pub fn gradient(mut self, gradient: GradientMode) -> Self {
        self.gradient = gradient;
        self
    }

    /// Times where the dynamics jump: a piecewise forcing, a dose, the knots of a control path
    /// interpolated linearly (torchdiffeq's `jump_t`, diffrax's `jump_ts`). Steps end on each of
    /// them, the stages there see f from the step's own side (one representable time inside, in
    /// the state's float type), and no stage is reused across one. An adaptive solver that is
    /// not told finds a jump by rejecting steps around it, and steps across it with an error
    /// estimate the jump spoils. Every gradient mode handles them; jump times themselves are
    /// fixed (not differentiated), and a step between two of them stays there when the output
    /// times move (the derivative with respect to an output time that sits on a jump is
    /// one-sided). A fixed-step solver lands only on output times, so each jump inside the
    /// solve must be one of them. Jumps outside the solve's open time span are ignored.
    ///
    /// ```
    /// use adjoint_dpm::prelude::*;
    /// use burn::backend::NdArray;
    /// use burn::prelude::*;
    ///
    /// /// dz/dt = u(t) − z with a forcing u that switches off at t = 1.
    /// #[derive(Module, Clone, Debug)]
    /// struct Switched {}
    /// impl<B: Backend> Dynamics<B, 2> for Switched {
    ///     fn f(&self, t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
    ///         let on = t.lower_elem(1.0).float().unsqueeze::<2>();
    ///         on - z
    ///     }
    /// }
    ///
    /// let device = Default::default();
    /// let z0 = Tensor::<NdArray<f64>, 2>::zeros([1, 1], &device);
    /// let solve = |ode: NeuralOde<Switched>| ode.solver(Solver::dopri5(1e-8, 1e-8)).integrate(z0.clone(), &[0.0, 2.0]);
    /// let told = solve(NeuralOde::new(Switched {}).jump_times(&[1.0]))?;
    /// let blind = solve(NeuralOde::new(Switched {}))?;
    /// // z(2) = (1 − e^−1) e^−1.
    /// let exact = (1.0 - (-1.0f64).exp()) * (-1.0f64).exp();
    /// let z2: f64 = told.last().into_scalar();
    /// assert!((z2 - exact).abs() < 1e-7);
    /// assert!(told.stats().rejected_steps < blind.stats().rejected_steps);
    /// # Ok::<(), adjoint_dpm::Error>(())
    /// ```
    pub fn jump_times(mut self, times: &[f64]) -> Self {
        self.jumps = times.to_vec();
        self
    }

    /// The jump times inside the open span of `grid` (a validated grid: monotone, two times or
    /// more), checked against the solver ([`jump_times`](Self::jump_times)).
    pub(crate) fn jumps_in(&self, grid: &[f64]) -> Result<Vec<f64>> {
        let bad = |value: f64, rule| Error::InvalidOption {
            name: "jump_times",
            value: value.to_string(),
            rule,
        };
        if let Some(&t) = self.jumps.iter().find(|t| !t.is_finite()) {
            return Err(bad(t, "must be finite"));
        }
        // A grid is monotone: its ends bound it.
        let (first, last) = (grid[0], grid[grid.len() - 1]);
        let (lo, hi) = (first.min(last), first.max(last));
        let inside: Vec<f64> = self.jumps.iter().copied().filter(|&t| t > lo && t < hi).collect();
        match (self.solver.control, inside.first()) {
            (StepControl::Adaptive(_), _) | (_, None) => Ok(inside),
            (StepControl::Uniform(_), Some(&t)) => Err(bad(
                t,
                "even steps over the whole grid (interpolate(true)) cannot land on a jump time",
            )),
            _ => match inside.iter().find(|t| !grid.contains(t)) {
                Some(&t) => Err(bad(t, "a fixed-step solver lands only on output times: make it one")),
                None => Ok(inside),
            },
        }
    }

    /// The solver.
    pub fn solver_config(&self) -> Solver {
        self.solver
    }

    /// The gradient mode.
    pub fn gradient_mode(&self) -> GradientMode {
        self.gradient
    }

    /// Solves with the backend's own operations on any backend, ignoring the gradient mode. On
    /// an autodiff backend this *is* [`GradientMode::Backprop`]; on an inner backend it is a
    /// plain, graph-free solve (inference).
    pub fn integrate<B: Backend, const D: usize>(&self, z0: Tensor<B, D>, times: &[f64]) -> Result<Solution<B, D>>
    where
        M: Dynamics<B, D>,
    {
        let grid = TimeGrid::new(times)?;
        self.integrate_grid(z0, grid, None)
    }

    fn integrate_grid<B: Backend, const D: usize>(
        &self,
        z0: Tensor<B, D>,
        grid: TimeGrid,
        times: Option<Tensor<B, 1>>,
    ) -> Result<Solution<B, D>>
    where
        M: Dynamics<B, D>,
    {
        self.solver.validate()?;
        let jumps = self.jumps_in(grid.times())?;
        let field = DynamicsField { module: &self.dynamics };
        let mut stepper = Stepper::new(&field, self.solver).with_jumps(&jumps);
        if let Some(times) = times {
            stepper = stepper.with_time_leaf(times, &grid);
        }
        let outputs = integrate(&mut stepper, &grid, z0, &mut |_, _| {})?;
        let report = Arc::new(Mutex::new(Report::default()));
        record_forward(&report, &stepper);
        Ok(Solution::new(Tensor::cat(outputs, 0), grid, report))
    }

    /// Solves on an autodiff backend, differentiated by the gradient mode. Gradients flow to
    /// `z0` (when tracked) and to every trainable parameter of the dynamics: a leaf that
    /// requires a gradient, or a value computed from tracked tensors (`Param::initialized` from,
    /// say, a hypernetwork's output), whose gradient then flows on through the caller's graph.
    pub fn solve<B, C, const D: usize>(
        &self,
        z0: Tensor<Autodiff<B, C>, D>,
        times: &[f64],
    ) -> Result<Solution<Autodiff<B, C>, D>>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
        M::InnerModule: Dynamics<B, D>,
    {
        let grid = TimeGrid::new(times)?;
        let times = Tensor::from_data(TensorData::from(times), (&z0.device(), z0.dtype()));
        self.solve_grid(z0, grid, times, false)
    }

    /// Like [`solve`](Self::solve), with the times as a tensor: when it is tracked (a
    /// `require_grad` leaf, or computed from one), the output times receive gradients too
    /// (`dL/dT_k`).
    pub fn solve_with_times<B, C, const D: usize>(
        &self,
        z0: Tensor<Autodiff<B, C>, D>,
        times: Tensor<Autodiff<B, C>, 1>,
    ) -> Result<Solution<Autodiff<B, C>, D>>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
        M::InnerModule: Dynamics<B, D>,
    {
        let values = read_values(times.clone().inner(), "the output times")?;
        let grid = TimeGrid::new(&values)?;
        // Tracked also when computed from tracked tensors (`is_require_grad` sees leaves only).
        let tracked = times.clone().into_primitive().tensor().is_tracked();
        self.solve_grid(z0, grid, times, tracked)
    }

    fn solve_grid<B, C, const D: usize>(
        &self,
        z0: Tensor<Autodiff<B, C>, D>,
        grid: TimeGrid,
        times: Tensor<Autodiff<B, C>, 1>,
        times_tracked: bool,
    ) -> Result<Solution<Autodiff<B, C>, D>>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
        M::InnerModule: Dynamics<B, D>,
    {
        self.solver.validate()?;
        match self.gradient {
            GradientMode::Backprop => self.integrate_grid(z0, grid, times_tracked.then_some(times)),
            mode => {
                let jumps = self.jumps_in(grid.times())?;
                let (ys, report) = solve_op(&self.dynamics, self.solver, mode, grid.clone(), jumps, z0, times)?;
                Ok(Solution::new(ys, grid, report))
            }
        }
    }
}

/// The states of a solve at the requested times, and what it cost.
#[derive(Debug, Clone)]
pub struct Solution<B: Backend, const D: usize> {
    ys: Tensor<B, D>,
    grid: TimeGrid,
    report: Arc<Mutex<Report>>,
}

impl<B: Backend, const D: usize> Solution<B, D> {
    fn new(ys: Tensor<B, D>, grid: TimeGrid, report: Arc<Mutex<Report>>) -> Self {
        Self { ys, grid, report }
    }

    /// The requested times.
    pub fn times(&self) -> &[f64] {
        self.grid.times()
    }

    /// The state at `times()[k]` (tracked on an autodiff backend).
    ///
    /// # Panics
    /// If `k` is not below the number of times.
    pub fn state(&self, k: usize) -> Tensor<B, D> {
        assert!(
            k < self.grid.len(),
            "state {k} asked of a solution with {} times",
            self.grid.len()
        );
        let batch = self.ys.dims()[0] / self.grid.len();
        self.ys.clone().narrow(0, k * batch, batch)
    }

    /// The state at the last time.
    pub fn last(&self) -> Tensor<B, D> {
        self.state(self.grid.len() - 1)
    }

    /// Every state, in time order.
    pub fn states(&self) -> Vec<Tensor<B, D>> {
        self.ys.clone().chunk(self.grid.len(), 0)
    }

    /// All states concatenated along the first dimension: `[times · batch, …]`.
    pub fn stacked(&self) -> Tensor<B, D> {
        self.ys.clone()
    }

    /// Work done so far; the backward figures fill in once `backward()` has run.
    pub fn stats(&self) -> Stats {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// Number of step states held for the backward pass (0 for Backprop, whose memory is the
    /// graph itself).
    pub fn stored_states(&self) -> usize {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).stored_states
    }

    /// Why the backward pass failed, if it did (its gradients are then NaN).
    pub fn backward_error(&self) -> Option<Error> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .backward_error
            .clone()
    }
}
