//! Building blocks with mlx.nn's exact op sequences: Linear / QuantizedLinear, Embedding /
//! QuantizedEmbedding, SwitchLinear / QuantizedSwitchLinear, RMSNorm, RoPE.
//! Loading follows mlx-lm's class_predicate: a module is quantized iff config.json names it or
//! its `.scales` tensor exists; bits and group size come from the tensor shapes.
use anyhow::{bail, Result};
use mlx_rs::{fast, ops, Array, Dtype};

use crate::config::{ModelConfig, QuantParams};
use crate::weights::{expect_float, WeightStore};

/// Everything a module loader needs besides its own path.
pub struct LoadCtx<'a> {
    pub store: &'a mut WeightStore,
    pub config: &'a ModelConfig,
    /// Compute dtype: float tensors (incl. quantization scales/biases) are cast to it.
    pub dtype: Dtype,
    /// Arrays produced since the last `drain`, so the loader can evaluate layer by layer.
    pub pending: Vec<Array>,
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

    /// A weight of logical shape `[lead.., out, in]`, float or quantized.
    fn weight(&mut self, path: &str, lead: &[i32], out: i32, inp: i32) -> Result<Weight> {
        let wname = format!("{path}.weight");
        let has_scales = self.store.contains(&format!("{path}.scales"));
        let Some(declared) = self.config.quant_for(path, has_scales) else {
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
        let (scales, biases) = (scales.as_dtype(self.dtype)?, biases.as_dtype(self.dtype)?);
        self.pending.extend([weight.clone(), scales.clone(), biases.clone()]);
        Ok(Weight::Quant(QWeight { weight, scales, biases, q }))
    }
}

#[derive(Clone)]
pub enum Weight {
    Float(Array),
    Quant(QWeight),
}

/// nn.Linear / nn.QuantizedLinear.
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Array>,
}

impl Linear {
    pub fn load(ctx: &mut LoadCtx, path: &str, inp: i32, out: i32, bias: bool) -> Result<Linear> {
        let weight = ctx.weight(path, &[], out, inp)?;
        let bias = if bias { Some(ctx.float(&format!("{path}.bias"), &[out])?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
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
}

fn quantized_matmul(x: &Array, q: &QWeight) -> Result<Array> {
    Ok(ops::quantized_matmul(x, &q.weight, &q.scales, &q.biases, true, q.q.group_size, q.q.bits)?)
}

/// nn.Embedding / nn.QuantizedEmbedding (and `as_linear` for tied output heads).
#[derive(Clone)]
pub struct Embedding {
    pub weight: Weight,
}

impl Embedding {
    pub fn load(ctx: &mut LoadCtx, path: &str, vocab: i32, dim: i32) -> Result<Embedding> {
        Ok(Embedding { weight: ctx.weight(path, &[], vocab, dim)? })
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        Ok(match &self.weight {
            Weight::Float(w) => w.take_axis(ids, 0)?,
            Weight::Quant(q) => ops::dequantize(
                q.weight.take_axis(ids, 0)?,
                q.scales.take_axis(ids, 0)?,
                &q.biases.take_axis(ids, 0)?,
                q.q.group_size,
                q.q.bits,
            )?,
        })
    }

    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Ok(match &self.weight {
            Weight::Float(w) => x.matmul(w.t())?,
            Weight::Quant(q) => quantized_matmul(x, q)?,
        })
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
        Ok(match &self.weight {
            Weight::Float(w) => ops::gather_mm(x, w.swap_axes(-1, -2)?, None, idx, sorted)?,
            Weight::Quant(q) => ops::gather_qmm(
                x, &q.weight, &q.scales, &q.biases, None, idx, true, q.q.group_size, q.q.bits, sorted,
            )?,
        })
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

/// nn.RoPE over `[B, H, L, D]`.
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
}

impl Rope {
    pub fn forward(&self, x: &Array, offset: i32) -> Result<Array> {
        Ok(fast::rope(x, self.dims, self.traditional, self.base, self.scale, offset, None)?)
    }
}
