//! `tensorbus bench`: measured figures written as a results table (Markdown and JSON).

use crate::workload::{self, Workload};
use std::time::{Duration, Instant};
use tensorbus_planner::{BatchPlan, DType, Scope, Side};

/// One row of the planner benchmark.
pub struct PlannerRow {
    pub workload: &'static str,
    pub tensors: usize,
    pub scope: String,
    pub chunks: usize,
    pub buckets: usize,
    pub bytes: u64,
    pub median: Duration,
    pub min: Duration,
}

fn time_plan(w: &Workload, scope: Scope, iters: usize) -> PlannerRow {
    let pairs = w.pair_refs();
    let mut times = Vec::with_capacity(iters);
    let mut last = None;
    for _ in 0..iters {
        let t0 = Instant::now();
        let plan = BatchPlan::build(&pairs, &w.tensors, None, scope).expect("workload plans");
        times.push(t0.elapsed());
        last = Some(plan);
    }
    times.sort();
    let plan = last.expect("at least one iteration");
    PlannerRow {
        workload: w.name,
        tensors: w.tensors.len(),
        scope: match scope {
            Scope::All => "all ranks".into(),
            Scope::Rank(Side::Src, r) => format!("source rank {r}"),
            Scope::Rank(Side::Dst, r) => format!("destination rank {r}"),
        },
        chunks: plan.all_chunks().len(),
        buckets: plan.buckets().len(),
        bytes: plan.total_bytes(),
        median: times[times.len() / 2],
        min: times[0],
    }
}

/// Plans the 8B-class and 1T-class workloads, whole and rank-local.
pub fn planner(iters: usize) -> Vec<PlannerRow> {
    let dense = workload::dense_8b(1, DType::BF16);
    let moe = workload::moe_1t(DType::BF16);
    vec![
        time_plan(&dense, Scope::All, iters),
        time_plan(&dense, Scope::Rank(Side::Src, 0), iters),
        time_plan(&dense, Scope::Rank(Side::Dst, 0), iters),
        time_plan(&moe, Scope::Rank(Side::Src, 0), iters),
        time_plan(&moe, Scope::Rank(Side::Dst, 0), iters),
    ]
}

pub fn planner_markdown(rows: &[PlannerRow]) -> String {
    let mut s = String::from(
        "| workload | tensors | share | chunks | buckets | bytes moved | median | min |\n|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.2} GiB | {:.3} ms | {:.3} ms |\n",
            r.workload,
            r.tensors,
            r.scope,
            r.chunks,
            r.buckets,
            r.bytes as f64 / (1u64 << 30) as f64,
            r.median.as_secs_f64() * 1e3,
            r.min.as_secs_f64() * 1e3
        );
    }
    s
}

pub fn planner_json(rows: &[PlannerRow]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"workload\":{:?},\"tensors\":{},\"share\":{:?},\"chunks\":{},\"buckets\":{},\"bytes\":{},\"median_ms\":{:.4},\"min_ms\":{:.4}}}",
                r.workload,
                r.tensors,
                r.scope,
                r.chunks,
                r.buckets,
                r.bytes,
                r.median.as_secs_f64() * 1e3,
                r.min.as_secs_f64() * 1e3
            )
        })
        .collect();
    format!("{{\"planner\":[{}]}}\n", items.join(","))
}
