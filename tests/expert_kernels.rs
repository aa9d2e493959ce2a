//! The decode-step expert kernels (`qmv_swiglu`, `qmv_combine`) vs their MLX-ops references on
//! CPU: bit-exact for 2/4/8 bits and group sizes 32/64/128, one, several and 40 (prefill) tokens, k = 1 and
//! k = E, all tokens on one expert, repeated experts, NaN/inf activations, non-contiguous
//! inputs, both instruction sets (AVX2 and baseline, via a child process), and clear errors.
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

/// Re-runs the bit-exactness tests in children capped at the baseline x86-64 and the AVX2 row
/// kernels (`ZMLX_CPU_ISA`; the parent runs the widest this CPU has, AVX-512 where present),
/// one thread each.
#[test]
fn expert_kernels_bit_exact_on_each_isa() {
    if std::env::var("ZMLX_CPU_ISA").is_ok() {
        return; // already a child
    }
    let exe = std::env::current_exe().unwrap();
    for isa in ["base", "avx2"] {
        for test in ["expert_kernels_bit_exact_bits_groups_and_routing", "qmv_linear_bit_exact_and_limits"] {
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
