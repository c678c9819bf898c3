//! The continuous adjoint ("backsolve"): integrate the augmented system backward in time.
//!
//! With `a(t) = dL/dz(t)`, the augmented state `[z, a_z, a_θ, a_t]` obeys
//! `dz/dt = f`, `da_z/dt = −a_zᵀ ∂f/∂z`, `da_θ/dt = −a_zᵀ ∂f/∂θ`, `da_t/dt = −a_zᵀ ∂f/∂t`,
//! from `a_z(T_K) = dL/dz(T_K)`, `a_θ = a_t = 0`, down to `T_0`. At every output time `z` is reset
//! to the stored forward state and that time's cotangent is added to `a_z` (torchdiffeq's
//! recipe); an adaptive reverse solve does not stop at outputs whose cotangent is zero. Then `dL/dz_0 = a_z(T_0)`, `dL/dθ = a_θ(T_0)`, `dL/dT_k = g_k·f(T_k, z_k)` for k ≥ 1
//! and `dL/dT_0 = a_t(T_0) − Σ_{k≥1} g_k·f(T_k, z_k)`.
//!
//! The system is just another [`VectorField`], stepped by the ordinary solver; each evaluation
//! is one vector-Jacobian product of f on a fresh graph.

use std::cell::Cell;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::error::{read_scalar, Result};
use crate::ode::dynamics::{check_same_shape, Dynamics, DynamicsField};
use crate::ode::gradient::BacksolveOptions;
use crate::ode::params;
use crate::ode::problem::{Cotangents, Problem};
use crate::ode::solver::{Solver, StepControl, Stepper, Tolerances};
use crate::ode::state::{tensor_error_sq_sum, OdeState, Time, VectorField};

/// The augmented state `[z, a_z, a_θ, a_t]`.
#[derive(Debug, Clone)]
pub(crate) struct AugState<B: Backend, const D: usize> {
    pub z: Tensor<B, D>,
    pub a_z: Tensor<B, D>,
    /// One flat tensor per trainable parameter (empty when θ is not wanted).
    pub a_theta: Vec<Tensor<B, 1>>,
    /// `[1]`, when time gradients are wanted.
    pub a_t: Option<Tensor<B, 1>>,
    /// Error control on `z` and `a_z` only.
    pub seminorm: bool,
}

fn zip_add<B: Backend, const R: usize>(a: &[Tensor<B, R>], b: &[Tensor<B, R>]) -> Vec<Tensor<B, R>> {
    a.iter().zip(b).map(|(a, b)| a.clone() + b.clone()).collect()
}

impl<B: Backend, const D: usize> OdeState<B> for AugState<B, D> {
    fn add(&self, o: &Self) -> Self {
        Self {
            z: OdeState::add(&self.z, &o.z),
            a_z: OdeState::add(&self.a_z, &o.a_z),
            a_theta: zip_add(&self.a_theta, &o.a_theta),
            a_t: self
                .a_t
                .as_ref()
                .zip(o.a_t.as_ref())
                .map(|(a, b)| a.clone() + b.clone()),
            seminorm: self.seminorm,
        }
    }

    fn scale(&self, c: f64) -> Self {
        Self {
            z: OdeState::scale(&self.z, c),
            a_z: OdeState::scale(&self.a_z, c),
            a_theta: self.a_theta.iter().map(|t| t.clone().mul_scalar(c)).collect(),
            a_t: self.a_t.as_ref().map(|t| t.clone().mul_scalar(c)),
            seminorm: self.seminorm,
        }
    }

    fn scale_time(&self, h: &Time<B>) -> Self {
        Self {
            z: self.z.scale_time(h),
            a_z: self.a_z.scale_time(h),
            a_theta: self.a_theta.iter().map(|t| t.scale_time(h)).collect(),
            a_t: self.a_t.as_ref().map(|t| t.scale_time(h)),
            seminorm: self.seminorm,
        }
    }

    fn error_sq_sum(&self, y0: &Self, y1: &Self, rtol: f64, atol: f64) -> (Tensor<B, 1>, usize) {
        let (mut sum, mut n) = tensor_error_sq_sum(&self.z, &y0.z, &y1.z, rtol, atol);
        let (s, m) = tensor_error_sq_sum(&self.a_z, &y0.a_z, &y1.a_z, rtol, atol);
        sum = sum + s;
        n += m;
        if !self.seminorm {
            for ((e, a), b) in self.a_theta.iter().zip(&y0.a_theta).zip(&y1.a_theta) {
                let (s, m) = tensor_error_sq_sum(e, a, b, rtol, atol);
                sum = sum + s;
                n += m;
            }
            if let (Some(e), Some(a), Some(b)) = (&self.a_t, &y0.a_t, &y1.a_t) {
                let (s, m) = tensor_error_sq_sum(e, a, b, rtol, atol);
                sum = sum + s;
                n += m;
            }
        }
        (sum, n)
    }

    fn finiteness_probe(&self) -> Result<f64> {
        Ok(self.z.finiteness_probe()? + self.a_z.finiteness_probe()?)
    }

    fn time_dtype(&self) -> burn::tensor::DType {
        self.z.dtype()
    }

    /// `[z, a_z]`: a_θ and a_t are quadratures (no derivative reads them), so the stages skip
    /// them; with the parameters of P2 that is 6 of the 8 tensors of every stage sum.
    fn field_view(&self) -> Self {
        Self {
            z: self.z.clone(),
            a_z: self.a_z.clone(),
            a_theta: Vec::new(),
            a_t: None,
            seminorm: self.seminorm,
        }
    }

    fn error_view(&self) -> Self {
        if self.seminorm {
            self.field_view()
        } else {
            self.clone()
        }
    }
}

/// The augmented dynamics: one VJP of f per evaluation.
struct AugField<'a, AD: AutodiffBackend, M: AutodiffModule<AD>, const D: usize> {
    problem: &'a Problem<AD::InnerBackend, M::InnerModule, D>,
    vjps: Cell<usize>,
}

impl<AD, M, const D: usize> VectorField<AD::InnerBackend> for AugField<'_, AD, M, D>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    type State = AugState<AD::InnerBackend, D>;

    fn eval(&self, t: &Time<AD::InnerBackend>, s: &Self::State) -> Result<Self::State> {
        self.vjps.set(self.vjps.get() + 1);
        let p = self.problem;
        let module: M = params::fresh::<AD, M>(&p.inner, &p.trainable, p.want.theta);
        let z = Tensor::<AD, D>::from_inner(s.z.clone()).require_grad();
        // What to differentiate comes from the problem, not from `s`: a stage state carries
        // only z and a_z (`field_view`).
        let t_tensor = t.to_tensor(&s.z);
        let t = Tensor::<AD, 1>::from_inner(t_tensor.clone()).set_require_grad(p.want.times);
        let f = module.f(t.clone(), z.clone());
        check_same_shape(&z, &f)?;
        let dz = f.clone().inner();
        // Seeded with −a_z, the gradients are the derivatives −a_zᵀ ∂f/∂(z, θ, t) themselves:
        // one negation instead of one per parameter tensor (bit for bit the same values).
        let grads = (f * Tensor::from_inner(s.a_z.clone().neg())).sum().backward();
        let a_theta = if p.want.theta {
            params::trainable_grads(&module, &grads)
        } else {
            Vec::new()
        };
        let a_t = p
            .want
            .times
            .then(|| t.grad(&grads).unwrap_or_else(|| t_tensor.zeros_like()));
        let a_z = z.grad(&grads).unwrap_or_else(|| s.z.zeros_like());
        Ok(AugState {
            z: dz,
            a_z,
            a_theta,
            a_t,
            seminorm: s.seminorm,
        })
    }
}

/// `g · f(t, z)` as a `[1]` tensor, f on the inner backend.
fn dot_f<B: Backend, I: Dynamics<B, D>, const D: usize>(
    inner: &I,
    t: &Time<B>,
    z: &Tensor<B, D>,
    g: &Tensor<B, D>,
) -> Result<Tensor<B, 1>> {
    let field = DynamicsField { module: inner };
    let f = field.eval(t, z)?;
    Ok((f * g.clone()).sum())
}

/// Gradients by the continuous adjoint. `outputs[k]` is the forward state at `T_k`,
/// `cotangents[k]` is dL/dz(T_k). Returns the cotangents, VJP count and reverse steps taken.
pub(crate) fn backsolve<AD, M, const D: usize>(
    problem: &Problem<AD::InnerBackend, M::InnerModule, D>,
    options: &BacksolveOptions,
    outputs: &[Tensor<AD::InnerBackend, D>],
    cotangents: Vec<Tensor<AD::InnerBackend, D>>,
) -> Result<(Cotangents<AD::InnerBackend, D>, usize, usize)>
where
    AD: AutodiffBackend,
    M: AutodiffModule<AD> + Dynamics<AD, D>,
    M::InnerModule: Dynamics<AD::InnerBackend, D>,
{
    let grid = problem.grid.times();
    let last = grid.len() - 1;
    let field = AugField::<AD, M, D> {
        problem,
        vjps: Cell::new(0),
    };
    let reverse_solver = match problem.solver.control {
        StepControl::Adaptive(tol) => Solver {
            tableau: problem.solver.tableau,
            control: StepControl::Adaptive(Tolerances {
                rtol: options.rtol,
                atol: options.atol,
                ..tol
            }),
        },
        _ => problem.solver,
    };
    reverse_solver.validate()?;
    let mut stepper = Stepper::new(&field, reverse_solver).with_jumps(&problem.jumps);

    let a_theta = if problem.want.theta {
        params::trainable_zeros(&params::fresh::<AD, M>(&problem.inner, &problem.trainable, true))
    } else {
        Vec::new()
    };
    let mut state = AugState {
        z: outputs[last].clone(),
        a_z: cotangents[last].clone(),
        a_theta,
        a_t: problem
            .want
            .times
            .then(|| Tensor::zeros([1], (&outputs[0].device(), outputs[0].dtype()))),
        seminorm: options.seminorm,
    };
    // dL/dT_k = g_k · f(T_k, z_k) for k ≥ 1.
    let mut time_grads: Vec<Tensor<AD::InnerBackend, 1>> = Vec::new();
    let mut extra_fe = 0;
    if problem.want.times {
        for k in 1..=last {
            time_grads.push(dot_f(
                &problem.inner,
                &Time::Value(grid[k]),
                &outputs[k],
                &cotangents[k],
            )?);
            extra_fe += 1;
        }
    }
    // An adaptive reverse solve runs through outputs whose cotangent is zero (outputs the loss
    // does not use) instead of stopping there; fixed steps repeat the forward intervals.
    let adaptive = matches!(reverse_solver.control, StepControl::Adaptive(_));
    let is_zero = |g: &Tensor<AD::InnerBackend, D>| -> Result<bool> {
        Ok(read_scalar(g.clone().abs().max(), "an output's cotangent")? == 0.0)
    };
    // The states at jump times the reverse solve passes, for dL/dT_0.
    let mut at_jumps: Vec<(f64, AugState<AD::InnerBackend, D>)> = Vec::new();
    let mut k = last;
    while k > 0 {
        let mut j = k - 1;
        while adaptive && j > 0 && is_zero(&cotangents[j])? {
            j -= 1;
        }
        let n = problem.solver.fixed_steps(&problem.grid, j);
        stepper.reset_state();
        let mut on_step = |span: crate::ode::solver::Span, y: &AugState<AD::InnerBackend, D>| {
            if problem.want.times && span.jumps.0 {
                at_jumps.push((span.t0, y.clone()));
            }
        };
        state = stepper.leg(grid, k, j, state, n, &mut Vec::new(), &mut on_step)?;
        state.z = outputs[j].clone();
        state.a_z = state.a_z + cotangents[j].clone();
        k = j;
    }
    let times = if problem.want.times {
        // d(a·f)/dt = a·∂f/∂t between jumps (and outputs), which the quadrature of a_t sees;
        // across a jump time a·f jumps too, by a·(f(t⁺) − f(t⁻)), f from just after and before.
        let mut jumps_sum = 0.0;
        for (t, y) in &at_jumps {
            let side = |toward: f64| {
                dot_f(
                    &problem.inner,
                    &Time::Value(*t).nudged(toward, y.z.dtype()),
                    &y.z,
                    &y.a_z,
                )
            };
            let jump = side(f64::INFINITY)? - side(f64::NEG_INFINITY)?;
            jumps_sum += read_scalar(jump, "a jump of a·f")?;
            extra_fe += 2;
        }
        let sum_later: f64 = time_grads
            .iter()
            .map(|g| read_scalar(g.clone(), "a time gradient"))
            .sum::<Result<f64>>()?;
        let a_t0 = state
            .a_t
            .clone()
            .expect("a_t is carried when times are wanted")
            .add_scalar(jumps_sum - sum_later);
        let mut all = vec![a_t0];
        all.extend(time_grads);
        Some(Tensor::cat(all, 0))
    } else {
        None
    };
    let vjps = field.vjps.get();
    Ok((
        Cotangents {
            z0: state.a_z,
            theta: state.a_theta,
            times,
        },
        vjps + extra_fe,
        stepper.counters.accepted,
    ))
}
