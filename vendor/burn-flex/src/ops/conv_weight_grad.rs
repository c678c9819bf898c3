//! adjoint-dpm patch 8: the weight gradient of a convolution as GEMMs over the im2col of its
//! input.
//!
//! burn's default `conv*_weight_backward` swaps the batch and channel dims and convolves: each
//! input channel becomes a sample of one channel, convolved by the output gradient as a kernel
//! as large as the output. For a UNet's 3×3 convolutions that is one narrow GEMM (9 output
//! columns) per input channel, and took 2–4.6 times the forward convolution on this crate's
//! CPU backend. Here, as in the forward pass, the input is laid out channels-last and unfolded
//! (im2col) a chunk of output pixels at a time; the chunk's output gradient rows times its
//! unfolded input accumulate into the kernel's gradient:
//! `dW[o, (k, c)] = Σ_pixels dY[o, pixel] · cols[pixel, (k, c)]`, one GEMM per chunk and group.

use alloc::vec;
use burn_backend::DType;
use burn_backend::ops::ConvOptions;
use burn_std::{Bytes, Shape, f16};

use super::conv::{expand_1d_to_3d, expand_2d_to_3d, im2col_3d_tile, to_nhwc};
use super::conv_common::{convert_bf16_to_f32, convert_f32_to_bf16};
use super::team;
use crate::{FlexTensor, Layout};

/// Elements of the unfolded input held at once (2^20, 4 MiB in f32), but at least
/// [`CHUNK_MIN_ROWS`] pixels: the chunk is the GEMM's inner dimension, and each chunk adds
/// into the whole gradient once.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// Fewest output pixels per chunk.
const CHUNK_MIN_ROWS: usize = 256;

/// The gradient of a 1D convolution's `weight` (only its shape is read), through the 3D code
/// as the forward convolution goes (`conv::expand_1d_to_3d`, for the output gradient too).
pub fn conv1d_weight_backward(
    x: FlexTensor,
    weight: &FlexTensor,
    grad: FlexTensor,
    options: &ConvOptions<1>,
) -> FlexTensor {
    let (x_3d, weight_3d, options_3d) = expand_1d_to_3d(&x, weight, options);
    let (grad_3d, _, _) = expand_1d_to_3d(&grad, weight, options);
    conv3d_weight_backward(x_3d, dims(weight_3d.layout().shape()), grad_3d, &options_3d)
        .reshape(weight.layout().shape().clone())
}

/// The gradient of a 2D convolution's `weight` (only its shape is read), through the 3D code
/// as the forward convolution goes (`conv::expand_2d_to_3d`, for the output gradient too).
pub fn conv2d_weight_backward(
    x: FlexTensor,
    weight: &FlexTensor,
    grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let (x_3d, weight_3d, options_3d) = expand_2d_to_3d(&x, weight, options);
    let (grad_3d, _, _) = expand_2d_to_3d(&grad, weight, options);
    conv3d_weight_backward(x_3d, dims(weight_3d.layout().shape()), grad_3d, &options_3d)
        .reshape(weight.layout().shape().clone())
}

/// The gradient of a 3D convolution's weight `[out, in / groups, kd, kh, kw]`, given its input
/// `x` and the gradient of its output.
pub fn conv3d_weight_backward(
    x: FlexTensor,
    weight_shape: [usize; 5],
    grad: FlexTensor,
    options: &ConvOptions<3>,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => weight_grad(x, weight_shape, grad, options, DType::F32, 0.0f32, 1.0f32),
        DType::F64 => weight_grad(x, weight_shape, grad, options, DType::F64, 0.0f64, 1.0f64),
        DType::F16 => weight_grad(
            x,
            weight_shape,
            grad,
            options,
            DType::F16,
            f16::from_f32(0.0),
            f16::from_f32(1.0),
        ),
        DType::BF16 => convert_f32_to_bf16(&weight_grad(
            convert_bf16_to_f32(&x),
            weight_shape,
            convert_bf16_to_f32(&grad),
            options,
            DType::F32,
            0.0f32,
            1.0f32,
        )),
        dtype => panic!("conv weight backward: unsupported dtype {dtype:?}"),
    }
}

fn dims<const D: usize>(shape: &Shape) -> [usize; D] {
    core::array::from_fn(|i| shape[i])
}

fn weight_grad<T: bytemuck::Pod + burn_backend::Element + Send + Sync>(
    x: FlexTensor,
    weight_shape: [usize; 5],
    grad: FlexTensor,
    options: &ConvOptions<3>,
    dtype: DType,
    zero: T,
    one: T,
) -> FlexTensor {
    let x = x.to_contiguous();
    let grad = grad.to_contiguous();
    let [batch, channels_in, in_d, in_h, in_w] = dims(x.layout().shape());
    let [_, channels_out, out_d, out_h, out_w] = dims(grad.layout().shape());
    let [_, per_group, kernel_d, kernel_h, kernel_w] = weight_shape;
    let groups = options.groups;
    let out_per_group = channels_out / groups;
    let k_spatial = kernel_d * kernel_h * kernel_w;
    let col_len = per_group * k_spatial;
    let spatial_out = out_d * out_h * out_w;

    let x_nhwc = to_nhwc(x.storage::<T>(), batch, channels_in, in_d * in_h * in_w, zero);
    let nhwc_stride = (
        in_d * in_h * in_w * channels_in,
        in_h * in_w * channels_in,
        in_w * channels_in,
        channels_in,
        1,
    );
    let dy: &[T] = grad.storage();

    let rows = (CHUNK_ELEMENTS / col_len.max(1)).max(CHUNK_MIN_ROWS).min(spatial_out.max(1));
    let mut cols = vec![zero; rows * col_len];
    // dW with each kernel row ordered as the unfolded input's columns: [out, (k, c)].
    let mut dw = vec![zero; channels_out * col_len];
    let parts = team::threads();
    for b in 0..batch {
        for start in (0..spatial_out).step_by(rows) {
            let end = (start + rows).min(spatial_out);
            let pixels = end - start;
            for g in 0..groups {
                // Unfold the chunk, its pixels split among the team. Padding is left as zeros,
                // so each part clears its rows first (the buffer holds the previous chunk).
                let cols_addr = cols.as_mut_ptr() as usize;
                let unfold_parts = match pixels * col_len >= team::ELEMENTWISE_MIN {
                    true => parts.min(pixels),
                    false => 1,
                };
                let unfold = |p: usize| {
                    let r = team::block(pixels, unfold_parts, 1, p);
                    // SAFETY: the parts' row ranges are disjoint and inside `cols`, which
                    // outlives the job.
                    let part = unsafe {
                        core::slice::from_raw_parts_mut(
                            (cols_addr as *mut T).add(r.start * col_len),
                            r.len() * col_len,
                        )
                    };
                    part.fill(zero);
                    im2col_3d_tile(
                        part,
                        &x_nhwc,
                        start + r.start,
                        start + r.end,
                        out_h,
                        out_w,
                        kernel_d,
                        kernel_h,
                        kernel_w,
                        options.stride[0],
                        options.stride[1],
                        options.stride[2],
                        options.dilation[0],
                        options.dilation[1],
                        options.dilation[2],
                        options.padding[0],
                        options.padding[1],
                        options.padding[2],
                        in_d,
                        in_h,
                        in_w,
                        per_group,
                        col_len,
                        b,
                        g * per_group,
                        nhwc_stride,
                    );
                };
                team::run(unfold_parts, &unfold);

                // dW[group rows] += dY[b, group rows, chunk] · cols, split along the longer
                // side of dW's block (each part owns its rows or columns: the same sums in the
                // same order as one thread).
                let dw_addr = dw[g * out_per_group * col_len..].as_mut_ptr() as usize;
                let dy_block = &dy[(b * channels_out + g * out_per_group) * spatial_out + start..];
                let by_columns = col_len >= out_per_group;
                let len = if by_columns { col_len } else { out_per_group };
                let gemm_parts = match out_per_group * col_len * pixels >= team::SPLIT_MIN_WORK {
                    true => parts.min(len),
                    false => 1,
                };
                let gemm_part = |p: usize| {
                    let r = team::block(len, gemm_parts, if by_columns { 16 } else { 1 }, p);
                    let (m, n, row, col) = if by_columns {
                        (out_per_group, r.len(), 0, r.start)
                    } else {
                        (r.len(), col_len, r.start, 0)
                    };
                    if m == 0 || n == 0 {
                        return;
                    }
                    // SAFETY: dW's part (rows `row..row + m`, columns `col..col + n` of this
                    // group's block) is written by this part alone; the reads stay inside
                    // `dy` (rows of `spatial_out` from the chunk's first pixel) and `cols`.
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            pixels,
                            (dw_addr as *mut T).add(row * col_len + col),
                            1,
                            col_len as isize,
                            true,
                            dy_block.as_ptr().add(row * spatial_out),
                            1,
                            spatial_out as isize,
                            (cols_addr as *const T).add(col),
                            1,
                            col_len as isize,
                            one,
                            one,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                };
                team::run(gemm_parts, &gemm_part);
            }
        }
    }

    // [out, (k, c)] → [out, c, k], the weight's layout.
    let mut out = vec![zero; channels_out * col_len];
    for o in 0..channels_out {
        let src = &dw[o * col_len..(o + 1) * col_len];
        let dst = &mut out[o * col_len..(o + 1) * col_len];
        for k in 0..k_spatial {
            for c in 0..per_group {
                dst[c * k_spatial + k] = src[k * per_group + c];
            }
        }
    }
    FlexTensor::new(
        Bytes::from_elems(out),
        Layout::contiguous(Shape::from(weight_shape.to_vec())),
        dtype,
    )
}
