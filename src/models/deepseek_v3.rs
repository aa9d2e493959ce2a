//! DeepSeek-V3 / Kimi-K2 / JoyAI-LLM-Flash (`deepseek_v3`, `kimi_k2`, `joyai_llm_flash`): MLA
//! attention with YaRN + the sigmoid group-router MoE (shared with glm4_moe_lite: mla.rs). The
//! MLA norms use a hard-coded 1e-6 and the router divides by the plain sum.
use anyhow::Result;
use serde_json::{json, Value};

use super::mla::{self, MlaDefaults};
use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub struct DeepseekV3;

impl ModelFamily for DeepseekV3 {
    fn model_type(&self) -> &'static str {
        "deepseek_v3"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["kimi_k2", "joyai_llm_flash"]
    }

    fn sigmoid_router(&self) -> bool {
        true
    }

    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        let d = MlaDefaults {
            routed_scaling_factor: 1.0,
            first_k_dense_replace: 0,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            renorm_eps: None,
            norm_eps: Some(1e-6),
        };
        mla::parse_keys(k, c, &d)
    }

    fn is_moe_layer(&self, c: &ModelConfig, i: i32) -> bool {
        mla::is_moe_layer(c, i)
    }

    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        if let Some(k) = store.names().find(|k| k.ends_with("weight_scale_inv") || k.ends_with("weight_packed")) {
            anyhow::bail!(
                "{}: tensor `{k}` is an fp8 / compressed-tensors weight; convert the checkpoint with mlx_lm.convert first",
                store.file_of(k)
            );
        }
        super::stack_all_experts(c, store, &HfExperts::STANDARD)?;
        mla::split_kv_b_proj(c, store)?;
        // mlx-lm drops DeepSeek-V3's MTP layer by its hard-coded index, and rotary inv_freq.
        super::drop_where(store, |k| k.starts_with("model.layers.61") || k.contains("rotary_emb.inv_freq"));
        Ok(())
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        mla::load_layer(ctx, i)
    }

    fn full_model(&self) -> &'static str {
        "moonshotai/Moonlight-16B-A3B"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "DeepseekV3ForCausalLM"
              ],
              "attention_bias": false,
              "attention_dropout": 0.0,
              "aux_loss_alpha": 0.001,
              "bos_token_id": 163584,
              "eos_token_id": 163586,
              "ep_size": 1,
              "first_k_dense_replace": 1,
              "hidden_act": "silu",
              "hidden_size": 2048,
              "initializer_range": 0.02,
              "intermediate_size": 11264,
              "kv_lora_rank": 512,
              "max_position_embeddings": 8192,
              "model_type": "deepseek_v3",
              "moe_intermediate_size": 1408,
              "moe_layer_freq": 1,
              "n_group": 1,
              "n_routed_experts": 64,
              "n_shared_experts": 2,
              "norm_topk_prob": true,
              "num_attention_heads": 16,
              "num_experts_per_tok": 6,
              "num_hidden_layers": 27,
              "num_key_value_heads": 16,
              "num_nextn_predict_layers": 0,
              "pretraining_tp": 1,
              "q_lora_rank": null,
              "qk_nope_head_dim": 128,
              "qk_rope_head_dim": 64,
              "rms_norm_eps": 1e-05,
              "rope_scaling": null,
              "rope_theta": 50000.0,
              "routed_scaling_factor": 2.446,
              "scoring_func": "sigmoid",
              "seq_aux": true,
              "tie_word_embeddings": false,
              "topk_group": 1,
              "topk_method": "noaux_tc",
              "torch_dtype": "bfloat16",
              "use_cache": true,
              "v_head_dim": 128,
              "vocab_size": 163840
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "num_hidden_layers": if tiny { 3 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 16 }, "num_key_value_heads": if tiny { 4 } else { 16 },
            "q_lora_rank": if tiny { 64 } else { 768 }, "kv_lora_rank": if tiny { 128 } else { 512 },
            "qk_nope_head_dim": if tiny { 64 } else { 128 }, "qk_rope_head_dim": if tiny { 32 } else { 64 },
            "v_head_dim": if tiny { 64 } else { 128 }, "attention_bias": false,
            "intermediate_size": if tiny { 256 } else { 5632 }, "moe_intermediate_size": if tiny { 64 } else { 1024 },
            "n_routed_experts": if tiny { 16 } else { 64 }, "num_experts_per_tok": if tiny { 4 } else { 8 },
            "n_shared_experts": 1, "n_group": if tiny { 4 } else { 8 }, "topk_group": if tiny { 2 } else { 4 },
            "norm_topk_prob": true, "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": if tiny { 4.0 } else { 40.0 }, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "max_position_embeddings": 163840, "tie_word_embeddings": false,
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
