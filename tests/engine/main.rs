//! Engine tests: one binary (burn links slowly), one module per property family.

mod common;
mod exactness;
mod p1;
