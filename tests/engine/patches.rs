//! The vendored burn crates' numerical patches (vendor/README.md), checked where the engine
//! depends on them: f64 gradients must be exact to rounding, and burn-flex's vectorised f32
//! functions as accurate as libm's, to an ulp or two.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{to_vec, Ad};

#[test]
fn div_scalar_gradients_are_exact_in_f64() {
    // d(x / 3)/dx = 1/3; 0.21.0 returned 1 / (3 as f32), 1.5e-8 off in relative terms. The
    // event time's implicit-function term divides by ġ this way.
    let device = Default::default();
    for divisor in [3.0, 0.1, -7.3, 1e-5] {
        let x = Tensor::<Ad, 1>::from_data(TensorData::from([1.5f64, -2.0]), &device).require_grad();
        let grads = x.clone().div_scalar(divisor).sum().backward();
        for g in to_vec(x.grad(&grads).unwrap()) {
            let want = 1.0 / divisor;
            assert!(
                (g - want).abs() <= 2.0 * f64::EPSILON * want.abs(),
                "÷{divisor}: {g} vs {want}"
            );
        }
    }
}

/// Distance in units in the last place between two finite f32 of the same sign (or zeros).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let bits = x.to_bits() as i64;
        if bits < 0 {
            i64::from(i32::MIN) - bits
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

#[test]
fn flex_f32_exp_tanh_sigmoid_are_accurate() {
    // The vendored burn-flex computes these with branch-free polynomials that vectorise
    // (vendor/README.md); compare with f64 libm, rounded, over a sweep of every f32 magnitude.
    type F = burn::backend::Flex;
    let device = Default::default();
    let mut xs: Vec<f32> = (0..u32::MAX / 997)
        .map(|i| f32::from_bits(i * 997))
        .filter(|x| x.is_finite())
        .collect();
    xs.extend([0.0, -0.0, 0.5, -0.5, 88.72, 88.73, -87.3, -103.9, -104.0, 1e-30, -1e-30]);
    let n = xs.len();
    let input = Tensor::<F, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
    let values = |t: Tensor<F, 1>| t.into_data().to_vec::<f32>().unwrap();
    type Case = (&'static str, Vec<f32>, fn(f64) -> f64);
    let cases: [Case; 3] = [
        ("exp", values(input.clone().exp()), f64::exp),
        ("tanh", values(input.clone().tanh()), f64::tanh),
        ("sigmoid", values(burn::tensor::activation::sigmoid(input)), |x| {
            1.0 / (1.0 + (-x).exp())
        }),
    ];
    for (name, got, reference) in cases {
        let mut worst = (0, 0.0f32);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = reference(f64::from(x)) as f32;
            assert!(y.is_finite() == want.is_finite(), "{name}({x}) = {y}, want {want}");
            let d = if want.is_finite() {
                ulps(y, want)
            } else {
                u32::from(y != want)
            };
            if d > worst.0 {
                worst = (d, x);
            }
        }
        // Measured: 1, 2, 2 (libm's own expf: ≤ 1).
        let bound = if name == "exp" { 1 } else { 2 };
        assert!(worst.0 <= bound, "{name}: {} ulp at x = {:e}", worst.0, worst.1);
    }
    // NaN stays NaN; the infinities give the limits.
    let special = Tensor::<F, 1>::from_data(
        TensorData::new(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY], [3]),
        &device,
    );
    let exp = values(special.clone().exp());
    let tanh = values(special.clone().tanh());
    let sigmoid = values(burn::tensor::activation::sigmoid(special));
    for (name, got, want) in [
        ("exp", exp, [f32::INFINITY, 0.0]),
        ("tanh", tanh, [1.0, -1.0]),
        ("sigmoid", sigmoid, [1.0, 0.0]),
    ] {
        assert!(got[0].is_nan(), "{name}(NaN) = {}", got[0]);
        assert_eq!(got[1..], want, "{name}(±∞)");
    }
}

/// Deterministic values in (−1, 1) for the team tests (no RNG state shared with other tests).
fn wiggle(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed) * 12.9898).sin())
        .collect()
}

#[test]
fn flex_team_splits_give_the_serial_results() {
    // The vendored burn-flex splits long elementwise ops and large GEMMs across helper threads
    // (patch 2 in vendor/README.md). On a machine with one core there is no team and this test
    // checks the serial path only; CI has two.
    let expected_threads = match std::env::var("ADJOINT_DPM_THREADS") {
        Ok(v) => v.trim().parse::<usize>().unwrap_or(1).max(1),
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
    };
    assert_eq!(burn_flex::ops::team::threads(), expected_threads);
    check_team_ops();
    // Threads that ask at once: one gets the team, the others run alone; all get the same
    // results.
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(check_team_ops);
        }
    });
}

fn check_team_ops() {
    type F = burn::backend::Flex;
    let device = Default::default();
    let vec = |t: Tensor<F, 2>| t.into_data().to_vec::<f32>().unwrap();

    // GEMMs split by rows (m ≥ n) and by columns (m < n), odd sizes, and a transposed
    // (strided) operand, against an f64 product.
    for (m, k, n, transposed) in [
        (300, 70, 260, false),
        (40, 300, 500, false),
        (257, 64, 64, true),
        (33, 129, 1001, true),
    ] {
        let a_data = wiggle(m * k, 0.1);
        let b_data = wiggle(k * n, 0.7);
        let a = if transposed {
            // The same [m, k] matrix, stored as the transpose of a [k, m] one.
            let at: Vec<f32> = (0..k * m).map(|j| a_data[(j % m) * k + j / m]).collect();
            Tensor::<F, 2>::from_data(TensorData::new(at, [k, m]), &device).transpose()
        } else {
            Tensor::<F, 2>::from_data(TensorData::new(a_data.clone(), [m, k]), &device)
        };
        let b = Tensor::<F, 2>::from_data(TensorData::new(b_data.clone(), [k, n]), &device);
        let got = vec(a.matmul(b));
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut scale) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let p = f64::from(a_data[i * k + l]) * f64::from(b_data[l * n + j]);
                    want += p;
                    scale += p.abs();
                }
                let err = (f64::from(got[i * n + j]) - want).abs();
                assert!(
                    err <= 1e-6 * scale + 1e-30,
                    "{m}×{k}×{n} (transposed: {transposed}) at ({i}, {j}): {} vs {want}",
                    got[i * n + j]
                );
            }
        }
    }

    // Elementwise ops on a long tensor equal the same ops on short pieces, which no team
    // touches, to the bit; in place (a tensor used once) and into a new buffer (shared).
    let len = 100_003;
    let (a, b) = (wiggle(len, 0.3), wiggle(len, 0.9));
    let tensor = |v: &[f32]| Tensor::<F, 2>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device);
    type Op = fn(Tensor<F, 2>, Tensor<F, 2>) -> Tensor<F, 2>;
    let ops: [(&str, Op); 6] = [
        ("add", |x, y| x + y),
        ("mul", |x, y| x * y),
        ("exp", |x, _| x.exp()),
        ("tanh", |x, _| x.tanh()),
        ("sigmoid", |x, _| burn::tensor::activation::sigmoid(x)),
        ("mul_scalar", |x, _| x.mul_scalar(1.7)),
    ];
    for (name, op) in ops {
        let pieces: Vec<f32> = (0..len)
            .step_by(1000)
            .flat_map(|s| {
                let e = (s + 1000).min(len);
                vec(op(tensor(&a[s..e]), tensor(&b[s..e])))
            })
            .collect();
        let in_place = vec(op(tensor(&a), tensor(&b)));
        let shared_a = tensor(&a);
        let shared_b = tensor(&b);
        let allocating = vec(op(shared_a.clone(), shared_b.clone()));
        drop((shared_a, shared_b));
        for (i, want) in pieces.iter().enumerate() {
            assert_eq!(in_place[i].to_bits(), want.to_bits(), "{name} in place at {i}");
            assert_eq!(allocating[i].to_bits(), want.to_bits(), "{name} allocating at {i}");
        }
        // One element at a time: scalar code, where the loops above run 8-lane AVX2 (patch 4)
        // or 4-lane SSE2; equal to the bit, since no operation is fused or reordered.
        for i in 0..64 {
            let one = vec(op(tensor(&a[i..i + 1]), tensor(&b[i..i + 1])))[0];
            assert_eq!(one.to_bits(), pieces[i].to_bits(), "{name} of one element at {i}");
        }
    }
}

#[test]
fn flex_convolutions_split_by_sample_give_the_serial_results() {
    // Patch 5: convolutions and transposed convolutions (a convolution's data gradient) share
    // their samples and pixel tiles among the team's threads, and a transposed convolution's
    // col2im computes each row's valid range instead of testing every pixel. Against the f64
    // NdArray backend, and bitwise against each sample alone (which the team splits by tiles
    // or not at all), over strides, paddings and dilations.
    use burn::tensor::module::{conv2d, conv_transpose2d};
    use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
    type F = burn::backend::Flex;
    type R = crate::common::F64;
    let (batch, c_in, c_out, h, w) = (3, 16, 8, 20, 19);
    let device = Default::default();
    let flex =
        |data: &[f32], shape: [usize; 4]| Tensor::<F, 4>::from_data(TensorData::new(data.to_vec(), shape), &device);
    let reference = |data: &[f32], shape: [usize; 4]| {
        let data: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
        Tensor::<R, 4>::from_data(TensorData::new(data, shape), &Default::default())
    };
    let x = wiggle(batch * c_in * h * w, 0.2);
    let w_conv = wiggle(c_out * c_in * 9, 0.4);
    let w_tr = wiggle(c_in * c_out * 9, 0.6);
    let values = |t: Tensor<F, 4>| t.into_data().to_vec::<f32>().unwrap();
    let values64 = |t: Tensor<R, 4>| t.into_data().to_vec::<f64>().unwrap();
    let close = |got: &[f32], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}: sizes");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(g) - r).abs() <= 1e-5 * scale, "{what} at {i}: {g} vs {r}");
        }
    };
    let per_sample = |f: &dyn Fn(Tensor<F, 4>) -> Tensor<F, 4>| -> Vec<f32> {
        let x = flex(&x, [batch, c_in, h, w]);
        (0..batch).flat_map(|b| values(f(x.clone().narrow(0, b, 1)))).collect()
    };
    let check = |what: String, f: &dyn Fn(Tensor<F, 4>) -> Tensor<F, 4>, want: Tensor<R, 4>| {
        let got = values(f(flex(&x, [batch, c_in, h, w])));
        close(&got, &values64(want), &what);
        assert_eq!(got, per_sample(f), "{what}, by sample");
    };
    let x64 = reference(&x, [batch, c_in, h, w]);
    for (stride, padding, dilation) in [(1, 1, 1), (2, 1, 1), (1, 0, 2), (2, 2, 1), (3, 1, 2)] {
        let what = format!("stride {stride}, padding {padding}, dilation {dilation}");
        let conv_options = ConvOptions::new([stride; 2], [padding; 2], [dilation; 2], 1);
        let conv_f = |x: Tensor<F, 4>| conv2d(x, flex(&w_conv, [c_out, c_in, 3, 3]), None, conv_options.clone());
        let w64 = reference(&w_conv, [c_out, c_in, 3, 3]);
        let want = conv2d(x64.clone(), w64, None, conv_options.clone());
        check(format!("conv2d, {what}"), &conv_f, want);

        let tr_options = ConvTransposeOptions::new([stride; 2], [padding; 2], [0; 2], [dilation; 2], 1);
        let tr_f = |x: Tensor<F, 4>| conv_transpose2d(x, flex(&w_tr, [c_in, c_out, 3, 3]), None, tr_options.clone());
        let w64 = reference(&w_tr, [c_in, c_out, 3, 3]);
        let want = conv_transpose2d(x64.clone(), w64, None, tr_options.clone());
        check(format!("conv_transpose2d, {what}"), &tr_f, want);
    }
}

#[test]
fn flex_nd_copies_hold_the_views_values() {
    // Patch 6: a view of rank 3 or more that does not collapse to 2D is copied one 2D block per
    // index of its outer dims. Permuted, sliced and flipped (the untouched fallback) views of a
    // 5D tensor, made contiguous by `reshape`, against the same views on NdArray.
    type F = burn::backend::Flex;
    type R = crate::common::F64;
    let shape = [2, 3, 4, 5, 6];
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let flex = Tensor::<F, 5>::from_data(TensorData::new(values.clone(), shape), &Default::default());
    let values64: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    let reference = Tensor::<R, 5>::from_data(TensorData::new(values64, shape), &Default::default());
    type View<B> = fn(Tensor<B, 5>) -> Tensor<B, 5>;
    fn views<B: Backend>() -> Vec<(&'static str, View<B>)> {
        vec![
            ("attention heads merged", |t| t.swap_dims(2, 3)),
            ("permuted", |t| t.permute([4, 0, 3, 1, 2])),
            ("permuted and sliced", |t| {
                t.permute([1, 4, 2, 0, 3]).narrow(1, 1, 4).narrow(3, 1, 1)
            }),
            ("sliced inner dims", |t| t.narrow(4, 2, 3).narrow(2, 1, 2)),
            ("flipped", |t| t.swap_dims(1, 3).flip([2])),
        ]
    }
    for ((what, view), (_, view64)) in views::<F>().into_iter().zip(views::<R>()) {
        let got = view(flex.clone());
        let want = view64(reference.clone());
        assert_eq!(got.dims(), want.dims(), "{what}");
        let len: usize = got.dims().iter().product();
        let got = got.reshape([len]).into_data().to_vec::<f32>().unwrap();
        let want = want.reshape([len]).into_data().to_vec::<f64>().unwrap();
        let got: Vec<f64> = got.into_iter().map(f64::from).collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn flex_attention_split_by_rows_matches_the_composed_softmax() {
    // Patch 7: attention's (batch, head, block of query rows) items are shared among the team,
    // and scores that are only scaled take vectorised max and sum loops. Against NdArray's
    // attention in f64 (matmul, softmax, matmul) on the naive path (small score matrices) and
    // the flash path (large ones), plain, softcapped and with the causal mask, a bool mask and
    // a bias (whose rows must follow the block); and bitwise against each head alone, which the team
    // splits differently.
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Bool;
    type F = burn::backend::Flex;
    type R = crate::common::F64;
    let device = Default::default();
    let flex = |v: &[f32], s: [usize; 4]| Tensor::<F, 4>::from_data(TensorData::new(v.to_vec(), s), &device);
    let reference = |v: &[f32], s: [usize; 4]| {
        let v: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        Tensor::<R, 4>::from_data(TensorData::new(v, s), &Default::default())
    };
    // (batch, heads, seq_q, seq_kv, head_dim): naive (≤ 256K scores a head) and flash, rows
    // and keys not multiples of the lanes or the blocks.
    for (batch, heads, n, m, d) in [(2, 3, 37, 45, 8), (1, 2, 301, 77, 16), (1, 1, 700, 513, 12)] {
        let q = wiggle(batch * heads * n * d, 0.1);
        let k = wiggle(batch * heads * m * d, 0.3);
        let v = wiggle(batch * heads * m * d, 0.5);
        let noise = wiggle(batch * heads * n * m, 0.7);
        let bias: Vec<f32> = noise.iter().map(|x| 2.0 * x).collect();
        let mask: Vec<bool> = noise.iter().map(|&x| x > 0.6).collect();
        let (qs, ks, os) = ([batch, heads, n, d], [batch, heads, m, d], [batch, heads, n, m]);
        for (what, causal, masked, biased, softcap) in [
            ("plain", false, false, false, None),
            ("causal", true, false, false, None),
            ("masked and biased", false, true, true, None),
            ("softcapped", false, false, false, Some(0.5)),
        ] {
            let options = AttentionModuleOptions {
                is_causal: causal,
                softcap,
                ..Default::default()
            };
            let flex_mask = masked.then(|| Tensor::<F, 4, Bool>::from_data(TensorData::new(mask.clone(), os), &device));
            let ref_mask =
                masked.then(|| Tensor::<R, 4, Bool>::from_data(TensorData::new(mask.clone(), os), &Default::default()));
            let run = |q: &[f32],
                       k: &[f32],
                       v: &[f32],
                       b: &[f32],
                       mask: Option<Tensor<F, 4, Bool>>,
                       shape: [usize; 4],
                       kv: [usize; 4]| {
                let mask_bias_shape = [shape[0], shape[1], shape[2], kv[2]];
                let bias = biased.then(|| flex(b, mask_bias_shape));
                attention(flex(q, shape), flex(k, kv), flex(v, kv), mask, bias, options)
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
            };
            let got = run(&q, &k, &v, &bias, flex_mask.clone(), qs, ks);
            let want = attention(
                reference(&q, qs),
                reference(&k, ks),
                reference(&v, ks),
                ref_mask,
                biased.then(|| reference(&bias, os)),
                options,
            )
            .into_data()
            .to_vec::<f64>()
            .unwrap();
            let case = format!("{what}, [{batch}, {heads}, {n}, {m}, {d}]");
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (f64::from(g) - w).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "{case}: off by {worst:e}");
            // Each head alone, bitwise.
            let mut alone = Vec::new();
            for bh in 0..batch * heads {
                let head = |x: &[f32], len: usize| x[bh * len..(bh + 1) * len].to_vec();
                let mask = flex_mask.as_ref().map(|mk| {
                    let (b, h) = (bh / heads, bh % heads);
                    mk.clone().narrow(0, b, 1).narrow(1, h, 1)
                });
                alone.extend(run(
                    &head(&q, n * d),
                    &head(&k, m * d),
                    &head(&v, m * d),
                    &head(&bias, n * m),
                    mask,
                    [1, 1, n, d],
                    [1, 1, m, d],
                ));
            }
            assert_eq!(got, alone, "{case}: by head");
        }
    }
}

/// dL/dW for L = Σ g ⊙ conv(x, W), g fixed (`wiggle`), on the autodiff backend `B`.
fn conv_weight_grad<B: burn::tensor::backend::AutodiffBackend, const D: usize>(
    x: &[f32],
    x_shape: [usize; D],
    w: &[f32],
    w_shape: [usize; D],
    conv: &dyn Fn(Tensor<B, D>, Tensor<B, D>) -> Tensor<B, D>,
) -> Vec<f64> {
    let device = Default::default();
    let tensor = |data: &[f32], shape: [usize; D]| {
        Tensor::<B, D>::from_data(TensorData::new(data.to_vec(), shape).convert::<B::FloatElem>(), &device)
    };
    let w = tensor(w, w_shape).require_grad();
    let y = conv(tensor(x, x_shape), w.clone());
    let y_shape: [usize; D] = y.dims();
    let g = tensor(&wiggle(y_shape.iter().product(), 0.8), y_shape);
    let grads = (y * g).sum().backward();
    let dw = w.grad(&grads).expect("W is tracked");
    dw.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

#[test]
fn flex_convolution_weight_gradients_match_f64() {
    // Patch 8: a convolution's weight gradient is one GEMM per chunk of output pixels and group,
    // over the input unfolded channels-last, split among the team by the gradient's columns (or
    // rows, when there are more output channels than unfolded columns); chunks reuse one buffer
    // whose padding must read as zeros. Against burn's own weight gradient on f64 NdArray, in
    // 1D (also grouped), 2D (strides, paddings, dilations, groups, either split, two chunks)
    // and 3D.
    use burn::tensor::module::{conv1d, conv2d, conv3d};
    use burn::tensor::ops::ConvOptions;
    type F = burn::backend::Autodiff<burn::backend::Flex>;
    let close = |got: &[f64], want: &[f64], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}: sizes");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: a zero gradient tests nothing");
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!((g - r).abs() <= 1e-5 * scale, "{what} at {i}: {g} vs {r}");
        }
    };
    // (batch, c_in, c_out, h, w, stride, padding, dilation, groups)
    for (b, ci, co, h, w, s, p, d, groups) in [
        (3, 16, 8, 20, 19, 1, 1, 1, 1),
        (3, 16, 8, 20, 19, 2, 1, 1, 1),
        (3, 16, 8, 20, 19, 1, 0, 2, 1),
        (3, 16, 8, 20, 19, 3, 2, 2, 1),
        (2, 16, 8, 20, 19, 1, 1, 1, 2),
        (2, 12, 12, 9, 11, 2, 1, 1, 12),
        // More output channels than unfolded columns (9): split by rows.
        (1, 1, 64, 32, 32, 1, 1, 1, 1),
        // 4608 unfolded columns: 256-pixel chunks, two of them, the second with padding.
        (1, 512, 2, 20, 15, 1, 1, 1, 1),
    ] {
        let what = format!("conv2d {b}x{ci}x{h}x{w} -> {co}, stride {s}, padding {p}, dilation {d}, groups {groups}");
        let x = wiggle(b * ci * h * w, 0.2);
        let wt = wiggle(co * ci / groups * 9, 0.4);
        let options = ConvOptions::new([s; 2], [p; 2], [d; 2], groups);
        let (xs, ws) = ([b, ci, h, w], [co, ci / groups, 3, 3]);
        let got = conv_weight_grad::<F, 4>(&x, xs, &wt, ws, &|x, w| conv2d(x, w, None, options.clone()));
        let want = conv_weight_grad::<Ad, 4>(&x, xs, &wt, ws, &|x, w| conv2d(x, w, None, options.clone()));
        close(&got, &want, &what);
    }

    let (x, wt) = (wiggle(2 * 6 * 40, 0.3), wiggle(4 * 6 * 5, 0.5));
    let options = ConvOptions::new([2], [2], [1], 1);
    let (xs, ws) = ([2, 6, 40], [4, 6, 5]);
    let got = conv_weight_grad::<F, 3>(&x, xs, &wt, ws, &|x, w| conv1d(x, w, None, options.clone()));
    let want = conv_weight_grad::<Ad, 3>(&x, xs, &wt, ws, &|x, w| conv1d(x, w, None, options.clone()));
    close(&got, &want, "conv1d");

    // Grouped with stride 2, where burn's own weight gradient panics on NdArray ("could not
    // broadcast [2, 3, 6] to [2, 3, 5]"): against the same convolution with groups = 1 and a
    // block-diagonal kernel (zero across groups), whose gradient's diagonal blocks it is.
    let grouped = ConvOptions::new([2], [2], [1], 2);
    let full = ConvOptions::new([2], [2], [1], 1);
    let wt = wiggle(4 * 3 * 5, 0.5);
    let mut w_full = vec![0.0f32; 4 * 6 * 5];
    for o in 0..4 {
        let g = o / 2;
        w_full[(o * 6 + g * 3) * 5..(o * 6 + g * 3 + 3) * 5].copy_from_slice(&wt[o * 15..(o + 1) * 15]);
    }
    let got = conv_weight_grad::<F, 3>(&x, xs, &wt, [4, 3, 5], &|x, w| conv1d(x, w, None, grouped.clone()));
    let dw_full = conv_weight_grad::<Ad, 3>(&x, xs, &w_full, ws, &|x, w| conv1d(x, w, None, full.clone()));
    let want: Vec<f64> = (0..4)
        .flat_map(|o| {
            let start = (o * 6 + o / 2 * 3) * 5;
            dw_full[start..start + 15].to_vec()
        })
        .collect();
    close(&got, &want, "grouped conv1d, stride 2");

    let (x, wt) = (wiggle(2 * 3 * 7 * 8 * 6, 0.3), wiggle(5 * 3 * 3 * 2 * 3, 0.5));
    let options = ConvOptions::new([1, 2, 1], [1, 0, 1], [2, 1, 1], 1);
    let (xs, ws) = ([2, 3, 7, 8, 6], [5, 3, 3, 2, 3]);
    let got = conv_weight_grad::<F, 5>(&x, xs, &wt, ws, &|x, w| conv3d(x, w, None, options.clone()));
    let want = conv_weight_grad::<Ad, 5>(&x, xs, &wt, ws, &|x, w| conv3d(x, w, None, options.clone()));
    close(&got, &want, "conv3d");
}

#[test]
fn flex_matmul_outputs_and_zeros_are_written_in_full() {
    // Patch 9: matmul outputs are no longer zeroed before the GEMM writes them (with an inner
    // dimension of 0 it writes zeros, the empty sum); new zero tensors are allocated at their
    // element's width. Freed non-zero buffers of the same sizes come first, so that memory
    // left unwritten would likely show.
    type F = burn::backend::Flex;
    let device = Default::default();
    for _ in 0..3 {
        drop(Tensor::<F, 3>::ones([2, 5, 7], &device) + 1.0);
        let empty_sum = Tensor::<F, 3>::ones([2, 5, 0], &device).matmul(Tensor::ones([2, 0, 7], &device));
        assert_eq!(empty_sum.dims(), [2, 5, 7]);
        assert!(
            to_vec(empty_sum.reshape([70])).iter().all(|&v| v == 0.0),
            "k = 0 batched"
        );
        drop(Tensor::<F, 2>::ones([5, 7], &device) + 1.0);
        let empty_sum = Tensor::<F, 2>::ones([5, 0], &device).matmul(Tensor::ones([0, 7], &device));
        assert!(to_vec(empty_sum.reshape([35])).iter().all(|&v| v == 0.0), "k = 0");
    }
    // Every element written: products of wiggles against f64 NdArray, broadcast batch included.
    for (a, b) in [([1, 3, 37, 11], [2, 1, 11, 29]), ([1, 1, 130, 70], [1, 1, 70, 140])] {
        let n = |s: [usize; 4]| s.iter().product::<usize>();
        let (xa, xb) = (wiggle(n(a), 0.1), wiggle(n(b), 0.7));
        let got = Tensor::<F, 4>::from_data(TensorData::new(xa.clone(), a), &device)
            .matmul(Tensor::from_data(TensorData::new(xb.clone(), b), &device));
        let r = |x: &[f32], s| {
            let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            Tensor::<crate::common::F64, 4>::from_data(TensorData::new(x, s), &Default::default())
        };
        let want = r(&xa, a).matmul(r(&xb, b)).into_data().to_vec::<f64>().unwrap();
        let got = got.into_data().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!((f64::from(g) - w).abs() < 1e-4, "{a:?} x {b:?} at {i}: {g} vs {w}");
        }
    }
    // Zeros of every width.
    for dtype in [
        burn::tensor::DType::F64,
        burn::tensor::DType::F32,
        burn::tensor::DType::F16,
    ] {
        let zeros = Tensor::<F, 1>::zeros([9], (&device, dtype));
        assert!(to_vec(zeros).iter().all(|&v| v == 0.0), "{dtype:?}");
    }
    let zeros = Tensor::<F, 1, Int>::zeros([9], &device).into_data().convert::<f64>();
    assert!(zeros.to_vec::<f64>().unwrap().iter().all(|&v| v == 0.0), "int");
    let falses = Tensor::<F, 1, Bool>::empty([9], &device).into_data();
    assert!(falses.to_vec::<bool>().unwrap().iter().all(|&v| !v), "bool");
}
