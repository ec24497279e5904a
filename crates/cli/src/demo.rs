//! `tensorbus demo`: the main job on one host. Starts a command node, the agents and two groups of
//! worker processes, transfers a model-shaped batch from the source layout to the target layout,
//! verifies every element on the receiving side, and prints the throughput next to this machine's
//! memcpy bandwidth measured in the same run.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::BufRead;
use std::process::Stdio;
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
    /// Instead of the model's tensors, one tensor of this global shape (e.g. 8192x4096) on the
    /// given layouts.
    #[arg(long)]
    pub shape: Option<String>,
    /// Where the workers keep their shards: cpu (shared memory), cuda (cuMemAlloc, CUDA IPC) or
    /// cuda-vmm (virtual-memory pieces as PyTorch's expandable segments, shared by fd).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    agent_peak_anon_bytes: u64,
    verified: bool,
    mismatches: u64,
    device: String,
    /// GPU runs: a plain device-to-device copy on the same GPU, and the ratio to it.
    d2d_gbps: Option<f64>,
    ratio_to_d2d: Option<f64>,
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

/// What a run moves: a name, the pairs, the tensors, and the two world sizes.
pub struct Plan {
    pub name: String,
    pub pairs: Vec<PairSpec>,
    pub tensors: Vec<TensorSpec>,
    pub n_src: usize,
    pub n_dst: usize,
}

/// How a run goes.
pub struct RunOpts {
    pub repeat: usize,
    pub bucket_size: Option<u64>,
    pub copy_threads: usize,
    pub timeout: f64,
    pub progress: bool,
    /// Fill sources with the test pattern and verify every received element (else only touch the
    /// memory, for large benchmark tensors).
    pub check: bool,
    /// Where workers keep their shards (`cpu`, `cuda`, `cuda-vmm`).
    pub device: String,
}

/// What a run measured.
pub struct Run {
    /// Bytes written to destinations per transfer.
    pub bytes: u64,
    /// Per transfer, the slowest receiver's seconds from its `Transfer` call to completion.
    pub seconds: Vec<f64>,
    pub verified: bool,
    pub mismatches: u64,
    /// Peak anonymous (private, non-shared) memory of any agent, sampled during the run.
    pub agent_peak_anon_bytes: u64,
}

impl Run {
    pub fn best(&self) -> f64 {
        self.seconds.iter().cloned().fold(f64::INFINITY, f64::min)
    }

    pub fn median(&self) -> f64 {
        let mut v = self.seconds.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    pub fn gbps(&self, seconds: f64) -> f64 {
        self.bytes as f64 / seconds.max(1e-9) / 1e9
    }
}

/// The pairs and tensors to move: the default 8B workload, or every tensor of it on one custom pair.
pub fn build(a: &DemoArgs) -> Result<Plan, String> {
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
        if let Some(shape) = &a.shape {
            let shape = shape
                .split('x')
                .map(|d| d.trim().parse::<u64>().map_err(|_| format!("--shape {shape:?}: use AxBx..., e.g. 8192x4096")))
                .collect::<Result<Vec<u64>, String>>()?;
            if shape.len() < need {
                return Err(format!("--shape {shape:?} has fewer dimensions than the placements shard"));
            }
            let t = TensorSpec { pair: 0, name: "w".into(), shape: shape.clone(), dtype: dtype.name().into() };
            (format!("one {shape:?} tensor"), vec![pair], vec![t])
        } else {
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
        }
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

/// `RssAnon` of a process, in bytes (0 when unreadable).
fn rss_anon(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A fresh directory for a run's agent files, removed on drop.
pub fn run_dir() -> Result<RemoveDir, String> {
    let dir = std::env::temp_dir().join(format!(
        "tensorbus-demo-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(RemoveDir(dir))
}

/// Runs `plan` on this host: command node, agents and workers, `opts.repeat` transfers.
pub fn execute(plan: &Plan, opts: &RunOpts) -> Result<Run, String> {
    let dir = run_dir()?;
    let node = EmbeddedCommandNode::start("127.0.0.1:0")?;
    let mut agents =
        Agents::spawn(plan.n_src + plan.n_dst, 0, &dir.0, &node.endpoints, opts.copy_threads.max(1), true)?;
    let pids: Vec<u32> = agents.children.iter().map(|c| c.id()).collect();
    let run = run_workers(plan, opts, &dir.0, pids);
    agents.stop(Duration::from_secs(5));
    drop(node);
    run
}

/// Runs the workers of `plan` against agents already running with their files in `dir` (source
/// ranks first, then destination ranks), sampling the agents' memory meanwhile.
pub fn run_workers(plan: &Plan, opts: &RunOpts, dir: &std::path::Path, agent_pids: Vec<u32>) -> Result<Run, String> {
    let Plan { pairs, tensors, n_src, n_dst, .. } = plan;
    let (n_src, n_dst) = (*n_src, *n_dst);
    let repeat = opts.repeat.max(1);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = agent_pids.iter().map(|&p| rss_anon(p)).fold(peak, u64::max);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };

    let (tx, rx) = mpsc::channel::<Report>();
    let mut workers = Vec::new();
    for (side, n, first) in [("src", n_src, 0), ("dst", n_dst, n_src)] {
        for rank in 0..n {
            let (q, s) = agent_paths(dir, first + rank);
            let spec = WorkerSpec {
                agent_rank: first + rank,
                command_queue: q,
                state: s,
                side: side.into(),
                rank,
                pairs: pairs.clone(),
                tensors: tensors.clone(),
                batch_id: "weights".into(),
                bucket_size: opts.bucket_size,
                repeat,
                timeout_s: opts.timeout,
                check: opts.check,
                device: opts.device.clone(),
            };
            let mut child = crate::self_command()?
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
    let steps = (total_workers * (3 + repeat)) as u64;
    let bar = if opts.progress { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}").expect("template"),
    );
    bar.set_message("pairing");
    let deadline = Instant::now() + Duration::from_secs_f64(opts.timeout * (3.0 + repeat as f64));
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
                return Err(format!("run timed out: {} of {total_workers} workers finished", done.len()));
            }
            Err(_) => {}
        }
    }
    bar.finish_and_clear();
    for mut w in workers {
        let _ = w.wait();
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let agent_peak_anon_bytes = sampler.join().unwrap_or(0);
    if !errors.is_empty() || done.len() < total_workers {
        let msgs: Vec<String> = errors.iter().map(|r| format!("{} rank {}: {}", r.side, r.rank, r.message)).collect();
        return Err(format!(
            "workers failed:\n  {}",
            if msgs.is_empty() { "a worker exited without reporting".into() } else { msgs.join("\n  ") }
        ));
    }
    let receivers: Vec<&Report> = done.iter().filter(|r| r.side == "dst").collect();
    Ok(Run {
        bytes: receivers.iter().map(|r| r.bytes).sum(),
        seconds: (0..repeat)
            .map(|i| receivers.iter().filter_map(|r| r.seconds.get(i)).cloned().fold(0.0, f64::max))
            .collect(),
        verified: receivers.iter().all(|r| r.verified == Some(true)),
        mismatches: receivers.iter().map(|r| r.mismatches).sum(),
        agent_peak_anon_bytes,
    })
}

static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn run(a: &DemoArgs) -> Result<bool, String> {
    if !["cpu", "cuda", "cuda-vmm"].contains(&a.device.as_str()) {
        return Err(format!("unknown device {:?} (cpu, cuda, cuda-vmm)", a.device));
    }
    let plan = build(a)?;
    let (src_layout, dst_layout) = plan.pairs[0].layouts()?;
    let opts = RunOpts {
        repeat: a.repeat,
        bucket_size: a.bucket_size,
        copy_threads: a.copy_threads,
        timeout: a.timeout,
        progress: !a.json,
        check: true,
        device: a.device.clone(),
    };
    let r = execute(&plan, &opts)?;
    let d2d = if a.device == "cpu" { None } else { Some(d2d_gbps(r.bytes)?) };
    let probe = (r.bytes as usize).clamp(16 << 20, 256 << 20);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let m1 = tensorbus_transport::exec::memcpy_gbps(probe, 1, 3);
    let mn = tensorbus_transport::exec::memcpy_gbps(probe, threads, 3);
    let res = DemoResult {
        workload: plan.name.clone(),
        source: src_layout.to_string(),
        destination: dst_layout.to_string(),
        tensors: plan.tensors.len(),
        dtype: a.dtype.clone(),
        bytes: r.bytes,
        repeat: r.seconds.len(),
        best_gbps: r.gbps(r.best()),
        median_gbps: r.gbps(r.median()),
        seconds: r.seconds.clone(),
        memcpy_1thread_gbps: m1,
        memcpy_nthread_gbps: mn,
        memcpy_threads: threads,
        ratio_to_memcpy_1thread: r.gbps(r.best()) / m1,
        agent_peak_anon_bytes: r.agent_peak_anon_bytes,
        verified: r.verified,
        mismatches: r.mismatches,
        device: a.device.clone(),
        d2d_gbps: d2d,
        ratio_to_d2d: d2d.map(|d| r.gbps(r.best()) / d),
    };
    if a.json {
        println!("{}", serde_json::to_string(&res).expect("encodes"));
    } else {
        println!("tensorbus demo: {}", res.workload);
        println!(
            "  {} tensors, {}, source {} ({} ranks) -> destination {} ({} ranks)",
            res.tensors, res.dtype, res.source, plan.n_src, res.destination, plan.n_dst
        );
        println!();
        println!("| bytes per transfer | best s | best GB/s | median GB/s | memcpy 1-thread GB/s | memcpy {threads}-thread GB/s | best / memcpy 1-thread | verified |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---|");
        println!(
            "| {} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            res.bytes,
            r.best(),
            res.best_gbps,
            res.median_gbps,
            m1,
            mn,
            res.ratio_to_memcpy_1thread,
            if r.verified { "yes, every element".to_string() } else { format!("NO: {} elements differ", r.mismatches) }
        );
        if let (Some(d), Some(ratio)) = (res.d2d_gbps, res.ratio_to_d2d) {
            println!();
            println!("GPU ({}): device-to-device copy {d:.2} GB/s; best / device copy {ratio:.2}", a.device);
        }
    }
    Ok(r.verified)
}

/// A plain device-to-device copy of `bytes` on GPU 0 (the limit GPU transfers are compared with).
#[cfg(feature = "cuda")]
pub fn d2d_gbps(bytes: u64) -> Result<f64, String> {
    tensorbus_transport::cuda::d2d_gbps(0, bytes.max(1 << 20), 5).map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
pub fn d2d_gbps(_bytes: u64) -> Result<f64, String> {
    Err("this build has no GPU support (the `cuda` feature)".into())
}

pub struct RemoveDir(pub std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
