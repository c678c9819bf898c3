//! Small hand-written dynamics for the solver and error tests.

use adjoint_dpm::prelude::*;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

/// What [`Toy`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// dz/dt = z·Aᵀ, A = [[-0.1, 1], [-1, -0.1]]: a decaying rotation with a closed form.
    Spiral,
    /// dz/dt = -k z.
    Decay,
    /// Returns one row fewer than it is given.
    WrongShape,
    /// dz/dt = z², which blows up at t = 1/z0.
    Blowup,
}

#[derive(Module, Debug)]
pub struct Toy<B: Backend> {
    pub k: Param<Tensor<B, 1>>,
    pub kind: u8,
}

impl<B: Backend> Toy<B> {
    pub fn new(kind: Kind, device: &B::Device) -> Self {
        let kind = match kind {
            Kind::Spiral => 0,
            Kind::Decay => 1,
            Kind::WrongShape => 2,
            Kind::Blowup => 3,
        };
        Self {
            k: Param::from_tensor(Tensor::from_data(TensorData::from([1.0f64]), device)),
            kind,
        }
    }
}

impl<B: Backend> Dynamics<B, 2> for Toy<B> {
    fn f(&self, _t: Tensor<B, 1>, z: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.kind {
            0 => {
                let a = Tensor::<B, 2>::from_data(TensorData::from([[-0.1f64, -1.0], [1.0, -0.1]]), &z.device());
                z.matmul(a)
            }
            1 => z * self.k.val().unsqueeze::<2>().neg(),
            2 => z.clone().narrow(0, 0, z.dims()[0] - 1),
            _ => z.powi_scalar(2),
        }
    }
}

/// The exact solution of [`Kind::Spiral`] from `z0` at time `t`.
pub fn spiral_exact(z0: [f64; 2], t: f64) -> [f64; 2] {
    let (c, s, d) = (t.cos(), t.sin(), (-0.1 * t).exp());
    [d * (c * z0[0] + s * z0[1]), d * (-s * z0[0] + c * z0[1])]
}

/// The exact solution of [`Kind::Blowup`] (dz/dt = z², elementwise) from `z0` at time `t`.
pub fn blowup_exact(z0: [f64; 2], t: f64) -> [f64; 2] {
    z0.map(|z| z / (1.0 - z * t))
}
