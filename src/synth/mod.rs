//! `zmlx synth`: deterministic random-weight checkpoints that mlx-lm loads unchanged.
//! Weights come from MLX's counter-based RNG keyed by (seed, tensor name), so a tensor does not
//! depend on which others are written; quantization is MLX's own `quantize` (affine layout).
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{ops, random, transforms::eval, Array, Dtype};
use serde_json::{json, Value};

use crate::config::{Family, ModelConfig};

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

/// config.json of a synthesized checkpoint: the family module's keys (realistic for the family,
/// small (tiny) or real-per-layer (bench) dimensions, chosen to exercise its special features)
/// plus the keys every synthesized checkpoint shares.
fn config_json(o: &SynthOptions) -> Value {
    let tiny = o.preset == Preset::Tiny;
    // Bench vocab 8192: the output head dominated per-token bytes at 32768 and is not part of
    // the per-layer shape the benchmark is about.
    let (v, d) = if tiny { (512, 128) } else { (8192, 2048) };
    let mut c = o.family.module().synth_config(tiny);
    let obj = c.as_object_mut().unwrap();
    obj.insert("vocab_size".into(), json!(v));
    obj.insert("hidden_size".into(), json!(d));
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
    /// Weight of a module mlx-lm quantizes (Linear, Embedding, SwitchLinear, MultiLinear).
    quantizable: bool,
    /// Per-module quantization override (Qwen3's 8-bit router).
    bits_override: Option<i32>,
    /// Stored dtype other than the checkpoint's (e_score_correction_bias stays f32).
    dtype: Option<Dtype>,
}

/// Every tensor the loader expects for `c`, in the chosen layout.
fn specs(c: &ModelConfig, layout: Layout) -> Vec<Spec> {
    let mut v = Vec::new();
    let sp = |name: String, shape: Vec<i32>, std: f32, mean: f32, quantizable: bool| Spec {
        name,
        shape,
        std,
        mean,
        quantizable,
        bits_override: None,
        dtype: None,
    };
    let lin = |v: &mut Vec<Spec>, name: &str, out: i32, inp: i32, std_scale: f32, bias: bool| {
        v.push(sp(format!("{name}.weight"), vec![out, inp], std_scale / (inp as f32).sqrt(), 0.0, true));
        if bias {
            v.push(sp(format!("{name}.bias"), vec![out], 0.05, 0.0, false));
        }
    };
    let norm = |v: &mut Vec<Spec>, name: String, n: i32| v.push(sp(format!("{name}.weight"), vec![n], 0.1, 1.0, false));
    let swiglu = |v: &mut Vec<Spec>, path: &str, d: i32, w: i32| {
        lin(v, &format!("{path}.gate_proj"), w, d, 1.0, false);
        lin(v, &format!("{path}.up_proj"), w, d, 1.0, false);
        lin(v, &format!("{path}.down_proj"), d, w, 1.0, false);
    };
    let (d, e) = (c.hidden_size, c.num_experts);
    v.push(sp("model.embed_tokens.weight".into(), vec![c.vocab_size, d], 1.0, 0.0, true));
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        norm(&mut v, format!("{p}.input_layernorm"), d);
        norm(&mut v, format!("{p}.post_attention_layernorm"), d);
        let a = format!("{p}.self_attn");
        match &c.mla {
            None => {
                let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
                lin(&mut v, &format!("{a}.q_proj"), q, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.k_proj"), kv, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.v_proj"), kv, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.o_proj"), d, q, 1.0, false);
                if c.use_qk_norm {
                    norm(&mut v, format!("{a}.q_norm"), c.head_dim);
                    norm(&mut v, format!("{a}.k_norm"), c.head_dim);
                }
            }
            Some(m) => {
                let h = c.num_attention_heads;
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                match m.q_lora_rank {
                    Some(r) => {
                        lin(&mut v, &format!("{a}.q_a_proj"), r, d, 1.0, c.attention_bias);
                        norm(&mut v, format!("{a}.q_a_layernorm"), r);
                        lin(&mut v, &format!("{a}.q_b_proj"), h * qk, r, 1.0, false);
                    }
                    None => lin(&mut v, &format!("{a}.q_proj"), h * qk, d, 1.0, false),
                }
                lin(
                    &mut v,
                    &format!("{a}.kv_a_proj_with_mqa"),
                    m.kv_lora_rank + m.qk_rope_head_dim,
                    d,
                    1.0,
                    c.attention_bias,
                );
                norm(&mut v, format!("{a}.kv_a_layernorm"), m.kv_lora_rank);
                let std = 1.0 / (m.kv_lora_rank as f32).sqrt();
                match layout {
                    Layout::Mlx => {
                        v.push(Spec {
                            std: 1.0 / (m.qk_nope_head_dim as f32).sqrt(),
                            ..sp(
                                format!("{a}.embed_q.weight"),
                                vec![h, m.kv_lora_rank, m.qk_nope_head_dim],
                                0.0,
                                0.0,
                                true,
                            )
                        });
                        v.push(sp(
                            format!("{a}.unembed_out.weight"),
                            vec![h, m.v_head_dim, m.kv_lora_rank],
                            std,
                            0.0,
                            true,
                        ));
                    }
                    Layout::Hf => v.push(sp(
                        format!("{a}.kv_b_proj.weight"),
                        vec![h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank],
                        std,
                        0.0,
                        true,
                    )),
                }
                lin(&mut v, &format!("{a}.o_proj"), d, h * m.v_head_dim, 1.0, c.attention_bias);
            }
        }
        let family = c.family.module();
        let experts = family.hf_experts();
        let moe = format!("{p}.{}", experts.block);
        if !c.is_moe_layer(l) {
            swiglu(&mut v, &moe, d, c.intermediate_size);
            continue;
        }
        if family.sigmoid_router() {
            v.push(sp(format!("{moe}.gate.weight"), vec![e, d], 2.0 / (d as f32).sqrt(), 0.0, false));
            v.push(Spec {
                dtype: Some(Dtype::Float32),
                ..sp(format!("{moe}.gate.e_score_correction_bias"), vec![e], 0.1, 0.0, false)
            });
        } else {
            // A wide router init makes routing decisive (clear top-k margins).
            lin(&mut v, &format!("{moe}.gate"), e, d, 4.0, false);
            v.last_mut().unwrap().bits_override = family.synth_router_bits();
        }
        let w = c.moe_intermediate_size;
        for (ours, out, inp) in [("gate_proj", w, d), ("down_proj", d, w), ("up_proj", w, d)] {
            let hf = experts.hf_name(ours);
            match layout {
                Layout::Mlx => v.push(sp(
                    format!("{moe}.switch_mlp.{ours}.weight"),
                    vec![e, out, inp],
                    1.0 / (inp as f32).sqrt(),
                    0.0,
                    true,
                )),
                Layout::Hf => {
                    for x in 0..e {
                        lin(&mut v, &format!("{moe}.experts.{x}.{hf}"), out, inp, 1.0, false);
                    }
                }
            }
        }
        if let Some(width) = c.shared_expert_intermediate_size {
            swiglu(&mut v, &format!("{moe}.shared_expert"), d, width);
            lin(&mut v, &format!("{moe}.shared_expert_gate"), 1, d, 1.0, false);
        }
        if let Some(n) = c.n_shared_experts {
            swiglu(&mut v, &format!("{moe}.shared_experts"), d, c.moe_intermediate_size * n);
        }
    }
    norm(&mut v, "model.norm".into(), d);
    lin(&mut v, "lm_head", c.vocab_size, d, 2.0, false);
    v
}

/// Writes the checkpoint into `out`; returns the files written.
pub fn synthesize(o: &SynthOptions, out: &Path) -> Result<Vec<PathBuf>> {
    if o.layout == Layout::Hf && o.quantize.is_some() && !o.family.module().hf_experts().parts.contains(&"scales") {
        bail!(
            "--layout hf with --quantize does not exist for {} (mlx-lm's sanitize stacks float expert weights only)",
            o.family
        );
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
    let mut config = config_json(o);
    let parsed = ModelConfig::from_value(&config, &out.join("config.json"))?;
    let mut quant_overrides = serde_json::Map::new();

    let mut tensors: Vec<(String, Array)> = Vec::new();
    for s in specs(&parsed, o.layout) {
        let key = tensor_key(o.seed, &s.name)?;
        let w =
            random::normal::<f32>(&s.shape[..], s.mean, s.std, &key)?.as_dtype(s.dtype.unwrap_or(o.dtype.dtype()))?;
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
    let tok = tokenizer::write_tokenizer(out, parsed.vocab_size as usize)
        .map_err(|e| anyhow!("writing the tokenizer: {e}"))?;
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
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
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
