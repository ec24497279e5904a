//! `tensorbus`: the command-line tool, as a library so that the binary and the Python package's
//! `tensorbus` command (the wheel carries no separate executable) run the same code. Subcommands:
//! `demo` (the main job), `agent`, `command-node`, `up`, `status`, `ctl`, `plan`, `bench`,
//! `doctor`.

mod bench;
mod ctl;
mod demo;
mod doctor;
mod job;
mod launch;
mod netns;
mod pattern;
mod plan_cmd;
mod status;
mod worker;
mod workload;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "tensorbus", version, about = "Move sharded tensors between independently launched process groups")]
struct Cli {
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one per line, for log
    /// collectors. Processes this one starts inherit the choice.
    #[arg(long, global = true, env = "TENSORBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole system on this host: command node, agents, two worker groups, a verified
    /// resharding transfer, and its throughput next to memcpy.
    Demo(demo::DemoArgs),
    /// Run one agent (one per rank).
    Agent(AgentArgs),
    /// Run a command node.
    CommandNode {
        /// HOST:PORT for the inbox; the outbox is PORT+1.
        #[arg(long, default_value = "127.0.0.1:5555")]
        listen: String,
        /// Where the job's state lives: `memory` (default) or `etcd://HOST:PORT[/JOB]`, which lets
        /// a restarted command node resume the job.
        #[arg(long)]
        registry: Option<String>,
        /// File holding the job secret peers must prove (or TENSORBUS_SECRET).
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Start a command node and N agents on loopback; Ctrl-C stops them all. Writes the job file
    /// (endpoints, secret) into DIR, where `status`, `ctl` and workers find it.
    Up {
        #[arg(long, default_value_t = 1)]
        agents: usize,
        #[arg(long, default_value = "127.0.0.1:5555")]
        listen: String,
        /// Directory for the agents' files and the job file (created, private, if missing).
        #[arg(long, env = "TENSORBUS_JOB", default_value = "/tmp")]
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        copy_threads: usize,
    },
    /// Show the job: agents, their pairs and batches, recent epochs and errors.
    Status {
        #[command(flatten)]
        job: job::JobArgs,
        #[arg(long)]
        json: bool,
        /// Refresh until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Drive epochs from outside: process, start, stop, init, deinit.
    Ctl {
        #[command(flatten)]
        job: job::JobArgs,
        #[command(subcommand)]
        what: ctl::Ctl,
    },
    /// Plan a resharding between two layouts and print the plan and its statistics.
    Plan(plan_cmd::PlanArgs),
    /// Run benchmarks and write a results table.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Check this machine: shared memory, semaphores, cross-memory attach and pidfd_getfd between
    /// processes, CUDA IPC and virtual-memory handoff between processes.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// The other process of a doctor check (internal).
    #[command(hide = true)]
    DoctorChild {
        #[arg(long)]
        cma: Option<String>,
        #[arg(long)]
        pidfd: Option<String>,
        #[arg(long)]
        cuda_ipc: Option<String>,
        #[arg(long)]
        cuda_fds: Option<String>,
    },
    /// A worker process for the demo and the tests (internal).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Agent rank on this host (names its files: /tmp/agent_rank{N}_command.lmdb, ..._state.lmdb).
    #[arg(long, env = "AGENT_RANK")]
    rank: usize,
    /// Node id in the control protocol (default agent:{rank}).
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long)]
    command_queue: Option<PathBuf>,
    #[arg(long)]
    state: Option<PathBuf>,
    /// The command node's inbox (default: tcp://$MASTER_ADDR:5555 when MASTER_ADDR is set, as
    /// under torchrun, else tcp://127.0.0.1:5555).
    #[arg(long, env = "TENSORBUS_COMMAND_INBOX")]
    command_inbox: Option<String>,
    /// The command node's outbox (default: inbox port + 1).
    #[arg(long)]
    command_outbox: Option<String>,
    /// Address to bind this agent's control outbox and data port on.
    #[arg(long, default_value = "127.0.0.1")]
    listen_host: String,
    /// Host or IP other hosts reach this agent at (needed when --listen-host is 0.0.0.0).
    #[arg(long, env = "TENSORBUS_ADVERTISE")]
    advertise: Option<String>,
    /// This agent's host as peers compare it (agents on another host get data over TCP).
    #[arg(long, env = "TENSORBUS_HOST_ID")]
    host_id: Option<String>,
    /// IP:PORT for data connections from other hosts (default: the listen host, any port).
    #[arg(long)]
    data_listen: Option<String>,
    /// File holding the job secret every data connection must prove (or TENSORBUS_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// TCP streams to each peer agent on another host.
    #[arg(long, default_value_t = 4)]
    data_streams: usize,
    /// Checksum the bytes of every epoch (reported in the `done` events; costs a read of them).
    #[arg(long)]
    checksum: bool,
    #[arg(long, default_value_t = 2)]
    copy_threads: usize,
    /// CUDA streams per GPU for device-memory copies (feature `cuda`).
    #[arg(long, default_value_t = 4)]
    gpu_streams: usize,
    #[arg(long, default_value_t = 1024)]
    queue_capacity: u64,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Cross-host transfer (two network namespaces, needs root) for 1 and 4 streams vs raw TCP.
    CrossHost {
        #[arg(long)]
        smoke: bool,
    },
    /// Raw TCP receiver for the cross-host baseline (internal).
    #[command(hide = true)]
    TcpSink {
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        raw: RawTcpArgs,
    },
    /// Raw TCP sender for the cross-host baseline (internal).
    #[command(hide = true)]
    TcpSource {
        #[arg(long)]
        to: String,
        #[command(flatten)]
        raw: RawTcpArgs,
    },
    /// Everything: transfers vs memcpy / process_vm_readv, resharding vs a naive baseline, round
    /// trips, agent memory, planner; writes results.md and results.json.
    All {
        /// Reduced sizes and counts (CI), no timing claims.
        #[arg(long)]
        smoke: bool,
        /// Directory for results.md and results.json.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// GPU transfers vs a device-to-device copy, and the staged cross-host GPU path (needs CUDA).
    Gpu {
        #[arg(long)]
        smoke: bool,
        /// File to write the Markdown table to.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Resharding: the eight mesh pairs vs a naive gather-then-scatter baseline.
    Reshard {
        /// Side of the square float32 tensors (8 of them).
        #[arg(long, default_value_t = 1024)]
        side: u64,
        /// Mesh pairs to run (of 8).
        #[arg(long, default_value_t = 8)]
        configs: usize,
    },
    /// Command round trip (enqueue → agent → result → semaphore) on one live agent.
    Rtt {
        /// Round trips timed (median and p99 are reported).
        #[arg(long, default_value_t = 5000)]
        iters: usize,
    },
    /// Planner time for the 8B-class and 1T-class workloads.
    Planner {
        /// Timed repetitions per row (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Directory to write planner.md and planner.json into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[cfg(feature = "cuda")]
fn gpu_bench(smoke: bool, out: Option<PathBuf>) -> Result<(), String> {
    let md = bench::gpu(smoke, |m| eprintln!("bench: {m}"))?;
    print!("{md}");
    match out {
        Some(p) => std::fs::write(&p, md).map_err(|e| format!("writing {}: {e}", p.display())),
        None => Ok(()),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_bench(_smoke: bool, _out: Option<PathBuf>) -> Result<(), String> {
    Err("this build has no GPU support (the `cuda` feature)".into())
}

/// What both ends of the raw TCP baseline are told.
#[derive(clap::Args)]
struct RawTcpArgs {
    #[arg(long)]
    streams: usize,
    #[arg(long)]
    bytes: u64,
    /// Send from / receive into memory the size of the whole transfer (not a reused buffer).
    #[arg(long)]
    whole: bool,
}

/// Removes a file when dropped (the job file, when `up` stops for any reason).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    stop
}

fn default_outbox(inbox: &str) -> Result<String, String> {
    let (head, port) = inbox.rsplit_once(':').ok_or_else(|| format!("bad endpoint {inbox:?}"))?;
    let port: u16 = port.parse().map_err(|_| format!("bad port in {inbox:?}"))?;
    Ok(format!("{head}:{}", port + 1))
}

fn run_agent(a: AgentArgs) -> Result<(), String> {
    let command_inbox = a.command_inbox.clone().unwrap_or_else(|| match std::env::var("MASTER_ADDR") {
        Ok(host) if !host.is_empty() => format!("tcp://{host}:5555"),
        _ => "tcp://127.0.0.1:5555".into(),
    });
    if a.listen_host == "0.0.0.0" && a.advertise.is_none() {
        return Err("--listen-host 0.0.0.0 needs --advertise HOST: the address other hosts reach this agent at".into());
    }
    let cfg = tensorbus_agent::AgentConfig {
        rank: a.rank,
        node_id: a.node_id.unwrap_or_else(|| format!("agent:{}", a.rank)),
        command_queue_path: a
            .command_queue
            .unwrap_or_else(|| tensorbus_host::bootstrap::default_command_queue_path(a.rank)),
        state_path: a.state.unwrap_or_else(|| tensorbus_host::bootstrap::default_state_path(a.rank)),
        command_outbox: match a.command_outbox {
            Some(o) => o,
            None => default_outbox(&command_inbox)?,
        },
        command_inbox,
        advertise: a.advertise,
        host_id: a.host_id.unwrap_or_else(tensorbus_agent::hostname),
        data_listen: a.data_listen.unwrap_or_else(|| format!("{}:0", a.listen_host)),
        secret: match (a.secret_file, std::env::var("TENSORBUS_SECRET").ok()) {
            (Some(f), _) => Some(
                std::fs::read_to_string(&f)
                    .map_err(|e| format!("reading the secret file {}: {e}", f.display()))?
                    .trim_end()
                    .as_bytes()
                    .to_vec(),
            ),
            (None, Some(s)) if !s.is_empty() => Some(s.into_bytes()),
            _ => None,
        },
        listen_host: a.listen_host,
        data_streams: a.data_streams.max(1),
        checksum: a.checksum,
        copy_threads: a.copy_threads.max(1),
        gpu_streams: a.gpu_streams.max(1),
        queue_capacity: a.queue_capacity.max(1),
        join_timeout: Duration::from_secs(5),
    };
    tensorbus_agent::run(cfg, stop_flag()).map_err(|e| e.to_string())
}

/// The argv prefix that runs this tool again (agents, workers, doctor's second process): this
/// executable, or, where the tool runs inside Python (the wheel's `tensorbus` command), the
/// words that `TENSORBUS_SELF` holds as a JSON array (`["python", "-m", "tensorbus"]`).
pub fn self_argv() -> Result<Vec<OsString>, String> {
    if let Ok(json) = std::env::var("TENSORBUS_SELF") {
        let argv: Vec<String> = serde_json::from_str(&json)
            .map_err(|e| format!("TENSORBUS_SELF={json:?} is not a JSON array of strings: {e}"))?;
        if argv.is_empty() {
            return Err("TENSORBUS_SELF is an empty array".into());
        }
        return Ok(argv.into_iter().map(OsString::from).collect());
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    Ok(vec![exe.into_os_string()])
}

/// A command that runs this tool again (see [`self_argv`]).
pub fn self_command() -> Result<std::process::Command, String> {
    let argv = self_argv()?;
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..]);
    Ok(c)
}

/// Runs the tool on `args` (the first is the program name) and returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let cli = Cli::parse_from(args);
    // The demo and the tools print results; the daemons log.
    let default_level = match cli.cmd {
        Cmd::Agent(_) | Cmd::CommandNode { .. } | Cmd::Up { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TENSORBUS_LOG").unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => {
            std::env::set_var("TENSORBUS_LOG_FORMAT", "json");
            logs.json().init();
        }
        LogFormat::Text => {
            use std::io::IsTerminal;
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init();
        }
    }
    let res = match cli.cmd {
        Cmd::Demo(a) => match demo::run(&a) {
            Ok(true) => Ok(()),
            Ok(false) => Err("verification failed".to_string()),
            Err(e) => Err(e),
        },
        Cmd::Agent(a) => run_agent(a),
        Cmd::CommandNode { listen, registry, secret_file } => (|| {
            let registry =
                tensorbus_command::registry::Registry::parse(registry.as_deref()).map_err(|e| e.to_string())?;
            if let Some(f) = &secret_file {
                let secret =
                    std::fs::read_to_string(f).map_err(|e| format!("reading the secret file {}: {e}", f.display()))?;
                std::env::set_var("TENSORBUS_SECRET", secret.trim_end());
            }
            let ctx = zmq::Context::new();
            let secret = tensorbus_command::secure::secret_from_env();
            let bound = tensorbus_command::bind(&ctx, &listen, secret.as_deref()).map_err(|e| e.to_string())?;
            println!("command node: inbox {} outbox {}", bound.endpoints.inbox, bound.endpoints.outbox);
            tensorbus_command::serve(bound, registry, stop_flag()).map_err(|e| e.to_string())
        })(),
        Cmd::Up { agents, listen, dir, copy_threads } => (|| {
            let stop = stop_flag();
            job::ensure_dir(&dir)?;
            if let Some(j) =
                job::read(&dir)?.filter(|j| j.pid != std::process::id() && tensorbus_host::pid_alive(j.pid))
            {
                return Err(format!(
                    "another `tensorbus up` (pid {}) runs the job in {}; stop it or use another --dir",
                    j.pid,
                    dir.display()
                ));
            }
            if tensorbus_command::secure::secret_from_env().is_none() {
                // A fresh job secret, inherited by the agents; workers never need it.
                let mut b = [0u8; 24];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                    .map_err(|e| format!("reading /dev/urandom: {e}"))?;
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                std::env::set_var("TENSORBUS_SECRET", &hex);
            }
            let node = launch::EmbeddedCommandNode::start(&listen)?;
            let mut procs = launch::Agents::spawn(agents, 0, &dir, &node.endpoints, copy_threads, false)?;
            let job_file = job::write(&job::JobFile {
                version: 1,
                inbox: node.endpoints.inbox.clone(),
                outbox: node.endpoints.outbox.clone(),
                secret: std::env::var("TENSORBUS_SECRET").ok(),
                agents,
                dir: dir.clone(),
                pid: std::process::id(),
            })?;
            // Ready means joined: wait (bounded) until every agent is in the directory.
            let secret = tensorbus_command::secure::secret_from_env();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let mut joined = 0;
            while std::time::Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                joined = status::query(&node.endpoints.inbox, secret.as_deref(), Duration::from_millis(500))
                    .map_or(0, |d| d.nodes.len());
                if joined >= agents {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if joined < agents {
                eprintln!("warning: only {joined} of {agents} agents joined within 15 s; see their logs above");
            }
            println!(
                "tensorbus up: command node inbox {} outbox {}; {agents} agents, files in {}",
                node.endpoints.inbox,
                node.endpoints.outbox,
                dir.display()
            );
            println!(
                "job file {} (mode 0600, holds the job secret): `tensorbus status` and workers on this host find the job with{}",
                job_file.display(),
                if dir == std::path::Path::new("/tmp") {
                    " no setting".to_string()
                } else {
                    format!(" TENSORBUS_JOB={}", dir.display())
                }
            );
            println!("Ctrl-C to stop.");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let _remove_job_file = RemoveOnDrop(job_file);
            while !stop.load(Ordering::Relaxed) {
                if let Some((i, st)) =
                    procs.children.iter_mut().enumerate().find_map(|(i, c)| c.try_wait().ok().flatten().map(|s| (i, s)))
                {
                    return Err(format!("agent {i} exited ({st}); stopping"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Orderly: deinit (agents release everything and report closed), then signals.
            println!("stopping: deinit, then SIGTERM");
            let _ = ctl::send(
                &node.endpoints.inbox,
                secret.as_deref(),
                tensorbus_protocol::control::Body::Deinit(()),
                Duration::from_millis(100),
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                match status::query(&node.endpoints.inbox, secret.as_deref(), Duration::from_millis(500)) {
                    Ok(d) if d.nodes.is_empty() => break,
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            procs.stop(Duration::from_secs(5));
            Ok(())
        })(),
        Cmd::Plan(args) => plan_cmd::run(&args),
        Cmd::Status { job, json, watch, interval } => job
            .resolve()
            .and_then(|t| status::run(&t, json, watch, Duration::from_secs_f64(interval.clamp(0.1, 3600.0)))),
        Cmd::Ctl { job, what } => job.resolve().and_then(|t| ctl::run(&t, what)),
        Cmd::Bench { what: BenchWhat::All { smoke, out } } => (|| {
            let s = bench::suite(smoke, |m| eprintln!("bench: {m}"))?;
            let planner = bench::planner(if smoke { 1 } else { 5 });
            let md = format!("{}\n### Planner\n\n{}", bench::suite_markdown(&s), bench::planner_markdown(&planner));
            print!("{md}");
            std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
            std::fs::write(out.join("results.md"), &md).map_err(|e| e.to_string())?;
            let json = serde_json::json!({"suite": s, "planner": serde_json::from_str::<serde_json::Value>(&bench::planner_json(&planner)).unwrap_or_default()});
            std::fs::write(out.join("results.json"), json.to_string()).map_err(|e| e.to_string())
        })(),
        Cmd::Bench { what: BenchWhat::TcpSink { listen, raw } } => {
            netns::tcp_sink(&listen, raw.streams.max(1), raw.bytes, raw.whole)
        }
        Cmd::Bench { what: BenchWhat::TcpSource { to, raw } } => {
            netns::tcp_source(&to, raw.streams.max(1), raw.bytes, raw.whole)
        }
        Cmd::Bench { what: BenchWhat::CrossHost { smoke } } => bench::cross_host(smoke, "cpu").map(|rows| {
            print!("{}", bench::cross_markdown(&rows));
        }),
        Cmd::Bench { what: BenchWhat::Gpu { smoke, out } } => gpu_bench(smoke, out),
        Cmd::Bench { what: BenchWhat::Reshard { side, configs } } => {
            bench::reshard(configs.clamp(1, 8), 8, side.max(8), &|m| eprintln!("bench: {m}")).map(|rows| {
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                println!("{cores} cores, 8 tensors of {side}x{side} float32\n");
                print!("{}", bench::reshard_markdown(&rows));
            })
        }
        Cmd::Bench { what: BenchWhat::Rtt { iters } } => bench::command_rtt(iters.max(1)).map(|(med, p99)| {
            println!("command round trip over {iters}: median {med:.1} us, p99 {p99:.1} us");
        }),
        Cmd::Bench { what: BenchWhat::Planner { iters, out } } => {
            let rows = bench::planner(iters.max(1));
            let md = bench::planner_markdown(&rows);
            print!("{md}");
            match out {
                Some(dir) => std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(dir.join("planner.md"), &md))
                    .and_then(|_| std::fs::write(dir.join("planner.json"), bench::planner_json(&rows)))
                    .map_err(|e| format!("writing results to {}: {e}", dir.display())),
                None => Ok(()),
            }
        }
        Cmd::Doctor { json } => doctor::run(json),
        Cmd::DoctorChild { cma, pidfd, cuda_ipc, cuda_fds } => {
            doctor::child_main(cma, pidfd, cuda_ipc, cuda_fds);
            Ok(())
        }
        Cmd::Worker { spec } => worker::run(&spec),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
