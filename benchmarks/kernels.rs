//! criterion: each fused kernel vs its MLX-ops reference, at the bench checkpoints' shapes
//! (hidden 2048, expert width 768, 64 experts, top-8; 256-expert DeepSeek router), for one
//! decode token and a 128-token prefill chunk. Each iteration builds the op and evaluates it.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mlx_rs::{ops, random, Array, Dtype};
use zmlx::kernels::{self, CombineMode, RouterKind, SigmoidRouting};

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
    targets = bench
}
criterion_main!(benches);
