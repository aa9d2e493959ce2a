//! `gqa_attention` vs the stock core (qk-norm, mx.fast.rope, KV-cache update, SDPA) on the CPU:
//! outputs and cache contents bit-identical over prefill, chunked prefill and decode steps —
//! GQA ratios 8:1 and 1:1, with and without qk-norm, half-split and traditional, full and
//! partial rotation, explicit frequencies, linear position scaling, growth past the cache's
//! 256-position step, extreme activations — and a mixed run (stock and fused steps on one
//! cache); bad inputs are errors, not panics. The `fast` class (validated): outputs within a
//! float-rounding tolerance of the stock core, cache contents bit-identical, NaN propagated.
mod common;

use common::mlx_lock;
use mlx_rs::{ops, Array, Dtype};
use zmlx::cache::KvCache;
use zmlx::kernels::check::rand;
use zmlx::kernels::gqa_attention::{gqa_attention, gqa_attention_reference, random_attention, run_both};
use zmlx::kernels::KernelClass::{self, Exact, Fast};
use zmlx::nn::Rope;

fn bit_equal(a: &Array, b: &Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && ops::array_eq(a, b, true).unwrap().item_cast::<bool>()
}

fn check(hq: i32, hk: i32, d: i32, norm: bool, rope: Rope, steps: &[i32], what: &str) {
    let a = random_attention(hq, hk, d, norm, rope).unwrap();
    let (want, got) = run_both(&a, steps, 7, Exact).unwrap();
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let part = if i < steps.len() { format!("step {i} output") } else { format!("cache {}", i - steps.len()) };
        assert!(bit_equal(w, g), "{what}: {part} differs");
    }
}

#[test]
fn gqa_attention_bit_exact() {
    let _g = mlx_lock();
    check(32, 4, 128, true, Rope::plain(128, false, 1e6), &[17, 1, 1, 1, 1], "qwen3 shape");
    check(8, 8, 64, false, Rope::plain(64, false, 1e4), &[5, 3, 1], "MHA, chunked prefill");
    check(8, 2, 128, true, Rope::plain(64, false, 1e4), &[6, 1, 1], "partial rotation (GLM-4.5)");
    check(4, 1, 64, false, Rope::plain(64, true, 1e4), &[3, 1, 1], "traditional");
    let scaled = Rope { scale: 0.25, ..Rope::plain(64, false, 5e5) };
    check(4, 2, 64, true, scaled, &[4, 1], "linear position scaling");
    let freqs = ops::arange::<_, f32>(1.0, 33.0, None).unwrap().multiply(Array::from_f32(3.0)).unwrap();
    let with_freqs = Rope { freqs: Some(freqs), ..Rope::plain(64, false, 1e4) };
    check(4, 2, 64, false, with_freqs, &[2, 1], "explicit frequencies");
    // 250 + 10 crosses the 256 step mid-chunk; decode continues in the grown buffer.
    check(4, 2, 32, true, Rope::plain(32, false, 1e4), &[250, 10, 1, 1], "growth past 256");
}

#[test]
fn gqa_attention_mixed_with_stock_steps() {
    let _g = mlx_lock();
    // A cache written by the stock core, then the kernel, then stock again (a pattern falls
    // back per call): the fused steps must leave exactly the stock cache behind.
    let a = random_attention(8, 2, 64, true, Rope::plain(64, false, 1e4)).unwrap();
    let (mut stock, mut mixed) = (KvCache::default(), KvCache::default());
    for (i, l) in [7, 1, 1, 2, 1].into_iter().enumerate() {
        let s = 40 + 3 * i as u64;
        let q = rand(&[1, l, 8 * 64], s, 3.0, Dtype::Float32).unwrap();
        let k = rand(&[1, l, 2 * 64], s + 1, 3.0, Dtype::Float32).unwrap();
        let v = rand(&[1, l, 2 * 64], s + 2, 1.0, Dtype::Float32).unwrap();
        let w = gqa_attention_reference(&a, &q, &k, &v, &mut stock).unwrap();
        let g = if i % 2 == 1 {
            gqa_attention(&a, &q, &k, &v, &mut mixed, Exact).unwrap()
        } else {
            gqa_attention_reference(&a, &q, &k, &v, &mut mixed).unwrap()
        };
        assert!(bit_equal(&w, &g), "step {i} differs");
    }
    let (sk, sv) = stock.buffers().unwrap();
    let (mk, mv) = mixed.buffers().unwrap();
    use mlx_rs::ops::indexing::{Ellipsis, TryIndexOp};
    let n = stock.offset;
    assert_eq!(n, mixed.offset);
    assert!(bit_equal(&sk.try_index((Ellipsis, ..n, ..)).unwrap(), &mk.try_index((Ellipsis, ..n, ..)).unwrap()));
    assert!(bit_equal(&sv.try_index((Ellipsis, ..n, ..)).unwrap(), &mv.try_index((Ellipsis, ..n, ..)).unwrap()));
}

/// Large activations (scores in the thousands: softmax saturates to one key) and tiny ones, a
/// prefill and a decode step each, through the stock core and the kernel of `class`:
/// (what, stock output, kernel output) per step.
fn extreme_steps(class: KernelClass) -> Vec<(String, Array, Array)> {
    let a = random_attention(4, 2, 64, false, Rope::plain(64, false, 1e4)).unwrap();
    let mut out = vec![];
    for scale in [300.0f32, 1e-20] {
        let (mut cw, mut cg) = (KvCache::default(), KvCache::default());
        for (i, l) in [5, 1].into_iter().enumerate() {
            let f = |shape: &[i32], s: u64| {
                rand(shape, s, 1.0, Dtype::Float32).unwrap().multiply(Array::from_f32(scale)).unwrap()
            };
            let (q, k, v) =
                (f(&[1, l, 256], 60 + i as u64), f(&[1, l, 128], 70 + i as u64), f(&[1, l, 128], 80 + i as u64));
            let w = gqa_attention_reference(&a, &q, &k, &v, &mut cw).unwrap();
            let g = gqa_attention(&a, &q, &k, &v, &mut cg, class).unwrap();
            out.push((format!("scale {scale} step {i}"), w, g));
        }
    }
    out
}

#[test]
fn gqa_attention_extreme_values() {
    let _g = mlx_lock();
    for (what, w, g) in extreme_steps(Exact) {
        assert!(bit_equal(&w, &g), "{what} differs");
    }
}

#[test]
fn gqa_attention_strided_inputs() {
    let _g = mlx_lock();
    // q, k, v as transposed views (not row-contiguous): packed inside the kernel, same bits.
    let a = random_attention(4, 2, 32, true, Rope::plain(32, false, 1e4)).unwrap();
    let view =
        |n: i32, l: i32, s: u64| rand(&[1, n, l], s, 2.0, Dtype::Float32).unwrap().transpose_axes(&[0, 2, 1]).unwrap();
    let (mut cw, mut cg) = (KvCache::default(), KvCache::default());
    for (i, l) in [6, 1].into_iter().enumerate() {
        let s = 20 + 3 * i as u64;
        let (q, k, v) = (view(128, l, s), view(64, l, s + 1), view(64, l, s + 2));
        let w = gqa_attention_reference(&a, &q, &k, &v, &mut cw).unwrap();
        let g = gqa_attention(&a, &q, &k, &v, &mut cg, Exact).unwrap();
        assert!(bit_equal(&w, &g), "step {i} differs");
    }
}

#[test]
fn gqa_attention_bad_inputs() {
    let _g = mlx_lock();
    let a = random_attention(4, 2, 64, false, Rope::plain(64, false, 1e4)).unwrap();
    let q = rand(&[1, 1, 256], 1, 1.0, Dtype::Float32).unwrap();
    let k = rand(&[1, 1, 128], 2, 1.0, Dtype::Float32).unwrap();
    // Wrong head count in k.
    let bad_k = rand(&[1, 1, 96], 3, 1.0, Dtype::Float32).unwrap();
    let e = gqa_attention(&a, &q, &bad_k, &bad_k, &mut KvCache::default(), Exact).unwrap_err();
    assert!(format!("{e:#}").contains("gqa_attention"), "{e:#}");
    // Half precision is refused (the stock core runs those calls).
    let e =
        gqa_attention(&a, &q.as_dtype(Dtype::Bfloat16).unwrap(), &k, &k, &mut KvCache::default(), Exact).unwrap_err();
    assert!(format!("{e:#}").contains("float32"), "{e:#}");
    // Rank errors.
    let e = gqa_attention(&a, &q.reshape(&[256]).unwrap(), &k, &k, &mut KvCache::default(), Exact).unwrap_err();
    assert!(format!("{e:#}").contains("[B, L, H*D]"), "{e:#}");
}

/// Max |a - b| over max |b| (relative to the output's scale); the shapes must match.
fn rel_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let d = ops::abs(a.subtract(b).unwrap()).unwrap().max(None).unwrap().item_cast::<f32>();
    let m = ops::abs(b).unwrap().max(None).unwrap().item_cast::<f32>();
    d / m.max(f32::MIN_POSITIVE)
}

fn check_fast(hq: i32, hk: i32, d: i32, norm: bool, rope: Rope, steps: &[i32], what: &str) {
    let a = random_attention(hq, hk, d, norm, rope).unwrap();
    let (want, got) = run_both(&a, steps, 7, Fast).unwrap();
    let mut rounded = false;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if i < steps.len() {
            let r = rel_diff(g, w);
            assert!(r < 2e-5, "{what}: step {i} output off by {r:e} (relative)");
            rounded |= !bit_equal(w, g);
        } else {
            assert!(
                bit_equal(w, g),
                "{what}: cache {} differs (the writes are exact in both classes)",
                i - steps.len()
            );
        }
    }
    // The reassociated sums round differently somewhere: else the fast core did not run.
    assert!(rounded, "{what}: the fast outputs are bit-identical to the stock core");
}

#[test]
fn gqa_attention_fast_within_rounding() {
    let _g = mlx_lock();
    check_fast(32, 4, 128, true, Rope::plain(128, false, 1e6), &[17, 1, 1, 1, 1], "qwen3 shape");
    // 12 query heads per KV head (GLM-4.5: a tile of 8 and one of 4), 1:1, odd head dims (a
    // remainder after the vector part), key counts that are not a multiple of 8.
    check_fast(24, 2, 128, true, Rope::plain(64, false, 1e4), &[13, 1, 1], "rep 12");
    check_fast(8, 8, 64, false, Rope::plain(64, false, 1e4), &[5, 3, 1], "MHA, chunked prefill");
    check_fast(6, 2, 40, false, Rope::plain(40, true, 1e4), &[9, 1, 1], "head dim 40, rep 3");
    check_fast(4, 2, 32, true, Rope::plain(32, false, 1e4), &[250, 10, 1, 1], "growth past 256");
}

#[test]
fn gqa_attention_fast_extremes_and_nan() {
    let _g = mlx_lock();
    // Saturated softmax (exp underflows to 0 for all but one key) and tiny scores.
    for (what, w, g) in extreme_steps(Fast) {
        let r = rel_diff(&g, &w);
        assert!(r < 2e-5, "{what}: off by {r:e}");
    }
    let a = random_attention(4, 2, 64, false, Rope::plain(64, false, 1e4)).unwrap();
    // A NaN in one key's row: every head of its group sees NaN, as in the stock chain.
    let (mut cw, mut cg) = (KvCache::default(), KvCache::default());
    let q = rand(&[1, 3, 256], 1, 1.0, Dtype::Float32).unwrap();
    let v = rand(&[1, 3, 128], 3, 1.0, Dtype::Float32).unwrap();
    let mut kv: Vec<f32> = rand(&[1, 3, 128], 2, 1.0, Dtype::Float32).unwrap().as_slice().to_vec();
    kv[5] = f32::NAN;
    let k = Array::from_slice(&kv, &[1, 3, 128]);
    let w = gqa_attention_reference(&a, &q, &k, &v, &mut cw).unwrap();
    let g = gqa_attention(&a, &q, &k, &v, &mut cg, Fast).unwrap();
    let nan = |x: &Array| ops::is_nan(x).unwrap().as_slice::<bool>().to_vec();
    assert_eq!(nan(&w), nan(&g), "NaN positions differ");
    assert!(nan(&g).iter().any(|&b| b), "the NaN key must reach the output");
}

#[test]
fn gqa_attention_host_ahead_of_the_stream() {
    let _g = mlx_lock();
    // The host builds and evaluates decode steps while the stream still works through earlier
    // ones (async_eval in the generate loop; with few nodes per step it gets a step or more
    // ahead). Here a slow matmul chain gates step 1's key, so when step 2's cache write is
    // evaluated on the host, step 1's write has not run: the previous cache may be copied only
    // inside the stream's task (a copy at evaluation time read the cache without step 1's row).
    let a = random_attention(4, 2, 64, true, Rope::plain(64, false, 1e4)).unwrap();
    let inputs: Vec<(Array, Array, Array)> = [5, 1, 1]
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let s = 90 + 3 * i as u64;
            (
                rand(&[1, l, 4 * 64], s, 2.0, Dtype::Float32).unwrap(),
                rand(&[1, l, 2 * 64], s + 1, 2.0, Dtype::Float32).unwrap(),
                rand(&[1, l, 2 * 64], s + 2, 1.0, Dtype::Float32).unwrap(),
            )
        })
        .collect();
    let mut stock = KvCache::default();
    let want: Vec<Array> = inputs
        .iter()
        .map(|(q, k, v)| {
            let o = gqa_attention_reference(&a, q, k, v, &mut stock).unwrap();
            o.eval().unwrap();
            o
        })
        .collect();
    for class in [Exact, Fast] {
        let mut cache = KvCache::default();
        let (q, k, v) = &inputs[0];
        gqa_attention(&a, q, k, v, &mut cache, class).unwrap().eval().unwrap();
        // ~1 s of reference-BLAS matmuls, finite, times zero: the value of k is unchanged.
        let mut slow = rand(&[768, 768], 5, 0.03, Dtype::Float32).unwrap();
        for _ in 0..3 {
            slow = slow.matmul(&slow).unwrap();
        }
        let gate = slow.sum(None).unwrap().multiply(Array::from_f32(0.0)).unwrap();
        let (q1, k1, v1) = &inputs[1];
        let o1 = gqa_attention(&a, q1, &k1.add(&gate).unwrap(), v1, &mut cache, class).unwrap();
        let (q2, k2, v2) = &inputs[2];
        let o2 = gqa_attention(&a, q2, k2, v2, &mut cache, class).unwrap();
        mlx_rs::transforms::eval([&o2]).unwrap();
        o1.eval().unwrap();
        for (i, (w, g)) in want[1..].iter().zip([&o1, &o2]).enumerate() {
            let ok = if class == Exact { bit_equal(w, g) } else { rel_diff(w, g) < 2e-5 };
            assert!(ok, "{class:?}: decode step {} differs from the stock core", i + 1);
        }
    }
}
