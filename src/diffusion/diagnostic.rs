//! How far the continuous adjoint (AdjointDPM) is from the exact gradient of a sampler, per run.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::Serialize;

use crate::diffusion::eps_model::EpsModel;
use crate::diffusion::error::DiffusionError;
use crate::diffusion::sampler::Sampler;
use crate::diffusion::schedule::NoiseSchedule;
use crate::ode::{BacksolveOptions, GradientMode, NeuralOde, Schedule};

/// AdjointDPM against the exact gradient on one batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdjointReport {
    /// ‖g_adjoint − g_exact‖ / ‖g_exact‖ for the gradient w.r.t. x_T.
    pub gradient_rel_diff: f64,
    /// ‖x̂_T − x_T‖ / ‖x_T‖, with x̂_T the noise the sampler's steps, run backward from the
    /// generated x_0, recover: the reverse-integration error the adjoint carries.
    pub reconstruction_rel_err: f64,
}

fn norm<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    let s: f64 = t.powi_scalar(2).sum().into_scalar().elem();
    s.sqrt()
}

impl Sampler {
    /// Differentiates `loss(x_0)` w.r.t. `x_T` twice — exactly (`Checkpointed`) and with the
    /// continuous adjoint (`Backsolve`, which for DDIM is the paper's AdjointDPM) — and
    /// reconstructs x_T from x_0 by running the steps backward. Costs two differentiated
    /// samplings and one reverse sampling.
    pub fn adjoint_diagnostic<B, C, M, const D: usize>(
        &self,
        model: &M,
        schedule: &NoiseSchedule,
        x_t: Tensor<Autodiff<B, C>, D>,
        loss: impl Fn(Tensor<Autodiff<B, C>, D>) -> Tensor<Autodiff<B, C>, 1>,
        backsolve: BacksolveOptions,
    ) -> Result<AdjointReport, DiffusionError>
    where
        B: Backend,
        C: CheckpointStrategy,
        M: EpsModel<Autodiff<B, C>, D> + AutodiffModule<Autodiff<B, C>> + 'static,
        M::InnerModule: EpsModel<B, D>,
    {
        let x_t = x_t.detach();
        let gradient = |mode: GradientMode| -> Result<Tensor<B, D>, DiffusionError> {
            let leaf = x_t.clone().require_grad();
            let x0 = self.gradient(mode).sample(model, schedule, leaf.clone())?;
            let grads = loss(x0).backward();
            Ok(leaf.grad(&grads).unwrap_or_else(|| leaf.clone().inner().zeros_like()))
        };
        let exact = gradient(GradientMode::Checkpointed(Schedule::All))?;
        let adjoint = gradient(GradientMode::Backsolve(backsolve))?;
        let gradient_rel_diff = norm(adjoint - exact.clone()) / norm(exact).max(f64::MIN_POSITIVE);

        let inner = model.valid();
        let x_t = x_t.inner();
        let x0 = self.sample_inference(&inner, schedule, x_t.clone())?;
        let grid = self.rho_grid(schedule)?;
        let pf_ode = self.pf_ode(inner, schedule)?;
        // The run's solves backward, last first.
        let mut y = x0.div_scalar(NoiseSchedule::alpha_of_rho(grid[grid.len() - 1]));
        for (solver, knots) in self.segments(&grid).into_iter().rev() {
            let reversed: Vec<f64> = knots.iter().rev().copied().collect();
            y = NeuralOde::new(pf_ode.clone())
                .solver(solver)
                .integrate(y, &reversed)?
                .last();
        }
        let x_t_hat = y.mul_scalar(NoiseSchedule::alpha_of_rho(grid[0]));
        let reconstruction_rel_err = norm(x_t_hat - x_t.clone()) / norm(x_t).max(f64::MIN_POSITIVE);
        Ok(AdjointReport {
            gradient_rel_diff,
            reconstruction_rel_err,
        })
    }
}
