//! The embedded default: a procedurally generated labelled image set, and the tiny class-
//! conditional diffusion model and classifier the crate trains on it and ships.
