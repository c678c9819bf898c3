// adjoint-dpm: 0.21.0 leaves its tuners unused without autotune; cargo shows a path dependency's
// warnings (never a registry crate's), so every `cuda-untuned` build would list them.
#![cfg_attr(not(feature = "autotune"), allow(unused))]

#[macro_use]
extern crate derive_new;

pub mod optim;

mod base;

pub(crate) mod engine;
pub(crate) mod tune;

pub use base::*;
