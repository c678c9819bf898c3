//! The engine: neural ODEs on burn, and three ways to differentiate them.
//!
//! Knows nothing of diffusion. [`Dynamics`] is the vector field (any burn module), [`Solver`]
//! an explicit Runge–Kutta method from a [`ButcherTableau`] with fixed or adaptive steps,
//! [`GradientMode`] how the solve is differentiated, [`NeuralOde`] puts them together.

mod adjoint;
mod checkpoint;
mod controller;
mod dynamics;
mod event;
mod gradient;
mod grid;
pub mod mlp;
mod neural_ode;
mod op;
mod params;
mod problem;
mod solver;
mod state;
pub mod tableau;

pub use dynamics::Dynamics;
pub use event::{Crossing, EventHit};
pub use gradient::{BacksolveOptions, GradientMode, Schedule};
pub use grid::TimeGrid;
pub use neural_ode::{NeuralOde, Solution};
pub use params::{materialized, train_only};
pub use solver::{Solver, Stats, StepControl, Tolerances};
pub use tableau::ButcherTableau;
