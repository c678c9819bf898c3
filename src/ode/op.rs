//! The solve as one burn autodiff operation.
//!
//! Its forward runs the solver on the inner backend (no graph) and records what the chosen
//! gradient mode needs: step states for the discrete adjoint, output states for the continuous
//! one, nothing at all when no input is tracked. Its parents are `z0`, the flattened trainable
//! parameters θ and the time grid; its backward runs the adjoint and hands each tracked parent
//! its gradient, so a user's `loss.backward()` reaches them as if the solver had been
//! differentiated directly.

use core::marker::PhantomData;
use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::error::{Error, Result};
use crate::ode::adjoint::backsolve;
use crate::ode::checkpoint::{discrete_adjoint, Tape};
use crate::ode::dynamics::{Dynamics, DynamicsField};
use crate::ode::gradient::{BacksolveOptions, GradientMode};
use crate::ode::grid::TimeGrid;
use crate::ode::params;
use crate::ode::problem::{Problem, Wants};
use crate::ode::solver::{integrate, Solver, Stats, Stepper};

/// What a solve reports, filled in by its forward and, later, its backward pass.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub stats: Stats,
    /// Step states held between the forward and the backward pass.
    pub stored_states: usize,
    pub backward_error: Option<Error>,
}

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Clone)]
enum Record<B: Backend, const D: usize> {
    Discrete(Tape<B, D>),
    Continuous(BacksolveOptions, Vec<Tensor<B, D>>),
}

#[derive(Debug, Clone)]
pub(crate) struct SolveState<B: Backend, I, const D: usize> {
    problem: Problem<B, I, D>,
    record: Record<B, D>,
    theta_len: usize,
    report: Arc<Mutex<Report>>,
}

/// Marks the backend, checkpoint strategy and module types without owning them.
type Types<B, C, M> = PhantomData<fn() -> (B, C, M)>;

struct SolveBackward<B, C, M, const D: usize>(Types<B, C, M>);

impl<B, C, M, const D: usize> core::fmt::Debug for SolveBackward<B, C, M, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SolveBackward")
    }
}

impl<B, C, M, const D: usize> Backward<B, 3> for SolveBackward<B, C, M, D>
where
    B: Backend,
    C: CheckpointStrategy,
    M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
    M::InnerModule: Dynamics<B, D>,
{
    type State = SolveState<B, M::InnerModule, D>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [p_z0, p_theta, p_times] = ops.parents;
        let SolveState {
            mut problem,
            record,
            theta_len,
            report,
        } = ops.state;
        problem.want = Wants {
            z0: p_z0.is_some(),
            theta: p_theta.is_some() && theta_len > 0,
            times: p_times.is_some(),
        };
        let cotangent = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let cotangents = cotangent.chunk(problem.grid.len(), 0);
        let like = cotangents[0].clone();
        let result = match &record {
            Record::Discrete(tape) => discrete_adjoint::<Autodiff<B, C>, M, D>(&problem, tape, cotangents)
                .map(|(c, nfe)| (c, nfe, tape.spans.len())),
            Record::Continuous(options, outputs) => {
                backsolve::<Autodiff<B, C>, M, D>(&problem, options, outputs, cotangents)
            }
        };
        let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
        let (z0, theta, times) = match result {
            Ok((c, nfe, steps)) => {
                report.stats.nfe_backward += nfe;
                report.stats.backward_steps += steps;
                let theta = (!c.theta.is_empty()).then(|| Tensor::cat(c.theta, 0));
                (c.z0, theta, c.times)
            }
            Err(e) => {
                // A backward step cannot return an error: poison the gradients, keep the reason.
                report.backward_error = Some(Error::Backward(Box::new(e)));
                let nan = |t: Tensor<B, 1>| t.add_scalar(f64::NAN);
                let device = like.device();
                (
                    like.zeros_like().add_scalar(f64::NAN),
                    Some(nan(Tensor::zeros([theta_len.max(1)], (&device, like.dtype())))),
                    Some(nan(problem.times.zeros_like())),
                )
            }
        };
        if let Some(node) = p_z0 {
            grads.register::<B>(node.id, z0.into_primitive().tensor());
        }
        if let (Some(node), Some(theta)) = (p_theta, theta) {
            grads.register::<B>(node.id, theta.into_primitive().tensor());
        }
        if let (Some(node), Some(times)) = (p_times, times) {
            grads.register::<B>(node.id, times.into_primitive().tensor());
        }
    }
}

/// The stacked states and the report they fill in.
type TrackedSolve<B, C, const D: usize> = (Tensor<Autodiff<B, C>, D>, Arc<Mutex<Report>>);

/// Solves on the inner backend and returns the stacked states as a tracked tensor whose backward
/// runs `mode` (Checkpointed or Backsolve).
pub(crate) fn solve_op<B, C, M, const D: usize>(
    module: &M,
    solver: Solver,
    mode: GradientMode,
    grid: TimeGrid,
    jumps: Vec<f64>,
    z0: Tensor<Autodiff<B, C>, D>,
    times: Tensor<Autodiff<B, C>, 1>,
) -> Result<TrackedSolve<B, C, D>>
where
    B: Backend,
    C: CheckpointStrategy,
    M: AutodiffModule<Autodiff<B, C>> + Dynamics<Autodiff<B, C>, D> + 'static,
    M::InnerModule: Dynamics<B, D>,
{
    let device = z0.device();
    let theta = params::flatten_trainable(module);
    let theta_len = theta.as_ref().map_or(0, |t| t.dims()[0]);
    let theta = theta.unwrap_or_else(|| Tensor::zeros([1], (&device, z0.dtype())));
    let inner = module.valid();
    let z0_inner = z0.clone().inner();
    let times_inner = times.clone().inner();
    let z0 = z0.into_primitive().tensor();
    let theta = theta.into_primitive().tensor();
    let times = times.into_primitive().tensor();
    let report = Arc::new(Mutex::new(Report::default()));

    let field = DynamicsField { module: &inner };
    let mut stepper = Stepper::new(&field, solver).with_jumps(&jumps);
    let prep = SolveBackward::<B, C, M, D>(PhantomData)
        .prepare::<C>([z0.node.clone(), theta.node.clone(), times.node.clone()])
        .compute_bound()
        .stateful();
    let output = match prep {
        OpsKind::Tracked(prep) => {
            let (outputs, record) = match mode {
                GradientMode::Backsolve(options) => {
                    let outputs = integrate(&mut stepper, &grid, z0_inner, &mut |_, _| {})?;
                    (outputs.clone(), Record::Continuous(options, outputs))
                }
                GradientMode::Checkpointed(schedule) => {
                    let mut tape = Tape::new(schedule);
                    let outputs = integrate(&mut stepper, &grid, z0_inner, &mut |span, y| tape.record(span, y))?;
                    (outputs, Record::Discrete(tape))
                }
                GradientMode::Backprop => {
                    unreachable!("Backprop differentiates the solver's own operations")
                }
            };
            {
                let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                r.stored_states = match &record {
                    Record::Discrete(tape) => tape.stored_states(),
                    Record::Continuous(_, outputs) => outputs.len(),
                };
            }
            let problem = Problem {
                inner: inner.clone(),
                trainable: params::trainable_mask(module),
                solver,
                grid,
                jumps,
                times: times_inner,
                want: Wants {
                    z0: true,
                    theta: true,
                    times: true,
                },
            };
            let state = SolveState {
                problem,
                record,
                theta_len,
                report: report.clone(),
            };
            prep.finish(state, Tensor::cat(outputs, 0).into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let outputs = integrate(&mut stepper, &grid, z0_inner, &mut |_, _| {})?;
            prep.finish(Tensor::cat(outputs, 0).into_primitive().tensor())
        }
    };
    record_forward(&report, &stepper);
    Ok((Tensor::from_primitive(TensorPrimitive::Float(output)), report))
}

/// Copies the forward counters into the report.
pub(crate) fn record_forward<B: Backend, V: crate::ode::state::VectorField<B>>(
    report: &Arc<Mutex<Report>>,
    stepper: &Stepper<'_, B, V>,
) {
    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
    r.stats.nfe_forward = stepper.counters.nfe;
    r.stats.accepted_steps = stepper.counters.accepted;
    r.stats.rejected_steps = stepper.counters.rejected;
}
