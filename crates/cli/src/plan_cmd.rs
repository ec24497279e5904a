//! `tensorbus plan`: shows what the planner decides for one tensor between two layouts.

use tensorbus_planner::{
    parse_mesh_shape, parse_placements, BatchPlan, BatchTensor, DType, Layout, PairPlan, Scope, TensorMeta,
};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Source mesh shape, e.g. 2x4.
    #[arg(long, default_value = "2x4")]
    pub src_mesh: String,
    /// Source placements, one per mesh dim: S(d), R, P or P(sum|avg|max|min).
    #[arg(long, default_value = "S(0),S(1)")]
    pub src_placements: String,
    #[arg(long, default_value = "4")]
    pub dst_mesh: String,
    #[arg(long, default_value = "S(0)")]
    pub dst_placements: String,
    /// Global tensor shape, e.g. 4096x4096.
    #[arg(long, default_value = "4096x4096")]
    pub shape: String,
    #[arg(long, default_value = "bfloat16")]
    pub dtype: String,
    /// Bucket size in bytes (default 32 MiB).
    #[arg(long)]
    pub bucket_size: Option<u64>,
}

pub fn layout(mesh: &str, placements: &str) -> Result<Layout, String> {
    Layout::new(
        parse_mesh_shape(mesh).map_err(|e| e.to_string())?,
        parse_placements(placements).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}

pub fn run(a: &PlanArgs) -> Result<(), String> {
    let src = layout(&a.src_mesh, &a.src_placements)?;
    let dst = layout(&a.dst_mesh, &a.dst_placements)?;
    let shape: Vec<u64> = a
        .shape
        .split(['x', ','])
        .map(|p| p.trim().parse().map_err(|_| format!("bad shape {:?}: use e.g. 4096x4096", a.shape)))
        .collect::<Result<_, _>>()?;
    let dtype: DType = a.dtype.parse().map_err(|e: tensorbus_planner::PlanError| e.to_string())?;
    let pair = PairPlan::new(src.clone(), dst.clone()).map_err(|e| e.to_string())?;
    let t = BatchTensor { pair: 0, meta: TensorMeta::new("tensor", shape.clone(), dtype) };
    let plan =
        BatchPlan::build(&[&pair], std::slice::from_ref(&t), a.bucket_size, Scope::All).map_err(|e| e.to_string())?;

    println!("source      {src}");
    println!("destination {dst}");
    println!("tensor      {shape:?} {dtype} ({} bytes)\n", t.meta.nbytes());
    let mut supplies = Vec::new();
    for d in 0..dst.world_size() {
        supplies.clear();
        pair.supplies_to(&shape, 0, d, &mut supplies);
        println!("destination rank {d} holds {:?}", dst.local_box(&shape, d));
        for s in &supplies {
            println!("    from source rank {:>3}: {:?}", s.src_rank, s.region);
        }
    }
    let mut sent = vec![0u64; src.world_size()];
    for b in plan.buckets() {
        sent[b.src_rank as usize] += b.bytes;
    }
    println!(
        "\n{} chunks in {} buckets, {} bytes moved (minimum {}); bytes sent per source rank: {:?}",
        plan.all_chunks().len(),
        plan.buckets().len(),
        plan.total_bytes(),
        (0..dst.world_size()).map(|d| dst.local_shape(&shape, d).iter().product::<u64>()).sum::<u64>()
            * dtype.size() as u64,
        sent
    );
    Ok(())
}
