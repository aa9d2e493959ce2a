//! config.json: the shared [`ModelConfig`] every family fills, the typed key reader [`Keys`] the
//! family modules (src/models/) parse their keys with (mlx-lm's ModelArgs and defaults live
//! there), the keys every family shares (`model_type`, sizes, eos, the `quantization` block) and
//! the cross-key check. Every error names config.json, the key and what was expected.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// The family id; each family is a module in src/models/ (the registry there lists them).
pub use crate::models::Family;

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
    /// Qwen2-MoE's sigmoid-gated shared expert width.
    pub shared_expert_intermediate_size: Option<i32>,
    /// DS/GLM ungated shared experts (width = moe_intermediate_size × n).
    pub n_shared_experts: Option<i32>,
    pub n_group: i32,
    pub topk_group: i32,
    pub routed_scaling_factor: f32,
    pub first_k_dense_replace: i32,
    pub moe_layer_freq: i32,
    pub attention_bias: bool,
    pub use_qk_norm: bool,
    /// Rotated features per head (GLM-4.5's partial RoPE; head_dim elsewhere).
    pub rope_dims: i32,
    pub mla: Option<MlaConfig>,
    pub rope_scaling: Option<RopeScaling>,
    /// GLM-4.7-Flash adds 1e-20 to the renormalisation denominator.
    pub renorm_eps: Option<f32>,
}

/// Multi-head latent attention dimensions (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash).
#[derive(Debug, Clone)]
pub struct MlaConfig {
    pub q_lora_rank: Option<i32>,
    pub kv_lora_rank: i32,
    pub qk_nope_head_dim: i32,
    pub qk_rope_head_dim: i32,
    pub v_head_dim: i32,
    /// q_a_layernorm / kv_a_layernorm eps (DeepSeek-V3 hard-codes 1e-6).
    pub norm_eps: f32,
}

/// `rope_scaling` as mlx-lm's initialize_rope reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f32,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
}

/// Reads typed keys with errors that name the file and the key.
pub struct Keys<'a> {
    pub map: &'a Map<String, Value>,
    pub file: &'a Path,
}

impl Keys<'_> {
    pub fn err(&self, key: &str, expected: &str) -> anyhow::Error {
        let found = self.map.get(key).map(|v| v.to_string()).unwrap_or_else(|| "missing".into());
        anyhow!("{}: key `{key}` must be {expected} (found {found})", self.file.display())
    }

    pub fn int_opt(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err(key, "an integer")),
        }
    }

    pub fn int(&self, key: &str, default: Option<i64>) -> Result<i32> {
        let v = self.int_opt(key)?.or(default).ok_or_else(|| self.err(key, "an integer"))?;
        i32::try_from(v).map_err(|_| self.err(key, "an integer that fits in i32"))
    }

    pub fn positive(&self, key: &str, default: Option<i64>) -> Result<i32> {
        let v = self.int(key, default)?;
        if v <= 0 {
            return Err(self.err(key, "a positive integer"));
        }
        Ok(v)
    }

    pub fn non_negative(&self, key: &str, default: Option<i64>) -> Result<i32> {
        let v = self.int(key, default)?;
        if v < 0 {
            return Err(self.err(key, "an integer >= 0"));
        }
        Ok(v)
    }

    pub fn float(&self, key: &str, default: Option<f64>) -> Result<f32> {
        let x = match self.map.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "a number"))?,
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number"))?,
        };
        if !(x as f32).is_finite() {
            return Err(self.err(key, "a finite number"));
        }
        Ok(x as f32)
    }

    /// A number > 0 (epsilons, RoPE bases, scaling factors: 0 or a negative value is nonsense).
    pub fn positive_float(&self, key: &str, default: Option<f64>) -> Result<f32> {
        let x = self.float(key, default)?;
        if x <= 0.0 {
            return Err(self.err(key, "a number > 0"));
        }
        Ok(x)
    }

    /// An optional positive integer (`null` or absent = none).
    pub fn positive_opt(&self, key: &str) -> Result<Option<i32>> {
        match self.int_opt(key)? {
            None => Ok(None),
            Some(v) if v > 0 && v <= i32::MAX as i64 => Ok(Some(v as i32)),
            Some(_) => Err(self.err(key, "a positive integer or null")),
        }
    }

    pub fn string_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(key, "a string")),
        }
    }

    pub fn boolean(&self, key: &str, default: Option<bool>) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "true or false")),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }

    pub fn int_list(&self, key: &str, default: Option<Vec<i32>>) -> Result<Vec<i32>> {
        match self.map.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "a list of integers")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_i64().and_then(|x| i32::try_from(x).ok()).ok_or_else(|| self.err(key, "a list of integers"))
                })
                .collect(),
            Some(_) => Err(self.err(key, "a list of integers")),
        }
    }
}

impl ModelConfig {
    /// Reads `<dir>/config.json` (and `generation_config.json`'s eos override, as mlx-lm does).
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}: a checkpoint directory needs config.json", path.display()))?;
        let mut value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let gen: Value =
                serde_json::from_str(&gen_text).with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
            if let (Some(eos), Some(obj)) = (gen.get("eos_token_id"), value.as_object_mut()) {
                obj.insert("eos_token_id".into(), eos.clone());
            }
        }
        Self::from_value(&value, &path)
    }

    pub fn from_value(value: &Value, file: &Path) -> Result<ModelConfig> {
        let map =
            value.as_object().ok_or_else(|| anyhow!("{}: expected a JSON object at the top level", file.display()))?;
        let k = Keys { map, file };
        let model_type = map
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| k.err("model_type", "a string naming the model family"))?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            let known: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
            anyhow!("{}: unsupported model_type `{model_type}`; zmlx supports: {}", file.display(), known.join(", "))
        })?;
        let hidden_size = k.positive("hidden_size", None)?;
        let num_attention_heads = k.positive("num_attention_heads", None)?;
        let eos_id = |v: &Value| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| k.err("eos_token_id", "a token id (integer >= 0) or a list of them"))
        };
        let eos_token_ids = match map.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a.iter().map(eos_id).collect::<Result<_>>()?,
            Some(v) => vec![eos_id(v)?],
        };
        let quantization = parse_quantization(map, file)?;
        let torch_dtype = map.get("torch_dtype").and_then(Value::as_str).map(str::to_owned);

        let mut c =
            ModelConfig::blank(family, eos_token_ids, quantization, torch_dtype, hidden_size, num_attention_heads);
        family.module().parse_config(&k, &mut c)?;
        if c.rope_dims == 0 {
            c.rope_dims = c.head_dim;
        }
        let cfg = c;
        cfg.check(file)?;
        Ok(cfg)
    }

    /// A config with every field at its neutral value, for the family parsers to fill in.
    fn blank(
        family: Family,
        eos_token_ids: Vec<u32>,
        quantization: QuantConfig,
        torch_dtype: Option<String>,
        hidden_size: i32,
        heads: i32,
    ) -> ModelConfig {
        ModelConfig {
            family,
            vocab_size: 0,
            hidden_size,
            num_hidden_layers: 0,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: hidden_size / heads,
            intermediate_size: 0,
            moe_intermediate_size: 0,
            num_experts: 0,
            num_experts_per_tok: 1,
            norm_topk_prob: false,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rope_traditional: false,
            tie_word_embeddings: false,
            max_position_embeddings: None,
            eos_token_ids,
            quantization,
            torch_dtype,
            shared_expert_intermediate_size: None,
            n_shared_experts: None,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            attention_bias: false,
            use_qk_norm: false,
            rope_dims: 0,
            mla: None,
            rope_scaling: None,
            renorm_eps: None,
        }
    }

    /// What the model code relies on beyond each key's own type and sign: sizes that divide
    /// evenly, top-k within the expert count, RoPE dimensions that fit the head, layer indices
    /// that exist. Each message names the file, the keys, their values and the accepted range.
    fn check(&self, file: &Path) -> Result<()> {
        let f = file.display();
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            bail!(
                "{f}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        // Mixtral and Qwen2-MoE derive head_dim as hidden_size / num_attention_heads.
        if self.family.module().head_dim_from_hidden() && self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "{f}: hidden_size ({}) must be a multiple of num_attention_heads ({}) for {} (head_dim = hidden_size / heads)",
                self.hidden_size,
                self.num_attention_heads,
                self.family
            );
        }
        if self.head_dim <= 0 {
            bail!("{f}: the head dimension must be positive (found {})", self.head_dim);
        }
        if self.rope_dims <= 0 || self.rope_dims > self.head_dim || self.rope_dims % 2 != 0 {
            bail!(
                "{f}: the rotated dimensions per head ({}; partial_rotary_factor x head_dim, or qk_rope_head_dim) \
                 must be even and between 2 and head_dim ({})",
                self.rope_dims,
                self.head_dim
            );
        }
        if self.family.sigmoid_router() {
            if self.num_experts % self.n_group != 0 {
                bail!("{f}: n_group ({}) must divide n_routed_experts ({})", self.n_group, self.num_experts);
            }
            if self.topk_group > self.n_group {
                bail!("{f}: topk_group ({}) must be at most n_group ({})", self.topk_group, self.n_group);
            }
            // Group-limited top-k keeps topk_group groups of E / n_group experts: k must fit in them.
            let reachable = self.topk_group * (self.num_experts / self.n_group);
            if self.num_experts_per_tok > reachable {
                bail!(
                    "{f}: num_experts_per_tok ({}) exceeds the experts reachable through topk_group ({}) of \
                     n_group ({}) groups: at most {reachable}",
                    self.num_experts_per_tok,
                    self.topk_group,
                    self.n_group
                );
            }
        }
        if self.num_experts_per_tok < 1 || self.num_experts_per_tok > self.num_experts.max(1) {
            bail!(
                "{f}: num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
                self.num_experts_per_tok,
                self.num_experts
            );
        }
        if let Some(bad) = self.mlp_only_layers.iter().find(|&&i| i < 0 || i >= self.num_hidden_layers) {
            bail!(
                "{f}: mlp_only_layers contains {bad}, which is not a layer index (0..{})",
                self.num_hidden_layers - 1
            );
        }
        if let Some(mla) = &self.mla {
            if mla.qk_rope_head_dim % 2 != 0 {
                bail!("{f}: qk_rope_head_dim ({}) must be even (RoPE rotates pairs)", mla.qk_rope_head_dim);
            }
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !(*factor > 0.0 && factor.is_finite()) => {
                bail!("{f}: rope_scaling.factor ({factor}) must be a finite number > 0")
            }
            Some(RopeScaling::Yarn {
                factor, original_max_position_embeddings: omax, beta_fast, beta_slow, ..
            }) => {
                let fine = |x: f64| x.is_finite() && x > 0.0;
                if !(fine(*factor) && fine(*omax) && fine(*beta_fast) && fine(*beta_slow)) {
                    bail!(
                        "{f}: rope_scaling factor ({factor}), original_max_position_embeddings ({omax}), \
                         beta_fast ({beta_fast}) and beta_slow ({beta_slow}) must be finite numbers > 0"
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether decoder layer `i` has a MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, i: i32) -> bool {
        self.family.module().is_moe_layer(self, i)
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

/// `rope_scaling` for the MLA families (mlx-lm's initialize_rope: default, linear or yarn).
pub fn parse_rope_scaling(map: &Map<String, Value>, file: &Path) -> Result<Option<RopeScaling>> {
    let Some(rs) = map.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let o = rs
        .as_object()
        .ok_or_else(|| anyhow!("{}: rope_scaling must be an object or null (found {rs})", file.display()))?;
    let kind = o.get("type").or_else(|| o.get("rope_type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str, default: f64| -> Result<f64> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| anyhow!("{}: rope_scaling.{key} must be a number (found {v})", file.display()))
            }
        }
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor", 1.0)? as f32 }),
        "yarn" | "deepseek_yarn" => Some(RopeScaling::Yarn {
            factor: num("factor", 1.0)?,
            original_max_position_embeddings: num("original_max_position_embeddings", 4096.0)?,
            beta_fast: num("beta_fast", 32.0)?,
            beta_slow: num("beta_slow", 1.0)?,
            mscale: num("mscale", 1.0)?,
            mscale_all_dim: num("mscale_all_dim", 0.0)?,
        }),
        other => bail!(
            "{}: rope_scaling type `{other}` is not supported for MLA models (expected yarn, linear or default)",
            file.display()
        ),
    })
}

fn parse_quant_params(v: &Map<String, Value>, file: &Path, at: &str) -> Result<QuantParams> {
    let get = |key: &str, default: i64| -> Result<i32> {
        match v.get(key) {
            None => Ok(default as i32),
            Some(x) => x
                .as_i64()
                .map(|n| n as i32)
                .ok_or_else(|| anyhow!("{}: {at}.{key} must be an integer (found {x})", file.display())),
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
    let q = q.as_object().ok_or_else(|| anyhow!("{}: `quantization` must be an object (found {q})", file.display()))?;
    let mut out =
        QuantConfig { global: Some(parse_quant_params(q, file, "quantization")?), overrides: BTreeMap::new() };
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
        assert!(
            e.contains("/m/config.json") && e.contains("`num_experts_per_tok` must be an integer (found \"two\")"),
            "{e}"
        );
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
