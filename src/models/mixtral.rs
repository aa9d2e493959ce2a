//! Mixtral (`mixtral`): GQA attention, every layer sparse (`block_sparse_moe`), router = softmax
//! over the top-k raw logits, combine in the activation dtype, no shared expert.
use anyhow::Result;
use serde_json::{json, Value};

use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::{DecoderLayer, LayerMlp};
use crate::moe::RouterKind;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub struct Mixtral;

/// HF checkpoints hold `block_sparse_moe.experts.{e}.w1/w2/w3` (+ scales/biases when quantized).
const EXPERTS: HfExperts = HfExperts {
    block: "block_sparse_moe",
    names: [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")],
    parts: &["weight", "scales", "biases"],
};

impl ModelFamily for Mixtral {
    fn model_type(&self) -> &'static str {
        "mixtral"
    }

    fn head_dim_from_hidden(&self) -> bool {
        true
    }

    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        c.vocab_size = k.positive("vocab_size", Some(32000))?;
        c.num_hidden_layers = k.positive("num_hidden_layers", None)?;
        c.num_key_value_heads = k.positive("num_key_value_heads", Some(8))?;
        c.intermediate_size = k.positive("intermediate_size", Some(14336))?;
        c.moe_intermediate_size = c.intermediate_size;
        c.num_experts = k.positive("num_local_experts", Some(8))?;
        c.num_experts_per_tok = k.positive("num_experts_per_tok", Some(2))?;
        c.rms_norm_eps = k.positive_float("rms_norm_eps", Some(1e-5))?;
        c.rope_theta = k.positive_float("rope_theta", Some(1e6))?;
        c.rope_traditional = k.boolean("rope_traditional", Some(false))?;
        c.tie_word_embeddings = k.boolean("tie_word_embeddings", Some(false))?;
        c.max_position_embeddings = k.positive_opt("max_position_embeddings")?.map(i64::from);
        Ok(())
    }

    fn hf_experts(&self) -> &'static HfExperts {
        &EXPERTS
    }

    /// mlx-lm stacks only when layer 0's first expert is stored per expert.
    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        if !store.contains("model.layers.0.block_sparse_moe.experts.0.w1.weight") {
            return Ok(());
        }
        super::stack_all_experts(c, store, &EXPERTS)
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        let attention = super::gqa_attention(ctx, i)?;
        let width = ctx.config.intermediate_size;
        let moe = format!("model.layers.{i}.block_sparse_moe");
        let mlp = LayerMlp::Moe(super::softmax_moe(ctx, moe, RouterKind::TopKThenSoftmax, width, false)?);
        super::decoder_layer(ctx, i, attention, mlp)
    }

    fn full_model(&self) -> &'static str {
        "mistralai/Mixtral-8x7B-v0.1"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "MixtralForCausalLM"
              ],
              "attention_dropout": 0.0,
              "bos_token_id": 1,
              "eos_token_id": 2,
              "hidden_act": "silu",
              "hidden_size": 4096,
              "initializer_range": 0.02,
              "intermediate_size": 14336,
              "max_position_embeddings": 32768,
              "model_type": "mixtral",
              "num_attention_heads": 32,
              "num_experts_per_tok": 2,
              "num_hidden_layers": 32,
              "num_key_value_heads": 8,
              "num_local_experts": 8,
              "output_router_logits": false,
              "rms_norm_eps": 1e-05,
              "rope_theta": 1000000.0,
              "router_aux_loss_coef": 0.02,
              "sliding_window": null,
              "tie_word_embeddings": false,
              "torch_dtype": "bfloat16",
              "use_cache": true,
              "vocab_size": 32000
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_hidden_layers": if tiny { 2 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 16 }, "num_key_value_heads": if tiny { 2 } else { 4 },
            "intermediate_size": if tiny { 128 } else { 5632 },
            "num_local_experts": 8, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": false,
        })
    }

    fn preset_patterns(&self) -> Vec<&'static str> {
        vec![
            "swiglu_mlp",
            "moe_mlp",
            "downproj_combine",
            "gqa_attention",
            "qmv_linear",
            "rms_norm",
            "quantized_embedding",
        ]
    }
}
