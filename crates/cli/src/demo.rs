//! `tensorbus demo`: the main job on one host. Starts a command node, the agents and two groups of
//! worker processes, transfers a model-shaped batch from the source layout to the target layout,
//! verifies every element on the receiving side, and prints the throughput next to this machine's
//! memcpy bandwidth measured in the same run.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tensorbus_planner::{parse_mesh_shape, parse_placements, DType, Layout, Placement};

use crate::launch::{agent_paths, Agents, EmbeddedCommandNode};
use crate::worker::{PairSpec, Report, TensorSpec, WorkerSpec};
use crate::workload;

#[derive(clap::Args, Clone)]
pub struct DemoArgs {
    /// Source mesh shape, e.g. 2x4 (default: the 8B workload's 2x4 FSDPxTP).
    #[arg(long)]
    pub src_mesh: Option<String>,
    /// Source placements, one per mesh dim: S(d), R, P or P(sum|avg|max|min).
    #[arg(long)]
    pub src_placements: Option<String>,
    #[arg(long)]
    pub dst_mesh: Option<String>,
    #[arg(long)]
    pub dst_placements: Option<String>,
    #[arg(long, default_value = "bfloat16")]
    pub dtype: String,
    /// Divide the 8B-class model's dimensions by this (1 = full size, ~16 GB per side in bf16).
    #[arg(long, default_value_t = 4)]
    pub scale: u64,
    /// Transfers of the registered batch.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Bucket size in bytes.
    #[arg(long)]
    pub bucket_size: Option<u64>,
    /// Copy threads per agent.
    #[arg(long, default_value_t = 2)]
    pub copy_threads: usize,
    /// Seconds any one step may take.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Use only the first N tensors of the workload (0 = all).
    #[arg(long, default_value_t = 0)]
    pub tensors: usize,
}

#[derive(Serialize)]
struct DemoResult {
    workload: String,
    source: String,
    destination: String,
    tensors: usize,
    dtype: String,
    bytes: u64,
    repeat: usize,
    seconds: Vec<f64>,
    best_gbps: f64,
    median_gbps: f64,
    memcpy_1thread_gbps: f64,
    memcpy_nthread_gbps: f64,
    memcpy_threads: usize,
    ratio_to_memcpy_1thread: f64,
    verified: bool,
    mismatches: u64,
}

fn layout_flag(mesh: &str, placements: &str) -> Result<Layout, String> {
    Layout::new(
        parse_mesh_shape(mesh).map_err(|e| e.to_string())?,
        parse_placements(placements).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}

fn fmt_placements(l: &Layout) -> String {
    l.placements().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
}

/// The pairs and tensors to move: the default 8B workload, or every tensor of it on one custom pair.
/// What the demo moves: a name, the pairs, the tensors, and the two world sizes.
struct Plan {
    name: String,
    pairs: Vec<PairSpec>,
    tensors: Vec<TensorSpec>,
    n_src: usize,
    n_dst: usize,
}

fn build(a: &DemoArgs) -> Result<Plan, String> {
    let dtype: DType = a.dtype.parse().map_err(|e: tensorbus_planner::PlanError| e.to_string())?;
    let w = workload::dense_8b(a.scale.max(1), dtype);
    let custom =
        a.src_mesh.is_some() || a.src_placements.is_some() || a.dst_mesh.is_some() || a.dst_placements.is_some();
    let (name, pairs, tensors): (String, Vec<PairSpec>, Vec<TensorSpec>) = if custom {
        let src =
            layout_flag(a.src_mesh.as_deref().unwrap_or("2x4"), a.src_placements.as_deref().unwrap_or("S(0),S(1)"))?;
        let dst = layout_flag(a.dst_mesh.as_deref().unwrap_or("4"), a.dst_placements.as_deref().unwrap_or("S(0)"))?;
        tensorbus_planner::PairPlan::new(src.clone(), dst.clone()).map_err(|e| e.to_string())?;
        if let Some(op) = src.partial_op() {
            if !tensorbus_transport::reduce::supported(dtype) {
                return Err(format!("Partial({}) sources need a numeric dtype; {dtype} cannot be reduced", op.name()));
            }
        }
        let max_dim = src.placements().iter().chain(dst.placements()).filter_map(|p| match p {
            Placement::Shard(d) => Some(*d),
            _ => None,
        });
        let need = max_dim.max().map_or(0, |d| d + 1);
        let pair = PairSpec {
            name: "weights".into(),
            src_mesh: src.mesh().shape().to_vec(),
            src_placements: fmt_placements(&src),
            dst_mesh: dst.mesh().shape().to_vec(),
            dst_placements: fmt_placements(&dst),
        };
        let tensors = w
            .tensors
            .iter()
            .filter(|t| t.meta.shape.len() >= need)
            .map(|t| TensorSpec {
                pair: 0,
                name: t.meta.name.clone(),
                shape: t.meta.shape.clone(),
                dtype: dtype.name().into(),
            })
            .collect();
        (format!("8B-class tensors /{} on one pair", a.scale), vec![pair], tensors)
    } else {
        let pairs = w
            .pairs
            .iter()
            .zip(["colwise", "rowwise", "replicated"])
            .map(|(p, n)| PairSpec {
                name: n.into(),
                src_mesh: p.src().mesh().shape().to_vec(),
                src_placements: fmt_placements(p.src()),
                dst_mesh: p.dst().mesh().shape().to_vec(),
                dst_placements: fmt_placements(p.dst()),
            })
            .collect();
        let tensors = w
            .tensors
            .iter()
            .map(|t| TensorSpec {
                pair: t.pair,
                name: t.meta.name.clone(),
                shape: t.meta.shape.clone(),
                dtype: dtype.name().into(),
            })
            .collect();
        (format!("{} (dims /{})", w.name, a.scale), pairs, tensors)
    };
    let mut tensors = tensors;
    if a.tensors > 0 {
        tensors.truncate(a.tensors);
    }
    if tensors.is_empty() {
        return Err("no tensor of the workload fits these layouts".into());
    }
    let (src, dst) = pairs[0].layouts()?;
    for p in &pairs {
        let (s, d) = p.layouts()?;
        if s.world_size() != src.world_size() || d.world_size() != dst.world_size() {
            return Err("every pair of the demo must have the same world sizes".into());
        }
    }
    Ok(Plan { name, pairs, tensors, n_src: src.world_size(), n_dst: dst.world_size() })
}

pub fn run(a: &DemoArgs) -> Result<bool, String> {
    let Plan { name, pairs, tensors, n_src, n_dst } = build(a)?;
    let (src_layout, dst_layout) = pairs[0].layouts()?;
    let dir = std::env::temp_dir().join(format!("tensorbus-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = RemoveDir(dir.clone());
    let node = EmbeddedCommandNode::start("127.0.0.1:0")?;
    let mut agents = Agents::spawn(n_src + n_dst, 0, &dir, &node.endpoints, a.copy_threads.max(1), true)?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<Report>();
    let mut workers = Vec::new();
    for (side, n, first) in [("src", n_src, 0), ("dst", n_dst, n_src)] {
        for rank in 0..n {
            let (q, s) = agent_paths(&dir, first + rank);
            let spec = WorkerSpec {
                agent_rank: first + rank,
                command_queue: q,
                state: s,
                side: side.into(),
                rank,
                pairs: pairs.clone(),
                tensors: tensors.clone(),
                batch_id: "weights".into(),
                bucket_size: a.bucket_size,
                repeat: a.repeat.max(1),
                timeout_s: a.timeout,
            };
            let mut child = Command::new(&exe)
                .args(["worker", "--spec", &serde_json::to_string(&spec).expect("encodes")])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("starting worker: {e}"))?;
            let out = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(r) = serde_json::from_str::<Report>(&line) {
                        let _ = tx.send(r);
                    }
                }
            });
            workers.push(child);
        }
    }
    drop(tx);

    let total_workers = n_src + n_dst;
    let steps = (total_workers * (3 + a.repeat.max(1))) as u64;
    let bar = if a.json { ProgressBar::hidden() } else { ProgressBar::new(steps) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}").expect("template"),
    );
    bar.set_message("pairing");
    let deadline = Instant::now() + Duration::from_secs_f64(a.timeout * (3.0 + a.repeat as f64));
    let mut done: Vec<Report> = Vec::new();
    let mut errors: Vec<Report> = Vec::new();
    while done.len() + errors.len() < total_workers {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => {
                bar.inc(1);
                match r.phase.as_str() {
                    "registered" => bar.set_message("registered; transferring"),
                    "transfer" => bar.set_message(format!("transfer ({} {})", r.side, r.rank)),
                    "done" => done.push(r),
                    "error" => errors.push(r),
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                bar.abandon_with_message("timed out");
                return Err(format!("demo timed out: {} of {total_workers} workers finished", done.len()));
            }
            Err(_) => {}
        }
    }
    bar.finish_and_clear();
    for mut w in workers {
        let _ = w.wait();
    }
    agents.stop(Duration::from_secs(5));
    drop(node);
    if !errors.is_empty() || done.len() < total_workers {
        let msgs: Vec<String> = errors.iter().map(|r| format!("{} rank {}: {}", r.side, r.rank, r.message)).collect();
        return Err(format!(
            "workers failed:\n  {}",
            if msgs.is_empty() { "a worker exited without reporting".into() } else { msgs.join("\n  ") }
        ));
    }

    let receivers: Vec<&Report> = done.iter().filter(|r| r.side == "dst").collect();
    let bytes: u64 = receivers.iter().map(|r| r.bytes).sum();
    let per_epoch: Vec<f64> = (0..a.repeat.max(1))
        .map(|i| receivers.iter().filter_map(|r| r.seconds.get(i)).cloned().fold(0.0, f64::max))
        .collect();
    let mut sorted = per_epoch.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let gbps = |s: f64| bytes as f64 / s.max(1e-9) / 1e9;
    let mismatches: u64 = receivers.iter().map(|r| r.mismatches).sum();
    let verified = receivers.iter().all(|r| r.verified == Some(true));
    let probe = (bytes as usize).clamp(16 << 20, 256 << 20);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let m1 = tensorbus_transport::exec::memcpy_gbps(probe, 1, 3);
    let mn = tensorbus_transport::exec::memcpy_gbps(probe, threads, 3);
    let res = DemoResult {
        workload: name,
        source: src_layout.to_string(),
        destination: dst_layout.to_string(),
        tensors: tensors.len(),
        dtype: a.dtype.clone(),
        bytes,
        repeat: a.repeat.max(1),
        best_gbps: gbps(sorted[0]),
        median_gbps: gbps(sorted[sorted.len() / 2]),
        seconds: per_epoch,
        memcpy_1thread_gbps: m1,
        memcpy_nthread_gbps: mn,
        memcpy_threads: threads,
        ratio_to_memcpy_1thread: gbps(sorted[0]) / m1,
        verified,
        mismatches,
    };
    if a.json {
        println!("{}", serde_json::to_string(&res).expect("encodes"));
    } else {
        println!("tensorbus demo: {}", res.workload);
        println!(
            "  {} tensors, {}, source {} ({n_src} ranks) -> destination {} ({n_dst} ranks)",
            res.tensors, res.dtype, res.source, res.destination
        );
        println!();
        println!("| bytes per transfer | best s | best GB/s | median GB/s | memcpy 1-thread GB/s | memcpy {}-thread GB/s | best / memcpy 1-thread | verified |", threads);
        println!("|---:|---:|---:|---:|---:|---:|---:|---|");
        println!(
            "| {} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            res.bytes,
            sorted[0],
            res.best_gbps,
            res.median_gbps,
            m1,
            mn,
            res.ratio_to_memcpy_1thread,
            if verified { "yes, every element".to_string() } else { format!("NO: {mismatches} elements differ") }
        );
    }
    Ok(verified)
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
