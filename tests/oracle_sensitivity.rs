//! The oracle comparison can fail: a deliberately wrong router detail, swapped into the router
//! slot of a loaded model, changes the tokens; restoring the stock slot makes them equal again.
mod common;

use std::any::Any;
use std::rc::Rc;

use common::*;
use mlx_rs::ops::indexing::{Ellipsis, IntoStrideBy, TryIndexOp};
use mlx_rs::{ops, Array};
use zmlx::config::Family;
use zmlx::kernels::RouterKind;
use zmlx::model::{DtypeChoice, Model};
use zmlx::moe::SoftmaxRouter;
use zmlx::slots::{RouterSlot, Routing};

const TOKENS: usize = 64;

/// Wraps the stock router and reverses the slot order of its k experts.
struct ReversedOrder(Rc<dyn RouterSlot>);

impl RouterSlot for ReversedOrder {
    fn route(&self, x: &Array) -> anyhow::Result<Routing> {
        let r = self.0.route(x)?;
        let rev = |a: &Array| a.try_index((Ellipsis, (..).stride_by(-1)));
        Ok(Routing { indices: rev(&r.indices)?, weights: rev(&r.weights)? })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Mixtral routed with full-softmax probabilities, not renormalised over the top k (the Python
/// original's Mixtral deviation).
struct FullSoftmaxMixtral(SoftmaxRouter);

impl RouterSlot for FullSoftmaxMixtral {
    fn route(&self, x: &Array) -> anyhow::Result<Routing> {
        let gates = self.0.gate.forward(x)?;
        let k = self.0.k;
        let indices = ops::argpartition_axis(gates.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?;
        let weights = ops::softmax_axis(&gates, -1, true)?.take_along_axis(&indices, -1)?;
        Ok(Routing { indices, weights })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Builds a (wrong) router from the stock one.
type MakeRouter = dyn Fn(&Rc<dyn RouterSlot>) -> Rc<dyn RouterSlot>;

fn swap_routers(model: &mut Model, make: &MakeRouter) {
    for (_, block) in model.moe_blocks_mut() {
        let stock = block.router.stock().clone();
        block.router.swap(make(&stock), "test-wrong-router");
    }
}

fn restore_routers(model: &mut Model) {
    for (_, block) in model.moe_blocks_mut() {
        block.router.restore();
    }
}

/// Runs stock (must equal mlx-lm), wrong (must differ somewhere), restored (must equal again).
fn assert_detects(family: Family, quantize: Option<i32>, dtype: DtypeChoice, make: &MakeRouter) {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(family, quantize, 7));
    let oracle_dtype = if dtype == DtypeChoice::Bf16 { "bf16" } else { "f32" };
    let want: Vec<Vec<u32>> =
        oracle(dir.path(), &PROMPTS, TOKENS, oracle_dtype).into_iter().map(|r| r.token_ids).collect();
    let (mut model, tok) = load(dir.path(), dtype);
    let ids =
        |m: &Model| -> Vec<Vec<u32>> { zmlx_greedy(m, &tok, &PROMPTS, TOKENS).into_iter().map(|x| x.1).collect() };

    assert_eq!(ids(&model), want, "{family}: stock slots must match mlx-lm");
    swap_routers(&mut model, make);
    let wrong = ids(&model);
    assert_ne!(wrong, want, "{family}: the wrong router was not detected by the oracle comparison");
    restore_routers(&mut model);
    assert_eq!(ids(&model), want, "{family}: restoring the stock router must reproduce mlx-lm exactly");
}

#[test]
fn qwen3_renormalisation_off_is_detected() {
    assert_detects(Family::Qwen3Moe, None, DtypeChoice::F32, &|stock| {
        let s = stock.as_any().downcast_ref::<SoftmaxRouter>().expect("stock qwen3 router");
        assert_eq!(s.kind, RouterKind::SoftmaxThenTopK { norm: true });
        Rc::new(SoftmaxRouter { gate: s.gate.clone(), kind: RouterKind::SoftmaxThenTopK { norm: false }, k: s.k })
    });
}

#[test]
fn qwen3_reversed_expert_order_is_detected() {
    // k = 4 experts summed in the opposite order: a different rounding of the combine. In f32
    // that moves logits by ~1 ulp, which does not flip 64 greedy tokens of a tiny model; in bf16
    // (every add rounded to 8 bits) it does.
    assert_detects(Family::Qwen3Moe, Some(4), DtypeChoice::Bf16, &|stock| Rc::new(ReversedOrder(stock.clone())));
}

#[test]
fn mixtral_full_softmax_weights_are_detected() {
    assert_detects(Family::Mixtral, Some(4), DtypeChoice::F32, &|stock| {
        let s = stock.as_any().downcast_ref::<SoftmaxRouter>().expect("stock mixtral router");
        Rc::new(FullSoftmaxMixtral(SoftmaxRouter { gate: s.gate.clone(), kind: s.kind, k: s.k }))
    });
}

// ---- issue 5 families: one semantic detail changed per family makes the tokens differ.

use zmlx::attention_mla::MlaAttention;
use zmlx::moe::SigmoidGroupRouter;
use zmlx::slots::AttentionSlot;

fn sigmoid_router(stock: &Rc<dyn RouterSlot>) -> SigmoidGroupRouter {
    stock.as_any().downcast_ref::<SigmoidGroupRouter>().expect("stock sigmoid group router").clone()
}

#[test]
fn qwen2_moe_renormalisation_on_is_detected() {
    // mlx-lm's qwen2_moe never renormalises (it ignores norm_topk_prob).
    assert_detects(Family::Qwen2Moe, None, DtypeChoice::F32, &|stock| {
        let s = stock.as_any().downcast_ref::<SoftmaxRouter>().expect("stock qwen2 router");
        assert_eq!(s.kind, RouterKind::SoftmaxThenTopKDesc);
        Rc::new(SoftmaxRouter { gate: s.gate.clone(), kind: RouterKind::SoftmaxThenTopK { norm: true }, k: s.k })
    });
}

#[test]
fn glm4_moe_ignored_correction_bias_is_detected() {
    assert_detects(Family::Glm4Moe, None, DtypeChoice::F32, &|stock| {
        let mut r = sigmoid_router(stock);
        r.bias = mlx_rs::ops::zeros_like(&r.bias).unwrap();
        Rc::new(r)
    });
}

#[test]
fn deepseek_v3_scaling_factor_one_is_detected() {
    assert_detects(Family::DeepseekV3, None, DtypeChoice::F32, &|stock| {
        let mut r = sigmoid_router(stock);
        assert_eq!(r.params.routed_scaling_factor, 2.5);
        r.params.routed_scaling_factor = 1.0;
        Rc::new(r)
    });
}

#[test]
fn glm4_moe_lite_renormalisation_off_is_detected() {
    assert_detects(Family::Glm4MoeLite, None, DtypeChoice::F32, &|stock| {
        let mut r = sigmoid_router(stock);
        assert_eq!(r.params.renorm_eps, Some(1e-20));
        r.params.norm_topk_prob = false;
        Rc::new(r)
    });
}

#[test]
fn glm4_moe_lite_non_traditional_rope_is_detected() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Glm4MoeLite, None, 7));
    let want: Vec<Vec<u32>> = oracle(dir.path(), &PROMPTS, TOKENS, "f32").into_iter().map(|r| r.token_ids).collect();
    let (mut model, tok) = load(dir.path(), DtypeChoice::F32);
    let ids =
        |m: &Model| -> Vec<Vec<u32>> { zmlx_greedy(m, &tok, &PROMPTS, TOKENS).into_iter().map(|x| x.1).collect() };
    assert_eq!(ids(&model), want);
    for layer in &mut model.layers {
        let stock = layer.attention.stock().clone();
        let mut a = stock.as_any().downcast_ref::<MlaAttention>().expect("MLA attention").clone();
        assert!(a.rope.traditional);
        a.rope.traditional = false;
        layer.attention.swap(Rc::new(a) as Rc<dyn AttentionSlot>, "test-non-traditional-rope");
    }
    assert_ne!(ids(&model), want, "non-traditional RoPE must change the tokens");
}
