//! A loaded MoE language model: embedding → decoder layers (attention + MoE/dense MLP, each a
//! patchable slot) → final norm → output head. Family files decide how slots are composed.
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result};
use mlx_rs::{transforms::eval, Array, Dtype};

use crate::cache::KvCache;
use crate::config::{Family, ModelConfig};
use crate::mlx_env::Backend;
use crate::models;
use crate::moe::MoeBlock;
use crate::nn::{Embedding, Linear, LoadCtx, RmsNorm};
use crate::slots::{AttentionSlot, EmbeddingSlot, HeadSlot, MapLinears, MlpSlot, NormSlot, Slot, SlotMut};
use crate::weights::WeightStore;

pub enum LayerMlp {
    Moe(MoeBlock),
    Dense(Slot<dyn MlpSlot>),
}

pub struct DecoderLayer {
    pub input_layernorm: Slot<dyn NormSlot>,
    pub post_attention_layernorm: Slot<dyn NormSlot>,
    pub attention: Slot<dyn AttentionSlot>,
    pub mlp: LayerMlp,
}

impl DecoderLayer {
    /// (attention output, layer output); `caches`: one for all rows of `x`, or one per row.
    fn forward_parts(&self, x: &Array, caches: &mut [KvCache]) -> Result<(Array, Array)> {
        let a = crate::profile::span("attention", || {
            self.attention.get().forward(&self.input_layernorm.get().forward(x)?, caches)
        })?;
        let h = x.add(&a)?;
        let n = self.post_attention_layernorm.get().forward(&h)?;
        let m = match &self.mlp {
            LayerMlp::Moe(block) => block.forward(&n)?,
            LayerMlp::Dense(mlp) => crate::profile::span("dense_mlp", || mlp.get().forward(&n))?,
        };
        Ok((a, h.add(m)?))
    }
}

/// The stock output head (lm_head, or the tied embedding used as a linear map).
#[derive(Clone)]
pub struct OutputHead {
    pub linear: Linear,
}

impl HeadSlot for OutputHead {
    fn forward(&self, h: &Array) -> Result<Array> {
        self.linear.forward(h)
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn HeadSlot>> {
        Some(Rc::new(OutputHead { linear: f(&self.linear) }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub struct Model {
    /// With expert offloading: the expert pools and their prefetch thread (first, so it is
    /// dropped — its thread joined — before the layers).
    pub offload: Option<crate::offload::ExpertCache>,
    pub config: ModelConfig,
    pub embed_tokens: Slot<dyn EmbeddingSlot>,
    pub layers: Vec<DecoderLayer>,
    pub norm: Slot<dyn NormSlot>,
    /// lm_head, or the embedding as a linear map when tied.
    pub head: Slot<dyn HeadSlot>,
    pub dtype: Dtype,
}

/// Requested compute dtype; `Auto` is f32 on the CPU backend (its gather_mm is f32-only and its
/// quantized kernels are ~10x slower in bf16) and the checkpoint's dtype on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeChoice {
    Auto,
    F32,
    F16,
    Bf16,
}

impl DtypeChoice {
    pub fn resolve(self, backend: Backend, stored: Dtype) -> Dtype {
        match self {
            DtypeChoice::F32 => Dtype::Float32,
            DtypeChoice::F16 => Dtype::Float16,
            DtypeChoice::Bf16 => Dtype::Bfloat16,
            DtypeChoice::Auto if backend == Backend::Cpu => Dtype::Float32,
            DtypeChoice::Auto => stored,
        }
    }
}

pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Float32 => "float32",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        _ => "non-float",
    }
}

/// What `Model::load` did, for reports.
pub struct LoadInfo {
    pub seconds: f64,
    pub stored_dtype: Dtype,
    pub quantized: bool,
}

impl Model {
    /// Loads a checkpoint directory (HF or mlx-community layout, float or MLX-quantized).
    pub fn load(dir: &Path, dtype: DtypeChoice, backend: Backend) -> Result<(Model, LoadInfo)> {
        Model::load_with(dir, dtype, backend, None)
    }

    /// [`load`](Self::load); with `offload`, the routed experts stay in the checkpoint files
    /// and each MoE layer holds a bounded pool of them (`crate::offload`).
    pub fn load_with(
        dir: &Path,
        dtype: DtypeChoice,
        backend: Backend,
        offload: Option<crate::offload::OffloadConfig>,
    ) -> Result<(Model, LoadInfo)> {
        let start = Instant::now();
        let dir = crate::config::checkpoint_dir(dir)?;
        let config = ModelConfig::load(&dir)?;
        if offload.is_some() && backend != Backend::Cpu {
            anyhow::bail!(
                "--expert-cache runs on the CPU backend only for now (the pools are host memory); on {backend:?} load \
                 without it"
            );
        }
        if offload.is_some() && config.num_experts == 0 {
            anyhow::bail!("--expert-cache: {} has no routed experts (num_experts is 0)", dir.display());
        }
        let lazy = |name: &str| offload.is_some() && crate::weights::is_expert_tensor(name);
        let mut store = WeightStore::open_with(&dir, &lazy)?;
        let stored = stored_float_dtype(&store);
        let quantized = store.names().any(|n| n.ends_with(".scales"));
        models::sanitize(&config, &mut store)?;
        let dtype = dtype.resolve(backend, stored);
        // MLX's CPU gather_mm (the float expert matmul) has only a float32 kernel: say so before
        // loading instead of failing at the first token with MLX's own text.
        let float_experts = config.num_experts > 0
            && store.names().any(|n| n.contains("switch_mlp") && n.ends_with(".weight"))
            && !store.names().any(|n| n.contains("switch_mlp") && n.ends_with(".scales"));
        if backend == Backend::Cpu && dtype != Dtype::Float32 && float_experts {
            anyhow::bail!(
                "--dtype {} is not supported on the CPU backend for a checkpoint with float experts: MLX's CPU \
                 gather_mm (the expert matmul) runs only in float32. Use --dtype f32 (or auto, which is f32 on the \
                 CPU); half-precision compute works on the CPU for quantized checkpoints and on GPUs.",
                dtype_name(dtype)
            );
        }
        let model = Model::build(config, &mut store, dtype, offload)
            .with_context(|| format!("loading the checkpoint in {}", dir.display()))?;
        store.finish()?;
        Ok((model, LoadInfo { seconds: start.elapsed().as_secs_f64(), stored_dtype: stored, quantized }))
    }

    /// Assembles the model from (sanitized) tensors, evaluating layer by layer behind a progress bar.
    pub fn build(
        config: ModelConfig,
        store: &mut WeightStore,
        dtype: Dtype,
        offload: Option<crate::offload::OffloadConfig>,
    ) -> Result<Model> {
        let bar = indicatif::ProgressBar::new(config.num_hidden_layers as u64 + 2).with_style(
            indicatif::ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let moe_layers = (0..config.num_hidden_layers).filter(|&i| models::is_moe_layer(&config, i)).count();
        let mut pools = offload.map(|o| crate::offload::PoolBuilder::new(o, moe_layers));
        let mut ctx = LoadCtx { store, config: &config, dtype, pending: vec![], offload: pools.as_mut() };
        let on_gpu = crate::mlx_env::backend() != Backend::Cpu;
        let flush = |ctx: &mut LoadCtx| -> Result<()> {
            eval(ctx.pending.iter())?;
            if on_gpu {
                // Weights built from host bytes sit in CUDA managed memory whose pages the host
                // wrote: the GPU migrates them on first access, which otherwise lands inside the
                // first prefill (full-size Qwen3 shape on an H200: first prefill 2.0 s, vs 0.15 s
                // warm and 0.7 s for mlx-lm, whose loader leaves them on the device). One read
                // per tensor here moves that cost to the load.
                let touched = ctx.pending.iter().map(|a| a.sum(None)).collect::<Result<Vec<_>, _>>()?;
                eval(touched.iter())?;
            }
            ctx.pending.clear();
            bar.inc(1);
            Ok(())
        };
        let embed_tokens = Embedding::load(&mut ctx, "model.embed_tokens", config.vocab_size, config.hidden_size)?;
        flush(&mut ctx)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for i in 0..config.num_hidden_layers {
            layers.push(models::load_layer(&mut ctx, i)?);
            flush(&mut ctx)?;
        }
        let norm = RmsNorm::load(&mut ctx, "model.norm", config.hidden_size, config.rms_norm_eps)?;
        // Only Mixtral and Qwen3-MoE honour tie_word_embeddings in mlx-lm; the others always load lm_head.
        let linear = if config.tie_word_embeddings {
            // mlx-lm's embed_tokens.as_linear: the same op as a bias-free Linear over its weight.
            Linear::new(embed_tokens.weight.clone(), None)
        } else {
            Linear::load(&mut ctx, "lm_head", config.hidden_size, config.vocab_size, false)?
        };
        let head = slot(Rc::new(OutputHead { linear }) as Rc<dyn HeadSlot>);
        flush(&mut ctx)?;
        bar.finish_and_clear();
        let embed_tokens = slot(Rc::new(embed_tokens) as Rc<dyn EmbeddingSlot>);
        let norm = slot(Rc::new(norm) as Rc<dyn NormSlot>);
        let offload = pools.and_then(crate::offload::PoolBuilder::finish);
        let mut model = Model { offload: None, config, embed_tokens, layers, norm, head, dtype };
        if let Some(cache) = offload {
            cache.attach(&mut model)?;
            model.offload = Some(cache);
        }
        Ok(model)
    }

    pub fn family(&self) -> Family {
        self.config.family
    }

    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.layers.len()).map(|_| KvCache::default()).collect()
    }

    /// Hidden states after the final norm for `tokens` `[B, L]`, one cache per layer (holding
    /// all B rows, mlx-lm's layout).
    pub fn hidden(&self, tokens: &Array, caches: &mut [KvCache]) -> Result<Array> {
        self.hidden_layers(tokens, caches.iter_mut().map(std::slice::from_mut).collect())
    }

    /// Logits `[B, L, V]` for `tokens` `[B, L]`, one cache per layer.
    pub fn forward(&self, tokens: &Array, caches: &mut [KvCache]) -> Result<Array> {
        let h = self.hidden(tokens, caches)?;
        crate::profile::span("head", || self.head.get().forward(&h))
    }

    /// Logits `[B, L, V]` for a batch of independent sequences: row b of `tokens` `[B, L]`
    /// continues sequence b, whose cache in layer i is `caches[i][b]` (positions may differ per
    /// sequence). Everything but the attention core runs once over the batch.
    pub fn forward_batch(&self, tokens: &Array, caches: &mut [Vec<KvCache>]) -> Result<Array> {
        let h = self.hidden_layers(tokens, caches.iter_mut().map(|c| c.as_mut_slice()).collect())?;
        crate::profile::span("head", || self.head.get().forward(&h))
    }

    fn hidden_layers(&self, tokens: &Array, caches: Vec<&mut [KvCache]>) -> Result<Array> {
        if caches.len() != self.layers.len() {
            anyhow::bail!("{} layer caches for a model of {} layers", caches.len(), self.layers.len());
        }
        let mut h = self.embed_tokens.get().forward(tokens)?;
        let mut dump = crate::debug_dump::CallDump::start(&h);
        for (i, (layer, cache)) in self.layers.iter().zip(caches).enumerate() {
            if let Some(d) = &mut dump {
                d.before_layer(i);
            }
            let (a, out) = layer.forward_parts(&h, cache)?;
            if let Some(d) = &mut dump {
                d.after_layer(i, a, &out);
            }
            h = out;
        }
        if let Some(d) = dump {
            d.save()?;
        }
        self.norm.get().forward(&h)
    }

    /// Puts every slot back to the implementation it was loaded with.
    pub fn restore_all_slots(&mut self) {
        for (_, mut slot) in self.slots_mut() {
            slot.restore();
        }
    }

    /// Every slot with its module path, in model order: the embedding; per layer the input norm,
    /// attention, the post-attention norm, then router, experts, combine and shared expert (MoE)
    /// or the dense MLP; the final norm and the output head last.
    pub fn slots_mut(&mut self) -> Vec<(String, SlotMut<'_>)> {
        let mut out = vec![("model.embed_tokens".to_owned(), SlotMut::Embedding(&mut self.embed_tokens))];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm"), SlotMut::Norm(&mut layer.input_layernorm)));
            out.push((format!("model.layers.{i}.self_attn"), SlotMut::Attention(&mut layer.attention)));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm"),
                SlotMut::Norm(&mut layer.post_attention_layernorm),
            ));
            match &mut layer.mlp {
                LayerMlp::Moe(b) => {
                    out.push((format!("{}.gate", b.path), SlotMut::Router(&mut b.router)));
                    out.push((format!("{}.switch_mlp", b.path), SlotMut::Experts(&mut b.experts)));
                    out.push((format!("{}.combine", b.path), SlotMut::Combine(&mut b.combine)));
                    if let Some(s) = &mut b.shared {
                        out.push((format!("{}.shared_expert", b.path), SlotMut::SharedExpert(s)));
                    }
                }
                LayerMlp::Dense(m) => out.push((format!("model.layers.{i}.mlp"), SlotMut::DenseMlp(m))),
            }
        }
        out.push(("model.norm".into(), SlotMut::Norm(&mut self.norm)));
        out.push(("lm_head".into(), SlotMut::Head(&mut self.head)));
        out
    }

    /// The MoE blocks with their layer index, for patterns.
    pub fn moe_blocks_mut(&mut self) -> impl Iterator<Item = (usize, &mut MoeBlock)> {
        self.layers.iter_mut().enumerate().filter_map(|(i, l)| match &mut l.mlp {
            LayerMlp::Moe(b) => Some((i, b)),
            LayerMlp::Dense(_) => None,
        })
    }
}

/// The float dtype the checkpoint stores (of its first float tensor, e.g. embeddings or scales).
fn stored_float_dtype(store: &WeightStore) -> Dtype {
    store
        .names()
        .filter(|n| n.starts_with("model.embed_tokens") || n.ends_with(".scales") || n.ends_with("norm.weight"))
        .find_map(|n| store.peek_dtype(n).filter(|d| matches!(d, Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16)))
        .unwrap_or(Dtype::Float32)
}

/// Shorthand used by family files.
pub fn slot<T: ?Sized>(imp: Rc<T>) -> Slot<T> {
    Slot::new(imp)
}
