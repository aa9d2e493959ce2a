//! `zmlx selftest`: every fused kernel against its MLX-ops reference on the backend this process
//! runs on (the GPU machine has no cargo, so the kernel checks ship in the binary). Reports, per
//! case, whether the outputs are bit-identical and the max |difference|.
use anyhow::Result;
use mlx_rs::{ops, random, Array, Dtype};
use serde::Serialize;

use crate::kernels::{self, CombineMode, RouterKind, SigmoidRouting};

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub kernel: &'static str,
    pub case: String,
    pub bit_exact: bool,
    pub max_abs_diff: f64,
    /// Set when the fused call itself failed.
    pub error: Option<String>,
}

fn rand(shape: &[i32], seed: u64, scale: f32, dtype: Dtype) -> Result<Array> {
    let key = random::key(seed)?;
    Ok(random::normal::<f32>(shape, 0.0, scale, &key)?.as_dtype(dtype)?)
}

fn compare(kernel: &'static str, case: String, want: Result<Vec<Array>>, got: Result<Vec<Array>>) -> CaseResult {
    let (want, got) = match (want, got) {
        (Ok(w), Ok(g)) => (w, g),
        (Err(e), _) | (_, Err(e)) => {
            return CaseResult { kernel, case, bit_exact: false, max_abs_diff: f64::NAN, error: Some(format!("{e:#}")) }
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
    CaseResult { kernel, case, bit_exact: exact, max_abs_diff: diff, error: None }
}

pub fn run() -> Result<Vec<CaseResult>> {
    let mut out = Vec::new();
    for dt in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
        for (i, shape) in [vec![1, 1, 8, 1, 768], vec![1, 64, 8, 1, 768], vec![3, 17, 130]].iter().enumerate() {
            let g = rand(shape, i as u64, 3.0, dt)?;
            let u = rand(shape, 100 + i as u64, 1.0, dt)?;
            out.push(compare(
                "swiglu",
                format!("{shape:?} {dt:?}"),
                kernels::swiglu_reference(&g, &u).map(|a| vec![a]),
                kernels::swiglu(&g, &u).map(|a| vec![a]),
            ));
        }
        for (i, (lead, k, d)) in [(vec![1, 1], 8, 2048), (vec![1, 64], 4, 2048), (vec![2, 3], 1, 64)].iter().enumerate()
        {
            let y = rand(&[lead.clone(), vec![*k, *d]].concat(), 10 + i as u64, 1.0, dt)?;
            let w = ops::softmax_axis(rand(&[lead.clone(), vec![*k]].concat(), 20 + i as u64, 2.0, dt)?, -1, true)?;
            let want = kernels::moe_combine_reference(&y, &w).map(|a| vec![a]);
            out.push(compare(
                "moe_combine",
                format!("act {lead:?} k={k} D={d} {dt:?}"),
                want,
                kernels::moe_combine(&y, &w, CombineMode::Act).map(|a| vec![a]),
            ));
            let want32 = kernels::moe_combine_reference(&y.as_dtype(Dtype::Float32)?, &w.as_dtype(Dtype::Float32)?)
                .and_then(|a| Ok(vec![a.as_dtype(dt)?]));
            out.push(compare(
                "moe_combine",
                format!("f32_no_fma {lead:?} k={k} D={d} {dt:?}"),
                want32,
                kernels::moe_combine(&y, &w, CombineMode::F32NoFma).map(|a| vec![a]),
            ));
        }
        for (i, (rows, e, k)) in [(1, 8, 2), (1, 128, 8), (40, 64, 4)].iter().enumerate() {
            let logits = rand(&[1, *rows, *e], 30 + i as u64, 3.0, dt)?;
            for kind in [
                RouterKind::TopKThenSoftmax,
                RouterKind::SoftmaxThenTopK { norm: true },
                RouterKind::SoftmaxThenTopKDesc,
            ] {
                let want = kernels::moe_router_reference(&logits, kind, *k).map(|(a, b)| vec![a, b]);
                let got = kernels::moe_router(&logits, kind, *k).map(|(a, b)| vec![a, b]);
                out.push(compare("moe_router", format!("{kind:?} rows={rows} E={e} k={k} {dt:?}"), want, got));
            }
        }
        for (i, (e, k, ng, tg)) in [(256, 8, 8, 4), (64, 4, 1, 1), (384, 8, 1, 1)].iter().enumerate() {
            let logits = rand(&[1, 3, *e], 40 + i as u64, 2.0, dt)?;
            let bias = rand(&[*e], 50 + i as u64, 0.1, Dtype::Float32)?;
            let p = SigmoidRouting {
                k: *k,
                n_group: *ng,
                topk_group: *tg,
                norm_topk_prob: true,
                renorm_eps: None,
                routed_scaling_factor: 2.5,
            };
            let want = kernels::sigmoid_router_reference(&logits, &bias, &p).map(|(a, b)| vec![a, b]);
            let got = kernels::sigmoid_router(&logits, &bias, &p).map(|(a, b)| vec![a, b]);
            out.push(compare("sigmoid_router", format!("E={e} k={k} groups {ng}/{tg} {dt:?}"), want, got));
        }
    }
    Ok(out)
}
