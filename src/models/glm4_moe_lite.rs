//! GLM-4.7-Flash (`glm4_moe_lite`): MLA attention + the sigmoid group-router MoE, shared with
//! deepseek_v3 (mla.rs); it differs in config semantics only: the MLA norms use rms_norm_eps,
//! the router renormalises by `sum + 1e-20`, and mlx-lm's defaults are GLM's.
use anyhow::Result;
use serde_json::{json, Value};

use super::mla::{self, MlaDefaults};
use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub struct Glm4MoeLite;

impl ModelFamily for Glm4MoeLite {
    fn model_type(&self) -> &'static str {
        "glm4_moe_lite"
    }

    fn sigmoid_router(&self) -> bool {
        true
    }

    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        let d = MlaDefaults {
            routed_scaling_factor: 1.8,
            first_k_dense_replace: 1,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            renorm_eps: Some(1e-20),
            norm_eps: None,
        };
        mla::parse_keys(k, c, &d)
    }

    fn is_moe_layer(&self, c: &ModelConfig, i: i32) -> bool {
        mla::is_moe_layer(c, i)
    }

    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        // mlx-lm drops every layer at or above num_hidden_layers (the MTP layers) by index.
        let n = c.num_hidden_layers;
        super::drop_where(store, |k| {
            let s: Vec<&str> = k.split('.').collect();
            s.len() >= 3 && s[1] == "layers" && s[2].parse::<i32>().is_ok_and(|i| i >= n)
        });
        super::stack_all_experts(c, store, &HfExperts::STANDARD)?;
        mla::split_kv_b_proj(c, store)
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        mla::load_layer(ctx, i)
    }

    fn full_model(&self) -> &'static str {
        "zai-org/GLM-4.7-Flash"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "Glm4MoeLiteForCausalLM"
              ],
              "attention_bias": false,
              "attention_dropout": 0.0,
              "pad_token_id": 154820,
              "eos_token_id": [
                154820,
                154827,
                154829
              ],
              "hidden_act": "silu",
              "hidden_size": 2048,
              "intermediate_size": 10240,
              "max_position_embeddings": 202752,
              "model_type": "glm4_moe_lite",
              "moe_intermediate_size": 1536,
              "topk_method": "noaux_tc",
              "norm_topk_prob": true,
              "num_attention_heads": 20,
              "n_group": 1,
              "topk_group": 1,
              "n_routed_experts": 64,
              "n_shared_experts": 1,
              "routed_scaling_factor": 1.8,
              "num_experts_per_tok": 4,
              "first_k_dense_replace": 1,
              "num_hidden_layers": 47,
              "num_key_value_heads": 20,
              "num_nextn_predict_layers": 1,
              "partial_rotary_factor": 1.0,
              "rms_norm_eps": 1e-05,
              "rope_scaling": null,
              "rope_theta": 1000000,
              "tie_word_embeddings": false,
              "dtype": "bfloat16",
              "q_lora_rank": 768,
              "kv_lora_rank": 512,
              "qk_nope_head_dim": 192,
              "qk_rope_head_dim": 64,
              "v_head_dim": 256,
              "vocab_size": 154880
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
            "num_hidden_layers": if tiny { 3 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 20 }, "num_key_value_heads": if tiny { 4 } else { 20 },
            "q_lora_rank": if tiny { 64 } else { 768 }, "kv_lora_rank": if tiny { 128 } else { 512 },
            "qk_nope_head_dim": if tiny { 64 } else { 192 }, "qk_rope_head_dim": if tiny { 32 } else { 64 },
            "v_head_dim": if tiny { 96 } else { 256 }, "attention_bias": false,
            "intermediate_size": if tiny { 256 } else { 10240 }, "moe_intermediate_size": if tiny { 64 } else { 1536 },
            "n_routed_experts": if tiny { 16 } else { 64 }, "num_experts_per_tok": 4, "n_shared_experts": 1,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.8,
            "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "rope_scaling": null,
            "max_position_embeddings": 32768, "tie_word_embeddings": false,
        })
    }

    /// moe_mlp stays for its combine kernel; glm47_rope fuses the MLA decode RoPE.
    fn preset_patterns(&self) -> Vec<&'static str> {
        vec![
            "swiglu_mlp",
            "moe_mlp",
            "deepseek_router",
            "downproj_combine",
            "qmv_linear",
            "glm47_rope",
            "rms_norm",
            "quantized_embedding",
        ]
    }
}
