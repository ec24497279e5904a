//! `tensorbus bench`: measured figures written as a results table (Markdown and JSON).

use crate::workload::{self, Workload};
use std::time::{Duration, Instant};
use tensorbus_planner::{BatchPlan, DType, Scope, Side};

/// A Markdown table. A header cell starting with `<` is a left-aligned (text) column; the others
/// are right-aligned numbers.
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let names: Vec<&str> = header.iter().map(|h| h.trim_start_matches('<')).collect();
    let align: Vec<&str> = header.iter().map(|h| if h.starts_with('<') { "---" } else { "---:" }).collect();
    let mut m = format!("| {} |\n|{}|\n", names.join(" | "), align.join("|"));
    for r in rows {
        m += &format!("| {} |\n", r.join(" | "));
    }
    m
}

/// `yes`, `NO`, or `not checked`.
fn verdict(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "not checked",
    }
    .into()
}

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
    table(
        &["<workload", "tensors", "<share", "chunks", "buckets", "bytes moved", "median", "min"],
        rows.iter().map(|r| {
            vec![
                r.workload.to_string(),
                r.tensors.to_string(),
                r.scope.clone(),
                r.chunks.to_string(),
                r.buckets.to_string(),
                format!("{:.2} GiB", r.bytes as f64 / (1u64 << 30) as f64),
                format!("{:.3} ms", r.median.as_secs_f64() * 1e3),
                format!("{:.3} ms", r.min.as_secs_f64() * 1e3),
            ]
        }),
    )
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

// ---------------------------------------------------------------------------------------------
// The full suite: transfers against the machine's limits, resharding against a naive baseline,
// command and epoch round trips, agents' memory. Every figure comes with its limit, measured in
// the same run.

use crate::demo::{self, Plan, Run, RunOpts};
use crate::worker::{PairSpec, TensorSpec};
use serde::Serialize;

#[derive(Serialize)]
pub struct SizeRow {
    pub bytes: u64,
    pub best_gbps: f64,
    pub median_gbps: f64,
    pub memcpy_1thread_gbps: f64,
    pub memcpy_nthread_gbps: f64,
    pub process_vm_readv_gbps: f64,
    pub ratio_to_memcpy_1thread: f64,
    pub ratio_to_memcpy_nthread: f64,
    pub agent_peak_anon_mib: f64,
    pub verified: Option<bool>,
}

#[derive(Serialize)]
pub struct ReshardRow {
    pub source: String,
    pub destination: String,
    pub bytes: u64,
    pub tensorbus_seconds: f64,
    pub naive_seconds: f64,
    pub speedup: f64,
    pub verified: bool,
}

#[derive(Serialize)]
pub struct Suite {
    pub machine: String,
    pub smoke: bool,
    pub sizes: Vec<SizeRow>,
    pub model: Option<SizeRow>,
    pub reshard: Vec<ReshardRow>,
    pub command_rtt_us_median: f64,
    pub command_rtt_us_p99: f64,
    pub epoch_rtt_ms: Vec<(usize, f64)>,
    pub bucket_size: u64,
    pub cross_host: Vec<CrossRow>,
    /// Why the cross-host rows are missing, when they are.
    pub cross_host_skipped: Option<String>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0.0, |kb| kb as f64 / (1 << 20) as f64);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem:.0} GiB, Linux {}", kernel.trim())
}

fn pair(name: &str, sm: &[usize], sp: &str, dm: &[usize], dp: &str) -> PairSpec {
    PairSpec {
        name: name.into(),
        src_mesh: sm.to_vec(),
        src_placements: sp.into(),
        dst_mesh: dm.to_vec(),
        dst_placements: dp.into(),
    }
}

fn opts(repeat: usize, check: bool) -> RunOpts {
    RunOpts { repeat, bucket_size: None, copy_threads: 2, timeout: 120.0, progress: false, check, device: "cpu".into() }
}

/// `process_vm_readv` from this process into itself: the kernel's cross-memory copy rate.
fn cma_gbps(bytes: usize, reps: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let inner = ((64usize << 20) / bytes.max(1)).clamp(1, 100_000);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        for _ in 0..inner {
            // SAFETY: reading our own live buffer into another of the same size.
            unsafe { tensorbus_transport::cma::read(std::process::id(), src.as_ptr() as u64, dst.as_mut_ptr(), bytes) }
                .expect("process_vm_readv on self");
        }
        best = best.min(t0.elapsed().as_secs_f64() / inner as f64);
    }
    std::hint::black_box(&dst);
    bytes as f64 / best / 1e9
}

fn size_row(r: &Run, probe: usize, check: bool) -> SizeRow {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let m1 = tensorbus_transport::exec::memcpy_gbps(probe, 1, 5);
    let mn = tensorbus_transport::exec::memcpy_gbps(probe, threads, 5);
    SizeRow {
        bytes: r.bytes,
        best_gbps: r.gbps(r.best()),
        median_gbps: r.gbps(r.median()),
        memcpy_1thread_gbps: m1,
        memcpy_nthread_gbps: mn,
        ratio_to_memcpy_nthread: r.gbps(r.best()) / mn,
        process_vm_readv_gbps: cma_gbps(probe, 5),
        ratio_to_memcpy_1thread: r.gbps(r.best()) / m1,
        agent_peak_anon_mib: r.agent_peak_anon_bytes as f64 / (1 << 20) as f64,
        verified: check.then_some(r.verified),
    }
}

/// One tensor of `bytes` from one rank to one rank.
fn single(bytes: u64) -> Plan {
    let cols = 1024u64;
    Plan {
        name: format!("{bytes} bytes"),
        pairs: vec![pair("t", &[1], "R", &[1], "R")],
        tensors: vec![TensorSpec {
            pair: 0,
            name: "t".into(),
            shape: vec![(bytes / 4 / cols).max(1), cols],
            dtype: "float32".into(),
        }],
        n_src: 1,
        n_dst: 1,
    }
}

fn reshard_plan(sm: &[usize], sp: &str, dm: &[usize], dp: &str, n: usize, side: u64) -> Plan {
    let tensors = (0..n)
        .map(|i| TensorSpec { pair: 0, name: format!("w{i}"), shape: vec![side, side], dtype: "float32".into() })
        .collect();
    Plan {
        name: format!("{sm:?} -> {dm:?}"),
        pairs: vec![pair("w", sm, sp, dm, dp)],
        tensors,
        n_src: sm.iter().product(),
        n_dst: dm.iter().product(),
    }
}

fn placements_for(mesh: &[usize], first: usize) -> String {
    (0..mesh.len()).map(|i| format!("S({})", (i + first) % 2)).collect::<Vec<_>>().join(",")
}

/// Median and p99 of the command round trip (enqueue → agent → result → semaphore), microseconds.
pub fn command_rtt(iters: usize) -> Result<(f64, f64), String> {
    let dir = std::env::temp_dir().join(format!("tensorbus-bench-rtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let node = crate::launch::EmbeddedCommandNode::start("127.0.0.1:0")?;
    let agents = crate::launch::Agents::spawn(1, 0, &dir, &node.endpoints, 1, true)?;
    let (q, s) = crate::launch::agent_paths(&dir, 0);
    let c = tensorbus_host::client::TensorBusClient::new(0, Some(&q), Some(&s), Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        // The cheapest full round trip: a query the agent answers at once (with an error).
        let _ = c.query_transfer_signal("none", Duration::from_secs(5));
        t.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    drop(agents);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    t.sort_by(|a, b| a.total_cmp(b));
    Ok((t[t.len() / 2], t[(t.len() * 99 / 100).min(t.len() - 1)]))
}

/// The demo's 8B-class batch (2x4 FSDPxTP -> 4 TP), dimensions divided by 4 (32 when `smoke`).
fn model_batch(smoke: bool) -> Result<Plan, String> {
    demo::build(&crate::demo::DemoArgs {
        src_mesh: None,
        src_placements: None,
        dst_mesh: None,
        dst_placements: None,
        dtype: "bfloat16".into(),
        scale: if smoke { 32 } else { 4 },
        repeat: 5,
        bucket_size: None,
        copy_threads: 2,
        timeout: 120.0,
        json: true,
        tensors: 0,
        shape: None,
        device: "cpu".into(),
    })
}

pub fn suite(smoke: bool, progress: impl Fn(&str)) -> Result<Suite, String> {
    let sizes: Vec<u64> = if smoke {
        vec![4 << 10, 1 << 20]
    } else {
        vec![4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]
    };
    let mut out = Suite {
        machine: machine(),
        smoke,
        sizes: Vec::new(),
        model: None,
        reshard: Vec::new(),
        command_rtt_us_median: 0.0,
        command_rtt_us_p99: 0.0,
        epoch_rtt_ms: Vec::new(),
        bucket_size: tensorbus_planner::DEFAULT_BUCKET_SIZE,
        cross_host: Vec::new(),
        cross_host_skipped: None,
    };
    for &b in &sizes {
        progress(&format!("transfer of {b} bytes"));
        let check = b <= 64 << 20;
        let r = demo::execute(&single(b), &opts(if b >= 256 << 20 { 8 } else { 10 }, check))?;
        out.sizes.push(size_row(&r, b as usize, check));
    }
    progress("model-shaped batch");
    let model = model_batch(smoke)?;
    let r = demo::execute(&model, &opts(5, true))?;
    out.model = Some(size_row(&r, (r.bytes as usize).clamp(16 << 20, 256 << 20), true));

    let (n, side) = if smoke { (2, 64) } else { (8, 1024) };
    out.reshard = reshard(if smoke { 2 } else { 8 }, n, side, &progress)?;
    progress("command round trip");
    let (med, p99) = command_rtt(if smoke { 200 } else { 5000 })?;
    out.command_rtt_us_median = med;
    out.command_rtt_us_p99 = p99;
    for agents in [2usize, 16] {
        progress(&format!("epoch round trip, {agents} agents"));
        let half = agents / 2;
        let p = Plan {
            name: "tiny".into(),
            pairs: vec![pair("t", &[half], "S(0)", &[half], "S(0)")],
            tensors: vec![TensorSpec { pair: 0, name: "t".into(), shape: vec![half as u64], dtype: "float32".into() }],
            n_src: half,
            n_dst: half,
        };
        let r = demo::execute(&p, &opts(if smoke { 5 } else { 50 }, true))?;
        out.epoch_rtt_ms.push((agents, r.median() * 1e3));
    }
    progress("cross-host transfer (network namespaces)");
    match cross_host(smoke, "cpu") {
        Ok(rows) => out.cross_host = rows,
        Err(e) => out.cross_host_skipped = Some(e),
    }
    Ok(out)
}

/// The eight source -> destination mesh pairs (the first `configs` of them), `n` square
/// float32 tensors of `side` x `side`, each next to a naive gather-to-one-rank-then-scatter run by
/// the same harness.
pub fn reshard(configs: usize, n: usize, side: u64, progress: &dyn Fn(&str)) -> Result<Vec<ReshardRow>, String> {
    let all: [(&[usize], &[usize]); 8] = [
        (&[2, 2, 2, 1], &[1, 1, 4, 2]),
        (&[8, 1, 1, 1], &[1, 2, 2, 2]),
        (&[1, 2, 4, 1], &[8, 1, 1, 1]),
        (&[2, 4, 1, 1], &[1, 2, 4, 1]),
        (&[4, 1, 1, 2], &[2, 1, 1, 4]),
        (&[4, 1, 2, 1], &[1, 1, 1, 8]),
        (&[4, 2, 1, 1], &[1, 1, 2, 4]),
        (&[1, 1, 4, 2], &[4, 2, 1, 1]),
    ];
    let mut rows = Vec::new();
    for (sm, dm) in all.iter().take(configs) {
        progress(&format!("resharding {sm:?} -> {dm:?}"));
        let (sp, dp) = (placements_for(sm, 0), placements_for(dm, 1));
        let direct = demo::execute(&reshard_plan(sm, &sp, dm, &dp, n, side), &opts(3, true))?;
        // Naive baseline: gather everything to one rank, then scatter from it.
        let gather = demo::execute(&reshard_plan(sm, &sp, &[1], "R", n, side), &opts(3, true))?;
        let scatter = demo::execute(&reshard_plan(&[1], "R", dm, &dp, n, side), &opts(3, true))?;
        let naive = gather.best() + scatter.best();
        rows.push(ReshardRow {
            source: format!("{sm:?} [{sp}]"),
            destination: format!("{dm:?} [{dp}]"),
            bytes: direct.bytes,
            tensorbus_seconds: direct.best(),
            naive_seconds: naive,
            speedup: naive / direct.best(),
            verified: direct.verified && gather.verified && scatter.verified,
        });
    }
    Ok(rows)
}

pub fn reshard_markdown(rows: &[ReshardRow]) -> String {
    table(
        &["<source", "<destination", "bytes", "tensorbus s", "naive s", "speedup", "<verified"],
        rows.iter().map(|r| {
            vec![
                r.source.clone(),
                r.destination.clone(),
                r.bytes.to_string(),
                format!("{:.4}", r.tensorbus_seconds),
                format!("{:.4}", r.naive_seconds),
                format!("{:.2}x", r.speedup),
                verdict(Some(r.verified)),
            ]
        }),
    )
}

fn size_table(rows: &[SizeRow]) -> String {
    table(
        &[
            "bytes",
            "best GB/s",
            "median GB/s",
            "memcpy 1-thread GB/s",
            "memcpy all-threads GB/s",
            "process_vm_readv GB/s",
            "best / memcpy 1-thread",
            "best / memcpy all-threads",
            "agent peak anon MiB",
            "<verified",
        ],
        rows.iter().map(|r| {
            vec![
                r.bytes.to_string(),
                format!("{:.2}", r.best_gbps),
                format!("{:.2}", r.median_gbps),
                format!("{:.2}", r.memcpy_1thread_gbps),
                format!("{:.2}", r.memcpy_nthread_gbps),
                format!("{:.2}", r.process_vm_readv_gbps),
                format!("{:.2}", r.ratio_to_memcpy_1thread),
                format!("{:.2}", r.ratio_to_memcpy_nthread),
                format!("{:.1}", r.agent_peak_anon_mib),
                verdict(r.verified),
            ]
        }),
    )
}

pub fn suite_markdown(s: &Suite) -> String {
    let mut m = format!(
        "Machine: {}. Bucket size {} MiB.{}\n\n",
        s.machine,
        s.bucket_size >> 20,
        if s.smoke { " Smoke mode (reduced)." } else { "" }
    );
    m += "### One-host transfer, 1 rank -> 1 rank, per tensor size\n\n";
    m += &size_table(&s.sizes);
    if let Some(r) = &s.model {
        m += "\n### Model-shaped batch (8B-class, 2x4 FSDPxTP -> 4 TP, 3 pairs)\n\n";
        m += &size_table(std::slice::from_ref(r));
    }
    m += "\n### Resharding vs gather-to-one-rank-then-scatter (same harness)\n\n";
    m += &reshard_markdown(&s.reshard);
    m += "\n### Across hosts (two network namespaces joined by a veth pair), 1 rank -> 1 rank\n\n";
    match &s.cross_host_skipped {
        Some(why) => m += &format!("Skipped: {why}\n"),
        None => m += &cross_markdown(&s.cross_host),
    }
    m += &format!(
        "\n### Round trips\n\n| what | median | p99 |\n|---|---:|---:|\n| command (enqueue -> agent -> semaphore) | {:.1} us | {:.1} us |\n",
        s.command_rtt_us_median, s.command_rtt_us_p99
    );
    for (n, ms) in &s.epoch_rtt_ms {
        m += &format!("| epoch of a tiny batch, {n} agents (arm -> process -> done -> epoch_ended) | {ms:.2} ms | |\n");
    }
    m
}

#[derive(Serialize)]
pub struct CrossRow {
    pub streams: usize,
    pub bytes: u64,
    pub best_gbps: f64,
    pub median_gbps: f64,
    /// Raw TCP from and into one reused, cache-hot 1 MiB buffer: the network path's own rate.
    pub raw_tcp_gbps: f64,
    pub ratio: f64,
    /// Raw TCP from and into memory the size of the transfer: the network path plus the memory
    /// traffic any transfer of these bytes must make.
    pub raw_tcp_memory_gbps: f64,
    pub ratio_memory: f64,
    pub verified: Option<bool>,
}

/// Raw TCP between the two namespaces, best of 3, with `streams` connections; `whole`: from and
/// into memory the size of the transfer, else from and into one reused 1 MiB buffer.
fn raw_tcp(
    net: &crate::netns::Netns,
    exe: &[std::ffi::OsString],
    bytes: u64,
    streams: usize,
    whole: bool,
) -> Result<f64, String> {
    let flag: &[&str] = if whole { &["--whole"] } else { &[] };
    use std::io::BufRead;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut sink = net
            .command(1, exe)
            .args(["bench", "tcp-sink", "--listen", &format!("{}:0", net.addr[1])])
            .args(["--streams", &streams.to_string(), "--bytes", &bytes.to_string()])
            .args(flag)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufReader::new(sink.stdout.take().expect("piped")).read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line.trim().trim_start_matches("listening ").to_string();
        let out = net
            .command(0, exe)
            .args([
                "bench",
                "tcp-source",
                "--to",
                &addr,
                "--streams",
                &streams.to_string(),
                "--bytes",
                &bytes.to_string(),
            ])
            .args(flag)
            .output()
            .map_err(|e| e.to_string())?;
        let _ = sink.wait();
        let secs: f64 =
            String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| "tcp-source failed".to_string())?;
        best = best.min(secs);
    }
    Ok(bytes as f64 / best / 1e9)
}

/// One rank to one rank across two network namespaces, for 1 and 4 TCP streams, next to raw TCP
/// between the same namespaces.
/// `device`: where the workers keep their tensors (`cuda`: the staged GPU path over TCP).
pub fn cross_host(smoke: bool, device: &str) -> Result<Vec<CrossRow>, String> {
    use std::io::BufRead;
    let exe = crate::self_argv()?;
    let net = crate::netns::Netns::new("bx")?;
    let mut node = net
        .command(0, &exe)
        .args(["command-node", "--listen", &format!("{}:0", net.addr[0])])
        .env("TENSORBUS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(node.stdout.take().expect("piped")).read_line(&mut line).map_err(|e| e.to_string())?;
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.len() < 6 {
        let _ = node.kill();
        return Err(format!("command node did not start in the namespace: {line:?}"));
    }
    let (inbox, outbox) = (w[3].to_string(), w[5].to_string());
    let bytes: u64 = if smoke { 16 << 20 } else { 1 << 30 };
    let mut rows = Vec::new();
    for streams in [1usize, 4] {
        let dir = demo::run_dir()?;
        let mut agents = Vec::new();
        for (rank, host) in [(0usize, 0usize), (1, 1)] {
            let (q, s) = crate::launch::agent_paths(&dir.0, rank);
            let c = net
                .command(host, &exe)
                .args(["agent", "--rank", &rank.to_string(), "--command-inbox", &inbox, "--command-outbox", &outbox])
                .args(["--listen-host", &net.addr[host], "--host-id", &format!("host{host}")])
                .args(["--data-streams", &streams.to_string(), "--copy-threads", "4"])
                .arg("--command-queue")
                .arg(&q)
                .arg("--state")
                .arg(&s)
                .env("TENSORBUS_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            agents.push(c);
        }
        let pids = agents.iter().map(|c| c.id()).collect();
        let check = bytes <= 64 << 20;
        let run = demo::run_workers(&single(bytes), &RunOpts { device: device.into(), ..opts(5, check) }, &dir.0, pids);
        crate::launch::Agents { children: agents }.stop(Duration::from_secs(5));
        let run = run?;
        let raw = raw_tcp(&net, &exe, bytes, streams, false)?;
        let whole = raw_tcp(&net, &exe, bytes, streams, true)?;
        rows.push(CrossRow {
            streams,
            bytes,
            best_gbps: run.gbps(run.best()),
            median_gbps: run.gbps(run.median()),
            raw_tcp_gbps: raw,
            ratio: run.gbps(run.best()) / raw,
            raw_tcp_memory_gbps: whole,
            ratio_memory: run.gbps(run.best()) / whole,
            verified: check.then_some(run.verified),
        });
    }
    let _ = node.kill();
    let _ = node.wait();
    Ok(rows)
}

pub fn cross_markdown(rows: &[CrossRow]) -> String {
    table(
        &[
            "streams",
            "bytes",
            "best GB/s",
            "median GB/s",
            "raw TCP, 1 MiB buffer GB/s",
            "best / raw",
            "raw TCP, memory to memory GB/s",
            "best / raw memory to memory",
            "<verified",
        ],
        rows.iter().map(|r| {
            vec![
                r.streams.to_string(),
                r.bytes.to_string(),
                format!("{:.2}", r.best_gbps),
                format!("{:.2}", r.median_gbps),
                format!("{:.2}", r.raw_tcp_gbps),
                format!("{:.2}", r.ratio),
                format!("{:.2}", r.raw_tcp_memory_gbps),
                format!("{:.2}", r.ratio_memory),
                verdict(r.verified),
            ]
        }),
    )
}

/// GPU figures, each next to its limit on the same GPU in the same run: transfers of one 1 GiB
/// tensor (IPC handles and virtual-memory pieces) and of the model-shaped batch vs a plain
/// device-to-device copy; the staged cross-host path vs pinned host/device copies.
#[cfg(feature = "cuda")]
pub fn gpu(smoke: bool, progress: impl Fn(&str)) -> Result<String, String> {
    use tensorbus_transport::cuda;
    if !cuda::available() {
        return Err("no CUDA device on this machine".into());
    }
    let gib: u64 = if smoke { 64 << 20 } else { 1 << 30 };
    let mut rows = Vec::new();
    let mut row = |what: &str, device: &str, plan: &Plan, check: bool| -> Result<(), String> {
        progress(&format!("{what} ({device})"));
        let r = demo::execute(plan, &RunOpts { device: device.into(), ..opts(5, check) })?;
        let d2d = cuda::d2d_gbps(0, r.bytes.max(1 << 20), 5).map_err(|e| e.to_string())?;
        rows.push(vec![
            what.to_string(),
            device.to_string(),
            r.bytes.to_string(),
            format!("{:.2}", r.gbps(r.best())),
            format!("{:.2}", r.gbps(r.median())),
            format!("{d2d:.2}"),
            format!("{:.2}", r.gbps(r.best()) / d2d),
            verdict(check.then_some(r.verified)),
        ]);
        Ok(())
    };
    row("one tensor, 1 rank -> 1 rank", "cuda", &single(gib), false)?;
    row("one tensor, 1 rank -> 1 rank", "cuda-vmm", &single(gib), false)?;
    row("one tensor, verified", "cuda", &single(64 << 20), true)?;
    let model = model_batch(smoke)?;
    row("8B-class batch, 2x4 -> 4", "cuda", &model, true)?;
    let mut md = table(
        &[
            "<what",
            "<device memory",
            "bytes",
            "best GB/s",
            "median GB/s",
            "device copy GB/s",
            "best / device copy",
            "<verified",
        ],
        rows,
    );
    let (up, down) = cuda::pinned_gbps(0, gib.min(256 << 20), 5).map_err(|e| e.to_string())?;
    md += &format!("\nPinned host -> device {up:.2} GB/s, device -> host {down:.2} GB/s.\n");
    progress("staged cross-host GPU path (network namespaces)");
    match cross_host(smoke, "cuda") {
        Ok(rows) => {
            md += "\n### GPU tensors across hosts (staged through host memory and TCP)\n\n";
            md += &cross_markdown(&rows);
            for r in &rows {
                md += &format!(
                    "\n{} stream(s): {:.2} GB/s = {:.2} of pinned device -> host copies\n",
                    r.streams,
                    r.best_gbps,
                    r.best_gbps / down
                );
            }
        }
        Err(e) => md += &format!("\nCross-host GPU path not measured: {e}\n"),
    }
    Ok(md)
}
