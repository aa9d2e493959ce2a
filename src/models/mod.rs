//! One file per family: how checkpoint tensors map to modules (sanitize) and which slot
//! implementations a decoder layer is composed of.
mod mixtral;
mod qwen3_moe;

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
    match config.family {
        Family::Mixtral => mixtral::sanitize(config, store),
        Family::Qwen3Moe => qwen3_moe::sanitize(config, store),
    }
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    match ctx.config.family {
        Family::Mixtral => mixtral::load_layer(ctx, i),
        Family::Qwen3Moe => qwen3_moe::load_layer(ctx, i),
    }
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
    let stacked = ops::stack(&parts, 0).map_err(|e| anyhow!("stacking `{prefix}.*.{suffix}`: {e} (do all experts have the same shape?)"))?;
    store.insert(into.to_owned(), stacked, &first);
    Ok(())
}
