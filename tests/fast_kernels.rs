//! The `fast` (validated) quantized kernels vs the MLX-ops references on CPU: not bit-exact by
//! design (reassociated sums, FMA), so each result must be within a float-rounding tolerance
//! of the reference — relative to the magnitude of the terms summed, for every bit width and
//! group size, decode and prefill blocks (1, 3, 5, 40 tokens), row tails, NaN/inf activations,
//! out-of-range expert indices (NaN rows, as the exact kernels), and every ISA (children).
//! A result outside the tolerance (a wrong unpack order, a lost group, a bad tail) fails.
mod common;

use common::mlx_lock;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::config::QuantParams;
use zmlx::kernels::qmv_combine::qmv_combine_class;
use zmlx::kernels::qmv_linear::qmv_linear_class;
use zmlx::kernels::qmv_swiglu::qmv_swiglu_class;
use zmlx::kernels::{experts, fast_supported, KernelClass};
use zmlx::nn::QWeight;

const FAST: KernelClass = KernelClass::Fast;

fn rand(shape: &[i32], seed: u64, scale: f32) -> Array {
    let key = random::key(seed).unwrap();
    random::normal::<f32>(shape, 0.0, scale, &key).unwrap()
}

fn qweight(e: i32, n: i32, k: i32, gs: i32, bits: i32, seed: u64) -> QWeight {
    let (weight, scales, biases) = ops::quantize(rand(&[e, n, k], seed, 0.05), gs, bits).unwrap();
    QWeight { weight, scales, biases, q: QuantParams { bits, group_size: gs } }
}

fn dense(w: &QWeight) -> QWeight {
    let sq = |a: &Array| a.squeeze_axes(&[0]).unwrap();
    QWeight { weight: sq(&w.weight), scales: sq(&w.scales), biases: sq(&w.biases), q: w.q }
}

fn indices(rows: &[Vec<u32>]) -> Array {
    let k = rows[0].len() as i32;
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Array::from_slice(&flat, &[rows.len() as i32, k])
}

/// |got - want| <= 1e-5 * scale + 1e-6 elementwise, where scale = the largest |want| of the
/// tensor (the sums cancel, so a per-element relative bound would be meaningless); NaN where
/// and only where the reference has NaN.
fn close(want: &Array, got: &Array, what: &str) {
    assert_eq!(want.shape(), got.shape(), "{what}: shape");
    let (w, g) = (want.as_slice::<f32>(), got.as_slice::<f32>());
    let scale = w.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (a, b)) in w.iter().zip(g).enumerate() {
        assert_eq!(a.is_nan(), b.is_nan(), "{what}: NaN mismatch at {i}: want {a} got {b}");
        if a.is_infinite() || b.is_infinite() {
            assert_eq!(a, b, "{what}: inf mismatch at {i}");
            continue;
        }
        if a.is_finite() {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst <= 1e-5 * scale + 1e-6, "{what}: max |diff| {worst} > tolerance (scale {scale})");
}

/// The weight with scales/biases stored as `dt` (checkpoints keep bf16/f16 scales as stored).
fn with_scales(w: QWeight, dt: Dtype) -> QWeight {
    QWeight { scales: w.scales.as_dtype(dt).unwrap(), biases: w.biases.as_dtype(dt).unwrap(), ..w }
}

#[allow(clippy::too_many_arguments)]
fn check_experts(t: i32, k: i32, e: i32, dm: i32, im: i32, bits: i32, gs: i32, seed: u64, sdt: Dtype) {
    let q = |n, kk, s| with_scales(qweight(e, n, kk, gs, bits, s), sdt);
    let (g, u, d) = (q(im, dm, seed), q(im, dm, seed + 1), q(dm, im, seed + 2));
    let rows: Vec<Vec<u32>> =
        (0..t as u32).map(|ti| (0..k as u32).map(|j| (ti * 3 + j * 5) % e as u32).collect()).collect();
    let idx = indices(&rows);
    let x = rand(&[t, dm], seed + 3, 1.0);
    let what = format!("T{t} k{k} E{e} D{dm} I{im} {bits}b g{gs} scales {sdt:?}");
    let want_h = experts::qmv_swiglu_reference(&x, &idx, &g, &u).unwrap();
    close(&want_h, &qmv_swiglu_class(&x, &idx, &g, &u, FAST).unwrap(), &format!("qmv_swiglu fast {what}"));
    let w = ops::softmax_axis(rand(&[t, k], seed + 4, 1.0), -1, true).unwrap();
    let want = experts::qmv_combine_reference(&want_h, &idx, &w, &d).unwrap();
    close(&want, &qmv_combine_class(&want_h, &idx, &w, &d, FAST).unwrap(), &format!("qmv_combine fast {what}"));
}

#[test]
fn fast_expert_kernels_within_tolerance() {
    let _g = mlx_lock();
    assert!(fast_supported(4, 64), "the bench shape (4-bit, group 64) must take the fast path");
    let mut seed = 0;
    for (bits, gs) in [(4, 64), (4, 32), (4, 128), (8, 64), (8, 32), (2, 64), (2, 128)] {
        for (t, k) in [(1, 4), (3, 2), (5, 3), (40, 4)] {
            seed += 10;
            let sdt = [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16][(seed / 10 % 3) as usize];
            check_experts(t, k, 8, 256, 384, bits, gs, seed, sdt);
        }
    }
}

#[test]
fn fast_linear_within_tolerance() {
    let _g = mlx_lock();
    for (n, k, bits, gs, rows) in [
        (200, 256, 4, 64, 1),
        (513, 128, 8, 32, 3),
        (44, 256, 2, 128, 8),
        (2048, 512, 4, 64, 2),
        (301, 256, 4, 64, 9),
        (130, 128, 8, 64, 70),
    ] {
        let sdt = if rows % 2 == 0 { Dtype::Bfloat16 } else { Dtype::Float32 };
        let w = with_scales(dense(&qweight(1, n, k, gs, bits, n as u64)), sdt);
        let x = rand(&[1, rows, k], 7, 1.0);
        let want = ops::quantized_matmul(&x, &w.weight, &w.scales, &w.biases, true, gs, bits).unwrap();
        close(
            &want,
            &qmv_linear_class(&x, &w, FAST).unwrap(),
            &format!("qmv_linear fast N{n} K{k} {bits}b g{gs} rows{rows}"),
        );
    }
}

#[test]
fn fast_kernels_specials() {
    let _g = mlx_lock();
    let (g, u, d) = (qweight(4, 64, 128, 64, 4, 1), qweight(4, 64, 128, 64, 4, 2), qweight(4, 128, 64, 64, 4, 3));
    // Out-of-range index on token 1: its rows are NaN, token 0 unaffected.
    let idx = indices(&[vec![0, 3], vec![1, 9]]);
    let x = rand(&[2, 128], 5, 1.0);
    let h = qmv_swiglu_class(&x, &idx, &g, &u, FAST).unwrap();
    let hv = h.as_slice::<f32>();
    assert!(hv[..2 * 64].iter().all(|v| v.is_finite()) && hv[2 * 64..].iter().all(|v| v.is_nan()), "bad index rows");
    let w = ops::softmax_axis(rand(&[2, 2], 6, 1.0), -1, true).unwrap();
    let out = qmv_combine_class(&h, &idx, &w, &d, FAST).unwrap();
    let ov = out.as_slice::<f32>();
    assert!(ov[..128].iter().all(|v| v.is_finite()) && ov[128..].iter().all(|v| v.is_nan()), "bad index combine");
    // A NaN activation poisons every row it feeds (the sums must not skip it).
    let mut xs = rand(&[1, 128], 9, 1.0).as_slice::<f32>().to_vec();
    xs[70] = f32::NAN;
    let xn = Array::from_slice(&xs, &[1, 128]);
    let hn = qmv_swiglu_class(&xn, &indices(&[vec![2]]), &g, &u, FAST).unwrap();
    assert!(hn.as_slice::<f32>().iter().all(|v| v.is_nan()), "NaN activation must reach every row");
    // Strided (transposed) activations give the contiguous result.
    let xt = rand(&[128, 2], 11, 1.0).transpose().unwrap();
    let i2 = indices(&[vec![1, 2], vec![3, 0]]);
    let a = qmv_swiglu_class(&xt, &i2, &g, &u, FAST).unwrap();
    let b = qmv_swiglu_class(&xt.multiply(Array::from_f32(1.0)).unwrap(), &i2, &g, &u, FAST).unwrap();
    assert!(ops::array_eq(&a, &b, true).unwrap().item_cast::<bool>(), "strided input");
}

/// Batch invariance of the fast rows (batched decode relies on it): a token's outputs are
/// bitwise the same whether it runs alone or in a call of T tokens (its block of 4, 2 or 1
/// tokens), for the dense kernel and the expert kernels (an expert's group of 1–3 tokens).
#[test]
fn fast_kernels_are_per_token_invariant() {
    let _g = mlx_lock();
    let eq = |a: &Array, b: &Array| ops::array_eq(a, b, true).unwrap().item_cast::<bool>();
    for (bits, gs) in [(4, 64), (4, 32), (8, 64), (2, 128)] {
        let w = with_scales(dense(&qweight(1, 67, 256, gs, bits, 3)), Dtype::Bfloat16);
        for t in [2, 3, 5, 6, 7, 8, 11] {
            let x = rand(&[t, 256], t as u64, 1.0);
            let all = qmv_linear_class(&x, &w, FAST).unwrap();
            for i in 0..t {
                let one = qmv_linear_class(&x.index(i..i + 1), &w, FAST).unwrap();
                assert!(eq(&all.index(i..i + 1), &one), "qmv_linear {bits}b g{gs}: token {i} of {t} differs alone");
            }
        }
        let e = 4;
        let q = |n, kk, s| with_scales(qweight(e, n, kk, gs, bits, s), Dtype::Bfloat16);
        let (g, u, d) = (q(128, 256, 5), q(128, 256, 6), q(256, 128, 7));
        for t in [2, 3, 6, 8] {
            // Few experts, so groups of 1..t tokens form.
            let rows: Vec<Vec<u32>> = (0..t as u32).map(|ti| vec![ti % 2, 2 + ti % 3 % 2]).collect();
            let x = rand(&[t, 256], 40 + t as u64, 1.0);
            let idx = indices(&rows);
            let h = qmv_swiglu_class(&x, &idx, &g, &u, FAST).unwrap();
            let wts = ops::softmax_axis(rand(&[t, 2], 50 + t as u64, 1.0), -1, true).unwrap();
            let y = qmv_combine_class(&h, &idx, &wts, &d, FAST).unwrap();
            for i in 0..t {
                let r = |a: &Array| a.index(i..i + 1);
                let hi = qmv_swiglu_class(&r(&x), &r(&idx), &g, &u, FAST).unwrap();
                assert!(eq(&r(&h), &hi), "qmv_swiglu {bits}b g{gs}: token {i} of {t} differs alone");
                let yi = qmv_combine_class(&r(&h), &r(&idx), &r(&wts), &d, FAST).unwrap();
                assert!(eq(&r(&y), &yi), "qmv_combine {bits}b g{gs}: token {i} of {t} differs alone");
            }
        }
    }
}

/// The same tolerance tests on the baseline and AVX2 row kernels (children with
/// `ZMLX_CPU_ISA`; the parent runs the widest this CPU has), one thread and two.
#[test]
fn fast_kernels_on_each_isa() {
    if std::env::var("ZMLX_CPU_ISA").is_ok() {
        return; // already a child
    }
    let exe = std::env::current_exe().unwrap();
    for (isa, threads) in [("base", "1"), ("avx2", "2")] {
        for test in [
            "fast_expert_kernels_within_tolerance",
            "fast_linear_within_tolerance",
            "fast_kernels_are_per_token_invariant",
        ] {
            let out = std::process::Command::new(&exe)
                .args([test, "--exact", "--test-threads=1"])
                .env("ZMLX_CPU_ISA", isa)
                .env("ZMLX_CPU_THREADS", threads)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "{test} with ZMLX_CPU_ISA={isa} failed:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
