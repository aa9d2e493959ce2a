//! criterion: each fused kernel vs its MLX-ops reference, at the bench checkpoints' shapes
//! (hidden 2048, expert width 768, 64 experts, top-8; 256-expert DeepSeek router), for one
//! decode token and a 128-token prefill chunk. Each iteration builds the op and evaluates it.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::config::QuantParams;
use zmlx::kernels::{self, experts, rope, CombineMode, RouterKind, SigmoidRouting};
use zmlx::nn::{QWeight, Rope};

/// 4-bit, group 64 stacked expert weights [E, N, K] (the bench checkpoints' quantization).
fn qweight(e: i32, n: i32, k: i32, seed: u64) -> QWeight {
    let w = rand(&[e, n, k], seed, Dtype::Float32).multiply(Array::from_f32(0.02)).unwrap();
    let (weight, scales, biases) = ops::quantize(&w, 64, 4).unwrap();
    mlx_rs::transforms::eval([&weight, &scales, &biases]).unwrap();
    QWeight { weight, scales, biases, q: QuantParams { bits: 4, group_size: 64 } }
}

/// The decode-step expert and rope kernels (one token; qwen3 bench: 64 experts, top-8, hidden
/// 2048, expert width 768; GLM-4.7-Flash-like MLA rope: 20 heads, rope dim 64).
fn bench_decode_kernels(c: &mut Criterion) {
    zmlx::mlx_env::init().unwrap();
    let mut g = c.benchmark_group("kernels/decode");
    let (gate, up, down) = (qweight(64, 768, 2048, 11), qweight(64, 768, 2048, 12), qweight(64, 2048, 768, 13));
    let x = rand(&[1, 2048], 14, Dtype::Float32);
    let idx = Array::from_slice(&[3u32, 9, 17, 22, 35, 41, 50, 63], &[1, 8]);
    let w = ops::softmax_axis(rand(&[1, 8], 15, Dtype::Float32), -1, true).unwrap();
    g.bench_function(BenchmarkId::new("qmv_swiglu", "reference"), |b| {
        b.iter(|| experts::qmv_swiglu_reference(&x, &idx, &gate, &up).unwrap().eval().unwrap())
    });
    g.bench_function(BenchmarkId::new("qmv_swiglu", "fused"), |b| {
        b.iter(|| experts::qmv_swiglu(&x, &idx, &gate, &up).unwrap().eval().unwrap())
    });
    let h = rand(&[1, 8, 768], 16, Dtype::Float32);
    g.bench_function(BenchmarkId::new("qmv_combine", "reference"), |b| {
        b.iter(|| experts::qmv_combine_reference(&h, &idx, &w, &down).unwrap().eval().unwrap())
    });
    g.bench_function(BenchmarkId::new("qmv_combine", "fused"), |b| {
        b.iter(|| experts::qmv_combine(&h, &idx, &w, &down).unwrap().eval().unwrap())
    });
    let q = rand(&[1, 20, 1, 64], 17, Dtype::Float32);
    let k = rand(&[1, 1, 1, 64], 18, Dtype::Float32);
    let r = Rope::plain(64, true, 1_000_000.0);
    g.bench_function(BenchmarkId::new("rope_decode", "reference"), |b| {
        b.iter(|| {
            let (a, bb) = rope::rope_decode_reference(&q, &k, &r, 700, 0.07).unwrap();
            mlx_rs::transforms::eval([&a, &bb]).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("rope_decode", "fused"), |b| {
        b.iter(|| {
            let (a, bb) = rope::rope_decode(&q, &k, &r, 700, 0.07).unwrap();
            mlx_rs::transforms::eval([&a, &bb]).unwrap()
        })
    });
    g.finish();
}

fn rand(shape: &[i32], seed: u64, dtype: Dtype) -> Array {
    let key = random::key(seed).unwrap();
    let a = random::normal::<f32>(shape, 0.0, 1.0, &key).unwrap().as_dtype(dtype).unwrap();
    a.eval().unwrap();
    a
}

fn bench(c: &mut Criterion) {
    zmlx::mlx_env::init().unwrap();
    for (label, tokens) in [("decode", 1), ("prefill128", 128)] {
        let mut g = c.benchmark_group(format!("kernels/{label}"));
        let (gate, up) =
            (rand(&[1, tokens, 8, 1, 768], 1, Dtype::Float32), rand(&[1, tokens, 8, 1, 768], 2, Dtype::Float32));
        g.bench_function(BenchmarkId::new("swiglu", "reference"), |b| {
            b.iter(|| kernels::swiglu_reference(&gate, &up).unwrap().eval().unwrap())
        });
        g.bench_function(BenchmarkId::new("swiglu", "fused"), |b| {
            b.iter(|| kernels::swiglu(&gate, &up).unwrap().eval().unwrap())
        });
        let y = rand(&[1, tokens, 8, 2048], 3, Dtype::Float32);
        let w = ops::softmax_axis(rand(&[1, tokens, 8], 4, Dtype::Float32), -1, true).unwrap();
        g.bench_function(BenchmarkId::new("moe_combine", "reference"), |b| {
            b.iter(|| kernels::moe_combine_reference(&y, &w).unwrap().eval().unwrap())
        });
        g.bench_function(BenchmarkId::new("moe_combine", "fused"), |b| {
            b.iter(|| kernels::moe_combine(&y, &w, CombineMode::Act).unwrap().eval().unwrap())
        });
        let logits = rand(&[1, tokens, 64], 5, Dtype::Float32);
        let kind = RouterKind::SoftmaxThenTopK { norm: true };
        g.bench_function(BenchmarkId::new("moe_router", "reference"), |b| {
            b.iter(|| {
                mlx_rs::transforms::eval(
                    <[Array; 2]>::from(kernels::moe_router_reference(&logits, kind, 8).unwrap()).iter(),
                )
                .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("moe_router", "fused"), |b| {
            b.iter(|| {
                mlx_rs::transforms::eval(<[Array; 2]>::from(kernels::moe_router(&logits, kind, 8).unwrap()).iter())
                    .unwrap()
            })
        });
        let ds_logits = rand(&[1, tokens, 256], 6, Dtype::Float32);
        let bias = rand(&[256], 7, Dtype::Float32);
        let p = SigmoidRouting {
            k: 8,
            n_group: 8,
            topk_group: 4,
            norm_topk_prob: true,
            renorm_eps: None,
            routed_scaling_factor: 2.5,
        };
        g.bench_function(BenchmarkId::new("sigmoid_router", "reference"), |b| {
            b.iter(|| {
                mlx_rs::transforms::eval(
                    <[Array; 2]>::from(kernels::sigmoid_router_reference(&ds_logits, &bias, &p).unwrap()).iter(),
                )
                .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("sigmoid_router", "fused"), |b| {
            b.iter(|| {
                mlx_rs::transforms::eval(
                    <[Array; 2]>::from(kernels::sigmoid_router(&ds_logits, &bias, &p).unwrap()).iter(),
                )
                .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench, bench_decode_kernels
}
criterion_main!(benches);
