//! Every CPU kernel vs its MLX-ops reference: bit-exact (NaN == NaN) on random shapes, all float
//! dtypes, NaN/inf inputs, non-contiguous views, one token and many.
mod common;

use common::mlx_lock;
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::kernels::{self, CombineMode};

const DTYPES: [Dtype; 3] = [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16];

fn rand(shape: &[i32], seed: u64, scale: f32, dtype: Dtype) -> Array {
    let key = random::key(seed).unwrap();
    random::normal::<f32>(shape, 0.0, scale, &key).unwrap().as_dtype(dtype).unwrap()
}

fn bit_equal(a: &Array, b: &Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && ops::array_eq(a, b, true).unwrap().item_cast::<bool>()
}

/// Puts NaN, +inf, -inf, -0.0 and huge values at fixed positions of a 1-D view.
fn with_specials(a: &Array) -> Array {
    let n = a.size() as i32;
    let flat = a.flatten(None, None).unwrap();
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 88.0, -88.0, 1e-30];
    let idx: Vec<i32> = (0..specials.len() as i32).map(|i| (i * 7) % n).collect();
    let vals = Array::from_slice(&specials[..idx.len()], &[idx.len() as i32]).as_dtype(a.dtype()).unwrap();
    let out = ops::indexing::scatter_single(
        &flat,
        Array::from_slice(&idx, &[idx.len() as i32]),
        vals.reshape(&[idx.len() as i32, 1]).unwrap(),
        0,
    );
    out.unwrap().reshape(a.shape()).unwrap()
}

#[test]
fn swiglu_bit_exact() {
    let _g = mlx_lock();
    for (i, shape) in [vec![1, 1, 64], vec![1, 1, 8, 1, 768], vec![3, 17, 130], vec![2, 5]].iter().enumerate() {
        for &dt in &DTYPES {
            let g = rand(shape, i as u64, 3.0, dt);
            let u = rand(shape, 100 + i as u64, 1.0, dt);
            let (want, got) = (kernels::swiglu_reference(&g, &u).unwrap(), kernels::swiglu(&g, &u).unwrap());
            assert!(bit_equal(&want, &got), "swiglu {shape:?} {dt:?}");
            let (gs, us) = (with_specials(&g), with_specials(&u));
            assert!(
                bit_equal(&kernels::swiglu_reference(&gs, &us).unwrap(), &kernels::swiglu(&gs, &us).unwrap()),
                "specials {dt:?}"
            );
        }
    }
}

#[test]
fn swiglu_non_contiguous_and_errors() {
    let _g = mlx_lock();
    let g = rand(&[16, 24], 1, 2.0, Dtype::Float32).transpose().unwrap();
    let u = rand(&[24, 16], 2, 1.0, Dtype::Float32);
    assert!(bit_equal(&kernels::swiglu_reference(&g, &u).unwrap(), &kernels::swiglu(&g, &u).unwrap()));
    let bad = kernels::swiglu(&g, &rand(&[24, 15], 3, 1.0, Dtype::Float32)).unwrap_err().to_string();
    assert!(bad.contains("must match"), "{bad}");
    let ints = Array::from_slice(&[1i32, 2], &[2]);
    assert!(kernels::swiglu(&ints, &ints).unwrap_err().to_string().contains("expected float32"));
}

#[test]
fn moe_combine_act_mode_bit_exact() {
    let _g = mlx_lock();
    // (leading shape, k, D): decode (1 token), prefill (many tokens), k = 1, k = E-like 16.
    let cases =
        [(vec![1, 1], 2, 128), (vec![1, 1], 8, 2048), (vec![1, 37], 4, 96), (vec![2, 3], 1, 64), (vec![1, 5], 16, 32)];
    for (i, (lead, k, d)) in cases.iter().enumerate() {
        for &dt in &DTYPES {
            let mut ys = lead.clone();
            ys.extend([*k, *d]);
            let mut ws = lead.clone();
            ws.push(*k);
            let y = rand(&ys, i as u64, 1.0, dt);
            let w = ops::softmax_axis(rand(&ws, 50 + i as u64, 2.0, dt), -1, true).unwrap();
            let want = kernels::moe_combine_reference(&y, &w).unwrap();
            assert!(
                bit_equal(&want, &kernels::moe_combine(&y, &w, CombineMode::Act).unwrap()),
                "combine {ys:?} {dt:?}"
            );
            let (ys2, ws2) = (with_specials(&y), with_specials(&w));
            let want = kernels::moe_combine_reference(&ys2, &ws2).unwrap();
            assert!(bit_equal(&want, &kernels::moe_combine(&ys2, &ws2, CombineMode::Act).unwrap()), "specials {dt:?}");
        }
    }
}

#[test]
fn moe_combine_mixed_dtypes_and_f32_modes() {
    let _g = mlx_lock();
    // DeepSeek/GLM: bf16 expert outputs, f32 weights -> f32 combine (stock promotes).
    let y = rand(&[1, 3, 8, 64], 7, 1.0, Dtype::Bfloat16);
    let w = rand(&[1, 3, 8], 8, 0.5, Dtype::Float32);
    let want = kernels::moe_combine_reference(&y, &w).unwrap();
    assert_eq!(want.dtype(), Dtype::Float32);
    assert!(bit_equal(&want, &kernels::moe_combine(&y, &w, CombineMode::Act).unwrap()));
    // f32 accumulation of bf16 inputs: equal to the f32 reference cast back (tolerance 0).
    let yb = rand(&[2, 4, 8, 128], 9, 1.0, Dtype::Bfloat16);
    let wb = rand(&[2, 4, 8], 10, 0.5, Dtype::Bfloat16);
    let f32_ref =
        kernels::moe_combine_reference(&yb.as_dtype(Dtype::Float32).unwrap(), &wb.as_dtype(Dtype::Float32).unwrap())
            .unwrap()
            .as_dtype(Dtype::Bfloat16)
            .unwrap();
    for mode in [CombineMode::F32, CombineMode::F32NoFma] {
        let got = kernels::moe_combine(&yb, &wb, mode).unwrap();
        assert!(bit_equal(&f32_ref, &got), "{mode:?}");
    }
    // ... and it is a genuinely different mode from act for bf16 (rounding every add).
    let act = kernels::moe_combine(&yb, &wb, CombineMode::Act).unwrap();
    assert!(!bit_equal(&act, &f32_ref), "bf16 act vs f32 accumulation should differ somewhere");
}

#[test]
fn moe_combine_shape_errors() {
    let _g = mlx_lock();
    let y = rand(&[1, 4, 8], 1, 1.0, Dtype::Float32);
    let w = rand(&[1, 3], 2, 1.0, Dtype::Float32);
    let e = kernels::moe_combine(&y, &w, CombineMode::Act).unwrap_err().to_string();
    assert!(e.contains("expected y [..., k, D] and w [..., k]"), "{e}");
}

#[test]
fn gpu_sources_are_embedded_and_use_the_reference_arguments() {
    // Checked without a GPU: each CUDA/Metal body reads exactly the inputs the reference takes.
    for (src, names) in [
        (include_str!("../kernels/cuda/qmv_swiglu.cu"), &["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"][..]),
        (include_str!("../kernels/metal/qmv_swiglu.metal"), &["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"][..]),
        (include_str!("../kernels/cuda/qmv_combine.cu"), &["h", "idx", "w", "wd", "sd", "bd"][..]),
        (include_str!("../kernels/metal/qmv_combine.metal"), &["h", "idx", "w", "wd", "sd", "bd"][..]),
        (include_str!("../kernels/cuda/rope_decode.cu"), &["q", "k", "inv_freq", "params"][..]),
        (include_str!("../kernels/metal/rope_decode.metal"), &["q", "k", "inv_freq", "params"][..]),
        (include_str!("../kernels/cuda/swiglu.cu"), &["gate", "up"][..]),
        (include_str!("../kernels/metal/swiglu.metal"), &["gate", "up"][..]),
        (include_str!("../kernels/cuda/moe_combine.cu"), &["y", "w"][..]),
        (include_str!("../kernels/metal/moe_combine.metal"), &["y", "w"][..]),
    ] {
        for n in names {
            assert!(
                src.contains(&format!("{n}["))
                    || src.contains(&format!("{n} +"))
                    || src.contains(&format!("? {n} :"))
                    || src.contains(&format!("? q : {n}")),
                "kernel body lacks input {n}"
            );
        }
        assert!(src.contains("out[") || src.contains("? q_out : k_out"), "kernel body writes an output");
    }
}

fn check_router(logits: &Array, kind: kernels::RouterKind, k: i32, what: &str) {
    let (ri, rw) = kernels::moe_router_reference(logits, kind, k).unwrap();
    let (fi, fw) = kernels::moe_router(logits, kind, k).unwrap();
    assert!(
        bit_equal(&ri, &fi),
        "{what}: indices (slot order) differ\nref {:?}\nfused {:?}",
        ri.as_slice::<u32>(),
        fi.as_slice::<u32>()
    );
    assert!(bit_equal(&rw, &fw), "{what}: weights differ");
}

#[test]
fn moe_router_bit_exact_all_kinds() {
    use kernels::RouterKind::*;
    let _g = mlx_lock();
    let kinds = [TopKThenSoftmax, SoftmaxThenTopK { norm: true }, SoftmaxThenTopK { norm: false }, SoftmaxThenTopKDesc];
    // (rows shape, E, k): decode, prefill, k = 1, k = E, Qwen3-like 128/8.
    let cases = [
        (vec![1, 1], 8, 2),
        (vec![1, 40], 16, 4),
        (vec![2, 3], 8, 1),
        (vec![1, 6], 8, 8),
        (vec![1, 9], 128, 8),
        (vec![1, 3], 60, 4),
    ];
    for (i, (lead, e, k)) in cases.iter().enumerate() {
        let mut shape = lead.clone();
        shape.push(*e);
        for &dt in &DTYPES {
            let logits = rand(&shape, 300 + i as u64, 3.0, dt);
            for kind in kinds {
                check_router(&logits, kind, *k, &format!("{kind:?} {shape:?} {dt:?}"));
            }
        }
    }
}

#[test]
fn moe_router_ties_nan_inf() {
    use kernels::RouterKind::*;
    let _g = mlx_lock();
    // Heavy ties: logits drawn from 3 values, so the top-k boundary and order are all ties;
    // bf16 rounding of the softmax adds more. Plus NaN/inf rows.
    let key = random::key(77).unwrap();
    let coarse = random::randint::<_, i32>(0, 3, &[1, 50, 16][..], &key).unwrap();
    for &dt in &DTYPES {
        let logits = coarse.as_dtype(dt).unwrap();
        for kind in [TopKThenSoftmax, SoftmaxThenTopK { norm: true }, SoftmaxThenTopKDesc] {
            for k in [1, 3, 4, 16] {
                check_router(&logits, kind, k, &format!("ties {kind:?} k={k} {dt:?}"));
            }
        }
        let special = with_specials(&rand(&[1, 4, 16], 5, 2.0, dt));
        for kind in [TopKThenSoftmax, SoftmaxThenTopK { norm: true }, SoftmaxThenTopKDesc] {
            check_router(&special, kind, 4, &format!("nan/inf {kind:?} {dt:?}"));
        }
    }
    let e = kernels::moe_router(&rand(&[1, 8], 1, 1.0, Dtype::Float32), TopKThenSoftmax, 9).unwrap_err().to_string();
    assert!(e.contains("k = 9 must be between 1 and the number of experts (8)"), "{e}");
}

fn check_sigmoid_router(logits: &Array, bias: &Array, p: &kernels::SigmoidRouting, what: &str) {
    let (ri, rw) = kernels::sigmoid_router_reference(logits, bias, p).unwrap();
    let (fi, fw) = kernels::sigmoid_router(logits, bias, p).unwrap();
    assert!(
        bit_equal(&ri, &fi),
        "{what}: indices differ\nref {:?}\nfused {:?}",
        ri.as_slice::<u32>(),
        fi.as_slice::<u32>()
    );
    assert!(bit_equal(&rw, &fw), "{what}: weights differ");
}

#[test]
fn sigmoid_router_bit_exact() {
    let _g = mlx_lock();
    // (E, k, n_group, topk_group): DeepSeek-V3-like 256/8/8/4, GLM 64/4/1/1 and 128/8, Kimi 384/8/1/1,
    // tiny 16/4/4/2, k = 1 and k = E.
    let configs = [
        (256, 8, 8, 4),
        (64, 4, 1, 1),
        (128, 8, 1, 1),
        (384, 8, 1, 1),
        (16, 4, 4, 2),
        (16, 1, 4, 2),
        (8, 8, 2, 1),
        (16, 4, 4, 4),
    ];
    for (i, (e, k, ng, tg)) in configs.iter().enumerate() {
        for (lead, dt) in [(vec![1, 1], Dtype::Float32), (vec![1, 33], Dtype::Bfloat16), (vec![2, 5], Dtype::Float16)] {
            let mut shape = lead.clone();
            shape.push(*e);
            let logits = rand(&shape, 500 + i as u64, 2.0, dt);
            let bias = rand(&[*e], 600 + i as u64, 0.1, Dtype::Float32);
            for (norm, eps) in [(true, None), (true, Some(1e-20)), (false, None)] {
                let p = kernels::SigmoidRouting {
                    k: *k,
                    n_group: *ng,
                    topk_group: *tg,
                    norm_topk_prob: norm,
                    renorm_eps: eps,
                    routed_scaling_factor: 2.5,
                };
                check_sigmoid_router(&logits, &bias, &p, &format!("{p:?} {shape:?} {dt:?}"));
            }
        }
    }
}

#[test]
fn sigmoid_router_ties_and_negative_bias() {
    let _g = mlx_lock();
    // Coarse logits make whole groups tie (group drop tie rule) and scores tie (slot order);
    // a strongly negative bias makes the 0.0 of dropped groups outrank kept experts.
    let key = random::key(91).unwrap();
    let logits = random::randint::<_, i32>(-2, 3, &[1, 40, 16][..], &key).unwrap().as_dtype(Dtype::Float32).unwrap();
    for bias_shift in [0.0f32, -0.8] {
        let bias = rand(&[16], 92, 0.05, Dtype::Float32).add(Array::from_f32(bias_shift)).unwrap();
        for (k, ng, tg) in [(4, 4, 2), (4, 4, 1), (6, 8, 3), (1, 2, 1)] {
            let p = kernels::SigmoidRouting {
                k,
                n_group: ng,
                topk_group: tg,
                norm_topk_prob: true,
                renorm_eps: None,
                routed_scaling_factor: 1.8,
            };
            check_sigmoid_router(&logits, &bias, &p, &format!("ties shift {bias_shift} {p:?}"));
        }
    }
    let p = kernels::SigmoidRouting {
        k: 4,
        n_group: 3,
        topk_group: 1,
        norm_topk_prob: true,
        renorm_eps: None,
        routed_scaling_factor: 1.0,
    };
    let e = kernels::sigmoid_router(&logits, &rand(&[16], 1, 0.1, Dtype::Float32), &p).unwrap_err().to_string();
    assert!(e.contains("n_group | E"), "{e}");
}

#[test]
fn rms_norm_bit_exact() {
    use zmlx::kernels::rms_norm::{rms_norm, rms_norm_reference, rms_norm_unsupported};
    use zmlx::nn::RmsNorm;
    let _g = mlx_lock();
    for (i, &d) in [2048, 128, 7, 1].iter().enumerate() {
        let seed = 300 + 10 * i as u64;
        let norm = RmsNorm { weight: rand(&[d], seed, 1.0, Dtype::Float32), eps: [1e-6, 1e-5][i % 2] };
        // One decode row, a prefill block (threaded), wide and tiny magnitudes, specials.
        for (j, (shape, scale)) in
            [(vec![1, 1, d], 1.0), (vec![1, 33, d], 3.0), (vec![2, 3, d], 1e4), (vec![3, d], 1e-20)]
                .into_iter()
                .enumerate()
        {
            let x = rand(&shape, seed + j as u64, scale, Dtype::Float32);
            let x = if j == 1 { with_specials(&x) } else { x };
            let (w, g) = (rms_norm_reference(&x, &norm).unwrap(), rms_norm(&x, &norm).unwrap());
            assert!(bit_equal(&w, &g), "rms_norm D={d} shape {shape:?} scale {scale}: differs");
        }
        // All zeros: rsqrt(eps) times 0.
        let z = ops::zeros::<f32>(&[1, 2, d]).unwrap();
        assert!(bit_equal(&rms_norm_reference(&z, &norm).unwrap(), &rms_norm(&z, &norm).unwrap()));
        // A transposed (non-contiguous) view.
        let t = rand(&[d, 5], seed + 9, 1.0, Dtype::Float32).t();
        assert!(bit_equal(&rms_norm_reference(&t, &norm).unwrap(), &rms_norm(&t, &norm).unwrap()), "strided D={d}");
    }
    // bf16 activations are not the kernel's (the pattern runs stock for them), and say so.
    let norm = RmsNorm { weight: rand(&[64], 1, 1.0, Dtype::Float32), eps: 1e-6 };
    let xb = rand(&[1, 64], 2, 1.0, Dtype::Bfloat16);
    assert!(rms_norm_unsupported(&xb, &norm).unwrap().contains("Bfloat16"));
    assert!(rms_norm(&xb, &norm).is_err());
    // A weight of the wrong width is an error from the kernel, not a crash.
    let bad = RmsNorm { weight: rand(&[32], 3, 1.0, Dtype::Float32), eps: 1e-6 };
    let e = rms_norm(&rand(&[1, 64], 4, 1.0, Dtype::Float32), &bad).unwrap_err().to_string();
    assert!(e.contains("rms_norm"), "{e}");
}

#[test]
fn quantized_embedding_bit_exact() {
    use zmlx::config::QuantParams;
    use zmlx::kernels::quantized_embedding::{
        quantized_embedding, quantized_embedding_reference, quantized_embedding_unsupported,
    };
    use zmlx::nn::{Embedding, QWeight, Weight};
    let _g = mlx_lock();
    for bits in [2, 4, 8] {
        for (gs, st) in [(32, Dtype::Float32), (64, Dtype::Bfloat16), (128, Dtype::Float16)] {
            let (w, s, b) =
                ops::quantize(rand(&[300, 256], bits as u64 + gs as u64, 0.1, Dtype::Float32), gs, bits).unwrap();
            let q = QWeight {
                weight: w,
                scales: s.as_dtype(st).unwrap(),
                biases: b.as_dtype(st).unwrap(),
                q: QuantParams { bits, group_size: gs },
            };
            let emb = Embedding { weight: Weight::Quant(q), dtype: Dtype::Float32 };
            for ids in [vec![0u32], vec![299], vec![5, 5, 0, 299, 150, 17, 42, 8]] {
                let a = Array::from_slice(&ids, &[1, ids.len() as i32]);
                let (want, got) =
                    (quantized_embedding_reference(&a, &emb).unwrap(), quantized_embedding(&a, &emb).unwrap());
                assert!(bit_equal(&want, &got), "{bits}-bit g{gs} {st:?} ids {ids:?}: differs");
            }
            // An id past the table: a NaN row (MLX's gather does not check), no crash.
            let out = quantized_embedding(&Array::from_slice(&[300u32, 1], &[2]), &emb).unwrap();
            let nan_rows = ops::is_nan(&out).unwrap().all_axis(-1, None).unwrap();
            assert_eq!(nan_rows.as_slice::<bool>(), &[true, false], "{bits}-bit g{gs}");
        }
    }
    // What the kernel does not take is said (the pattern then runs the stock lookup).
    let (w, s, b) = ops::quantize(rand(&[8, 64], 1, 0.1, Dtype::Float32), 64, 4).unwrap();
    let emb = Embedding {
        weight: Weight::Quant(QWeight { weight: w, scales: s, biases: b, q: QuantParams { bits: 4, group_size: 64 } }),
        dtype: Dtype::Float32,
    };
    let why = quantized_embedding_unsupported(&Array::from_slice(&[1i32], &[1]), &emb).err().unwrap();
    assert!(why.contains("Int32"), "{why}");
    let f = Embedding { weight: Weight::Float(rand(&[8, 64], 2, 1.0, Dtype::Float32)), dtype: Dtype::Float32 };
    assert!(quantized_embedding_unsupported(&Array::from_slice(&[1u32], &[1]), &f)
        .err()
        .unwrap()
        .contains("float weights"));
}
