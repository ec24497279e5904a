//! Model-shaped workloads shared by the demo and the benchmarks: named pairs (one per layout) and a
//! parameter list, with real model dimensions.

use tensorbus_planner::{BatchTensor, DType, Layout, PairPlan, Placement, TensorMeta};

/// A set of pairs and the tensors that travel on them.
pub struct Workload {
    pub name: &'static str,
    pub pairs: Vec<PairPlan>,
    pub tensors: Vec<BatchTensor>,
}

impl Workload {
    pub fn pair_refs(&self) -> Vec<&PairPlan> {
        self.pairs.iter().collect()
    }
}

fn pair(src_mesh: &[usize], src: Vec<Placement>, dst_mesh: &[usize], dst: Vec<Placement>) -> PairPlan {
    PairPlan::new(
        Layout::from_parts(src_mesh.to_vec(), src).expect("valid workload layout"),
        Layout::from_parts(dst_mesh.to_vec(), dst).expect("valid workload layout"),
    )
    .expect("valid workload pair")
}

use Placement::{Replicate as R, Shard as S};

/// An 8B-class dense model (Llama-3-8B dimensions with q/k/v biases, 387 tensors), from a 2x4
/// FSDP x TP trainer to a 4-rank TP inference job. `scale` divides every dimension except the
/// vocabulary (which is divided too) to fit small machines; 1 is the real size.
pub fn dense_8b(scale: u64, dtype: DType) -> Workload {
    let (h, kv, ffn, vocab, layers) = (4096 / scale, 1024 / scale, 14336 / scale, 128256 / scale, 32);
    let mut tensors = Vec::new();
    let mut add = |pair: usize, name: String, shape: Vec<u64>| {
        tensors.push(BatchTensor { pair, meta: TensorMeta::new(name, shape, dtype) })
    };
    // Pairs: 0 column-parallel, 1 row-parallel, 2 replicated (norms).
    add(0, "embed_tokens.weight".into(), vec![vocab, h]);
    for l in 0..layers {
        let p = format!("layers.{l}");
        for (n, rows) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
            add(0, format!("{p}.self_attn.{n}.weight"), vec![rows, h]);
            add(0, format!("{p}.self_attn.{n}.bias"), vec![rows]);
        }
        add(1, format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        add(0, format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]);
        add(0, format!("{p}.mlp.up_proj.weight"), vec![ffn, h]);
        add(1, format!("{p}.mlp.down_proj.weight"), vec![h, ffn]);
        add(2, format!("{p}.input_layernorm.weight"), vec![h]);
        add(2, format!("{p}.post_attention_layernorm.weight"), vec![h]);
    }
    add(2, "norm.weight".into(), vec![h]);
    add(0, "lm_head.weight".into(), vec![vocab, h]);
    Workload {
        name: "8B-class dense, 2x4 FSDPxTP -> 4 TP",
        pairs: vec![
            pair(&[2, 4], vec![S(0), S(0)], &[4], vec![S(0)]),
            pair(&[2, 4], vec![S(0), S(1)], &[4], vec![S(1)]),
            pair(&[2, 4], vec![S(0), R], &[4], vec![R]),
        ],
        tensors,
    }
}

/// A 1T-class MoE model (Kimi-K2-like: 61 layers, 60 of them MoE with 330 experts of three
/// 2048x7168 matrices; ~60,000 tensors) from 256 trainer ranks (32 FSDP x 8 TP) to 128 inference
/// ranks (16 replicas x 8 TP).
pub fn moe_1t(dtype: DType) -> Workload {
    let (h, ffn, experts, layers) = (7168u64, 2048u64, 330, 61);
    let mut tensors = Vec::new();
    let mut add = |pair: usize, name: String, shape: Vec<u64>| {
        tensors.push(BatchTensor { pair, meta: TensorMeta::new(name, shape, dtype) })
    };
    add(0, "embed_tokens.weight".into(), vec![163840, h]);
    for l in 0..layers {
        let p = format!("layers.{l}");
        add(0, format!("{p}.self_attn.q_a_proj.weight"), vec![1536, h]);
        add(0, format!("{p}.self_attn.q_b_proj.weight"), vec![12288, 1536]);
        add(0, format!("{p}.self_attn.kv_a_proj.weight"), vec![576, h]);
        add(0, format!("{p}.self_attn.kv_b_proj.weight"), vec![16384, 512]);
        add(1, format!("{p}.self_attn.o_proj.weight"), vec![h, 8192]);
        add(2, format!("{p}.input_layernorm.weight"), vec![h]);
        add(2, format!("{p}.post_attention_layernorm.weight"), vec![h]);
        if l == 0 {
            add(0, format!("{p}.mlp.gate_proj.weight"), vec![18432, h]);
            add(0, format!("{p}.mlp.up_proj.weight"), vec![18432, h]);
            add(1, format!("{p}.mlp.down_proj.weight"), vec![h, 18432]);
            continue;
        }
        add(2, format!("{p}.mlp.gate.weight"), vec![experts, h]);
        for e in 0..experts {
            add(0, format!("{p}.mlp.experts.{e}.gate_proj.weight"), vec![ffn, h]);
            add(0, format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![ffn, h]);
            add(1, format!("{p}.mlp.experts.{e}.down_proj.weight"), vec![h, ffn]);
        }
    }
    add(2, "norm.weight".into(), vec![h]);
    add(0, "lm_head.weight".into(), vec![163840, h]);
    Workload {
        name: "1T-class MoE, 32x8 FSDPxTP (256) -> 16x8 DPxTP (128)",
        pairs: vec![
            pair(&[32, 8], vec![S(0), S(0)], &[16, 8], vec![R, S(0)]),
            pair(&[32, 8], vec![S(0), S(1)], &[16, 8], vec![R, S(1)]),
            pair(&[32, 8], vec![S(0), R], &[16, 8], vec![R, R]),
        ],
        tensors,
    }
}
