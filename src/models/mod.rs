//! One file per family: how checkpoint tensors map to modules (sanitize) and which slot
//! implementations a decoder layer is composed of.
mod deepseek_v3;
mod glm4_moe;
mod mixtral;
mod qwen2_moe;
mod qwen3_moe;
mod sigmoid_moe;

use anyhow::{anyhow, Result};
use mlx_rs::{ops, Array};

use crate::config::{Family, ModelConfig};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub fn sanitize(config: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    if config.tie_word_embeddings {
        store.take_opt("lm_head.weight");
    }
    let n = config.num_hidden_layers;
    match config.family {
        Family::Mixtral => mixtral::sanitize(config, store),
        Family::Qwen3Moe => qwen3_moe::sanitize(config, store),
        Family::Qwen2Moe => stack_all_experts(config, store),
        Family::Glm4Moe => {
            stack_all_experts(config, store)?;
            // mlx-lm drops the MTP layer by string prefix (so "model.layers.3" also drops 30-39).
            drop_where(store, |k| k.starts_with(&format!("model.layers.{n}")));
            Ok(())
        }
        Family::Glm4MoeLite => {
            drop_where(store, |k| {
                let s: Vec<&str> = k.split('.').collect();
                s.len() >= 3 && s[1] == "layers" && s[2].parse::<i32>().is_ok_and(|i| i >= n)
            });
            stack_all_experts(config, store)?;
            deepseek_v3::split_kv_b_proj(config, store)
        }
        Family::DeepseekV3 => {
            if let Some(k) = store.names().find(|k| k.ends_with("weight_scale_inv") || k.ends_with("weight_packed")) {
                anyhow::bail!(
                    "{}: tensor `{k}` is an fp8 / compressed-tensors weight; convert the checkpoint with mlx_lm.convert first",
                    store.file_of(k)
                );
            }
            stack_all_experts(config, store)?;
            deepseek_v3::split_kv_b_proj(config, store)?;
            // mlx-lm drops DeepSeek-V3's MTP layer by its hard-coded index, and rotary inv_freq.
            drop_where(store, |k| k.starts_with("model.layers.61") || k.contains("rotary_emb.inv_freq"));
            Ok(())
        }
    }
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    match ctx.config.family {
        Family::Mixtral => mixtral::load_layer(ctx, i),
        Family::Qwen2Moe => qwen2_moe::load_layer(ctx, i),
        Family::Qwen3Moe => qwen3_moe::load_layer(ctx, i),
        Family::Glm4Moe => glm4_moe::load_layer(ctx, i),
        Family::Glm4MoeLite | Family::DeepseekV3 => deepseek_v3::load_layer(ctx, i),
    }
}

/// A pre-norm decoder layer around the given attention and MLP (every family's layout).
fn decoder_layer(
    ctx: &mut LoadCtx,
    i: i32,
    attention: std::rc::Rc<dyn crate::slots::AttentionSlot>,
    mlp: crate::model::LayerMlp,
) -> Result<DecoderLayer> {
    let (d, eps) = (ctx.config.hidden_size, ctx.config.rms_norm_eps);
    Ok(DecoderLayer {
        input_layernorm: crate::nn::RmsNorm::load(ctx, &format!("model.layers.{i}.input_layernorm"), d, eps)?,
        post_attention_layernorm: crate::nn::RmsNorm::load(
            ctx,
            &format!("model.layers.{i}.post_attention_layernorm"),
            d,
            eps,
        )?,
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

/// `mlp.experts.{e}.{gate,up,down}_proj.{weight,scales,biases}` → `mlp.switch_mlp.*` for every
/// layer below num_hidden_layers (qwen2_moe, glm4_moe, glm4_moe_lite, deepseek_v3).
fn stack_all_experts(c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    for l in 0..c.num_hidden_layers {
        let prefix = format!("model.layers.{l}.mlp");
        for n in ["up_proj", "down_proj", "gate_proj"] {
            for k in ["weight", "scales", "biases"] {
                if store.contains(&format!("{prefix}.experts.0.{n}.{k}")) {
                    let into = format!("{prefix}.switch_mlp.{n}.{k}");
                    stack_experts(store, &format!("{prefix}.experts"), &format!("{n}.{k}"), c.num_experts, &into)?;
                }
            }
        }
    }
    Ok(())
}

/// Stacks per-expert tensors `{prefix}.{e}.{name}` (e = 0..E) into one `[E, ...]` tensor, as
/// mlx-lm's sanitize does for Hugging Face checkpoints.
fn stack_experts(store: &mut WeightStore, prefix: &str, suffix: &str, experts: i32, into: &str) -> Result<()> {
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
