//! Memory layout of intermediate tensors.

use burn::prelude::*;

/// `x` with its elements stored in row-major order: a view when they already are, one copy when
/// `x` is a permuted or sliced view (`swap_dims`, `chunk`).
///
/// Why: burn-flex runs an elementwise op on a non-contiguous operand one element at a time
/// through a strided index walk, several times slower than its SIMD path. A transformer block
/// that receives its tokens as a `swap_dims` view of the feature map, or GEGLU's two `chunk`
/// halves, would pay that on every residual add, layer norm and product. burn 0.21 has no
/// public "make contiguous", but a reshape that cannot be a view copies.
pub(crate) fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    x.reshape([dims.iter().product::<usize>()]).reshape(dims)
}
