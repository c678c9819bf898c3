#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

//! # Burn Autodiff
//!
//! This autodiff library is a part of the Burn project. It is a standalone crate
//! that can be used to perform automatic differentiation on tensors. It is
//! designed to be used with the Burn Tensor crate, but it can be used with any
//! tensor library that implements the `Backend` trait.

#[macro_use]
extern crate derive_new;

extern crate alloc;

/// Checkpoint module.
pub mod checkpoint;
#[cfg(feature = "distributed")]
/// Distributed utils.
pub mod distributed;
/// Gradients module.
pub mod grads;
/// Operation module.
pub mod ops;

pub(crate) mod graph;
// Exported for backend extension
pub use graph::NodeId;

/// adjoint-dpm: how many of adjoint-dpm's patches this copy carries (see `vendor/README.md` in
/// that repository). adjoint-dpm refuses to compile against a burn-autodiff without it, which is
/// what a crate that depends on adjoint-dpm gets unless it repeats the `[patch.crates-io]` entry.
#[doc(hidden)]
pub const ADJOINT_DPM_PATCHES: u32 = 6;
pub(crate) mod tensor;
pub(crate) mod utils;

mod backend;

pub(crate) mod runtime;

pub use backend::*;

/// A facade around for HashMap and HashSet.
/// This avoids elaborate import wrangling having to happen in every module.
// adjoint-dpm (patch 6): hashbrown's foldhash with `std` too, not std's SipHash; the keys are
// node ids this crate counts out, so no input chooses them.
mod collections {
    pub use hashbrown::{HashMap, HashSet};
}
