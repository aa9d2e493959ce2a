//! The `zmlx selftest` harness: a case runs a kernel and its reference on the same inputs and
//! records whether the outputs are bit-identical and the max |difference|. Each kernel module
//! holds its own cases (`selftest` there); `crate::selftest::run` runs them all in order.
use anyhow::Result;
use mlx_rs::{ops, random, Array, Dtype};
use serde::Serialize;

use crate::config::QuantParams;
use crate::nn::QWeight;

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub kernel: &'static str,
    pub case: String,
    pub bit_exact: bool,
    /// Whether zmlx claims this case bit-exact on this backend (its pattern is `safe` here);
    /// `zmlx selftest` fails when such a case is not.
    pub claims_exact: bool,
    pub max_abs_diff: f64,
    /// Set when the fused call itself failed.
    pub error: Option<String>,
}

pub fn rand(shape: &[i32], seed: u64, scale: f32, dtype: Dtype) -> Result<Array> {
    let key = random::key(seed)?;
    Ok(random::normal::<f32>(shape, 0.0, scale, &key)?.as_dtype(dtype)?)
}

/// Which cases are claimed bit-exact: every case on the CPU; on CUDA the routers, SwiGLU and
/// the float32 combine (the half-precision combine runs MLX's ops there, the expert/rope
/// kernels are opt-in experimental, the probes are measurements); on Metal nothing has run.
pub fn claims_exact(kernel: &str, case: &str, backend: crate::mlx_env::Backend) -> bool {
    use crate::mlx_env::Backend;
    match backend {
        // A token of a many-token call against the same token alone: the same arithmetic by
        // construction on every backend (the GPU expert bodies' decode and grouped forms too).
        _ if case.contains("invariance") => true,
        Backend::Cpu => true,
        Backend::Metal => false,
        Backend::Cuda => match kernel {
            "swiglu" | "moe_router" | "sigmoid_router" => true,
            "moe_combine" => !case.contains("probe") && case.contains("Float32"),
            _ => false,
        },
    }
}

pub fn compare(kernel: &'static str, case: String, want: Result<Vec<Array>>, got: Result<Vec<Array>>) -> CaseResult {
    let claims_exact = claims_exact(kernel, &case, super::backend());
    let (want, got) = match (want, got) {
        (Ok(w), Ok(g)) => (w, g),
        (Err(e), _) | (_, Err(e)) => {
            if super::backend() != crate::mlx_env::Backend::Cpu {
                eprintln!("[selftest] {kernel} {case}: error {e:#}");
            }
            return CaseResult {
                kernel,
                case,
                bit_exact: false,
                claims_exact,
                max_abs_diff: f64::NAN,
                error: Some(format!("{e:#}")),
            };
        }
    };
    let mut exact = true;
    let mut diff = 0.0f64;
    for (w, g) in want.iter().zip(&got) {
        let same = w.shape() == g.shape()
            && w.dtype() == g.dtype()
            && ops::array_eq(w, g, true).map(|a| a.item_cast::<bool>()).unwrap_or(false);
        exact &= same;
        if w.shape() == g.shape() {
            let d =
                ops::abs(w.as_dtype(Dtype::Float32).unwrap().subtract(g.as_dtype(Dtype::Float32).unwrap()).unwrap())
                    .and_then(|a| a.max(None))
                    .map(|m| m.item_cast::<f32>() as f64)
                    .unwrap_or(f64::NAN);
            diff = diff.max(d);
        }
    }
    if super::backend() != crate::mlx_env::Backend::Cpu {
        // GPU runs are few and remote: progress on stderr shows where a hang or a JIT stall is.
        eprintln!("[selftest] {kernel} {case}: exact {exact}, max |diff| {diff:e}");
    }
    CaseResult { kernel, case, bit_exact: exact, claims_exact, max_abs_diff: diff, error: None }
}

/// A random quantized expert stack `[e, n, k]` (group size 64), scales/biases in `dt`.
pub fn qweight(e: i32, n: i32, k: i32, bits: i32, seed: u64, dt: Dtype) -> Result<QWeight> {
    let (weight, scales, biases) = ops::quantize(&rand(&[e, n, k], seed, 0.05, Dtype::Float32)?, 64, bits)?;
    let (scales, biases) = (scales.as_dtype(dt)?, biases.as_dtype(dt)?);
    Ok(QWeight { weight, scales, biases, q: QuantParams { bits, group_size: 64 } })
}

/// `[t, k]` uint32 expert indices in `0..e`, distinct within a row (k <= e), spread so that the
/// experts get different token counts.
pub fn spread_indices(t: i32, k: i32, e: i32) -> Array {
    let v: Vec<u32> = (0..t).flat_map(|r| (0..k).map(move |j| ((r * 7 + j * (e / k)) % e) as u32)).collect();
    Array::from_slice(&v, &[t, k])
}

/// `f` on each row of `xs` (axis 0) alone, the results concatenated: what a many-token call must
/// equal bit for bit when a token's result does not depend on the others.
pub fn per_row(xs: &[&Array], f: impl Fn(&[Array]) -> Result<Array>) -> Result<Array> {
    let t = xs[0].dim(0);
    let mut rows = Vec::with_capacity(t as usize);
    for r in 0..t {
        let one: Vec<Array> =
            xs.iter().map(|a| a.take_axis(Array::from_slice(&[r], &[1]), 0)).collect::<Result<_, _>>()?;
        rows.push(f(&one)?);
    }
    Ok(ops::concatenate(&rows, 0)?)
}
