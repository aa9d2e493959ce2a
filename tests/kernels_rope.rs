//! `rope_decode` vs the stock chain (YaRN pre-scale, mx.fast.rope, × softmax scale) on CPU:
//! bit-exact for every float dtype, traditional and half-split layouts, base and YaRN
//! frequencies, linear position scaling, partial rotation, offsets 0 … 10^6, one and several
//! positions, strided views (q_pe is a split of the projected heads), and bad-input errors.
mod common;

use common::mlx_lock;
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::config::RopeScaling;
use zmlx::kernels::rope::{rope_decode, rope_decode_reference};
use zmlx::nn::Rope;

fn rand(shape: &[i32], seed: u64, dtype: Dtype) -> Array {
    let key = random::key(seed).unwrap();
    random::normal::<f32>(shape, 0.0, 2.0, &key).unwrap().as_dtype(dtype).unwrap()
}

fn bit_equal(a: &Array, b: &Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && ops::array_eq(a, b, true).unwrap().item_cast::<bool>()
}

fn yarn(dims: i32) -> Rope {
    let y = RopeScaling::Yarn {
        factor: 40.0,
        original_max_position_embeddings: 4096.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 0.707,
    };
    Rope::yarn(dims, true, 10000.0, &y).unwrap()
}

fn check(q: &Array, k: &Array, rope: &Rope, offset: i32, what: &str) {
    let (wq, wk) = rope_decode_reference(q, k, rope, offset, 0.0721).unwrap();
    let (gq, gk) = rope_decode(q, k, rope, offset, 0.0721).unwrap();
    assert!(bit_equal(&wq, &gq), "{what}: q differs");
    assert!(bit_equal(&wk, &gk), "{what}: k differs");
}

#[test]
fn rope_decode_bit_exact() {
    let _g = mlx_lock();
    let ropes: Vec<(&str, Rope)> = vec![
        ("glm traditional base 1e6", Rope::plain(64, true, 1_000_000.0)),
        ("half-split base 1e4", Rope::plain(64, false, 10_000.0)),
        ("linear scale 0.25", Rope { scale: 0.25, ..Rope::plain(32, true, 10_000.0) }),
        ("yarn (freqs + mscale)", yarn(64)),
        ("partial rotation 32 of 64", Rope::plain(32, true, 10_000.0)),
    ];
    for (name, rope) in &ropes {
        for dt in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
            for (l, offset) in [(1, 0), (1, 7), (1, 4095), (1, 1_000_000), (3, 12)] {
                for heads in [1, 4] {
                    // q_pe as the model makes it: the tail of each projected head, a strided view.
                    let full = rand(&[1, heads, l, 128 + 64], 1 + offset as u64, dt);
                    let q = full.split_at_indices(&[128], -1).unwrap()[1].clone();
                    let k = rand(&[1, 1, l, 64], 2 + offset as u64, dt);
                    check(&q, &k, rope, offset, &format!("{name} {dt:?} L={l} offset={offset} H={heads}"));
                }
            }
        }
    }
}

#[test]
fn rope_decode_specials_and_errors() {
    let _g = mlx_lock();
    let mut v = rand(&[1, 2, 1, 64], 3, Dtype::Float32).as_slice::<f32>().to_vec();
    v[0] = f32::NAN;
    v[3] = f32::INFINITY;
    v[70] = -0.0;
    let q = Array::from_slice(&v, &[1, 2, 1, 64]);
    let k = rand(&[1, 1, 1, 64], 4, Dtype::Float32);
    check(&q, &k, &Rope::plain(64, true, 10_000.0), 5, "NaN/inf");
    let e = rope_decode(&q, &rand(&[1, 1, 2, 64], 5, Dtype::Float32), &Rope::plain(64, true, 1e4), 0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected q_pe [B, H, L, R]"), "{e}");
    let e = rope_decode(&q.as_dtype(Dtype::Int32).unwrap(), &k, &Rope::plain(64, true, 1e4), 0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("float32, float16 or bfloat16"), "{e}");
}
