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
use crate::ode::solver::{integrate, Solver, Stats, Stepper};

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
}

impl<M> NeuralOde<M> {
    /// Dopri5 at rtol = atol = 1e-6, exact checkpointed gradients.
    pub fn new(dynamics: M) -> Self {
        Self {
            dynamics,
            solver: Solver::dopri5(1e-6, 1e-6),
            gradient: GradientMode::default(),
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
        let field = DynamicsField { module: &self.dynamics };
        let mut stepper = Stepper::new(&field, self.solver);
        if let Some(times) = times {
            stepper = stepper.with_time_leaf(times, &grid);
        }
        let outputs = integrate(&mut stepper, &grid, z0, &mut |_, _| {})?;
        let report = Arc::new(Mutex::new(Report::default()));
        record_forward(&report, &stepper);
        Ok(Solution::new(Tensor::cat(outputs, 0), grid, report))
    }

    /// Solves on an autodiff backend, differentiated by the gradient mode. Gradients flow to
    /// `z0` (when tracked) and to every trainable parameter of the dynamics.
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
                let (ys, report) = solve_op(&self.dynamics, self.solver, mode, grid.clone(), z0, times)?;
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
