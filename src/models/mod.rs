//! Model families: one module per family behind [`ModelFamily`], listed once in the registry
//! (`families!` below). A family module holds everything particular to it: the config.json keys
//! it reads (mlx-lm's `ModelArgs`, defaults included), its sanitize rules, how a decoder layer is
//! assembled from the shared blocks, its synth shapes and its CPU pattern preset.
//!
//! Shared blocks live once, here: `decoder_layer`, `gqa_attention`, `softmax_moe`,
//! `stack_all_experts` (HF per-expert tensors → `switch_mlp`, described per family by
//! [`HfExperts`]) and `drop_where`; `sigmoid_moe.rs` (DeepSeek-style router + MoE block and its
//! keys); `mla.rs` (the MLA families' keys, `kv_b_proj` split and layer); and outside this
//! folder `crate::attention` (GQA), `crate::attention_mla` (MLA), `crate::moe` (routers,
//! experts, combine).
//!
//! Adding a family: docs/adding-a-family.md.
mod deepseek_v3;
mod glm4_moe;
mod glm4_moe_lite;
mod mixtral;
mod mla;
mod qwen2_moe;
mod qwen3_moe;
mod sigmoid_moe;

use std::rc::Rc;

use anyhow::{anyhow, Result};
use mlx_rs::{ops, Array};
use serde_json::Value;

use crate::attention::{GqaAttention, GqaShape};
use crate::config::{Keys, ModelConfig};
use crate::model::{slot, DecoderLayer};
use crate::moe::RouterKind;
use crate::moe::{MoeBlock, SoftmaxRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::{Linear, LoadCtx};
use crate::weights::WeightStore;

/// Everything particular to one model family.
pub trait ModelFamily: Sync {
    /// config.json's `model_type` for this family.
    fn model_type(&self) -> &'static str;

    /// Other `model_type`s that run as this family (mlx-lm's MODEL_REMAPPING).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// Sigmoid router with e_score_correction_bias and group-limited top-k (DeepSeek-V3 style).
    fn sigmoid_router(&self) -> bool {
        false
    }

    /// head_dim is hidden_size / num_attention_heads (checked to divide).
    fn head_dim_from_hidden(&self) -> bool {
        false
    }

    /// Reads the family's keys into `c`, with mlx-lm's defaults. `c` arrives with the shared
    /// keys filled (hidden_size, num_attention_heads, eos, quantization, torch_dtype) and every
    /// other field neutral (`ModelConfig::blank`); the cross-key check runs afterwards.
    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()>;

    /// Whether decoder layer `i` has a MoE block (else a dense MLP).
    fn is_moe_layer(&self, _c: &ModelConfig, _i: i32) -> bool {
        true
    }

    /// How Hugging Face checkpoints of this family store experts (synth's HF layout, sanitize).
    fn hf_experts(&self) -> &'static HfExperts {
        &HfExperts::STANDARD
    }

    /// mlx-lm's sanitize: checkpoint tensor names → the names `load_layer` reads. Runs after the
    /// shared step (tied embeddings drop `lm_head.weight`).
    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()>;

    /// Decoder layer `i`, composed of the shared slot implementations.
    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer>;

    /// `zmlx synth`'s config.json keys for the family (`tiny` for tests, else the bench preset:
    /// real per-layer shapes, [`BENCH_LAYERS`] layers). vocab_size, hidden_size, torch_dtype and
    /// the token ids are added by synth.
    fn synth_config(&self, tiny: bool) -> Value;

    /// The real model `zmlx synth --preset full` reproduces (Hugging Face id).
    fn full_model(&self) -> &'static str;

    /// That model's published config.json: every key mlx-lm reads, as released (synth replaces
    /// the token ids with its tokenizer's and torch_dtype with the stored dtype).
    fn full_config(&self) -> Value;

    /// Bits of the router's per-module quantization override in a synthesized quantized
    /// checkpoint (mlx-lm's quant_predicate; Qwen3-MoE: 8).
    fn synth_router_bits(&self) -> Option<i32> {
        None
    }

    /// The default pattern set on the CPU backend (`safe` patterns only, chosen from the CPU
    /// bench ledger; see `patterns::family_preset`).
    fn preset_patterns(&self) -> Vec<&'static str>;
}

/// The registry: one line per family, `Id => module::Type`. Generates the [`Family`] id enum,
/// `Family::ALL` (registry order) and [`family`].
macro_rules! families {
    ($($id:ident => $imp:path),* $(,)?) => {
        /// Families zmlx can load (after mlx-lm's MODEL_REMAPPING): the id of a family module.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Family {
            $($id),*
        }

        impl Family {
            /// Every family, in registry order.
            pub const ALL: [Family; [$(Family::$id),*].len()] = [$(Family::$id),*];
        }

        /// The module implementing family `f`.
        pub fn family(f: Family) -> &'static dyn ModelFamily {
            match f {
                $(Family::$id => &$imp),*
            }
        }
    };
}

families! {
    Mixtral => mixtral::Mixtral,
    Qwen2Moe => qwen2_moe::Qwen2Moe,
    Qwen3Moe => qwen3_moe::Qwen3Moe,
    Glm4Moe => glm4_moe::Glm4Moe,
    Glm4MoeLite => glm4_moe_lite::Glm4MoeLite,
    DeepseekV3 => deepseek_v3::DeepseekV3,
}

impl Family {
    /// The module implementing this family.
    pub fn module(self) -> &'static dyn ModelFamily {
        family(self)
    }

    pub fn model_type(self) -> &'static str {
        family(self).model_type()
    }

    /// mlx-lm's MODEL_REMAPPING included: Kimi-K2 and JoyAI-LLM-Flash run as deepseek_v3.
    pub fn from_model_type(t: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|&f| f.model_type() == t || family(f).aliases().contains(&t))
    }

    /// Sigmoid router with e_score_correction_bias and group-limited top-k (DeepSeek-V3 style).
    pub fn sigmoid_router(self) -> bool {
        family(self).sigmoid_router()
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

/// Decoder layers of the bench preset: the real per-layer shapes are what decode speed depends
/// on; two layers (one dense + one MoE where the family starts dense) keep the oracle tests on
/// bench checkpoints inside the test command's time budget.
pub const BENCH_LAYERS: i32 = 2;

/// mlx-lm's sanitize for every family: the shared step, then the family's rules.
pub fn sanitize(config: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    if config.tie_word_embeddings {
        store.take_opt("lm_head.weight");
    }
    family(config.family).sanitize(config, store)
}

/// Whether decoder layer `i` of this config has a MoE block.
pub fn is_moe_layer(c: &ModelConfig, i: i32) -> bool {
    c.family.module().is_moe_layer(c, i)
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    family(ctx.config.family).load_layer(ctx, i)
}

/// The GQA attention of layer `i` as the config describes it (attention.rs).
fn gqa_attention(ctx: &mut LoadCtx, i: i32) -> Result<Rc<GqaAttention>> {
    let shape = GqaShape::from_config(ctx.config);
    Ok(Rc::new(GqaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &shape)?))
}

/// A softmax-router MoE block at `path` (mixtral, qwen2_moe, qwen3_moe): router `{path}.gate`
/// selecting `kind`, SwitchGLU experts of `width` at `{path}.switch_mlp`, the weighted combine
/// (`cast_back`: to the activation dtype), no shared expert.
fn softmax_moe(ctx: &mut LoadCtx, path: String, kind: RouterKind, width: i32, cast_back: bool) -> Result<MoeBlock> {
    let (d, e) = (ctx.config.hidden_size, ctx.config.num_experts);
    let router = SoftmaxRouter {
        gate: Linear::load(ctx, &format!("{path}.gate"), d, e, false)?,
        kind,
        k: ctx.config.num_experts_per_tok,
    };
    let experts = SwitchGlu::load(ctx, &format!("{path}.switch_mlp"), e, d, width)?;
    Ok(MoeBlock {
        path,
        router: slot(Rc::new(router)),
        experts: slot(Rc::new(experts)),
        combine: slot(Rc::new(WeightedSumCombine { cast_back })),
        shared: None,
        offload: None,
    })
}

/// A pre-norm decoder layer around the given attention and MLP (every family's layout).
fn decoder_layer(
    ctx: &mut LoadCtx,
    i: i32,
    attention: Rc<dyn crate::slots::AttentionSlot>,
    mlp: crate::model::LayerMlp,
) -> Result<DecoderLayer> {
    let (d, eps) = (ctx.config.hidden_size, ctx.config.rms_norm_eps);
    let norm = |ctx: &mut LoadCtx, name: &str| -> Result<crate::slots::Slot<dyn crate::slots::NormSlot>> {
        let n = crate::nn::RmsNorm::load(ctx, &format!("model.layers.{i}.{name}"), d, eps)?;
        Ok(crate::model::slot(Rc::new(n) as Rc<dyn crate::slots::NormSlot>))
    };
    Ok(DecoderLayer {
        input_layernorm: norm(ctx, "input_layernorm")?,
        post_attention_layernorm: norm(ctx, "post_attention_layernorm")?,
        attention: crate::model::slot(attention),
        mlp,
    })
}

/// Removes every tensor whose name matches (mlx-lm's sanitize drop rules).
fn drop_where(store: &mut WeightStore, pred: impl Fn(&str) -> bool) {
    let names: Vec<String> = store.names().filter(|k| pred(k)).cloned().collect();
    for n in names {
        store.take_opt(&n);
    }
}

/// How a family's Hugging Face checkpoints hold experts, and what mlx-lm's sanitize stacks.
pub struct HfExperts {
    /// The MoE module under `model.layers.{l}` (`mlp`; Mixtral: `block_sparse_moe`).
    pub block: &'static str,
    /// (per-expert HF name, stacked `switch_mlp` name), in mlx-lm's sanitize order.
    pub names: [(&'static str, &'static str); 3],
    /// The tensors stacked per projection (Qwen3-MoE: `weight` only, so an HF-layout
    /// checkpoint with quantized experts does not exist for it).
    pub parts: &'static [&'static str],
}

impl HfExperts {
    /// `mlp.experts.{e}.{up,down,gate}_proj.{weight,scales,biases}` (qwen2_moe, glm4_moe,
    /// glm4_moe_lite, deepseek_v3).
    pub const STANDARD: HfExperts = HfExperts {
        block: "mlp",
        names: [("up_proj", "up_proj"), ("down_proj", "down_proj"), ("gate_proj", "gate_proj")],
        parts: &["weight", "scales", "biases"],
    };

    /// The HF per-expert name of the stacked projection `ours` (gate_proj, up_proj, down_proj).
    pub fn hf_name(&self, ours: &str) -> &'static str {
        self.names.iter().find(|(_, o)| *o == ours).map(|(hf, _)| *hf).unwrap_or("")
    }
}

/// `{block}.experts.{e}.{hf}.{part}` → `{block}.switch_mlp.{ours}.{part}` for every layer below
/// num_hidden_layers where expert 0 has the tensor (mlx-lm's sanitize for HF checkpoints).
fn stack_all_experts(c: &ModelConfig, store: &mut WeightStore, x: &HfExperts) -> Result<()> {
    for l in 0..c.num_hidden_layers {
        let prefix = format!("model.layers.{l}.{}", x.block);
        for (hf, ours) in x.names {
            for k in x.parts {
                if store.contains(&format!("{prefix}.experts.0.{hf}.{k}")) {
                    let into = format!("{prefix}.switch_mlp.{ours}.{k}");
                    stack_experts(store, &format!("{prefix}.experts"), &format!("{hf}.{k}"), c.num_experts, &into)?;
                }
            }
        }
    }
    Ok(())
}

/// Stacks per-expert tensors `{prefix}.{e}.{name}` (e = 0..E) into one `[E, ...]` tensor, as
/// mlx-lm's sanitize does for Hugging Face checkpoints.
fn stack_experts(store: &mut WeightStore, prefix: &str, suffix: &str, experts: i32, into: &str) -> Result<()> {
    // Offloaded experts stay in their files: only where each expert's bytes are is stacked.
    if store.stack_lazy(prefix, suffix, experts, into)? {
        return Ok(());
    }
    let first = format!("{prefix}.0.{suffix}");
    let parts: Vec<Array> = (0..experts)
        .map(|e| {
            let name = format!("{prefix}.{e}.{suffix}");
            store.take(&name).map_err(|_| {
                anyhow!(
                    "{}: tensor `{name}` is missing: expert 0 has `{first}`, so all {experts} experts (num_experts in config.json) must",
                    store.file_of(&first)
                )
            })
        })
        .collect::<Result<_>>()?;
    let stacked = ops::stack(&parts, 0)
        .map_err(|e| anyhow!("stacking `{prefix}.*.{suffix}`: {e} (do all experts have the same shape?)"))?;
    store.insert(into.to_owned(), stacked, &first);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::patterns::{registry, SafetyClass};

    #[test]
    fn model_types_and_aliases_resolve_to_their_family() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
            for a in family(f).aliases() {
                assert_eq!(Family::from_model_type(a), Some(f));
            }
        }
        assert_eq!(Family::from_model_type("kimi_k2"), Some(Family::DeepseekV3));
        assert_eq!(Family::from_model_type("llama"), None);
    }

    #[test]
    fn synth_configs_parse_as_their_family() {
        for f in Family::ALL {
            for tiny in [true, false] {
                let mut v = family(f).synth_config(tiny);
                v["vocab_size"] = 512.into();
                v["hidden_size"] = (if tiny { 128 } else { 2048 }).into();
                let c = ModelConfig::from_value(&v, Path::new("config.json")).unwrap();
                assert_eq!(c.family, f);
            }
            // The full preset is the published config as it is.
            let c = ModelConfig::from_value(&family(f).full_config(), Path::new("config.json")).unwrap();
            assert_eq!(c.family, f, "{}", family(f).full_model());
        }
    }

    /// A family's preset names only registered `safe` patterns that claim the family.
    #[test]
    fn presets_name_safe_patterns_of_the_family() {
        let reg = registry();
        for f in Family::ALL {
            for name in family(f).preset_patterns() {
                let p = reg.iter().find(|p| p.info().name == name).unwrap_or_else(|| panic!("{f}: {name}"));
                assert_eq!(p.info().class, SafetyClass::Safe, "{f}: {name}");
                assert!(p.info().families.contains(&f), "{f}: {name} does not claim the family");
            }
        }
    }
}
