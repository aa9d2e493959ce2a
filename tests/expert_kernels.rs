//! The decode-step expert kernels (`qmv_swiglu`, `qmv_combine`) vs their MLX-ops references on
//! CPU: bit-exact for 2/4/8 bits and group sizes 32/64/128, one, several and 40 (prefill) tokens, k = 1 and
//! k = E, all tokens on one expert, repeated experts, NaN/inf activations, non-contiguous
//! inputs, scales/biases stored as f32, bf16 and f16 (random and edge values: subnormal, zero,
//! negative, large, inf), every instruction set (baseline, AVX2, AVX-512 where present, via
//! child processes), and clear errors.
mod common;

use common::mlx_lock;
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::config::QuantParams;
use zmlx::kernels::experts;
use zmlx::nn::QWeight;

fn rand(shape: &[i32], seed: u64, scale: f32) -> Array {
    let key = random::key(seed).unwrap();
    random::normal::<f32>(shape, 0.0, scale, &key).unwrap()
}

fn bit_equal(a: &Array, b: &Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && ops::array_eq(a, b, true).unwrap().item_cast::<bool>()
}

fn qweight(e: i32, n: i32, k: i32, gs: i32, bits: i32, seed: u64) -> QWeight {
    let w = rand(&[e, n, k], seed, 0.05);
    let (weight, scales, biases) = ops::quantize(&w, gs, bits).unwrap();
    QWeight { weight, scales, biases, q: QuantParams { bits, group_size: gs } }
}

fn indices(rows: &[Vec<u32>]) -> Array {
    let k = rows[0].len() as i32;
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Array::from_slice(&flat, &[rows.len() as i32, k])
}

fn softmaxish(t: i32, k: i32, seed: u64) -> Array {
    ops::softmax_axis(rand(&[t, k], seed, 1.0), -1, true).unwrap()
}

fn check(x: &Array, idx: &Array, w: &Array, g: &QWeight, u: &QWeight, d: &QWeight, what: &str) {
    let want_h = experts::qmv_swiglu_reference(x, idx, g, u).unwrap();
    let got_h = experts::qmv_swiglu(x, idx, g, u).unwrap();
    assert!(bit_equal(&want_h, &got_h), "{what}: qmv_swiglu differs from gather_qmm + swiglu");
    let want = experts::qmv_combine_reference(&want_h, idx, w, d).unwrap();
    let got = experts::qmv_combine(&want_h, idx, w, d).unwrap();
    assert!(bit_equal(&want, &got), "{what}: qmv_combine differs from gather_qmm + weighted sum");
}

#[test]
fn expert_kernels_bit_exact_bits_groups_and_routing() {
    let _g = mlx_lock();
    // (E, D, I, bits, group): bench-like widths, a width that leaves a lane tail (I = 200).
    let shapes =
        [(8, 256, 128, 4, 64), (8, 256, 128, 8, 64), (6, 256, 96, 2, 32), (4, 128, 256, 4, 128), (4, 512, 64, 8, 32)];
    for (s, &(e, dm, im, bits, gs)) in shapes.iter().enumerate() {
        let seed = 10 * s as u64;
        let (g, u) = (qweight(e, im, dm, gs, bits, seed + 1), qweight(e, im, dm, gs, bits, seed + 2));
        let d = qweight(e, dm, im, gs, bits, seed + 3);
        let all: Vec<u32> = (0..e as u32).collect();
        let routes: Vec<(&str, Vec<Vec<u32>>)> = vec![
            ("decode k=2", vec![vec![1, 3]]),
            ("k=1", vec![vec![2]]),
            ("k=E", vec![all.clone()]),
            ("3 tokens, one expert", vec![vec![0, 0], vec![0, 0], vec![0, 0]]),
            ("2 tokens", vec![vec![e as u32 - 1, 0], vec![2, 1]]),
            // Prefill: 40 tokens x 4 distinct experts, grouped by expert inside the kernels.
            (
                "prefill 40 tokens",
                (0..40u32).map(|t| (0..4u32).map(|j| (t * 3 + j * 5) % e as u32).collect()).collect(),
            ),
        ];
        for (name, rows) in routes {
            let idx = indices(&rows);
            let (t, k) = (idx.dim(0), idx.dim(1));
            let x = rand(&[t, dm], seed + 4, 1.0);
            check(&x, &idx, &softmaxish(t, k, seed + 5), &g, &u, &d, &format!("{name} E{e} D{dm} I{im} {bits}b g{gs}"));
        }
    }
}

#[test]
fn expert_kernels_row_tails() {
    // Output rows not a multiple of the 8-lane vectors or 32-row blocks (N = 200, 44).
    let _g = mlx_lock();
    for (n, seed) in [(200, 1u64), (44, 2)] {
        let (g, u, d) =
            (qweight(4, n, 128, 64, 4, seed), qweight(4, n, 128, 64, 4, seed + 1), qweight(4, n, 128, 64, 4, seed + 2));
        let idx = indices(&[vec![3, 1, 2]]);
        let x = rand(&[1, 128], seed + 3, 1.0);
        let (want, got) =
            (experts::qmv_swiglu_reference(&x, &idx, &g, &u).unwrap(), experts::qmv_swiglu(&x, &idx, &g, &u).unwrap());
        assert!(bit_equal(&want, &got), "qmv_swiglu N={n}");
        let h = rand(&[1, 3, 128], seed + 4, 1.0);
        let w = softmaxish(1, 3, seed + 5);
        let (want, got) = (
            experts::qmv_combine_reference(&h, &idx, &w, &d).unwrap(),
            experts::qmv_combine(&h, &idx, &w, &d).unwrap(),
        );
        assert!(bit_equal(&want, &got), "qmv_combine D={n}");
    }
}

#[test]
fn expert_kernels_specials_and_strided_inputs() {
    let _g = mlx_lock();
    let (g, u, d) = (qweight(4, 64, 128, 64, 4, 1), qweight(4, 64, 128, 64, 4, 2), qweight(4, 128, 64, 64, 4, 3));
    let idx = indices(&[vec![0, 3]]);
    let mut xs = rand(&[1, 128], 9, 1.0).as_slice::<f32>().to_vec();
    xs[0] = f32::NAN;
    xs[5] = f32::INFINITY;
    xs[9] = f32::NEG_INFINITY;
    xs[17] = 1e30;
    let x = Array::from_slice(&xs, &[1, 128]);
    let w = softmaxish(1, 2, 4);
    check(&x, &idx, &w, &g, &u, &d, "NaN/inf activations");
    // Non-contiguous activations, indices and weights (transposed views).
    let xt = rand(&[128, 2], 11, 1.0).transpose().unwrap();
    let it = indices(&[vec![1, 2], vec![3, 0]]).transpose().unwrap();
    let wt = softmaxish(2, 2, 12).transpose().unwrap();
    check(&xt, &it, &wt, &g, &u, &d, "strided inputs");
}

#[test]
fn expert_kernels_reject_bad_input() {
    let _g = mlx_lock();
    let g = qweight(4, 64, 128, 64, 4, 1);
    let x16 = rand(&[1, 128], 1, 1.0).as_dtype(Dtype::Bfloat16).unwrap();
    let idx = indices(&[vec![0, 1]]);
    let e = experts::qmv_swiglu(&x16, &idx, &g, &g).unwrap_err().to_string();
    assert!(e.contains("float32"), "{e}");
    let g3 = qweight(4, 64, 128, 64, 3, 1);
    let e = experts::qmv_swiglu(&rand(&[1, 128], 1, 1.0), &idx, &g3, &g3).unwrap_err().to_string();
    assert!(e.contains("3-bit"), "{e}");
    let e = experts::qmv_swiglu(&rand(&[1, 100], 1, 1.0), &idx, &g, &g).unwrap_err().to_string();
    assert!(e.contains("do not match"), "{e}");
    let e = experts::qmv_combine(&rand(&[1, 2, 64], 1, 1.0), &idx, &rand(&[1, 3], 1, 1.0), &g).unwrap_err().to_string();
    assert!(e.contains("weights [T, k]"), "{e}");
}

/// `w` with its scales/biases in `dt` (as a checkpoint stores them; the kernels read them as is).
fn with_scales(w: &QWeight, dt: Dtype) -> QWeight {
    QWeight { scales: w.scales.as_dtype(dt).unwrap(), biases: w.biases.as_dtype(dt).unwrap(), ..w.clone() }
}

/// Edge scales/biases in `dt`: every value the element type can hold that a group could get —
/// subnormal, zero and negative zero, tiny/large normals, and for biases also inf — placed on
/// a pattern over the first rows, the rest random.
fn edge_scales(w: &QWeight, dt: Dtype) -> QWeight {
    let w = with_scales(w, dt);
    let edges: &[f32] = match dt {
        // f16: smallest subnormal 2^-24, largest subnormal, smallest normal 2^-14, max 65504.
        Dtype::Float16 => &[5.9604645e-8, 6.097555e-5, 6.1035156e-5, 0.0, -0.0, 65504.0, -3.0517578e-5, 1.0009766],
        // bf16: a subnormal, the smallest normal, zero, large values.
        _ => &[9.2e-41, 1.1754944e-38, 0.0, -0.0, 3.0e38, -1.5e-39, 1.0078125, -7.0e30],
    };
    let patch = |a: &Array, extra: &[f32]| -> Array {
        let mut v: Vec<f32> = a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec();
        let all: Vec<f32> = edges.iter().chain(extra).copied().collect();
        for (i, x) in v.iter_mut().enumerate().take(all.len() * 7) {
            if i % 7 == 0 {
                *x = all[i / 7];
            }
        }
        Array::from_slice(&v, a.shape()).as_dtype(dt).unwrap()
    };
    let scales = patch(&w.scales, &[]);
    let biases = patch(&w.biases, &[f32::INFINITY, f32::NEG_INFINITY]);
    // The edge values survive the round trip through `dt` (else the test would not test them).
    QWeight { scales, biases, ..w }
}

#[test]
fn expert_kernels_half_precision_scales() {
    let _g = mlx_lock();
    for dt in [Dtype::Bfloat16, Dtype::Float16] {
        for (e, dm, im, bits, gs) in [(8, 256, 128, 4, 64), (6, 256, 96, 8, 32), (4, 128, 256, 2, 128)] {
            let seed = bits as u64 * 7 + gs as u64;
            let (g, u) = (qweight(e, im, dm, gs, bits, seed + 1), qweight(e, im, dm, gs, bits, seed + 2));
            let d = qweight(e, dm, im, gs, bits, seed + 3);
            for (what, conv) in [("random", with_scales as fn(&QWeight, Dtype) -> QWeight), ("edge", edge_scales)] {
                let (g, u, d) = (conv(&g, dt), conv(&u, dt), conv(&d, dt));
                for rows in
                    [vec![vec![1u32, 3]], (0..12u32).map(|t| vec![t % e as u32, (t * 5 + 1) % e as u32]).collect()]
                {
                    let idx = indices(&rows);
                    let (t, k) = (idx.dim(0), idx.dim(1));
                    let x = rand(&[t, dm], seed + 4, 1.0);
                    let name = format!("{dt:?} {what} scales, {t} token(s), E{e} D{dm} I{im} {bits}b g{gs}");
                    check(&x, &idx, &softmaxish(t, k, seed + 5), &g, &u, &d, &name);
                }
                // qmv_linear over one expert of `d` (a dense [D, I] projection), 1 and 9 rows.
                let lw = QWeight {
                    weight: d.weight.take_axis(Array::from_int(1), 0).unwrap(),
                    scales: d.scales.take_axis(Array::from_int(1), 0).unwrap(),
                    biases: d.biases.take_axis(Array::from_int(1), 0).unwrap(),
                    q: d.q,
                };
                for rows in [1, 9] {
                    let x = rand(&[1, rows, im], seed + 6, 1.0);
                    let want = ops::quantized_matmul(&x, &lw.weight, &lw.scales, &lw.biases, true, gs, bits).unwrap();
                    let got = experts::qmv_linear(&x, &lw).unwrap();
                    assert!(
                        bit_equal(&want, &got),
                        "qmv_linear {dt:?} {what} scales N={dm} K={im} {bits}b rows={rows}"
                    );
                }
            }
        }
    }
}

#[test]
fn expert_kernels_scales_and_biases_must_share_a_dtype() {
    let _g = mlx_lock();
    let g = qweight(4, 64, 128, 64, 4, 1);
    let mixed = QWeight { biases: g.biases.as_dtype(Dtype::Bfloat16).unwrap(), ..g.clone() };
    let e = experts::qmv_swiglu(&rand(&[1, 128], 1, 1.0), &indices(&[vec![0, 1]]), &mixed, &g).unwrap_err().to_string();
    assert!(e.contains("differ in dtype"), "{e}");
}

/// Re-runs the bit-exactness tests in children capped at the baseline x86-64, the AVX2 and the
/// AVX-512 row kernels (`ZMLX_CPU_ISA`; a CPU without AVX-512 runs its widest, as the parent
/// does), one thread each.
#[test]
fn expert_kernels_bit_exact_on_each_isa() {
    if std::env::var("ZMLX_CPU_ISA").is_ok() {
        return; // already a child
    }
    let exe = std::env::current_exe().unwrap();
    for isa in ["base", "avx2", "avx512"] {
        for test in [
            "expert_kernels_bit_exact_bits_groups_and_routing",
            "qmv_linear_bit_exact_and_limits",
            "expert_kernels_half_precision_scales",
        ] {
            let out = std::process::Command::new(&exe)
                .args([test, "--exact", "--test-threads=1"])
                .env("ZMLX_CPU_ISA", isa)
                .env("ZMLX_CPU_THREADS", "1")
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

#[test]
fn qmv_linear_bit_exact_and_limits() {
    let _g = mlx_lock();
    // Decode rows and prefill-sized blocks (9, 70 rows).
    for (n, k, bits, gs, rows) in [
        (200, 256, 4, 64, 1),
        (512, 128, 8, 32, 3),
        (44, 256, 2, 128, 8),
        (2048, 512, 4, 64, 2),
        (300, 256, 4, 64, 9),
        (130, 128, 8, 64, 70),
    ] {
        let w = qweight(1, n, k, gs, bits, n as u64);
        let w = QWeight {
            weight: w.weight.squeeze_axes(&[0]).unwrap(),
            scales: w.scales.squeeze_axes(&[0]).unwrap(),
            biases: w.biases.squeeze_axes(&[0]).unwrap(),
            q: w.q,
        };
        let x = rand(&[1, rows, k], 7, 1.0);
        let want = ops::quantized_matmul(&x, &w.weight, &w.scales, &w.biases, true, gs, bits).unwrap();
        let got = experts::qmv_linear(&x, &w).unwrap();
        assert!(bit_equal(&want, &got), "qmv_linear N={n} K={k} {bits}-bit g{gs} rows={rows}");
    }
    let w = qweight(1, 64, 128, 64, 4, 1);
    let w = QWeight {
        weight: w.weight.squeeze_axes(&[0]).unwrap(),
        scales: w.scales.squeeze_axes(&[0]).unwrap(),
        biases: w.biases.squeeze_axes(&[0]).unwrap(),
        q: w.q,
    };
    let e = experts::qmv_linear(&rand(&[1, 9, 128], 1, 1.0).as_dtype(Dtype::Bfloat16).unwrap(), &w)
        .unwrap_err()
        .to_string();
    assert!(e.contains("float32"), "{e}");
}
