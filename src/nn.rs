//! Building blocks with mlx.nn's exact op sequences: Linear / QuantizedLinear, Embedding /
//! QuantizedEmbedding, SwitchLinear / QuantizedSwitchLinear, RMSNorm, RoPE.
//! Loading follows mlx-lm's class_predicate: a module is quantized iff config.json names it or
//! its `.scales` tensor exists; bits and group size come from the tensor shapes.
use std::any::Any;
use std::rc::Rc;

use anyhow::{bail, Result};
use mlx_rs::{fast, ops, Array, Dtype};

use crate::config::{ModelConfig, QuantParams};
use crate::weights::{expect_float, WeightStore};

/// Everything a module loader needs besides its own path.
pub struct LoadCtx<'a> {
    pub store: &'a mut WeightStore,
    pub config: &'a ModelConfig,
    /// Compute dtype: float tensors are cast to it; quantization scales/biases stay as stored
    /// where that is exact (see [`keep_scales_stored`]).
    pub dtype: Dtype,
    /// Arrays produced since the last `drain`, so the loader can evaluate layer by layer.
    pub pending: Vec<Array>,
    /// With expert offloading: the expert pools being built (expert tensors are left in the files).
    pub offload: Option<&'a mut crate::offload::PoolBuilder>,
}

/// Affine-quantized weight: packed uint32 `[.., out, in*bits/32]` + scales/biases `[.., out, in/gs]`.
#[derive(Clone)]
pub struct QWeight {
    pub weight: Array,
    pub scales: Array,
    pub biases: Array,
    pub q: QuantParams,
}

impl LoadCtx<'_> {
    fn float(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        let a = self.store.take_shaped(name, shape)?;
        expect_float(self.store, name, &a)?;
        let a = a.as_dtype(self.dtype)?;
        self.pending.push(a.clone());
        Ok(a)
    }

    /// A float tensor of the given shape, cast to the compute dtype.
    pub fn tensor(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        self.float(name, shape)
    }

    /// A float tensor mlx-lm's conversion keeps in its stored dtype (e_score_correction_bias):
    /// cast only for an all-f32 run (as `set_dtype(float32)` does), else left as stored.
    pub fn tensor_stored(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        let a = self.store.take_shaped(name, shape)?;
        expect_float(self.store, name, &a)?;
        let a = if self.dtype == Dtype::Float32 { a.as_dtype(Dtype::Float32)? } else { a };
        self.pending.push(a.clone());
        Ok(a)
    }

    /// A weight of logical shape `[lead.., out, in]`, float or quantized.
    fn weight(&mut self, path: &str, lead: &[i32], out: i32, inp: i32) -> Result<Weight> {
        let wname = format!("{path}.weight");
        if self.store.is_lazy(&wname) {
            return crate::offload::pooled_weight(self, path, lead, out, inp);
        }
        let has_scales = self.store.contains(&format!("{path}.scales"));
        let Some(declared) = self.config.quant_for(path, has_scales) else {
            if has_scales
                && self.config.quantization.global.is_none()
                && !self.config.quantization.overrides.contains_key(path)
            {
                bail!(
                    "{}: `{path}` is quantized (it has `{path}.scales`), but config.json has no `quantization` \
                     block; add the one mlx_lm.convert writes, e.g. \"quantization\": {{\"group_size\": 64, \"bits\": 4}}",
                    self.store.file_of(&wname)
                );
            }
            let shape: Vec<i32> = lead.iter().copied().chain([out, inp]).collect();
            return Ok(Weight::Float(self.float(&wname, &shape)?));
        };
        let file = self.store.file_of(&wname);
        let weight = self.store.take(&wname)?;
        let scales = self.store.take(&format!("{path}.scales"))?;
        let biases = self.store.take(&format!("{path}.biases"))?;
        if weight.dtype() != Dtype::Uint32 {
            bail!("{file}: quantized tensor `{wname}` has dtype {:?}, expected uint32 (packed)", weight.dtype());
        }
        // mlx-lm infers bits / group size of each module from its tensors.
        let packed = *weight.shape().last().unwrap_or(&0);
        let groups = *scales.shape().last().unwrap_or(&0);
        if packed <= 0 || groups <= 0 || (packed * 32) % inp != 0 || inp % groups != 0 {
            bail!(
                "{file}: quantized `{path}` has weight {:?} and scales {:?}, which do not fit input width {inp}",
                weight.shape(),
                scales.shape()
            );
        }
        let q = QuantParams { bits: packed * 32 / inp, group_size: inp / groups };
        if self.config.quantization.overrides.contains_key(path) && q != declared {
            bail!(
                "{file}: config.json quantization.{path} says bits {} group_size {}, but the tensors have bits {} group_size {}",
                declared.bits, declared.group_size, q.bits, q.group_size
            );
        }
        let expect = |a: &Array, name: &str, last: i32| -> Result<()> {
            let shape: Vec<i32> = lead.iter().copied().chain([out, last]).collect();
            if a.shape() != shape.as_slice() {
                bail!("{file}: tensor `{path}.{name}` has shape {:?}, expected {shape:?}", a.shape());
            }
            Ok(())
        };
        expect(&weight, "weight", packed)?;
        expect(&scales, "scales", groups)?;
        expect(&biases, "biases", groups)?;
        expect_float(self.store, &format!("{path}.scales"), &scales)?;
        if biases.dtype() != scales.dtype() {
            bail!(
                "{file}: `{path}.biases` is {:?} but `{path}.scales` is {:?}; MLX-quantized checkpoints store both \
                 in one dtype",
                biases.dtype(),
                scales.dtype()
            );
        }
        let (scales, biases) = if keep_scales_stored(scales.dtype(), self.dtype) {
            (scales, biases)
        } else {
            (scales.as_dtype(self.dtype)?, biases.as_dtype(self.dtype)?)
        };
        self.pending.extend([weight.clone(), scales.clone(), biases.clone()]);
        Ok(Weight::Quant(QWeight { weight, scales, biases, q }))
    }
}

/// Whether quantization scales/biases of dtype `stored` stay as stored under compute dtype
/// `compute` instead of being cast at load (which for bf16 scales and f32 compute adds 11 % to a
/// 4-bit g64 checkpoint). True when MLX's quantized ops give the same result either way: the
/// dtypes are equal, or compute is f32 — `quantized_matmul`/`gather_qmm` promote to
/// `result_type(x, scales)` = f32 and widen the scales exactly per call (a transient cast of the
/// scales, not of the weights), and the CPU row kernels widen bf16/f16 scales on the fly.
/// Otherwise (e.g. f16 scales with bf16 compute, which would promote to f32) they are cast as
/// before.
pub fn keep_scales_stored(stored: Dtype, compute: Dtype) -> bool {
    stored == compute || compute == Dtype::Float32
}

#[derive(Clone)]
pub enum Weight {
    Float(Array),
    Quant(QWeight),
}

/// A dense projection `x @ W^T (+ b)` of one layer's weights (mistral.rs's `QuantMethod`): the
/// stock implementation is mlx.nn's Linear / QuantizedLinear ([`MlxLinear`]); a pattern may give
/// a [`Linear`] another implementation of the same weights (see [`Linear::with`]).
pub trait DenseProjection: Any {
    fn forward(&self, x: &Array) -> Result<Array>;
    fn weight(&self) -> &Weight;
    fn bias(&self) -> Option<&Array>;
    fn as_any(&self) -> &dyn Any;
}

/// nn.Linear / nn.QuantizedLinear: MLX's `addmm`/`matmul` or `quantized_matmul`.
#[derive(Clone)]
pub struct MlxLinear {
    pub weight: Weight,
    pub bias: Option<Array>,
}

impl DenseProjection for MlxLinear {
    fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match (&self.weight, &self.bias) {
            (Weight::Float(w), None) => x.matmul(w.t())?,
            (Weight::Float(w), Some(b)) => ops::addmm(b, x, w.t(), None, None)?,
            (Weight::Quant(q), b) => {
                let y = quantized_matmul(x, q)?;
                match b {
                    Some(b) => y.add(b)?,
                    None => y,
                }
            }
        })
    }

    fn weight(&self) -> &Weight {
        &self.weight
    }

    fn bias(&self) -> Option<&Array> {
        self.bias.as_ref()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A layer's dense projection: [`MlxLinear`] as loaded. Cloning shares the implementation;
/// [`Linear::with`] gives a copy another one (the slot holding the copy is what gets swapped and
/// restored, so the loaded layer never changes).
#[derive(Clone)]
pub struct Linear {
    imp: Rc<dyn DenseProjection>,
}

impl Linear {
    /// The stock projection over these weights.
    pub fn new(weight: Weight, bias: Option<Array>) -> Linear {
        Linear { imp: Rc::new(MlxLinear { weight, bias }) }
    }

    pub fn load(ctx: &mut LoadCtx, path: &str, inp: i32, out: i32, bias: bool) -> Result<Linear> {
        let weight = ctx.weight(path, &[], out, inp)?;
        let bias = if bias { Some(ctx.float(&format!("{path}.bias"), &[out])?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        self.imp.forward(x)
    }

    pub fn weight(&self) -> &Weight {
        self.imp.weight()
    }

    pub fn bias(&self) -> Option<&Array> {
        self.imp.bias()
    }

    /// The implementation that runs (a pattern may wrap it).
    pub fn implementation(&self) -> &Rc<dyn DenseProjection> {
        &self.imp
    }

    /// A copy of this layer computed by `imp` (which must project the same weights).
    pub fn with(&self, imp: Rc<dyn DenseProjection>) -> Linear {
        Linear { imp }
    }
}

/// `quantized_matmul(x, W, transpose=true)` as QuantizedLinear runs it (on CUDA: see
/// [`cuda_qmm_route`]).
pub fn quantized_matmul(x: &Array, q: &QWeight) -> Result<Array> {
    quantized_matmul_t(x, q, true)
}

/// `quantized_matmul(x, W, transpose)` through [`cuda_qmm_route`].
fn quantized_matmul_t(x: &Array, q: &QWeight, transpose: bool) -> Result<Array> {
    quantized_matmul_routed(x, q, transpose, cuda_qmm_route(x, out_rows(x, &q.weight)))
}

/// `quantized_matmul(x, W, transpose)` on a given route.
fn quantized_matmul_routed(x: &Array, q: &QWeight, transpose: bool, route: CudaQmm) -> Result<Array> {
    let stock = |x: &Array| -> Result<Array> {
        Ok(ops::quantized_matmul(x, &q.weight, &q.scales, &q.biases, transpose, q.q.group_size, q.q.bits)?)
    };
    match route {
        CudaQmm::Mlx => stock(x),
        CudaQmm::F32 => Ok(stock(&x.as_dtype(Dtype::Float32)?)?.as_dtype(x.dtype())?),
        CudaQmm::Deterministic => {
            let w = dequantized(q, x.dtype())?;
            Ok(if transpose { x.matmul(w.swap_axes(-1, -2)?)? } else { x.matmul(&w)? })
        }
    }
}

/// How the stock path runs a quantized matmul (`ZMLX_CUDA_QMM`). Only half-precision inputs of 8+
/// output rows on the CUDA backend are affected: there MLX 0.32.2 runs `qmm_sm80_kernel` (or its
/// naive kernel), and `qmm_sm80_kernel` has a shared-memory race (a late `cp.async` of the last K
/// tile lands in the epilogue's output tile; HANDOFF.md Known bugs, issue #15) that made greedy
/// output differ between processes. Fewer rows run MLX's qmv (deterministic) on every route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaQmm {
    /// MLX's quantized kernels as mlx-lm calls them (also every call off CUDA / in f32).
    Mlx,
    /// Default on CUDA: dense and per-head weights are dequantized and multiplied by MLX's matmul
    /// (cuBLAS, deterministic); gathered experts of at most 7 tokens are split into calls of < 8
    /// rows (MLX's gather_qmv), more tokens dequantize the expert stack and run MLX's gather_mm
    /// (CUTLASS grouped GEMM). Not the stock kernels' rounding order (same bf16 weights, products
    /// summed in another order); prefill is typically faster (tensor-core GEMMs).
    Deterministic,
    /// Diagnostic: the input goes in as float32, so MLX runs its naive kernel; ~3× slower prefill.
    F32,
}

/// The route of one quantized matmul whose result has `rows` rows (MLX's `M × batch`).
pub fn cuda_qmm_route(x: &Array, rows: usize) -> CudaQmm {
    // The backend first: on the CPU (every decode step) nothing else is looked at.
    if crate::mlx_env::backend() != crate::mlx_env::Backend::Cuda
        || !matches!(x.dtype(), Dtype::Bfloat16 | Dtype::Float16)
        || rows < 8
    {
        return CudaQmm::Mlx;
    }
    static ROUTE: std::sync::OnceLock<CudaQmm> = std::sync::OnceLock::new();
    *ROUTE.get_or_init(|| match crate::settings::var("ZMLX_CUDA_QMM").as_deref().map(str::trim) {
        Some("mlx") => CudaQmm::Mlx,
        Some("f32") => CudaQmm::F32,
        // Checked at start (settings::KNOWN): anything else is `deterministic`.
        _ => CudaQmm::Deterministic,
    })
}

/// Rows of `x @ W` as MLX counts them: every row of `x`, times the weight's batch when `x`
/// broadcasts over it (per-head weights `[H, out, in]` with `x` `[.., 1, L, in]`).
fn out_rows(x: &Array, w: &Array) -> usize {
    let rows = x.size() / (x.dim(-1).max(1) as usize);
    if w.ndim() >= 3 && x.ndim() >= 3 && x.dim(-3) == 1 {
        rows * w.dim(-3).max(1) as usize
    } else {
        rows
    }
}

/// The weight as `dtype` floats (dequantize returns the scales' dtype, which may be stored
/// narrower; widening is exact).
fn dequantized(q: &QWeight, dtype: Dtype) -> Result<Array> {
    Ok(ops::dequantize(&q.weight, &q.scales, &q.biases, q.q.group_size, q.q.bits)?.as_dtype(dtype)?)
}

/// nn.Embedding / nn.QuantizedEmbedding (a tied output head is a `Linear` over its weight).
#[derive(Clone)]
pub struct Embedding {
    pub weight: Weight,
    /// Compute dtype: the dequantized rows' dtype (scales may be stored narrower).
    pub dtype: Dtype,
}

impl Embedding {
    pub fn load(ctx: &mut LoadCtx, path: &str, vocab: i32, dim: i32) -> Result<Embedding> {
        Ok(Embedding { weight: ctx.weight(path, &[], vocab, dim)?, dtype: ctx.dtype })
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        Ok(match &self.weight {
            Weight::Float(w) => w.take_axis(ids, 0)?,
            // dequantize returns the scales' dtype: widen the gathered rows' scales (exact) so
            // the result is in the compute dtype, as with scales cast at load.
            Weight::Quant(q) => ops::dequantize(
                q.weight.take_axis(ids, 0)?,
                q.scales.take_axis(ids, 0)?.as_dtype(self.dtype)?,
                &q.biases.take_axis(ids, 0)?.as_dtype(self.dtype)?,
                q.q.group_size,
                q.q.bits,
            )?,
        })
    }
}

impl crate::slots::EmbeddingSlot for Embedding {
    fn forward(&self, ids: &Array) -> Result<Array> {
        Embedding::forward(self, ids)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// SwitchLinear / QuantizedSwitchLinear: one weight per expert, `[E, out, in]`.
#[derive(Clone)]
pub struct SwitchLinear {
    pub weight: Weight,
}

impl SwitchLinear {
    pub fn load(ctx: &mut LoadCtx, path: &str, experts: i32, inp: i32, out: i32) -> Result<SwitchLinear> {
        Ok(SwitchLinear { weight: ctx.weight(path, &[experts], out, inp)? })
    }

    /// `x` `[.., 1, in]` gathered per index in `idx` → `[.., k, 1, out]`.
    pub fn forward(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        self.forward_routed(x, idx, sorted, cuda_qmm_route(x, idx.size()))
    }

    /// [`forward`](Self::forward) on a given [`CudaQmm`] route (any backend: tests run the
    /// CUDA routes on the CPU).
    pub fn forward_routed(&self, x: &Array, idx: &Array, sorted: bool, route: CudaQmm) -> Result<Array> {
        let q = match &self.weight {
            Weight::Float(w) => return Ok(ops::gather_mm(x, w.swap_axes(-1, -2)?, None, idx, sorted)?),
            Weight::Quant(q) => q,
        };
        let stock = |x: &Array, idx: &Array| -> Result<Array> {
            Ok(ops::gather_qmm(x, &q.weight, &q.scales, &q.biases, None, idx, true, q.q.group_size, q.q.bits, sorted)?)
        };
        match route {
            CudaQmm::Mlx => stock(x, idx),
            CudaQmm::F32 => Ok(stock(&x.as_dtype(Dtype::Float32)?, idx)?.as_dtype(x.dtype())?),
            CudaQmm::Deterministic => match qmv_chunks(idx) {
                Some(width) => gather_in_chunks(x, idx, width, stock),
                None => {
                    let w = dequantized(q, x.dtype())?;
                    Ok(ops::gather_mm(x, w.swap_axes(-1, -2)?, None, idx, sorted)?)
                }
            },
        }
    }
}

/// Most chunks a gathered call is split into before the expert stack is dequantized instead.
const MAX_QMV_CHUNKS: usize = 4;

/// The width of chunks of `idx`'s last axis that keep each gathered call under MLX's 8-row qmm
/// threshold (so it runs gather_qmv), if at most [`MAX_QMV_CHUNKS`] are needed; balanced widths
/// (top-8 of one token: 4 + 4).
pub fn qmv_chunks(idx: &Array) -> Option<usize> {
    let k = idx.dim(-1).max(1) as usize;
    let lead = idx.size() / k;
    let widest = 7usize.checked_div(lead).filter(|&w| w > 0)?;
    let chunks = k.div_ceil(widest);
    (chunks <= MAX_QMV_CHUNKS).then(|| k.div_ceil(chunks))
}

/// `call(x, idx)` over chunks of `width` along `idx`'s last axis (and `x`'s slot axis −3 when it
/// has one row per slot), concatenated back along the slot axis of the result `[.., k, 1, out]`.
/// The chunks are views (split), so no index array is built per call.
fn gather_in_chunks(
    x: &Array,
    idx: &Array,
    width: usize,
    call: impl Fn(&Array, &Array) -> Result<Array>,
) -> Result<Array> {
    let k = idx.dim(-1);
    let cuts: Vec<i32> = (width as i32..k).step_by(width).collect();
    let idx_parts = idx.split_at_indices(&cuts, -1)?;
    let x_parts = if x.ndim() >= 3 && x.dim(-3) == k && k > 1 {
        x.split_at_indices(&cuts, -3)?
    } else {
        vec![x.clone(); idx_parts.len()]
    };
    let parts = x_parts.iter().zip(&idx_parts).map(|(x, i)| call(x, i)).collect::<Result<Vec<_>>>()?;
    Ok(ops::concatenate(&parts, -3)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::indexing::IndexOp;

    fn quantized_experts(e: i32, out: i32, inp: i32) -> SwitchLinear {
        let w = mlx_rs::random::normal::<f32>(&[e, out, inp], None, None, None).unwrap();
        let (weight, scales, biases) = ops::quantize(&w, 64, 4).unwrap();
        SwitchLinear {
            weight: Weight::Quant(QWeight { weight, scales, biases, q: QuantParams { group_size: 64, bits: 4 } }),
        }
    }

    #[test]
    fn qmv_chunks_keep_each_call_under_eight_rows() {
        let idx = |shape: &[i32]| Array::zeros::<u32>(shape).unwrap();
        assert_eq!(qmv_chunks(&idx(&[1, 1, 8])), Some(4)); // decode top-8: 4 + 4
        assert_eq!(qmv_chunks(&idx(&[1, 1, 4])), Some(4)); // < 8 already: one call
        assert_eq!(qmv_chunks(&idx(&[2, 1, 8])), Some(3)); // two tokens: 3 + 3 + 2 (6 rows per call)
        assert_eq!(qmv_chunks(&idx(&[1, 3, 8])), Some(2)); // three tokens: 4 chunks of 2 (6 rows)
        assert_eq!(qmv_chunks(&idx(&[1, 4, 8])), None); // 4 tokens would need 8 chunks
        assert_eq!(qmv_chunks(&idx(&[8, 1, 1])), None); // 8 tokens of top-1
        assert_eq!(qmv_chunks(&idx(&[512])), None); // mlx-lm's sorted prefill form
    }

    /// The CUDA `deterministic` route on the CPU: chunked calls are the stock call's rows
    /// (bitwise: each row is the same qmv); the dequantized stack + gather_mm is the same product
    /// in another summation order (close, not bitwise), for broadcast gate/up inputs, per-slot down
    /// inputs and the sorted prefill form.
    #[test]
    fn deterministic_route_matches_the_stock_gather() {
        let experts = quantized_experts(6, 32, 128);
        let x = mlx_rs::random::normal::<f32>(&[3, 1, 1, 1, 128], None, None, None).unwrap();
        let per_slot = mlx_rs::random::normal::<f32>(&[1, 1, 8, 1, 128], None, None, None).unwrap();
        let idx8 = Array::from_slice(&[5u32, 0, 3, 3, 1, 2, 4, 0], &[1, 1, 8]);
        let idx_3x2 = Array::from_slice(&[1u32, 4, 0, 5, 2, 2], &[3, 1, 2]);
        // mlx-lm's sorted form (from 64 pairs on): flat, sorted indices, one x row per pair
        let sorted: Vec<u32> = (0..64u32).map(|i| i * 6 / 64).collect();
        let sorted_idx = Array::from_slice(&sorted, &[64]);
        let sorted_x = mlx_rs::random::normal::<f32>(&[64, 1, 128], None, None, None).unwrap();
        let short_idx = Array::from_slice(&sorted[..10], &[10]);
        for (x, idx, sorted, chunked) in [
            (x.index((0..1, .., .., .., ..)), &idx8, false, true),
            (per_slot.clone(), &idx8, false, true),
            (x.clone(), &idx_3x2, false, true),
            (sorted_x.clone(), &sorted_idx, true, false),
            (sorted_x.index((0..10, .., ..)), &short_idx, true, true), // 5 + 5 rows
        ] {
            let stock = experts.forward_routed(&x, idx, sorted, CudaQmm::Mlx).unwrap();
            let det = experts.forward_routed(&x, idx, sorted, CudaQmm::Deterministic).unwrap();
            assert_eq!(det.shape(), stock.shape());
            assert_eq!(qmv_chunks(idx).is_some(), chunked);
            if chunked {
                assert!(det.eq_values(&stock).unwrap(), "chunked rows differ, idx {:?}", idx.shape());
            } else {
                assert!(det.all_close(&stock, 1e-4, 1e-4, None).unwrap(), "dequantized route differs");
            }
        }
    }

    #[test]
    fn deterministic_route_of_dense_and_per_head_weights() {
        let w = mlx_rs::random::normal::<f32>(&[3, 64, 128], None, None, None).unwrap();
        let (weight, scales, biases) = ops::quantize(&w, 64, 4).unwrap();
        let q = QWeight { weight, scales, biases, q: QuantParams { group_size: 64, bits: 4 } };
        let x = mlx_rs::random::normal::<f32>(&[1, 3, 9, 128], None, None, None).unwrap();
        let xt = mlx_rs::random::normal::<f32>(&[1, 3, 9, 64], None, None, None).unwrap();
        for (x, transpose) in [(&x, true), (&xt, false)] {
            let stock = quantized_matmul_routed(x, &q, transpose, CudaQmm::Mlx).unwrap();
            let det = quantized_matmul_routed(x, &q, transpose, CudaQmm::Deterministic).unwrap();
            assert!(det.all_close(&stock, 1e-4, 1e-4, None).unwrap(), "transpose {transpose}");
        }
        assert_eq!(out_rows(&x, &q.weight), 27);
        assert_eq!(out_rows(&x.index((.., 0..1, 0..1, ..)), &q.weight), 3); // [1, 1, 1, in] over 3 heads
    }
}

/// nn.RMSNorm.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(ctx: &mut LoadCtx, path: &str, dim: i32, eps: f32) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: ctx.float(&format!("{path}.weight"), &[dim])?, eps })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

impl crate::slots::NormSlot for RmsNorm {
    fn forward(&self, x: &Array) -> Result<Array> {
        RmsNorm::forward(self, x)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// nn.RoPE / YarnRoPE over `[B, H, L, D]`: rotates the first `dims` features.
#[derive(Clone)]
pub struct Rope {
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
    /// YaRN: per-pair frequencies passed to `fast::rope` instead of `base`.
    pub freqs: Option<Array>,
    /// YaRN: `x[..., :dims] *= mscale` before rotating (when the mscale ratio is not 1).
    pub pre_scale: Option<f64>,
}

impl Rope {
    pub fn plain(dims: i32, traditional: bool, base: f32) -> Rope {
        Rope { dims, traditional, base, scale: 1.0, freqs: None, pre_scale: None }
    }

    /// mlx-lm's YarnRoPE: frequencies from the correction range, computed with MLX f32 ops.
    pub fn yarn(dims: i32, traditional: bool, base: f64, y: &crate::config::RopeScaling) -> Result<Rope> {
        let crate::config::RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
        } = *y
        else {
            bail!("Rope::yarn needs yarn scaling parameters");
        };
        let d = dims as f64;
        let corr = |r: f64| (d * (orig / (r * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let low = corr(beta_fast).floor().max(0.0);
        let mut high = corr(beta_slow).ceil().min(d - 1.0);
        let get_mscale = |s: f64, m: f64| if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 };
        let ratio = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim);
        let f = |x: f64| Array::from_f32(x as f32);
        let exps = ops::arange::<_, f32>(0.0, d, 2.0)?.divide(f(d))?;
        let freq_extra = ops::power(f(base), &exps)?;
        let freq_inter = f(factor).multiply(&freq_extra)?;
        if low == high {
            high += 0.001;
        }
        let ramp = ops::arange::<_, f32>(None, (dims / 2) as f64, None)?.subtract(f(low))?.divide(f(high - low))?;
        let ramp = ops::clip(&ramp, (&f(0.0), &f(1.0)))?;
        let mask = f(1.0).subtract(&ramp)?;
        let num = freq_inter.multiply(&freq_extra)?;
        let den = freq_inter.multiply(&mask)?.add(freq_extra.multiply(f(1.0).subtract(&mask)?)?)?;
        let freqs = num.divide(&den)?;
        freqs.eval()?;
        Ok(Rope {
            dims,
            traditional,
            base: base as f32,
            scale: 1.0,
            freqs: Some(freqs),
            pre_scale: (ratio != 1.0).then_some(ratio),
        })
    }

    pub fn forward(&self, x: &Array, offset: i32) -> Result<Array> {
        // MLX 0.32.2's CUDA rope kernel returns wrong, run-to-run varying values for strided
        // inputs such as MLA's split q_pe/k_pe (scripts/gpu/split_repro.py: |Δ| up to 6 vs the
        // same op on a contiguous copy; mlx-lm is hit too). Copy first on GPU backends; the CPU
        // rope is an op-composed fallback that handles views, so it stays as mlx-lm runs it.
        let x = if crate::mlx_env::backend() != crate::mlx_env::Backend::Cpu { x.contiguous()? } else { x.clone() };
        let x = match self.pre_scale {
            Some(m) => x.multiply(Array::from_f32(m as f32).as_dtype(x.dtype())?)?,
            None => x,
        };
        Ok(match &self.freqs {
            Some(freqs) => fast::rope(&x, self.dims, self.traditional, None, self.scale, offset, freqs)?,
            None => fast::rope(&x, self.dims, self.traditional, self.base, self.scale, offset, None)?,
        })
    }
}

/// mla.py's MultiLinear: one `[out, in]` matrix per head, weight `[H, out, in]`, float or quantized.
#[derive(Clone)]
pub struct MultiLinear {
    pub weight: Weight,
}

impl MultiLinear {
    pub fn load(ctx: &mut LoadCtx, path: &str, heads: i32, inp: i32, out: i32) -> Result<MultiLinear> {
        Ok(MultiLinear { weight: ctx.weight(path, &[heads], out, inp)? })
    }

    /// `transpose = true`: `x @ W^T` (x `[.., in]` → `[.., out]`); false: `x @ W` (x `[.., out]` → `[.., in]`).
    /// On CUDA the quantized form follows [`cuda_qmm_route`]: the MLA core's per-head
    /// `embed_q`/`unembed_out` run `qmm_sm80_kernel` at prefill and with many heads at decode,
    /// and its race made the MLA families' greedy output differ between processes even with
    /// every other quantized matmul on zmlx's bodies (racecheck, H200 2026-12-01).
    pub fn forward(&self, x: &Array, transpose: bool) -> Result<Array> {
        Ok(match &self.weight {
            Weight::Float(w) => {
                if transpose {
                    x.matmul(w.swap_axes(-1, -2)?)?
                } else {
                    x.matmul(w)?
                }
            }
            Weight::Quant(q) => quantized_matmul_t(x, q, transpose)?,
        })
    }
}
