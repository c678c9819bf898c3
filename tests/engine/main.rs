//! Engine tests: one binary (burn links slowly), one module per property family.

mod common;
mod dense;
mod errors;
mod events;
mod exactness;
mod fields;
mod jumps;
mod p1;
mod patches;
mod solvers;
mod threads;
mod training;
