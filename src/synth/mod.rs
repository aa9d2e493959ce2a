//! `zmlx synth`: deterministic random-weight checkpoints that mlx-lm loads unchanged.
//! Weights come from MLX's counter-based RNG keyed by (seed, tensor name), so a tensor does not
//! depend on which others are written; quantization is MLX's own `quantize` (affine layout).
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{ops, random, transforms::eval, Array, Dtype};
use serde_json::{json, Value};

use crate::config::Family;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A few layers of small width: for tests (seconds).
    Tiny,
    /// Per-layer shape of a real small MoE (hidden 2048, many experts), few layers: for benchmarks.
    Bench,
}

/// Tensor naming of the written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// mlx-community conversion: stacked `switch_mlp` expert tensors.
    Mlx,
    /// Hugging Face original: one tensor per expert (`experts.{e}.…`), stacked at load time.
    Hf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreDtype {
    Bf16,
    F16,
    F32,
}

impl StoreDtype {
    fn dtype(self) -> Dtype {
        match self {
            StoreDtype::Bf16 => Dtype::Bfloat16,
            StoreDtype::F16 => Dtype::Float16,
            StoreDtype::F32 => Dtype::Float32,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            StoreDtype::Bf16 => "bfloat16",
            StoreDtype::F16 => "float16",
            StoreDtype::F32 => "float32",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub family: Family,
    pub preset: Preset,
    pub dtype: StoreDtype,
    /// Affine quantization bits (None = float checkpoint).
    pub quantize: Option<i32>,
    pub group_size: i32,
    pub seed: u64,
    pub layout: Layout,
    /// Shard the weights above this many bytes per file.
    pub max_shard_bytes: u64,
}

impl SynthOptions {
    pub fn new(family: Family) -> Self {
        SynthOptions {
            family,
            preset: Preset::Tiny,
            dtype: StoreDtype::Bf16,
            quantize: None,
            group_size: 64,
            seed: 0,
            layout: Layout::Mlx,
            max_shard_bytes: 2 << 30,
        }
    }
}

/// Dimensions of a synthesized model.
struct Dims {
    vocab: i32,
    hidden: i32,
    layers: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    experts: i32,
    top_k: i32,
    expert_width: i32,
    dense_width: i32,
    /// Qwen3: layers with a dense MLP instead of experts.
    mlp_only_layers: Vec<i32>,
}

fn dims(family: Family, preset: Preset) -> Dims {
    match (family, preset) {
        (Family::Mixtral, Preset::Tiny) => Dims {
            vocab: 512, hidden: 128, layers: 2, heads: 4, kv_heads: 2, head_dim: 32,
            experts: 8, top_k: 2, expert_width: 128, dense_width: 128, mlp_only_layers: vec![],
        },
        (Family::Qwen3Moe, Preset::Tiny) => Dims {
            vocab: 512, hidden: 128, layers: 3, heads: 4, kv_heads: 2, head_dim: 32,
            experts: 16, top_k: 4, expert_width: 64, dense_width: 256, mlp_only_layers: vec![1],
        },
        (Family::Mixtral, Preset::Bench) => Dims {
            vocab: 32768, hidden: 2048, layers: 4, heads: 16, kv_heads: 4, head_dim: 128,
            experts: 8, top_k: 2, expert_width: 5632, dense_width: 5632, mlp_only_layers: vec![],
        },
        (Family::Qwen3Moe, Preset::Bench) => Dims {
            vocab: 32768, hidden: 2048, layers: 4, heads: 32, kv_heads: 4, head_dim: 128,
            experts: 64, top_k: 8, expert_width: 768, dense_width: 6144, mlp_only_layers: vec![],
        },
    }
}

fn config_json(o: &SynthOptions, d: &Dims) -> Value {
    let mut c = match o.family {
        Family::Mixtral => json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": d.vocab,
            "hidden_size": d.hidden,
            "intermediate_size": d.expert_width,
            "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "num_local_experts": d.experts,
            "num_experts_per_tok": d.top_k,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": false,
        }),
        Family::Qwen3Moe => json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "vocab_size": d.vocab,
            "hidden_size": d.hidden,
            "intermediate_size": d.dense_width,
            "moe_intermediate_size": d.expert_width,
            "num_hidden_layers": d.layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim,
            "num_experts": d.experts,
            "num_experts_per_tok": d.top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": d.mlp_only_layers,
            "norm_topk_prob": true,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": false,
        }),
    };
    let obj = c.as_object_mut().unwrap();
    obj.insert("torch_dtype".into(), json!(o.dtype.torch_name()));
    obj.insert("eos_token_id".into(), json!(0));
    obj.insert("bos_token_id".into(), Value::Null);
    obj.insert("zmlx_synth".into(), json!({"preset": format!("{:?}", o.preset).to_lowercase(), "seed": o.seed}));
    c
}

/// FNV-1a of (seed, name): a per-tensor RNG key independent of write order.
fn tensor_key(seed: u64, name: &str) -> Result<Array> {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    Ok(random::key(h)?)
}

/// One logical tensor to synthesize.
struct Spec {
    name: String,
    shape: Vec<i32>,
    /// Standard deviation of the normal init; `mean` is added (norm weights ≈ 1).
    std: f32,
    mean: f32,
    /// Linear-like weight that is quantized when the checkpoint is.
    quantizable: bool,
    /// Per-module quantization override (Qwen3's 8-bit router).
    bits_override: Option<i32>,
}

fn specs(o: &SynthOptions, d: &Dims) -> Vec<Spec> {
    let mut v = Vec::new();
    let lin = |name: String, out: i32, inp: i32, std_scale: f32| Spec {
        name,
        shape: vec![out, inp],
        std: std_scale / (inp as f32).sqrt(),
        mean: 0.0,
        quantizable: true,
        bits_override: None,
    };
    let norm = |name: String, n: i32| Spec { name, shape: vec![n], std: 0.1, mean: 1.0, quantizable: false, bits_override: None };
    v.push(Spec { name: "model.embed_tokens.weight".into(), shape: vec![d.vocab, d.hidden], std: 1.0, mean: 0.0, quantizable: true, bits_override: None });
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        v.push(norm(format!("{p}.input_layernorm.weight"), d.hidden));
        v.push(norm(format!("{p}.post_attention_layernorm.weight"), d.hidden));
        let a = format!("{p}.self_attn");
        v.push(lin(format!("{a}.q_proj.weight"), d.heads * d.head_dim, d.hidden, 1.0));
        v.push(lin(format!("{a}.k_proj.weight"), d.kv_heads * d.head_dim, d.hidden, 1.0));
        v.push(lin(format!("{a}.v_proj.weight"), d.kv_heads * d.head_dim, d.hidden, 1.0));
        v.push(lin(format!("{a}.o_proj.weight"), d.hidden, d.heads * d.head_dim, 1.0));
        if o.family == Family::Qwen3Moe {
            v.push(norm(format!("{a}.q_norm.weight"), d.head_dim));
            v.push(norm(format!("{a}.k_norm.weight"), d.head_dim));
        }
        let moe_path = match o.family {
            Family::Mixtral => format!("{p}.block_sparse_moe"),
            Family::Qwen3Moe => format!("{p}.mlp"),
        };
        if d.mlp_only_layers.contains(&l) {
            for (n, out, inp) in [("gate_proj", d.dense_width, d.hidden), ("up_proj", d.dense_width, d.hidden), ("down_proj", d.hidden, d.dense_width)] {
                v.push(lin(format!("{moe_path}.{n}.weight"), out, inp, 1.0));
            }
            continue;
        }
        // A wide router init makes routing decisive (clear top-k margins).
        let mut gate = lin(format!("{moe_path}.gate.weight"), d.experts, d.hidden, 4.0);
        if o.family == Family::Qwen3Moe {
            gate.bits_override = Some(8); // mlx-lm's qwen3_moe quant_predicate
        }
        v.push(gate);
        let names: [(&str, &str, i32, i32); 3] = match o.family {
            Family::Mixtral => [("gate_proj", "w1", d.expert_width, d.hidden), ("down_proj", "w2", d.hidden, d.expert_width), ("up_proj", "w3", d.expert_width, d.hidden)],
            Family::Qwen3Moe => [("gate_proj", "gate_proj", d.expert_width, d.hidden), ("down_proj", "down_proj", d.hidden, d.expert_width), ("up_proj", "up_proj", d.expert_width, d.hidden)],
        };
        for (ours, hf, out, inp) in names {
            match o.layout {
                Layout::Mlx => {
                    let mut s = lin(format!("{moe_path}.switch_mlp.{ours}.weight"), out, inp, 1.0);
                    s.shape.insert(0, d.experts);
                    v.push(s);
                }
                Layout::Hf => {
                    for e in 0..d.experts {
                        v.push(lin(format!("{moe_path}.experts.{e}.{hf}.weight"), out, inp, 1.0));
                    }
                }
            }
        }
    }
    v.push(norm("model.norm.weight".into(), d.hidden));
    v.push(lin("lm_head.weight".into(), d.vocab, d.hidden, 2.0));
    v
}

/// Writes the checkpoint into `out`; returns the files written.
pub fn synthesize(o: &SynthOptions, out: &Path) -> Result<Vec<PathBuf>> {
    if o.layout == Layout::Hf && o.quantize.is_some() && o.family != Family::Mixtral {
        bail!("--layout hf with --quantize is only meaningful for mixtral (mlx-lm's {} sanitize stacks float weights only)", o.family);
    }
    if let Some(bits) = o.quantize {
        if ![2, 3, 4, 5, 6, 8].contains(&bits) {
            bail!("--quantize {bits}: MLX affine quantization supports 2, 3, 4, 5, 6 or 8 bits");
        }
        if ![32, 64, 128].contains(&o.group_size) {
            bail!("--group-size {}: expected 32, 64 or 128", o.group_size);
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let d = dims(o.family, o.preset);
    let mut config = config_json(o, &d);
    let mut quant_overrides = serde_json::Map::new();

    let mut tensors: Vec<(String, Array)> = Vec::new();
    for s in specs(o, &d) {
        let key = tensor_key(o.seed, &s.name)?;
        let w = random::normal::<f32>(&s.shape[..], s.mean, s.std, &key)?.as_dtype(o.dtype.dtype())?;
        let inp = *s.shape.last().unwrap();
        let bits = s.bits_override.or(o.quantize);
        match (o.quantize, bits) {
            (Some(_), Some(bits)) if s.quantizable && inp % o.group_size == 0 => {
                let base = s.name.trim_end_matches(".weight").to_owned();
                let (wq, scales, biases) = ops::quantize(&w, o.group_size, bits)?;
                eval([&wq, &scales, &biases])?;
                if s.bits_override.is_some() {
                    quant_overrides.insert(base.clone(), json!({"group_size": o.group_size, "bits": bits}));
                }
                tensors.push((s.name.clone(), wq));
                tensors.push((format!("{base}.scales"), scales));
                tensors.push((format!("{base}.biases"), biases));
            }
            _ => {
                w.eval()?;
                tensors.push((s.name, w));
            }
        }
    }
    if let Some(bits) = o.quantize {
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(o.group_size));
        q.insert("bits".into(), json!(bits));
        q.insert("mode".into(), json!("affine"));
        q.extend(quant_overrides);
        let obj = config.as_object_mut().unwrap();
        obj.insert("quantization".into(), Value::Object(q.clone()));
        obj.insert("quantization_config".into(), Value::Object(q));
    }

    let files = write_shards(out, &tensors, o.max_shard_bytes)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let tok = tokenizer::write_tokenizer(out, d.vocab as usize).map_err(|e| anyhow!("writing the tokenizer: {e}"))?;
    if tok.eos_token_id != 0 {
        bail!("internal: synthesized tokenizer has eos id {}, config says 0", tok.eos_token_id);
    }
    Ok(files)
}

/// Saves tensors into one `model.safetensors`, or shards + `model.safetensors.index.json`.
fn write_shards(out: &Path, tensors: &[(String, Array)], max_bytes: u64) -> Result<Vec<PathBuf>> {
    let total: u64 = tensors.iter().map(|(_, a)| a.nbytes() as u64).sum();
    let mut groups: Vec<Vec<&(String, Array)>> = vec![vec![]];
    let mut size = 0u64;
    for t in tensors {
        let n = t.1.nbytes() as u64;
        if size > 0 && size + n > max_bytes {
            groups.push(vec![]);
            size = 0;
        }
        groups.last_mut().unwrap().push(t);
        size += n;
    }
    // Remove stale weights from an earlier synth into the same directory.
    for e in std::fs::read_dir(out)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("model") && (name.ends_with(".safetensors") || name.ends_with(".index.json")) {
            std::fs::remove_file(e.path())?;
        }
    }
    let meta: HashMap<String, String> = [("format".to_string(), "mlx".to_string())].into();
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        let path = out.join(&name);
        Array::save_safetensors(g.iter().map(|(k, a)| (k.as_str(), a)), &meta, &path)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        for (k, _) in g {
            weight_map.insert(k.clone(), json!(name));
        }
        files.push(path);
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    Ok(files)
}
