//! Qwen2-MoE (`qwen2_moe`, Qwen1.5-MoE): GQA with q/k/v biases, every layer sparse, router =
//! softmax over all experts then top-k of the probabilities (descending, never renormalised),
//! plus a sigmoid-gated shared expert. head_dim is always hidden/heads.
use std::rc::Rc;

use anyhow::Result;
use serde_json::{json, Value};

use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::{slot, DecoderLayer, LayerMlp};
use crate::moe::RouterKind;
use crate::moe::{DenseMlp, GatedSharedExpert};
use crate::nn::{Linear, LoadCtx};
use crate::weights::WeightStore;

pub struct Qwen2Moe;

impl ModelFamily for Qwen2Moe {
    fn model_type(&self) -> &'static str {
        "qwen2_moe"
    }

    fn head_dim_from_hidden(&self) -> bool {
        true
    }

    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        c.vocab_size = k.positive("vocab_size", None)?;
        c.num_hidden_layers = k.positive("num_hidden_layers", None)?;
        c.num_key_value_heads = k.positive("num_key_value_heads", Some(c.num_attention_heads as i64))?;
        c.intermediate_size = k.positive("intermediate_size", None)?;
        c.moe_intermediate_size = k.positive("moe_intermediate_size", None)?;
        c.shared_expert_intermediate_size = Some(k.positive("shared_expert_intermediate_size", None)?);
        c.num_experts = k.positive("num_experts", None)?;
        c.num_experts_per_tok = k.positive("num_experts_per_tok", None)?;
        c.rms_norm_eps = k.positive_float("rms_norm_eps", None)?;
        c.rope_theta = k.positive_float("rope_theta", Some(1e6))?;
        c.rope_traditional = k.boolean("rope_traditional", Some(false))?;
        c.attention_bias = true;
        // Validated as mlx-lm does, never applied.
        if let Some(rs) =
            k.map.get("rope_scaling").filter(|v| !v.is_null() && v.as_object().is_some_and(|o| !o.is_empty()))
        {
            if rs.get("type").and_then(Value::as_str) != Some("linear") || rs.get("factor").is_none() {
                return Err(k.err("rope_scaling", "null or {\"type\": \"linear\", \"factor\": F} for qwen2_moe"));
            }
        }
        Ok(())
    }

    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        super::stack_all_experts(c, store, &HfExperts::STANDARD)
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        let attention = super::gqa_attention(ctx, i)?;
        let c = ctx.config.clone();
        let mlp = format!("model.layers.{i}.mlp");
        let mut block =
            super::softmax_moe(ctx, mlp.clone(), RouterKind::SoftmaxThenTopKDesc, c.moe_intermediate_size, false)?;
        let width = c.shared_expert_intermediate_size.unwrap_or(c.moe_intermediate_size);
        let shared = GatedSharedExpert {
            mlp: DenseMlp::load(ctx, &format!("{mlp}.shared_expert"), c.hidden_size, width)?,
            gate: Linear::load(ctx, &format!("{mlp}.shared_expert_gate"), c.hidden_size, 1, false)?,
        };
        block.shared = Some(slot(Rc::new(shared)));
        super::decoder_layer(ctx, i, attention, LayerMlp::Moe(block))
    }

    fn full_model(&self) -> &'static str {
        "Qwen/Qwen1.5-MoE-A2.7B"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "Qwen2MoeForCausalLM"
              ],
              "attention_dropout": 0.0,
              "bos_token_id": 151643,
              "eos_token_id": 151643,
              "hidden_act": "silu",
              "hidden_size": 2048,
              "initializer_range": 0.02,
              "intermediate_size": 5632,
              "max_position_embeddings": 8192,
              "max_window_layers": 21,
              "model_type": "qwen2_moe",
              "num_attention_heads": 16,
              "num_hidden_layers": 24,
              "num_key_value_heads": 16,
              "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0,
              "sliding_window": 32768,
              "tie_word_embeddings": false,
              "torch_dtype": "bfloat16",
              "use_cache": true,
              "use_sliding_window": false,
              "vocab_size": 151936,
              "decoder_sparse_step": 1,
              "moe_intermediate_size": 1408,
              "shared_expert_intermediate_size": 5632,
              "num_experts_per_tok": 4,
              "num_experts": 60,
              "norm_topk_prob": false,
              "output_router_logits": false,
              "router_aux_loss_coef": 0.001
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_hidden_layers": if tiny { 2 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 16 }, "num_key_value_heads": if tiny { 2 } else { 16 },
            "intermediate_size": if tiny { 256 } else { 5632 },
            "num_experts": if tiny { 16 } else { 60 }, "num_experts_per_tok": 4,
            "moe_intermediate_size": if tiny { 64 } else { 1408 },
            "shared_expert_intermediate_size": if tiny { 192 } else { 5632 },
            "norm_topk_prob": false, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": false,
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
