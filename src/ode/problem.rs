//! What the backward pass of a solve needs, held on the inner backend, and what it returns.

use burn::tensor::{backend::Backend, Tensor};

use crate::ode::grid::TimeGrid;
use crate::ode::solver::Solver;

/// Which inputs of a solve want a gradient (only tracked inputs are differentiated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wants {
    pub z0: bool,
    pub theta: bool,
    pub times: bool,
}

/// A solve as its backward pass sees it.
#[derive(Debug, Clone)]
pub(crate) struct Problem<B: Backend, I, const D: usize> {
    /// The dynamics on the inner backend, parameters as they were at the forward pass.
    pub inner: I,
    /// Which float parameters of the dynamics are trainable (visiting order).
    pub trainable: Vec<bool>,
    pub solver: Solver,
    pub grid: TimeGrid,
    /// The jump times inside the grid's span.
    pub jumps: Vec<f64>,
    /// The grid as a tensor (the leaf of time gradients).
    pub times: Tensor<B, 1>,
    pub want: Wants,
}

/// Gradients of the solve's inputs.
#[derive(Debug, Clone)]
pub(crate) struct Cotangents<B: Backend, const D: usize> {
    pub z0: Tensor<B, D>,
    /// One flat tensor per trainable parameter (empty when θ is not wanted).
    pub theta: Vec<Tensor<B, 1>>,
    /// dL/dT for every grid time, when wanted.
    pub times: Option<Tensor<B, 1>>,
}

impl<B: Backend, const D: usize> Cotangents<B, D> {
    /// All zero, shaped for `problem`; `like` gives the state's shape and device.
    pub(crate) fn zeros<I>(problem: &Problem<B, I, D>, like: &Tensor<B, D>) -> Self {
        Self {
            z0: like.zeros_like(),
            theta: Vec::new(),
            times: problem.want.times.then(|| problem.times.zeros_like()),
        }
    }

    /// Adds one step's parameter gradients.
    pub(crate) fn add_theta(&mut self, grads: Vec<Tensor<B, 1>>) {
        if self.theta.is_empty() {
            self.theta = grads;
        } else {
            for (acc, g) in self.theta.iter_mut().zip(grads) {
                *acc = acc.clone() + g;
            }
        }
    }
}
