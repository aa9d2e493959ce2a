//! config.json: the keys each family reads (mlx-lm's ModelArgs), with mlx-lm's defaults, and the
//! `quantization` block. Every error names config.json, the key and what was expected.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// Families zmlx can load (after mlx-lm's MODEL_REMAPPING).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Mixtral,
    Qwen3Moe,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Mixtral, Family::Qwen3Moe];

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    pub fn from_model_type(t: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == t)
    }
}

impl serde::Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.model_type())
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// MLX affine quantization parameters of one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    pub group_size: i32,
    pub bits: i32,
}

/// The `quantization` block: a global setting plus per-module-path overrides
/// (`false` = keep that module float).
#[derive(Debug, Clone, Default)]
pub struct QuantConfig {
    pub global: Option<QuantParams>,
    pub overrides: BTreeMap<String, Option<QuantParams>>,
}

/// Everything the supported families read from config.json.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_hidden_layers: i32,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub head_dim: i32,
    /// Dense-MLP width (Mixtral: the expert width).
    pub intermediate_size: i32,
    /// Per-expert width.
    pub moe_intermediate_size: i32,
    pub num_experts: i32,
    pub num_experts_per_tok: i32,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: i32,
    pub mlp_only_layers: Vec<i32>,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_traditional: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<i64>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: QuantConfig,
    /// Dtype the checkpoint declares (`torch_dtype`), if any.
    pub torch_dtype: Option<String>,
}

/// Reads typed keys with errors that name the file and the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
}

impl Keys<'_> {
    fn err(&self, key: &str, expected: &str) -> anyhow::Error {
        let found = self.map.get(key).map(|v| v.to_string()).unwrap_or_else(|| "missing".into());
        anyhow!("{}: key `{key}` must be {expected} (found {found})", self.file.display())
    }

    fn int_opt(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err(key, "an integer")),
        }
    }

    fn int(&self, key: &str, default: Option<i64>) -> Result<i32> {
        let v = self.int_opt(key)?.or(default).ok_or_else(|| self.err(key, "an integer"))?;
        i32::try_from(v).map_err(|_| self.err(key, "an integer that fits in i32"))
    }

    fn positive(&self, key: &str, default: Option<i64>) -> Result<i32> {
        let v = self.int(key, default)?;
        if v <= 0 {
            return Err(self.err(key, "a positive integer"));
        }
        Ok(v)
    }

    fn float(&self, key: &str, default: Option<f64>) -> Result<f32> {
        match self.map.get(key) {
            None | Some(Value::Null) => default.map(|d| d as f32).ok_or_else(|| self.err(key, "a number")),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| self.err(key, "a number")),
        }
    }

    fn boolean(&self, key: &str, default: Option<bool>) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "true or false")),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }

    fn int_list(&self, key: &str, default: Option<Vec<i32>>) -> Result<Vec<i32>> {
        match self.map.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "a list of integers")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_i64().map(|x| x as i32).ok_or_else(|| self.err(key, "a list of integers")))
                .collect(),
            Some(_) => Err(self.err(key, "a list of integers")),
        }
    }
}

impl ModelConfig {
    /// Reads `<dir>/config.json` (and `generation_config.json`'s eos override, as mlx-lm does).
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {}: a checkpoint directory needs config.json", path.display())
        })?;
        let mut value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let gen: Value = serde_json::from_str(&gen_text)
                .with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
            if let (Some(eos), Some(obj)) = (gen.get("eos_token_id"), value.as_object_mut()) {
                obj.insert("eos_token_id".into(), eos.clone());
            }
        }
        Self::from_value(&value, &path)
    }

    pub fn from_value(value: &Value, file: &Path) -> Result<ModelConfig> {
        let map = value
            .as_object()
            .ok_or_else(|| anyhow!("{}: expected a JSON object at the top level", file.display()))?;
        let k = Keys { map, file };
        let model_type = map
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| k.err("model_type", "a string naming the model family"))?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            let known: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
            anyhow!(
                "{}: unsupported model_type `{model_type}`; zmlx supports: {}",
                file.display(),
                known.join(", ")
            )
        })?;
        let hidden_size = k.positive("hidden_size", None)?;
        let num_attention_heads = k.positive("num_attention_heads", None)?;
        let eos_token_ids = match map.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect(),
            Some(v) => vec![v.as_u64().ok_or_else(|| k.err("eos_token_id", "an integer or a list"))? as u32],
        };
        let quantization = parse_quantization(map, file)?;
        let torch_dtype = map.get("torch_dtype").and_then(Value::as_str).map(str::to_owned);

        let cfg = match family {
            Family::Mixtral => {
                let heads_kv = k.int_opt("num_key_value_heads")?.unwrap_or(8);
                let intermediate = k.positive("intermediate_size", Some(14336))?;
                ModelConfig {
                    family,
                    vocab_size: k.positive("vocab_size", Some(32000))?,
                    hidden_size,
                    num_hidden_layers: k.positive("num_hidden_layers", None)?,
                    num_attention_heads,
                    num_key_value_heads: heads_kv as i32,
                    // mlx-lm's Mixtral ignores a head_dim key.
                    head_dim: hidden_size / num_attention_heads,
                    intermediate_size: intermediate,
                    moe_intermediate_size: intermediate,
                    num_experts: k.positive("num_local_experts", Some(8))?,
                    num_experts_per_tok: k.positive("num_experts_per_tok", Some(2))?,
                    norm_topk_prob: false,
                    decoder_sparse_step: 1,
                    mlp_only_layers: vec![],
                    rms_norm_eps: k.float("rms_norm_eps", Some(1e-5))?,
                    rope_theta: k.float("rope_theta", Some(1e6))?,
                    rope_traditional: k.boolean("rope_traditional", Some(false))?,
                    tie_word_embeddings: k.boolean("tie_word_embeddings", Some(false))?,
                    max_position_embeddings: k.int_opt("max_position_embeddings")?,
                    eos_token_ids,
                    quantization,
                    torch_dtype,
                }
            }
            // Qwen3-MoE's ModelArgs has no defaults: every key is required.
            Family::Qwen3Moe => ModelConfig {
                family,
                vocab_size: k.positive("vocab_size", None)?,
                hidden_size,
                num_hidden_layers: k.positive("num_hidden_layers", None)?,
                num_attention_heads,
                num_key_value_heads: k.positive("num_key_value_heads", None)?,
                head_dim: k.positive("head_dim", None)?,
                intermediate_size: k.positive("intermediate_size", None)?,
                moe_intermediate_size: k.positive("moe_intermediate_size", None)?,
                num_experts: k.int("num_experts", None)?,
                num_experts_per_tok: k.positive("num_experts_per_tok", None)?,
                norm_topk_prob: k.boolean("norm_topk_prob", None)?,
                decoder_sparse_step: k.positive("decoder_sparse_step", None)?,
                mlp_only_layers: k.int_list("mlp_only_layers", None)?,
                rms_norm_eps: k.float("rms_norm_eps", None)?,
                rope_theta: k.float("rope_theta", None)?,
                rope_traditional: false,
                tie_word_embeddings: k.boolean("tie_word_embeddings", None)?,
                max_position_embeddings: Some(k.int("max_position_embeddings", None)? as i64),
                eos_token_ids,
                quantization,
                torch_dtype,
            },
        };
        cfg.check(file)?;
        Ok(cfg)
    }

    fn check(&self, file: &Path) -> Result<()> {
        let f = file.display();
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            bail!(
                "{f}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.num_experts < 0 || self.num_experts_per_tok > self.num_experts.max(1) {
            bail!(
                "{f}: num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                self.num_experts_per_tok,
                self.num_experts
            );
        }
        Ok(())
    }

    /// Whether decoder layer `i` has a MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, i: i32) -> bool {
        match self.family {
            Family::Mixtral => true,
            Family::Qwen3Moe => {
                !self.mlp_only_layers.contains(&i)
                    && self.num_experts > 0
                    && (i + 1) % self.decoder_sparse_step == 0
            }
        }
    }

    /// Quantization of the module at `path`, following mlx-lm's class_predicate: a per-path entry
    /// wins; otherwise a module is quantized iff its `.scales` tensor exists.
    pub fn quant_for(&self, path: &str, has_scales: bool) -> Option<QuantParams> {
        if let Some(o) = self.quantization.overrides.get(path) {
            return *o;
        }
        if has_scales {
            self.quantization.global
        } else {
            None
        }
    }
}

fn parse_quant_params(v: &Map<String, Value>, file: &Path, at: &str) -> Result<QuantParams> {
    let get = |key: &str, default: i64| -> Result<i32> {
        match v.get(key) {
            None => Ok(default as i32),
            Some(x) => x.as_i64().map(|n| n as i32).ok_or_else(|| {
                anyhow!("{}: {at}.{key} must be an integer (found {x})", file.display())
            }),
        }
    };
    let (group_size, bits) = (get("group_size", 64)?, get("bits", 4)?);
    if let Some(mode) = v.get("mode").and_then(Value::as_str) {
        if mode != "affine" {
            bail!(
                "{}: {at}.mode is `{mode}`; zmlx supports MLX affine quantization only \
                 (re-quantize with mlx_lm.convert --q-mode affine)",
                file.display()
            );
        }
    }
    if ![2, 3, 4, 5, 6, 8].contains(&bits) {
        bail!("{}: {at}.bits is {bits}; MLX affine quantization supports 2, 3, 4, 5, 6 or 8 bits", file.display());
    }
    if ![32, 64, 128].contains(&group_size) {
        bail!("{}: {at}.group_size is {group_size}; expected 32, 64 or 128", file.display());
    }
    Ok(QuantParams { group_size, bits })
}

fn parse_quantization(map: &Map<String, Value>, file: &Path) -> Result<QuantConfig> {
    let Some(q) = map.get("quantization").or_else(|| map.get("quantization_config")) else {
        return Ok(QuantConfig::default());
    };
    let q = q
        .as_object()
        .ok_or_else(|| anyhow!("{}: `quantization` must be an object (found {q})", file.display()))?;
    let mut out = QuantConfig {
        global: Some(parse_quant_params(q, file, "quantization")?),
        overrides: BTreeMap::new(),
    };
    for (key, value) in q {
        let at = format!("quantization.{key}");
        match value {
            Value::Object(o) => {
                out.overrides.insert(key.clone(), Some(parse_quant_params(o, file, &at)?));
            }
            Value::Bool(false) => {
                out.overrides.insert(key.clone(), None);
            }
            Value::Bool(true) => {
                out.overrides.insert(key.clone(), out.global);
            }
            _ if ["group_size", "bits", "mode", "quant_method"].contains(&key.as_str()) => {}
            other => bail!(
                "{}: {at} must be an object like {{\"group_size\": 64, \"bits\": 4}} or false (found {other})",
                file.display()
            ),
        }
    }
    Ok(out)
}

/// The checkpoint directory a user passed, checked to exist.
pub fn checkpoint_dir(p: &Path) -> Result<PathBuf> {
    if !p.is_dir() {
        bail!("{} is not a directory; pass a checkpoint directory holding config.json and *.safetensors", p.display());
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen3() -> Value {
        json!({"model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": true,
            "decoder_sparse_step": 2, "mlp_only_layers": [3], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": false, "max_position_embeddings": 128})
    }

    #[test]
    fn qwen3_moe_layer_placement() {
        let c = ModelConfig::from_value(&qwen3(), Path::new("config.json")).unwrap();
        let moe: Vec<i32> = (0..4).filter(|&i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, vec![1], "(i+1) % decoder_sparse_step == 0 and not in mlp_only_layers");
    }

    #[test]
    fn mixtral_defaults_and_ignored_head_dim() {
        let v = json!({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 999});
        let c = ModelConfig::from_value(&v, Path::new("config.json")).unwrap();
        assert_eq!((c.head_dim, c.num_experts, c.num_experts_per_tok, c.vocab_size), (16, 8, 2, 32000));
        assert!(!c.rope_traditional && (c.rope_theta - 1e6).abs() < 1.0);
    }

    #[test]
    fn quantization_overrides() {
        let mut v = qwen3();
        v["quantization"] = json!({"group_size": 64, "bits": 4, "mode": "affine",
            "model.layers.1.mlp.gate": {"group_size": 64, "bits": 8}, "lm_head": false});
        let c = ModelConfig::from_value(&v, Path::new("config.json")).unwrap();
        assert_eq!(c.quant_for("model.layers.1.mlp.gate", true), Some(QuantParams { group_size: 64, bits: 8 }));
        assert_eq!(c.quant_for("lm_head", true), None, "false keeps a module float");
        assert_eq!(c.quant_for("model.embed_tokens", true), Some(QuantParams { group_size: 64, bits: 4 }));
        assert_eq!(c.quant_for("model.layers.0.mlp.gate", false), None, "no .scales -> float (old Mixtral routers)");
    }

    #[test]
    fn errors_name_file_and_key() {
        let mut v = qwen3();
        v["num_experts_per_tok"] = json!("two");
        let e = ModelConfig::from_value(&v, Path::new("/m/config.json")).unwrap_err().to_string();
        assert!(e.contains("/m/config.json") && e.contains("`num_experts_per_tok` must be an integer (found \"two\")"), "{e}");
        let mut v = qwen3();
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("multiple of num_key_value_heads"), "{e}");
        let mut v = qwen3();
        v["quantization"] = json!({"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": 8});
        let e = ModelConfig::from_value(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("quantization.model.layers.0.mlp.gate must be an object"), "{e}");
    }
}
