//! The vector field of a neural ODE.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

/// dz/dt = f(t, z; θ), where θ are the module's parameters.
///
/// Any burn [`Module`] can be the dynamics: its trainable parameters receive gradients from every
/// [`GradientMode`](crate::ode::GradientMode), frozen ones (`require_grad = false`) receive none
/// and cost no parameter work. `D` is the rank of the state, batch dimension included.
///
/// Implement it generically over the backend, so that the engine can also run it on the inner
/// (non-autodiff) backend, which is where the adjoint modes solve:
///
/// ```
/// use adjoint_dpm::ode::Dynamics;
/// use burn::prelude::*;
///
/// /// dz/dt = -k z, with a trainable rate k.
/// #[derive(Module, Debug)]
/// struct Decay<B: Backend> {
///     k: burn::module::Param<Tensor<B, 1>>,
/// }
///
/// impl<B: Backend> Dynamics<B, 2> for Decay<B> {
///     fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
///         z * self.k.val().unsqueeze::<2>().neg()
///     }
/// }
/// ```
pub trait Dynamics<B: Backend, const D: usize>: Module<B> {
    /// The time derivative of `z` at time `t`.
    ///
    /// # Shapes
    /// - `t`: `[1]`; it carries a gradient when the solve's times are differentiated.
    /// - `z`: any shape; the output must have the same shape.
    fn f(&self, t: Tensor<B, 1>, z: Tensor<B, D>) -> Tensor<B, D>;
}

/// The user's dynamics seen by the solver: checks that f keeps the state's shape.
pub(crate) struct DynamicsField<'a, M, const D: usize> {
    pub module: &'a M,
}

impl<B: Backend, M: Dynamics<B, D>, const D: usize> crate::ode::state::VectorField<B> for DynamicsField<'_, M, D> {
    type State = Tensor<B, D>;

    fn eval(&self, t: &crate::ode::state::Time<B>, z: &Tensor<B, D>) -> crate::error::Result<Tensor<B, D>> {
        let out = self.module.f(t.to_tensor(z), z.clone());
        check_same_shape(z, &out)?;
        Ok(out)
    }
}

/// `Error::ShapeMismatch` unless `out` is shaped like `z`.
pub(crate) fn check_same_shape<B: Backend, const D: usize>(
    z: &Tensor<B, D>,
    out: &Tensor<B, D>,
) -> crate::error::Result<()> {
    if out.dims() != z.dims() {
        return Err(crate::error::Error::ShapeMismatch {
            expected: z.dims().to_vec(),
            got: out.dims().to_vec(),
        });
    }
    Ok(())
}
