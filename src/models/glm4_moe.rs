//! GLM-4.5 / 4.5-Air / 4.6 (`glm4_moe`): GQA with q/k/v biases (`attention_bias`), optional
//! per-head qk-norm, partial RoPE (`head_dim × partial_rotary_factor` features, half-split),
//! dense layers below `first_k_dense_replace`, then the sigmoid-router MoE (sigmoid_moe.rs).
use anyhow::Result;
use serde_json::{json, Value};

use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub struct Glm4Moe;

impl ModelFamily for Glm4Moe {
    fn model_type(&self) -> &'static str {
        "glm4_moe"
    }

    fn sigmoid_router(&self) -> bool {
        true
    }

    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        c.vocab_size = k.positive("vocab_size", None)?;
        c.num_hidden_layers = k.positive("num_hidden_layers", None)?;
        c.num_key_value_heads = k.positive("num_key_value_heads", None)?;
        c.head_dim = k.positive("head_dim", None)?;
        c.intermediate_size = k.positive("intermediate_size", None)?;
        super::sigmoid_moe::parse_keys(k, c, None)?;
        c.rms_norm_eps = k.positive_float("rms_norm_eps", None)?;
        c.rope_theta = k.positive_float("rope_theta", None)?;
        c.use_qk_norm = k.boolean("use_qk_norm", None)?;
        c.attention_bias = k.boolean("attention_bias", None)?;
        let partial = k.positive_float("partial_rotary_factor", None)?;
        c.rope_dims = (c.head_dim as f64 * partial as f64) as i32;
        c.moe_layer_freq = 1; // glm4_moe ignores moe_layer_freq
        Ok(())
    }

    fn is_moe_layer(&self, c: &ModelConfig, i: i32) -> bool {
        i >= c.first_k_dense_replace
    }

    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        super::stack_all_experts(c, store, &HfExperts::STANDARD)?;
        // mlx-lm drops the MTP layer by string prefix (so "model.layers.3" also drops 30-39).
        let mtp = format!("model.layers.{}", c.num_hidden_layers);
        super::drop_where(store, |k| k.starts_with(&mtp));
        Ok(())
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        let attention = super::gqa_attention(ctx, i)?;
        let mlp = super::sigmoid_moe::load_mlp(ctx, i)?;
        super::decoder_layer(ctx, i, attention, mlp)
    }

    fn full_model(&self) -> &'static str {
        "zai-org/GLM-4.5-Air"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "Glm4MoeForCausalLM"
              ],
              "attention_bias": true,
              "attention_dropout": 0.0,
              "pad_token_id": 151329,
              "eos_token_id": [
                151329,
                151336,
                151338
              ],
              "head_dim": 128,
              "hidden_act": "silu",
              "hidden_size": 4096,
              "partial_rotary_factor": 0.5,
              "initializer_range": 0.02,
              "intermediate_size": 10944,
              "max_position_embeddings": 131072,
              "model_type": "glm4_moe",
              "moe_intermediate_size": 1408,
              "norm_topk_prob": true,
              "num_attention_heads": 96,
              "n_group": 1,
              "topk_group": 1,
              "n_routed_experts": 128,
              "n_shared_experts": 1,
              "routed_scaling_factor": 1.0,
              "num_experts_per_tok": 8,
              "first_k_dense_replace": 1,
              "num_hidden_layers": 46,
              "num_key_value_heads": 8,
              "rms_norm_eps": 1e-05,
              "rope_scaling": null,
              "rope_theta": 1000000,
              "num_nextn_predict_layers": 1,
              "tie_word_embeddings": false,
              "torch_dtype": "bfloat16",
              "use_cache": true,
              "use_qk_norm": false,
              "vocab_size": 151552
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
            "num_hidden_layers": if tiny { 3 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 16 }, "num_key_value_heads": if tiny { 2 } else { 4 },
            "head_dim": if tiny { 64 } else { 128 }, "partial_rotary_factor": 0.5,
            "attention_bias": true, "use_qk_norm": true,
            "intermediate_size": if tiny { 256 } else { 5632 }, "moe_intermediate_size": if tiny { 64 } else { 1408 },
            "n_routed_experts": if tiny { 16 } else { 64 }, "num_experts_per_tok": if tiny { 4 } else { 8 },
            "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "rope_scaling": null,
            "max_position_embeddings": 32768, "tie_word_embeddings": false,
        })
    }

    /// moe_mlp stays for its combine kernel; the router is deepseek_router's.
    fn preset_patterns(&self) -> Vec<&'static str> {
        vec![
            "swiglu_mlp",
            "moe_mlp",
            "deepseek_router",
            "downproj_combine",
            "gqa_attention",
            "qmv_linear",
            "rms_norm",
            "quantized_embedding",
        ]
    }
}
