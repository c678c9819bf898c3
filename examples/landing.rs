//! Differentiating through a terminal event: find the launch speed at which a projectile with
//! air drag lands 10 m away.
//!
//! The flight is solved until the height crosses zero (`NeuralOde::solve_until`); the landing
//! time and state carry gradients, so Newton's method on the launch speed gets `dx*/ds` from one
//! `backward()` per iteration.
//!
//! ```text
//! cargo run --release --example landing
//! ```

use adjoint_dpm::prelude::*;
use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;

type B = Autodiff<NdArray<f64>>;

const GRAVITY: f64 = 9.81;
/// Quadratic drag per unit mass (1/m).
const DRAG: f64 = 0.05;
const TARGET: f64 = 10.0;

/// z = [x, y, vx, vy]: gravity and drag −c|v|v.
#[derive(Module, Clone, Debug)]
struct Flight {}

impl<Bk: Backend> Dynamics<Bk, 2> for Flight {
    fn f(&self, _t: Tensor<Bk, 1>, z: Tensor<Bk, 2>) -> Tensor<Bk, 2> {
        let v = z.narrow(1, 2, 2);
        let speed = v.clone().powi_scalar(2).sum_dim(1).sqrt();
        let drag = v.clone() * speed.mul_scalar(-DRAG);
        let gravity = Tensor::<Bk, 2>::from_data([[0.0, -GRAVITY]], (&v.device(), v.dtype()));
        Tensor::cat(vec![v, drag + gravity], 1)
    }
}

fn main() -> adjoint_dpm::Result<()> {
    let device = Default::default();
    let ode = NeuralOde::new(Flight {})
        .solver(Solver::tsit5(1e-9, 1e-9))
        .gradient(GradientMode::Checkpointed(Schedule::All));
    // Launched at 45° from 1 m up.
    let direction = Tensor::<B, 2>::from_data([[0.0, 0.0, 0.5f64.sqrt(), 0.5f64.sqrt()]], &device);
    let offset = Tensor::<B, 2>::from_data([[0.0, 1.0, 0.0, 0.0]], &device);
    let mut speed = 5.0;
    for iteration in 0..8 {
        let s = Tensor::<B, 1>::from_data([speed], &device).require_grad();
        let z0 = offset.clone() + direction.clone() * s.clone().unsqueeze::<2>();
        let ground = |_t, z: Tensor<B, 2>| z.narrow(1, 1, 1).reshape([1]);
        let Some(hit) = ode.solve_until(z0, 0.0, 60.0, ground)? else {
            println!("no landing within 60 s at {speed} m/s");
            return Ok(());
        };
        let t_star: f64 = hit.time.clone().into_scalar();
        let x = hit.state.clone().narrow(1, 0, 1).reshape([1]);
        let range: f64 = x.clone().into_scalar();
        let grads = x.backward();
        let slope: f64 = s.grad(&grads).expect("the range depends on the speed").into_scalar();
        println!(
            "iter {iteration}: speed {speed:.6} m/s -> lands at t* = {t_star:.4} s, x* = {range:.6} m, dx*/ds = {slope:.4} s"
        );
        if (range - TARGET).abs() < 1e-9 {
            println!("launch at {speed:.6} m/s to land {TARGET} m away");
            return Ok(());
        }
        speed -= (range - TARGET) / slope;
    }
    println!("did not converge; last speed {speed}");
    Ok(())
}
