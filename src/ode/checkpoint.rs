//! The exact discrete adjoint: replay each step from a stored state under autodiff and pull the
//! cotangent back through it.
//!
//! For steps `z_{n+1} = Φ_n(z_n; θ, T)` the gradient of the discretised solve is
//! `a_n = (∂Φ_n/∂z_n)ᵀ a_{n+1}` (plus the cotangent of any output at step n),
//! `dL/dθ = Σ_n (∂Φ_n/∂θ)ᵀ a_{n+1}`, `dL/dT = Σ_n (∂Φ_n/∂T)ᵀ a_{n+1}`: one vector-Jacobian
//! product of one step each, computed on a fresh graph (a step's stage times are
//! `T_a + s·(T_b − T_a)` with its fractions `s` of its leg fixed, so output times move their steps
//! with them). A step that interpolates outputs inside itself pulls their cotangents back in the
//! same product. Which states are kept is the [`Schedule`]; those not kept are recomputed.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::error::Result;
use crate::ode::dynamics::{Dynamics, DynamicsField};
use crate::ode::gradient::Schedule;
use crate::ode::params;
use crate::ode::problem::{Cotangents, Problem};
use crate::ode::solver::{dense_states, rk_step, Counters, Span};

/// The states kept by the forward pass.
#[derive(Debug, Clone)]
pub(crate) enum Checkpoints<B: Backend, const D: usize> {
    /// The starting state of every step.
    All(Vec<Tensor<B, D>>),
    /// The starting state of steps 0, k, 2k, …
    Every(usize, Vec<Tensor<B, D>>),
    /// The initial state only.
    Recursive(Option<Tensor<B, D>>),
}

/// What the forward pass records for the discrete adjoint: its accepted steps and some states.
#[derive(Debug, Clone)]
pub(crate) struct Tape<B: Backend, const D: usize> {
    pub spans: Vec<Span>,
    pub checkpoints: Checkpoints<B, D>,
}

impl<B: Backend, const D: usize> Tape<B, D> {
    pub(crate) fn new(schedule: Schedule) -> Self {
        let checkpoints = match schedule {
            Schedule::All => Checkpoints::All(Vec::new()),
            Schedule::Every(k) => Checkpoints::Every(k.max(1), Vec::new()),
            Schedule::Recursive => Checkpoints::Recursive(None),
        };
        Self {
            spans: Vec::new(),
            checkpoints,
        }
    }

    /// Records an accepted step and the state it started from.
    pub(crate) fn record(&mut self, span: Span, y: &Tensor<B, D>) {
        let n = self.spans.len();
        self.spans.push(span);
        match &mut self.checkpoints {
            Checkpoints::All(states) => states.push(y.clone()),
            Checkpoints::Every(k, states) if n.is_multiple_of(*k) => states.push(y.clone()),
            Checkpoints::Recursive(first @ None) => *first = Some(y.clone()),
            _ => {}
        }
    }

    /// Number of states held.
    pub(crate) fn stored_states(&self) -> usize {
        match &self.checkpoints {
            Checkpoints::All(s) | Checkpoints::Every(_, s) => s.len(),
            Checkpoints::Recursive(s) => usize::from(s.is_some()),
        }
    }
}

/// Replays and differentiates single steps of a recorded solve.
struct Replay<'a, AD: AutodiffBackend, M: AutodiffModule<AD>, const D: usize> {
    problem: &'a Problem<AD::InnerBackend, M::InnerModule, D>,
    spans: &'a [Span],
    counters: Counters,
}

impl<AD, M, const D: usize> Replay<'_, AD, M, D>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    /// z_{n+1} from z_n, without a graph.
    fn advance(&mut self, n: usize, y: &Tensor<AD::InnerBackend, D>) -> Result<Tensor<AD::InnerBackend, D>> {
        let span = self.spans[n];
        let field = DynamicsField {
            module: &self.problem.inner,
        };
        let (t0, h) = span.times::<AD::InnerBackend>(None);
        let out = rk_step(
            &field,
            self.problem.solver.tableau,
            &t0,
            &h,
            y,
            None,
            span.jumps,
            &mut self.counters,
        )?;
        Ok(out.y)
    }

    /// The vector-Jacobian product of step n at z_n with cotangent `a` on z_{n+1} and
    /// `dense[j]` on the j-th output interpolated inside the step.
    fn vjp(
        &mut self,
        n: usize,
        y: Tensor<AD::InnerBackend, D>,
        a: Tensor<AD::InnerBackend, D>,
        dense: &[Tensor<AD::InnerBackend, D>],
        acc: &mut Cotangents<AD::InnerBackend, D>,
    ) -> Result<Tensor<AD::InnerBackend, D>> {
        let p = self.problem;
        let span = self.spans[n];
        let module: M = params::fresh::<AD, M>(&p.inner, &p.trainable, p.want.theta);
        let z = Tensor::<AD, D>::from_inner(y).require_grad();
        let times = p.want.times.then(|| {
            (
                Tensor::<AD, 1>::from_inner(p.times.clone()).require_grad(),
                p.grid.times().to_vec(),
            )
        });
        let (t0, h) = span.times(times.as_ref());
        let field = DynamicsField { module: &module };
        let tab = p.solver.tableau;
        let out = rk_step(&field, tab, &t0, &h, &z, None, span.jumps, &mut self.counters)?;
        let mut pullback = (out.y * Tensor::from_inner(a)).sum();
        let grid = p.grid.times();
        let leaf = times.as_ref().map(|(t, _)| t);
        for (state, g) in dense_states(tab, &span, grid, &z, &out.ks, &t0, &h, leaf)
            .into_iter()
            .zip(dense)
        {
            pullback = pullback + (state * Tensor::from_inner(g.clone())).sum();
        }
        let grads = pullback.backward();
        if p.want.theta {
            acc.add_theta(params::trainable_grads(&module, &grads));
        }
        if let (Some((times, _)), Some(acc_t)) = (&times, acc.times.as_mut()) {
            if let Some(g) = times.grad(&grads) {
                *acc_t = acc_t.clone() + g;
            }
        }
        Ok(z.grad(&grads).unwrap_or_else(|| z.inner().zeros_like()))
    }
}

/// Called with each step index and its starting state, last step first.
type StepVisitor<'v, 'r, AD, M, const D: usize> =
    dyn FnMut(&mut Replay<'r, AD, M, D>, usize, Tensor<<AD as AutodiffBackend>::InnerBackend, D>) -> Result<()> + 'v;

/// Visits steps N−1, …, 0 in that order with their starting states, as the schedule allows.
fn reverse_states<'r, AD, M, const D: usize>(
    replay: &mut Replay<'r, AD, M, D>,
    checkpoints: &Checkpoints<AD::InnerBackend, D>,
    visit: &mut StepVisitor<'_, 'r, AD, M, D>,
) -> Result<()>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    let n_steps = replay.spans.len();
    match checkpoints {
        Checkpoints::All(states) => {
            for n in (0..n_steps).rev() {
                visit(replay, n, states[n].clone())?;
            }
        }
        Checkpoints::Every(k, states) => {
            for (segment, start_state) in states.iter().enumerate().rev() {
                let start = segment * k;
                let end = (start + k).min(n_steps);
                let mut ys = vec![start_state.clone()];
                for n in start..end - 1 {
                    let next = replay.advance(n, &ys[ys.len() - 1])?;
                    ys.push(next);
                }
                for n in (start..end).rev() {
                    visit(replay, n, ys.pop().expect("one state per step"))?;
                }
            }
        }
        Checkpoints::Recursive(first) => {
            if let Some(y0) = first {
                bisect(replay, y0.clone(), 0, n_steps, visit)?;
            }
        }
    }
    Ok(())
}

/// Visits steps `j−1 … i` given z_i, keeping one state per level of recursion.
fn bisect<'r, AD, M, const D: usize>(
    replay: &mut Replay<'r, AD, M, D>,
    y_i: Tensor<AD::InnerBackend, D>,
    i: usize,
    j: usize,
    visit: &mut StepVisitor<'_, 'r, AD, M, D>,
) -> Result<()>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    if j - i == 1 {
        return visit(replay, i, y_i);
    }
    let mid = (i + j) / 2;
    let mut y_mid = y_i.clone();
    for n in i..mid {
        y_mid = replay.advance(n, &y_mid)?;
    }
    bisect(replay, y_mid, mid, j, visit)?;
    bisect(replay, y_i, i, mid, visit)
}

/// Gradients of the discretised solve. `cotangents[k]` is dL/dz(T_k). Returns the cotangents
/// of the inputs and the number of f evaluations (VJPs and recomputations) it took.
pub(crate) fn discrete_adjoint<AD, M, const D: usize>(
    problem: &Problem<AD::InnerBackend, M::InnerModule, D>,
    tape: &Tape<AD::InnerBackend, D>,
    cotangents: Vec<Tensor<AD::InnerBackend, D>>,
) -> Result<(Cotangents<AD::InnerBackend, D>, usize)>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    // The output whose state z_{n+1} is, for steps that end their leg; the others are
    // interpolated inside steps.
    let grid = problem.grid.times();
    let ends: Vec<Option<usize>> = tape
        .spans
        .iter()
        .map(|span| span.ends_leg(grid).then_some(span.to))
        .collect();
    let mut acc = Cotangents::zeros(problem, &cotangents[0]);
    let mut a: Option<Tensor<AD::InnerBackend, D>> = None;
    let mut replay = Replay::<AD, M, D> {
        problem,
        spans: &tape.spans,
        counters: Counters::default(),
    };
    reverse_states(&mut replay, &tape.checkpoints, &mut |replay, n, y| {
        let at_end = ends[n].map(|k| cotangents[k].clone());
        let cot = match (a.take(), at_end) {
            (Some(a), Some(g)) => a + g,
            (Some(a), None) => a,
            (None, Some(g)) => g,
            (None, None) => unreachable!("the last step ends the last leg"),
        };
        let span = replay.spans[n];
        let dense = &cotangents[span.dense.0..span.dense.1];
        a = Some(replay.vjp(n, y, cot, dense, &mut acc)?);
        Ok(())
    })?;
    let a = a.map_or_else(|| cotangents[0].clone(), |a| a + cotangents[0].clone());
    acc.z0 = a;
    Ok((acc, replay.counters.nfe))
}
