//! `qmv_linear` (safe on CPU): every quantized dense projection (decode and prefill rows) —
//! attention q/k/v/o (GQA and MLA), dense and shared-expert MLPs, the output head — run through
//! zmlx's multi-threaded SIMD mat-vec (`kernels::experts::qmv_linear`) instead of MLX's scalar
//! CPU `quantized_matmul`. Each output row keeps `_qmm_t`'s exact sequential sum, so it is
//! bit-identical (tests/expert_kernels.rs) and token-identical (tests/fidelity.rs). Float
//! weights, bf16 activations and GPU backends run stock, counted in `fallbacks`.
//! Applies on top of the other attention/MLP patterns (it copies the active slot).
use std::rc::Rc;

use anyhow::Result;

use super::glm47_rope::FusedRopeMla;
use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind};
use crate::attention::GqaAttention;
use crate::attention_mla::{MlaAttention, QueryProj};
use crate::config::Family;
use crate::model::{LayerMlp, Model, OutputHead};
use crate::moe::{DenseMlp, GatedSharedExpert};
use crate::nn::{Linear, Weight};
use crate::slots::{AttentionSlot, HeadSlot, MlpSlot};

pub struct QmvLinear;

static INFO: PatternInfo = PatternInfo {
    name: "qmv_linear",
    slot: SlotKind::Linear,
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "decode: quantized dense projections (attention, dense/shared MLP, lm_head) on zmlx's bit-exact multi-threaded mat-vec",
};

fn on(l: &Linear) -> Linear {
    Linear { qmv: matches!(l.weight, Weight::Quant(_)), ..l.clone() }
}

fn any_quant(ls: &[&Linear]) -> bool {
    ls.iter().any(|l| matches!(l.weight, Weight::Quant(_)))
}

fn mla(m: &MlaAttention) -> MlaAttention {
    let q = match &m.q {
        QueryProj::Direct(p) => QueryProj::Direct(on(p)),
        QueryProj::LowRank { a, norm, b } => QueryProj::LowRank { a: on(a), norm: norm.clone(), b: on(b) },
    };
    MlaAttention { q, kv_a_proj_with_mqa: on(&m.kv_a_proj_with_mqa), o_proj: on(&m.o_proj), ..m.clone() }
}

fn attention(active: &Rc<dyn AttentionSlot>) -> Option<Rc<dyn AttentionSlot>> {
    let any = active.as_any();
    if let Some(g) = any.downcast_ref::<GqaAttention>() {
        if !any_quant(&[&g.q_proj, &g.k_proj, &g.v_proj, &g.o_proj]) {
            return None;
        }
        return Some(Rc::new(GqaAttention {
            q_proj: on(&g.q_proj),
            k_proj: on(&g.k_proj),
            v_proj: on(&g.v_proj),
            o_proj: on(&g.o_proj),
            ..g.clone()
        }));
    }
    let quant = |m: &MlaAttention| any_quant(&[&m.kv_a_proj_with_mqa, &m.o_proj]);
    if let Some(m) = any.downcast_ref::<MlaAttention>() {
        return quant(m).then(|| Rc::new(mla(m)) as Rc<dyn AttentionSlot>);
    }
    let f = any.downcast_ref::<FusedRopeMla>()?;
    quant(&f.inner).then(|| Rc::new(FusedRopeMla { inner: mla(&f.inner) }) as Rc<dyn AttentionSlot>)
}

fn mlp(active: &Rc<dyn MlpSlot>) -> Option<Rc<dyn MlpSlot>> {
    let dense = |d: &DenseMlp| DenseMlp {
        gate_proj: on(&d.gate_proj),
        up_proj: on(&d.up_proj),
        down_proj: on(&d.down_proj),
        activation: d.activation.clone(),
    };
    let any = active.as_any();
    if let Some(g) = any.downcast_ref::<GatedSharedExpert>() {
        return any_quant(&[&g.mlp.down_proj])
            .then(|| Rc::new(GatedSharedExpert { mlp: dense(&g.mlp), gate: on(&g.gate) }) as Rc<dyn MlpSlot>);
    }
    let d = any.downcast_ref::<DenseMlp>()?;
    any_quant(&[&d.down_proj]).then(|| Rc::new(dense(d)) as Rc<dyn MlpSlot>)
}

impl Pattern for QmvLinear {
    fn info(&self) -> &PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let mut out = PatternOutcome::default();
        let float = "float weights (the kernel is for quantized 2/4/8-bit projections)".to_string();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let path = format!("model.layers.{i}.self_attn");
            match attention(&layer.attention.get_rc().clone()) {
                Some(a) => {
                    layer.attention.swap(a, INFO.name);
                    out.patched.push(path);
                }
                None => out.skipped.push((path, float.clone())),
            }
            let slot = match &mut layer.mlp {
                LayerMlp::Dense(m) => Some((m, format!("model.layers.{i}.mlp"))),
                LayerMlp::Moe(b) => b.shared.as_mut().map(|s| (s, format!("{}.shared_expert", b.path))),
            };
            if let Some((s, path)) = slot {
                match mlp(&s.get_rc().clone()) {
                    Some(m) => {
                        s.swap(m, INFO.name);
                        out.patched.push(path);
                    }
                    None => out.skipped.push((path, float.clone())),
                }
            }
        }
        let head = model.head.get_rc().clone();
        match head.as_any().downcast_ref::<OutputHead>() {
            Some(h) if matches!(h.linear.weight, Weight::Quant(_)) => {
                model.head.swap(Rc::new(OutputHead { linear: on(&h.linear) }) as Rc<dyn HeadSlot>, INFO.name);
                out.patched.push("lm_head".into());
            }
            _ => out.skipped.push(("lm_head".into(), float)),
        }
        Ok(out)
    }
}
