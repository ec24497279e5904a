//! The agent's event loop and its pair / batch bookkeeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tensorbus_host::keys::{self, Heartbeat};
use tensorbus_host::store::{CommandQueue, StateStore};
use tensorbus_host::HEARTBEAT_INTERVAL;
use tensorbus_planner::{BatchPlan, DType, Layout, PairPlan, Placement, Scope, Side, TensorMeta};
use tensorbus_protocol::control::{
    AnnounceValue, BatchReg, Body, Epoch, ErrorValue, Event, EventKind, EventValue, IdentifyValue, Message, NodeStatus,
    PROTOCOL_VERSION,
};
use tensorbus_protocol::host::{Command, CommandResult, ErrorKind, RemoteError, TransferType};
use tensorbus_protocol::payload::{Memory, MeshPayload, PairSide, PlacementsPayload, TensorDesc};
use tensorbus_transport::exec::{self, ExecPlan, Loc, Op};
use tensorbus_transport::shm::ShmSegment;
use tensorbus_transport::tcp::{self, Secret};
use tensorbus_transport::{cma, reduce};

use crate::commands::{self, value_err, Answer, BatchStatus, Lane, Replies};
use crate::directory;
use crate::gpu::Gpus;
use crate::AgentError;

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Agent rank on this host (names its files).
    pub rank: usize,
    /// Node id in the control protocol, e.g. `"agent:3"`.
    pub node_id: String,
    pub command_queue_path: PathBuf,
    pub state_path: PathBuf,
    /// The command node's inbox (ROUTER), e.g. `tcp://127.0.0.1:5555`.
    pub command_inbox: String,
    /// The command node's outbox (XPUB), e.g. `tcp://127.0.0.1:5556`.
    pub command_outbox: String,
    /// Host to bind this agent's outbox on.
    pub listen_host: String,
    /// Host or IP peers reach this agent at, when it differs from `listen_host` (e.g. binding
    /// 0.0.0.0); replaces the host part of the advertised outbox and data addresses.
    pub advertise: Option<String>,
    /// This agent's host, as peers compare it (default: the hostname). Agents on another host
    /// get data over TCP.
    pub host_id: String,
    /// `IP:PORT` for data connections from agents on other hosts (port 0: any free port).
    pub data_listen: String,
    /// The job secret every data connection must prove (none: a one-user loopback job).
    pub secret: Option<Vec<u8>>,
    /// TCP streams to each peer agent on another host.
    pub data_streams: usize,
    /// Compute a checksum of the bytes each epoch delivers (reported in its `done` event; costs
    /// a read of those bytes).
    pub checksum: bool,
    pub copy_threads: usize,
    /// CUDA streams per GPU for device-memory copies.
    pub gpu_streams: usize,
    pub queue_capacity: u64,
    /// How long commands that need the command node wait for it before failing.
    pub join_timeout: Duration,
}

struct PairState {
    side: PairSide,
    layout: Layout,
    matched: bool,
    pending: Vec<Option<String>>,
}

struct PendingTransfer {
    seq: u64,
    dir: TransferType,
    sem: Option<String>,
    epoch: Option<u64>,
}

struct BatchState {
    reg: BatchReg,
    ready: bool,
    pending_register: Option<Option<String>>,
    next_seq: u64,
    pending: VecDeque<PendingTransfer>,
    exec: Option<Arc<ExecPlan>>,
    copying: bool,
    signal: bool,
    /// Bytes this rank receives per epoch from agents on other hosts (computed once).
    remote_bytes: Option<u64>,
    /// Epochs of this batch that ended everywhere (the next `seq` to end).
    ended: u64,
    /// `QueryStatus(epoch_ended:N)` commands waiting for epoch `N` to end.
    waits: Vec<(u64, Option<String>)>,
}

/// A destination tensor that peers on other hosts write into.
struct Target {
    loc: Loc,
    nbytes: u64,
    /// Moves received bytes into device memory (a `Loc::Device` target).
    dev: Option<Arc<dyn tensorbus_transport::exec::DeviceEngine>>,
    /// Keeps the mapping alive while the target is published.
    _segment: Option<Arc<ShmSegment>>,
}

// SAFETY: a Target's Loc points into the segment it keeps alive (or names another process).
unsafe impl Send for Target {}
unsafe impl Sync for Target {}

/// What a data connection reports to the main loop.
enum DataEvent {
    Received { epoch: u64, bytes: u64 },
    Failed { key: String, epoch: u64, message: String },
}

/// Accepts data connections from agents on other hosts; each must prove the job secret first.
fn serve_data(
    listener: std::net::TcpListener,
    key: Secret,
    targets: Arc<std::sync::RwLock<HashMap<String, Target>>>,
    events: std::sync::mpsc::Sender<DataEvent>,
    ctx: zmq::Context,
    wake_ep: String,
    node: String,
) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let (key, targets, events, ctx, wake_ep, node) =
            (key.clone(), targets.clone(), events.clone(), ctx.clone(), wake_ep.clone(), node.clone());
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            if let Err(e) = tcp::handshake(&mut s, &key, true) {
                return tracing::warn!(node = %node, peer = %peer, "data connection refused: {e}");
            }
            let _ = s.set_read_timeout(None);
            let _ = s.set_nodelay(true);
            let Ok(wake) = ctx.socket(zmq::PUSH).and_then(|w| w.connect(&wake_ep).map(|_| w)) else { return };
            let mut buf = Vec::new();
            loop {
                let f = match tcp::read_header(&mut s) {
                    Ok(Some(f)) => f,
                    Ok(None) => return,
                    Err(e) => return tracing::warn!(node = %node, peer = %peer, "data connection closed: {e}"),
                };
                let ev = match receive(&mut s, &f, &targets, &mut buf) {
                    Ok(()) => DataEvent::Received { epoch: f.epoch, bytes: f.len },
                    Err(message) => {
                        tracing::warn!(node = %node, peer = %peer, "{message}");
                        let _ = events.send(DataEvent::Failed { key: f.key, epoch: f.epoch, message });
                        let _ = wake.send(&b""[..], 0);
                        return;
                    }
                };
                let _ = events.send(ev);
                let _ = wake.send(&b""[..], 0);
            }
        });
    }
}

/// Reads one frame's payload straight into the registered destination it names.
fn receive(
    s: &mut std::net::TcpStream,
    f: &tcp::Frame,
    targets: &std::sync::RwLock<HashMap<String, Target>>,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    use std::io::Read;
    let targets = targets.read().unwrap();
    let t =
        targets.get(&f.key).ok_or_else(|| format!("data for an unregistered tensor {:?}", f.key.replace('\0', "/")))?;
    if f.offset.checked_add(f.len).is_none_or(|end| end > t.nbytes) {
        return Err(format!(
            "data for bytes [{}, +{}) outside tensor {:?} of {} bytes",
            f.offset,
            f.len,
            f.key.replace('\0', "/"),
            t.nbytes
        ));
    }
    let n = f.len as usize;
    match t.loc.offset(f.offset) {
        // SAFETY: bounds checked above; the destination worker waits in a receive.
        Loc::Local(p) => s.read_exact(unsafe { std::slice::from_raw_parts_mut(p, n) }).map_err(|e| e.to_string()),
        Loc::Remote { pid, addr } => {
            buf.resize(n, 0);
            s.read_exact(buf).map_err(|e| e.to_string())?;
            // SAFETY: buf holds n bytes.
            unsafe { cma::write(pid, addr, buf.as_ptr(), n) }.map_err(|e| e.to_string())
        }
        Loc::Device(p) => {
            // Staged through one pinned buffer (at most a bucket: one frame), then copied up.
            let dev = t.dev.as_ref().ok_or("a device target without a device engine")?;
            let st = dev.take_staging(n).map_err(|e| e.to_string())?;
            // SAFETY: the staging buffer holds at least n bytes and is ours until given back.
            let r = s
                .read_exact(unsafe { std::slice::from_raw_parts_mut(st.ptr, n) })
                .map_err(|e| e.to_string())
                .and_then(|_| dev.copy(p, st.ptr as u64, n as u64).map_err(|e| e.to_string()));
            dev.give_staging(st);
            r
        }
    }
}

/// An epoch's copies, for the copy thread.
struct CopyJob {
    batch: String,
    epoch: u64,
    plan: Arc<ExecPlan>,
    /// Keeps every mapping the plan points into alive while it runs.
    segments: Vec<Arc<ShmSegment>>,
}

/// The copy thread: runs epochs one after another, reports each through `done` and wakes the
/// main loop through the in-process socket `wake_ep`.
fn copier(
    ctx: zmq::Context,
    wake_ep: String,
    threads: usize,
    checksum: bool,
    jobs: std::sync::mpsc::Receiver<CopyJob>,
    done: std::sync::mpsc::Sender<CopyDone>,
) {
    let wake = match ctx.socket(zmq::PUSH).and_then(|w| w.connect(&wake_ep).map(|_| w)) {
        Ok(w) => w,
        Err(e) => return tracing::error!("copy thread: {e}"),
    };
    for job in jobs {
        let t0 = Instant::now();
        // SAFETY: the plan's local pointers are into `job.segments`, alive for the call;
        // destinations are written only while their workers wait in a receive of this epoch.
        let result = unsafe { exec::execute(&job.plan, threads, job.epoch, checksum) }.map_err(|e| e.to_string());
        drop(job.segments);
        let _ = done.send(CopyDone { batch: job.batch, epoch: job.epoch, result, seconds: t0.elapsed().as_secs_f64() });
        let _ = wake.send(&b""[..], 0);
    }
}

/// A copy thread's report.
struct CopyDone {
    batch: String,
    epoch: u64,
    result: Result<(u64, u64), String>,
    seconds: f64,
}

struct Agent {
    cfg: AgentConfig,
    state: Arc<StateStore>,
    outbox_addr: String,
    dealer: zmq::Socket,
    outbox: zmq::Socket,
    dir: AnnounceValue,
    joined: bool,
    last_identify: Option<Instant>,
    unjoined_since: Instant,
    pairs: BTreeMap<String, PairState>,
    batches: BTreeMap<String, BatchState>,
    segments: HashMap<String, Arc<ShmSegment>>,
    /// Workers' GPU memory, opened once per allocation.
    gpus: Gpus,
    copies: Vec<CopyDone>,
    copy_jobs: std::sync::mpsc::Sender<CopyJob>,
    copy_rx: std::sync::mpsc::Receiver<CopyDone>,
    event_id: u64,
    status: NodeStatus,
    last_from_command: Instant,
    /// We have received a publication on the command node's outbox since (re)joining.
    subscribed: bool,
    last_heartbeat: Instant,
    last_pid_check: Instant,
    data_addr: String,
    /// Destination tensors peers on other hosts may write, by frame key.
    targets: Arc<std::sync::RwLock<HashMap<String, Target>>>,
    data_rx: std::sync::mpsc::Receiver<DataEvent>,
    /// Bytes received over TCP per epoch, and receives waiting for their remote bytes.
    received: HashMap<u64, u64>,
    awaiting: HashMap<u64, (String, u64, u64)>,
    replies: Arc<Replies>,
    /// What the queue thread answers queries from.
    lane: Arc<Lane>,
    /// Completions of this loop turn, sent by [`Agent::flush`].
    outgoing: std::cell::RefCell<Vec<(String, CommandResult)>>,
    /// Epoch number → (batch, seq), from `process` messages.
    epochs: HashMap<u64, (String, u64)>,
}

#[derive(Deserialize)]
struct CommandHead {
    #[serde(rename = "type")]
    ty: Option<String>,
    semaphore_name: Option<String>,
}

fn now_unix() -> f64 {
    keys::unix_now()
}

/// Holds an exclusive lock on `{queue}.pid` for the agent's lifetime.
fn lock_paths(cfg: &AgentConfig) -> Result<std::fs::File, AgentError> {
    use std::io::{Read, Seek, Write};
    let mut path = cfg.command_queue_path.as_os_str().to_owned();
    path.push(".pid");
    let path = PathBuf::from(path);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| AgentError::Io { what: format!("open {}", path.display()), source: e })?;
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(AgentError::AlreadyRunning {
            path: cfg.command_queue_path.display().to_string(),
            pid: pid.trim().into(),
        });
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// Runs an agent until `stop` is set. Cleans up its files and semaphores on the way out.
pub fn run(cfg: AgentConfig, stop: Arc<AtomicBool>) -> Result<(), AgentError> {
    let lock = lock_paths(&cfg)?;
    // Semaphores left by agents and workers that died without cleaning up (SIGKILL, OOM).
    let orphans = tensorbus_host::sem::remove_orphans();
    if orphans > 0 {
        tracing::info!("removed {orphans} semaphore(s) of processes that are gone");
    }
    let queue = Arc::new(CommandQueue::create(&cfg.command_queue_path, cfg.queue_capacity)?);
    let state = Arc::new(StateStore::create(&cfg.state_path)?);
    let hb =
        |alive| Heartbeat { pid: std::process::id(), node_id: cfg.node_id.clone(), time: now_unix(), alive }.encode();
    state.put(keys::HEARTBEAT, &hb(true))?;

    let ctx = zmq::Context::new();
    let dealer = ctx.socket(zmq::DEALER)?;
    dealer.set_identity(cfg.node_id.as_bytes())?;
    tensorbus_command::secure::client(&dealer, cfg.secret.as_deref())?;
    dealer.set_linger(0)?;
    dealer.connect(&cfg.command_inbox)?;
    let sub = ctx.socket(zmq::SUB)?;
    sub.set_linger(0)?;
    tensorbus_command::secure::client(&sub, cfg.secret.as_deref())?;
    sub.connect(&cfg.command_outbox)?;
    sub.set_subscribe(b"")?;
    // Only peers that know the job secret may subscribe to our events.
    let zap = tensorbus_command::secure::Zap::start(&ctx, cfg.secret.as_deref())?;
    let outbox = ctx.socket(zmq::XPUB)?;
    outbox.set_linger(0)?;
    tensorbus_command::secure::server(&outbox, cfg.secret.as_deref())?;
    outbox.bind(&format!("tcp://{}:*", cfg.listen_host))?;
    let outbox_addr = advertised(&outbox.get_last_endpoint()?.unwrap_or_default(), cfg.advertise.as_deref());
    let commands = ctx.socket(zmq::PULL)?;
    let cmd_ep = format!("inproc://commands-{}", cfg.rank);
    commands.bind(&cmd_ep)?;
    let copy_ep = format!("inproc://copies-{}", cfg.rank);
    let copy_pull = ctx.socket(zmq::PULL)?;
    copy_pull.bind(&copy_ep)?;

    let threads_stop = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let (state, stop, node_id) = (state.clone(), threads_stop.clone(), cfg.node_id.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let b = Heartbeat { pid: std::process::id(), node_id: node_id.clone(), time: now_unix(), alive: true };
                if let Err(e) = state.put(keys::HEARTBEAT, &b.encode()) {
                    tracing::error!("heartbeat: {e}");
                }
                std::thread::sleep(HEARTBEAT_INTERVAL);
            }
        })
    };
    let lane = Arc::new(Lane::default());
    let replies = Arc::new(Replies::new(state.clone()));
    let reader = {
        let push = ctx.socket(zmq::PUSH)?;
        push.connect(&cmd_ep)?;
        let (queue, lane, replies, me, stop) =
            (queue.clone(), lane.clone(), replies.clone(), cfg.node_id.clone(), threads_stop.clone());
        std::thread::spawn(move || commands::queue_thread(queue, lane, replies, push, me, stop))
    };

    let data_listener = std::net::TcpListener::bind(&cfg.data_listen)
        .map_err(|e| AgentError::Io { what: format!("binding the data port {}", cfg.data_listen), source: e })?;
    let data_addr =
        advertised(&data_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), cfg.advertise.as_deref());
    let targets: Arc<std::sync::RwLock<HashMap<String, Target>>> = Default::default();
    let (data_tx, data_rx) = std::sync::mpsc::channel();
    {
        let key = cfg.secret.as_deref().map_or_else(Secret::none, Secret::new);
        let (targets, ctx, ep, node) = (targets.clone(), ctx.clone(), copy_ep.clone(), cfg.node_id.clone());
        std::thread::spawn(move || serve_data(data_listener, key, targets, data_tx, ctx, ep, node));
    }

    let (copy_tx, copy_rx) = std::sync::mpsc::channel();
    let (copy_jobs, jobs_rx) = std::sync::mpsc::channel();
    let copy_thread = {
        let (ctx, ep, threads, checksum) = (ctx.clone(), copy_ep.clone(), cfg.copy_threads, cfg.checksum);
        std::thread::spawn(move || copier(ctx, ep, threads, checksum, jobs_rx, copy_tx))
    };
    let mut agent = Agent {
        cfg: cfg.clone(),
        state: state.clone(),
        outbox_addr,
        dealer,
        outbox,
        dir: AnnounceValue::default(),
        joined: false,
        last_identify: None,
        unjoined_since: Instant::now(),
        pairs: BTreeMap::new(),
        batches: BTreeMap::new(),
        segments: HashMap::new(),
        gpus: Gpus::new(cfg.gpu_streams),
        copies: Vec::new(),
        copy_jobs,
        copy_rx,
        event_id: 0,
        status: NodeStatus::Waiting,
        last_from_command: Instant::now(),
        subscribed: false,
        last_heartbeat: Instant::now(),
        last_pid_check: Instant::now(),
        epochs: HashMap::new(),
        replies,
        lane,
        outgoing: Default::default(),
        data_addr,
        targets,
        data_rx,
        received: HashMap::new(),
        awaiting: HashMap::new(),
    };
    tracing::info!(node = %cfg.node_id, queue = %cfg.command_queue_path.display(), outbox = %agent.outbox_addr, "agent started");
    let result = agent.main_loop(&commands, &sub, &copy_pull, zap.as_ref(), &stop);
    agent.flush(0);

    // Orderly exit: say so in the heartbeat, tell the command node, remove files and semaphores.
    agent.status = NodeStatus::Closed;
    let _ = agent.send_identify();
    threads_stop.store(true, Ordering::Relaxed);
    let _ = heartbeat.join();
    let _ = reader.join();
    let _ = state.put(keys::HEARTBEAT, &hb(false));
    drop(agent); // closes the job channel: the copy thread ends after its current epoch
    let _ = copy_thread.join();
    if let Ok(q) = Arc::try_unwrap(queue) {
        q.remove();
    }
    if let Ok(s) = Arc::try_unwrap(state) {
        s.remove();
    }
    let mut pid = cfg.command_queue_path.as_os_str().to_owned();
    pid.push(".pid");
    let _ = std::fs::remove_file(PathBuf::from(pid));
    drop(lock);
    tracing::info!(node = %cfg.node_id, "agent stopped");
    result
}

impl Agent {
    fn main_loop(
        &mut self,
        commands: &zmq::Socket,
        sub: &zmq::Socket,
        copy_pull: &zmq::Socket,
        zap: Option<&tensorbus_command::secure::Zap>,
        stop: &AtomicBool,
    ) -> Result<(), AgentError> {
        self.send_identify()?;
        while !stop.load(Ordering::Relaxed) {
            let mut items = vec![
                commands.as_poll_item(zmq::POLLIN),
                sub.as_poll_item(zmq::POLLIN),
                self.dealer.as_poll_item(zmq::POLLIN),
                copy_pull.as_poll_item(zmq::POLLIN),
                self.outbox.as_poll_item(zmq::POLLIN),
            ];
            if let Some(z) = zap {
                items.push(z.poll_item());
            }
            match zmq::poll(&mut items, 100) {
                Ok(_) | Err(zmq::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
            if ready.get(5) == Some(&true) {
                zap.expect("polled").handle();
            }
            let mut handled = 0;
            if ready[0] {
                while let Ok(bytes) = commands.recv_bytes(zmq::DONTWAIT) {
                    self.handle_command(&bytes);
                    handled += 1;
                }
            }
            let mut msgs = Vec::new();
            for (i, sock) in [(1, sub), (2, &self.dealer)] {
                if ready[i] {
                    while let Ok(frames) = sock.recv_multipart(zmq::DONTWAIT) {
                        msgs.push(frames);
                    }
                }
            }
            if ready[1] && !msgs.is_empty() && !self.subscribed {
                self.subscribed = true;
                self.send_identify()?;
            }
            if !msgs.is_empty() {
                self.last_from_command = Instant::now();
            }
            for frames in msgs {
                let Some(last) = frames.last() else { continue };
                match Message::from_json(last) {
                    Ok(m) => self.handle_control(m),
                    Err(e) => tracing::warn!("dropped control message: {e}"),
                }
            }
            if ready[3] {
                while copy_pull.recv_bytes(zmq::DONTWAIT).is_ok() {}
                while let Ok(done) = self.copy_rx.try_recv() {
                    self.copies.push(done);
                }
                for done in std::mem::take(&mut self.copies) {
                    self.copy_finished(done);
                }
                while let Ok(ev) = self.data_rx.try_recv() {
                    self.data_event(ev);
                }
            }
            if ready[4] {
                // Subscriptions to our outbox; nothing to do but drain them.
                while self.outbox.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            self.tick()?;
            self.flush(handled);
        }
        Ok(())
    }

    /// Timers: our heartbeat; the command node's liveness; our workers' liveness; re-identify
    /// until the command node has us in its directory; give up on commands that need a command
    /// node that is not answering.
    fn tick(&mut self) -> Result<(), AgentError> {
        if self.last_heartbeat.elapsed() >= Duration::from_millis(250) {
            self.last_heartbeat = Instant::now();
            self.send(Body::Status(self.status))?;
        }
        let silent = self.last_from_command.elapsed();
        if self.joined && silent > tensorbus_protocol::coordinator::DEAD_AFTER {
            tracing::warn!(node = %self.cfg.node_id, "command node silent for {:.1} s; rejoining", silent.as_secs_f64());
            self.joined = false;
            self.subscribed = false;
            self.unjoined_since = Instant::now();
            let err = RemoteError {
                kind: ErrorKind::ConnectionError,
                message: format!(
                    "the command node at {} is gone (silent for {:.1} s)",
                    self.cfg.command_inbox,
                    silent.as_secs_f64()
                ),
                origin: "command".into(),
            };
            self.fail_transfers(None, &err);
        }
        if self.last_pid_check.elapsed() >= Duration::from_millis(250) {
            self.last_pid_check = Instant::now();
            self.check_workers();
        }
        if !self.joined && self.status != NodeStatus::Closed {
            if self.last_identify.is_none_or(|t| t.elapsed() > Duration::from_millis(250)) {
                self.send_identify()?;
            }
            if self.unjoined_since.elapsed() > self.cfg.join_timeout {
                let err = RemoteError {
                    kind: ErrorKind::ConnectionError,
                    message: format!(
                        "the command node at {} has not answered for {:.1} s",
                        self.cfg.command_inbox,
                        self.unjoined_since.elapsed().as_secs_f64()
                    ),
                    origin: self.cfg.node_id.clone(),
                };
                self.fail_waiting(err);
            }
        }
        Ok(())
    }

    /// Fails the armed or running transfers of `batch` (of every batch when `None`).
    fn fail_transfers(&mut self, batch: Option<&str>, err: &RemoteError) {
        let mut sems = Vec::new();
        for (id, b) in self.batches.iter_mut() {
            if batch.is_none_or(|x| x == id) {
                sems.extend(b.pending.drain(..).map(|p| p.sem));
            }
        }
        for s in sems {
            self.complete(s.as_deref(), CommandResult::err(err.clone()));
        }
    }

    /// Releases the batches of workers that exited, and tells the job.
    fn check_workers(&mut self) {
        let gone: Vec<(String, u32)> = self
            .batches
            .iter()
            .filter_map(|(id, b)| {
                b.reg.tensors.iter().filter_map(|t| t.pid).find(|&pid| !pid_alive(pid)).map(|pid| (id.clone(), pid))
            })
            .collect();
        for (batch, pid) in gone {
            if self.batches[&batch].copying {
                continue; // finish the copy first; the next tick releases it
            }
            let msg = format!("worker pid {pid} of {} exited", self.cfg.node_id);
            tracing::warn!(node = %self.cfg.node_id, batch = %batch, "{msg}; releasing the batch");
            let err = RemoteError {
                kind: ErrorKind::ConnectionError,
                message: msg.clone(),
                origin: self.cfg.node_id.clone(),
            };
            self.fail_transfers(Some(&batch), &err);
            let v = ErrorValue {
                err_type: "ConnectionError".into(),
                err_args: vec![serde_json::Value::String(msg), serde_json::json!({"origin": self.cfg.node_id})],
                traceback: None,
                batch_id: Some(batch.clone()),
                epoch: None,
            };
            let _ = self.send(Body::Error(v));
            let _ = self.cleanup(&batch);
        }
    }

    /// Fails every command waiting on the control plane.
    fn fail_waiting(&mut self, err: RemoteError) {
        let mut sems = Vec::new();
        for p in self.pairs.values_mut() {
            sems.append(&mut p.pending);
        }
        for b in self.batches.values_mut() {
            sems.extend(b.pending_register.take());
            sems.extend(b.pending.drain(..).map(|p| p.sem));
            sems.extend(b.waits.drain(..).map(|(_, s)| s));
        }
        for s in sems {
            self.complete(s.as_deref(), CommandResult::err(err.clone()));
        }
    }

    fn identify_value(&self) -> IdentifyValue {
        IdentifyValue {
            node_id: self.cfg.node_id.clone(),
            outbox: self.outbox_addr.clone(),
            status: self.status,
            signals: Vec::new(),
            slots: Vec::new(),
            subscribed: self.subscribed,
            protocol: PROTOCOL_VERSION,
            host: self.cfg.host_id.clone(),
            data_addr: self.data_addr.clone(),
            pid: std::process::id(),
            pairs: self.pairs.iter().map(|(k, p)| (k.clone(), p.side.clone())).collect(),
            batches: self.batches.iter().map(|(k, b)| (k.clone(), b.reg.clone())).collect(),
        }
    }

    /// Sends to the command node. Before a connection exists (the command node is not there yet,
    /// or refused us) the message is dropped: joining retries every 250 ms, and commands that need
    /// the command node fail with a ConnectionError after the join timeout.
    fn send(&self, body: Body) -> Result<(), AgentError> {
        let m = Message::new(&self.cfg.node_id, body);
        match self.dealer.send(m.to_json().as_bytes(), zmq::DONTWAIT) {
            Err(zmq::Error::EAGAIN) => {
                tracing::debug!(node = %self.cfg.node_id, "no connection to the command node; {} dropped", m.body.type_name());
                Ok(())
            }
            r => r.map_err(Into::into),
        }
    }

    fn send_identify(&mut self) -> Result<(), AgentError> {
        if self.joined {
            self.unjoined_since = Instant::now();
        }
        self.joined = false;
        self.last_identify = Some(Instant::now());
        self.send(Body::Identify(self.identify_value()))
    }

    /// Writes the result, then posts the command's semaphore.
    /// Completes a command once this loop turn is over (see [`Agent::flush`]).
    fn complete(&self, sem: Option<&str>, result: CommandResult) {
        if let Some(e) = &result.error {
            tracing::warn!(node = %self.cfg.node_id, "command failed: {}", e.message);
        }
        if let Some(sem) = sem {
            self.outgoing.borrow_mut().push((sem.to_string(), result));
        }
    }

    /// Publishes the batches' status to the queue thread, then completes this turn's commands:
    /// a worker woken by a completion must find what it waited for in any query it makes next.
    fn flush(&mut self, handled: u64) {
        self.lane.publish(
            self.batches.iter().map(|(k, b)| (k.clone(), BatchStatus { signal: b.signal, ended: b.ended })).collect(),
        );
        for (sem, result) in self.outgoing.get_mut().drain(..) {
            self.replies.complete(Some(&sem), result);
        }
        self.lane.handled(handled);
    }

    fn handle_command(&mut self, bytes: &[u8]) {
        let cmd = match Command::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                let head: Option<CommandHead> = rmp_serde_head(bytes);
                let (ty, sem) = head.map(|h| (h.ty, h.semaphore_name)).unwrap_or((None, None));
                let msg = match ty {
                    Some(t)
                        if !["InitPair", "RegisterTensors", "Transfer", "QueryStatus", "CleanupBatch"]
                            .contains(&t.as_str()) =>
                    {
                        format!("unknown command type {t:?}")
                    }
                    _ => e.to_string(),
                };
                tracing::warn!("refused command: {msg}");
                self.complete(sem.as_deref(), CommandResult::err(value_err(&self.cfg.node_id, msg)));
                return;
            }
        };
        let sem = cmd.semaphore_name().map(str::to_string);
        tracing::debug!(node = %self.cfg.node_id, "command {}", cmd.type_name());
        let res = match cmd {
            Command::InitPair(c) => self.init_pair(c, sem.clone()),
            Command::RegisterTensors(c) => self.register(c, sem.clone()),
            Command::Transfer(c) => self.transfer(&c.batch_id, c.transfer_type, sem.clone()),
            Command::QueryStatus(c) => self.query(&c.batch_id, &c.state_name, sem.clone()),
            Command::CleanupBatch(c) => self.cleanup(&c.batch_id),
        };
        match res {
            Ok(Some(r)) => self.complete(sem.as_deref(), r),
            Ok(None) => {} // completes later
            Err(e) => self.complete(sem.as_deref(), CommandResult::err(e)),
        }
    }

    fn init_pair(
        &mut self,
        c: tensorbus_protocol::host::InitPair,
        sem: Option<String>,
    ) -> Result<Option<CommandResult>, RemoteError> {
        let me = self.cfg.node_id.clone();
        let bad = |m: String| value_err(&me, format!("InitPair {}: {m}", c.pair_name));
        let ws = c.expected_world_size as usize;
        if ws == 0 {
            return Err(bad("expected_world_size must be at least 1".into()));
        }
        let (mesh, rank) = match &c.mesh_shape_payload {
            Some(b) => {
                let m = MeshPayload::decode(b).map_err(|e| bad(e.to_string()))?;
                (m.shape, m.rank)
            }
            None => (vec![ws], self.cfg.rank % ws),
        };
        let placements = match &c.placements_payload {
            Some(b) => PlacementsPayload::decode(b).map_err(|e| bad(e.to_string()))?,
            None => vec![Placement::Replicate; mesh.len()],
        };
        let layout = Layout::from_parts(mesh.clone(), placements.clone()).map_err(|e| bad(e.to_string()))?;
        layout.check_world_size(Side::Src, ws).map_err(|e| bad(e.to_string().replace("source ", "")))?;
        if rank >= ws {
            return Err(bad(format!("rank {rank} is outside the {ws}-rank mesh {mesh:?}")));
        }
        if c.local_name == c.remote_name {
            return Err(bad(format!("local_name and remote_name are both {:?}", c.local_name)));
        }
        let side = PairSide {
            local_name: c.local_name.clone(),
            remote_name: c.remote_name.clone(),
            world_size: ws,
            rank,
            mesh,
            placements: placements.iter().map(|p| p.to_string()).collect(),
        };
        if let Some(p) = self.pairs.get(&c.pair_name) {
            if p.side != side {
                return Err(bad(format!("already registered on this agent with a different layout ({:?})", p.side)));
            }
        }
        let _ = self.state.put(&keys::pair_match(&c.pair_name), b"\xc2");
        let entry = self.pairs.entry(c.pair_name.clone()).or_insert(PairState {
            side,
            layout,
            matched: false,
            pending: vec![],
        });
        if entry.matched {
            return Ok(Some(CommandResult::ok()));
        }
        entry.pending.push(sem);
        self.status = NodeStatus::Waiting;
        self.send_identify().map_err(|e| value_err(&me, e.to_string()))?;
        self.check_pairs();
        Ok(None)
    }

    fn check_pairs(&mut self) {
        let mut done = Vec::new();
        for (name, p) in self.pairs.iter_mut() {
            if p.matched {
                continue;
            }
            match directory::pair_matched(&self.dir, name, &p.side) {
                Ok(true) => {
                    p.matched = true;
                    tracing::info!(node = %self.cfg.node_id, pair = %name, "pair matched");
                    let _ = self.state.put(&keys::pair_match(name), b"\xc3");
                    done.extend(p.pending.drain(..).map(|s| (s, CommandResult::ok())));
                }
                Ok(false) => {}
                Err(m) => {
                    let e = value_err(&self.cfg.node_id, m);
                    done.extend(p.pending.drain(..).map(|s| (s, CommandResult::err(e.clone()))));
                }
            }
        }
        for (s, r) in done {
            self.complete(s.as_deref(), r);
        }
        if !self.pairs.is_empty() && self.pairs.values().all(|p| p.matched) && self.status == NodeStatus::Waiting {
            self.status = NodeStatus::Ready;
            let _ = self.send(Body::Status(NodeStatus::Ready));
        }
    }

    fn map_segment(&mut self, name: &str) -> Result<Arc<ShmSegment>, String> {
        map_segment(&mut self.segments, name)
    }

    /// Checks that a worker's tensor memory exists and is large enough.
    fn check_memory(&mut self, i: usize, d: &TensorDesc) -> Result<(), String> {
        match &d.memory {
            Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                self.gpus.locate(&d.memory, d.nbytes).map_err(|e| format!("tensor {i}: {e}"))?;
            }
            Memory::Shm { name, offset } => {
                let seg = self.map_segment(name)?;
                if offset + d.nbytes > seg.len() as u64 {
                    return Err(format!(
                        "tensor {i}: bytes [{offset}, {}) lie outside shared memory {name} of {} bytes",
                        offset + d.nbytes,
                        seg.len()
                    ));
                }
            }
            Memory::Cma { pid, addr } => {
                if d.nbytes > 0 {
                    let mut b = [0u8; 1];
                    for at in [*addr, *addr + d.nbytes - 1] {
                        // SAFETY: reading one byte into a local buffer.
                        unsafe { cma::read(*pid, at, b.as_mut_ptr(), 1) }.map_err(|e| format!("tensor {i}: {e}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn register(
        &mut self,
        c: tensorbus_protocol::host::RegisterTensors,
        sem: Option<String>,
    ) -> Result<Option<CommandResult>, RemoteError> {
        let me = self.cfg.node_id.clone();
        let bad = |m: String| value_err(&me, format!("RegisterTensors {}: {m}", c.batch_id));
        if let Some(b) = self.batches.get(&c.batch_id) {
            return Err(bad(format!(
                "batch is already registered ({} tensors); call CleanupBatch first to reuse the id",
                b.reg.tensors.len()
            )));
        }
        if c.tensors.is_empty() {
            return Err(bad("no tensors given".into()));
        }
        if c.bucket_size == Some(0) {
            return Err(bad("bucket_size must be positive".into()));
        }
        let mut reg = BatchReg { pairs: vec![], tensors: vec![], bucket_size: c.bucket_size };
        for (i, (pair, payload)) in c.tensors.iter().enumerate() {
            let p = self
                .pairs
                .get(pair)
                .ok_or_else(|| bad(format!("tensor {i}: unknown pair {pair:?}; call InitPair first")))?;
            if !p.matched {
                return Err(bad(format!("tensor {i}: pair {pair:?} is not matched yet")));
            }
            let d = TensorDesc::decode(payload).map_err(|e| bad(format!("tensor {i}: {e}")))?;
            d.validate().map_err(|e| bad(format!("tensor {i}: {e}")))?;
            p.layout.check_ndim(d.shape.len()).map_err(|e| bad(format!("tensor {i}: {e}")))?;
            self.check_memory(i, &d).map_err(bad)?;
            reg.pairs.push(pair.clone());
            reg.tensors.push(d);
        }
        self.batches.insert(
            c.batch_id.clone(),
            BatchState {
                reg,
                ready: false,
                pending_register: Some(sem),
                next_seq: 0,
                pending: VecDeque::new(),
                exec: None,
                copying: false,
                signal: false,
                remote_bytes: None,
                ended: 0,
                waits: Vec::new(),
            },
        );
        self.send_identify().map_err(|e| value_err(&me, e.to_string()))?;
        self.check_batches();
        Ok(None)
    }

    /// Tears everything down (pending commands fail, batches are released, pairs forgotten) and
    /// leaves the directory as `closed`; `init` rejoins.
    fn deinit(&mut self) {
        let me = self.cfg.node_id.clone();
        let err = RemoteError {
            kind: ErrorKind::TransferError,
            message: "the job was deinitialized".into(),
            origin: me.clone(),
        };
        self.fail_waiting(err);
        let ids: Vec<String> = self.batches.keys().cloned().collect();
        for id in ids {
            if self.batches[&id].copying {
                continue; // released by the worker's CleanupBatch once its copy ends
            }
            let _ = self.cleanup(&id);
        }
        for p in std::mem::take(&mut self.pairs).into_keys() {
            let _ = self.state.delete(&keys::pair_match(&p));
        }
        self.segments.clear();
        self.status = NodeStatus::Closed;
        let _ = self.send_identify();
        tracing::info!(node = %me, "deinit: released everything, closed");
    }

    /// Pairs of a batch in canonical order (sorted by name).
    fn batch_pairs(reg: &BatchReg) -> Vec<String> {
        let mut v = reg.pairs.clone();
        v.sort();
        v.dedup();
        v
    }

    /// Checks registration of every batch waiting for its peers; completes or fails it.
    fn check_batches(&mut self) {
        let ids: Vec<String> = self.batches.iter().filter(|(_, b)| !b.ready).map(|(k, _)| k.clone()).collect();
        for id in ids {
            match self.batch_complete(&id) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(m) = self.publish_targets(&id) {
                        let b = self.batches.remove(&id).expect("present");
                        let _ = self.send_identify();
                        let e = value_err(&self.cfg.node_id, format!("RegisterTensors {id}: {m}"));
                        self.complete(b.pending_register.flatten().as_deref(), CommandResult::err(e));
                        continue;
                    }
                    let b = self.batches.get_mut(&id).expect("present");
                    b.ready = true;
                    let sem = b.pending_register.take().flatten();
                    tracing::info!(node = %self.cfg.node_id, batch = %id, tensors = b.reg.tensors.len(), "batch registered on both sides");
                    self.complete(sem.as_deref(), CommandResult::ok());
                }
                Err(m) => {
                    let b = self.batches.remove(&id).expect("present");
                    let _ = self.send_identify();
                    let e = value_err(&self.cfg.node_id, format!("RegisterTensors {id}: {m}"));
                    self.complete(b.pending_register.flatten().as_deref(), CommandResult::err(e));
                }
            }
        }
    }

    /// Whether every rank of both sides of every pair of the batch has registered it, with
    /// matching tensors; an error says what disagrees.
    fn batch_complete(&self, id: &str) -> Result<bool, String> {
        let b = &self.batches[id];
        for pair in Self::batch_pairs(&b.reg) {
            let p = &self.pairs[&pair];
            let mut metas: Vec<Vec<TensorMeta>> = Vec::new();
            for name in [&p.side.local_name, &p.side.remote_name] {
                let side = directory::side(&self.dir, &pair, name)?;
                let Some((_, _, ps)) = side.values().next() else { return Ok(false) };
                let mut per_rank = Vec::new();
                for r in 0..ps.world_size {
                    let Some((_, ident, _)) = side.get(&r) else { return Ok(false) };
                    let Some(ts) = directory::tensors_on(ident, id, &pair) else { return Ok(false) };
                    per_rank.push(ts);
                }
                let n = per_rank[0].len();
                if let Some((r, ts)) = per_rank.iter().enumerate().find(|(_, t)| t.len() != n) {
                    return Err(format!("pair {pair}: {name} rank 0 registered {n} tensors, rank {r} {}", ts.len()));
                }
                let layout = ps.layout().map_err(|e| e.to_string())?;
                let mut side_metas = Vec::new();
                for k in 0..n {
                    let tname = per_rank[0][k].name.clone().unwrap_or_else(|| format!("{pair}[{k}]"));
                    let dtype = per_rank[0][k].dtype.clone();
                    if let Some(r) = per_rank.iter().position(|t| t[k].dtype != dtype) {
                        return Err(format!(
                            "tensor {tname}: {name} ranks disagree on dtype ({dtype} on rank 0, {} on rank {r})",
                            per_rank[r][k].dtype
                        ));
                    }
                    let locals: Vec<Vec<u64>> = per_rank.iter().map(|t| t[k].shape.clone()).collect();
                    let global =
                        layout.global_shape_from_locals(&tname, &locals).map_err(|e| format!("{name}: {e}"))?;
                    side_metas.push(TensorMeta::new(tname, global, dtype.parse::<DType>().map_err(|e| e.to_string())?));
                }
                metas.push(side_metas);
            }
            if metas[0].len() != metas[1].len() {
                return Err(format!(
                    "pair {pair}: {} registered {} tensors but {} registered {}",
                    p.side.local_name,
                    metas[0].len(),
                    p.side.remote_name,
                    metas[1].len()
                ));
            }
            for (a, b) in metas[0].iter().zip(&metas[1]) {
                a.check_matches(b).map_err(|e| e.to_string())?;
            }
        }
        Ok(true)
    }

    fn transfer(
        &mut self,
        batch: &str,
        dir: TransferType,
        sem: Option<String>,
    ) -> Result<Option<CommandResult>, RemoteError> {
        let me = self.cfg.node_id.clone();
        let b = self
            .batches
            .get_mut(batch)
            .ok_or_else(|| value_err(&me, format!("Transfer: unknown batch {batch:?}; call RegisterTensors first")))?;
        if !b.ready {
            return Err(value_err(&me, format!("Transfer: batch {batch:?} is still being registered")));
        }
        if let Some(p) = b.pending.front() {
            if p.dir != dir {
                return Err(value_err(
                    &me,
                    format!("Transfer: batch {batch:?} has a {:?} in flight; cannot {:?} at the same time", p.dir, dir),
                ));
            }
        }
        let seq = b.next_seq;
        b.next_seq += 1;
        b.signal = false;
        b.pending.push_back(PendingTransfer { seq, dir, sem, epoch: None });
        self.replies.store_signal(batch, false);
        self.emit(batch, EventKind::Armed, seq, None, 0, 0.0, 0);
        Ok(None)
    }

    fn query(
        &mut self,
        batch: &str,
        state_name: &str,
        sem: Option<String>,
    ) -> Result<Option<CommandResult>, RemoteError> {
        let b = self.batches.get_mut(batch);
        let status = b.as_ref().map(|b| BatchStatus { signal: b.signal, ended: b.ended });
        match commands::answer(&self.cfg.node_id, batch, status, state_name)? {
            Answer::WaitFor(n) => {
                b.expect("answered for a known batch").waits.push((n, sem));
                Ok(None)
            }
            Answer::Now(v) => {
                if state_name == "transfer_signal" {
                    self.replies.store_signal(batch, v);
                }
                Ok(Some(CommandResult::value(v)))
            }
        }
    }

    fn cleanup(&mut self, batch: &str) -> Result<Option<CommandResult>, RemoteError> {
        let me = self.cfg.node_id.clone();
        let b =
            self.batches.get(batch).ok_or_else(|| value_err(&me, format!("CleanupBatch: unknown batch {batch:?}")))?;
        if b.copying {
            return Err(value_err(
                &me,
                format!("CleanupBatch: batch {batch:?} is being copied; wait for the transfer"),
            ));
        }
        let b = self.batches.remove(batch).expect("present");
        let cancelled = RemoteError {
            kind: ErrorKind::TransferError,
            message: format!("batch {batch:?} was cleaned up"),
            origin: me.clone(),
        };
        for p in b.pending {
            self.complete(p.sem.as_deref(), CommandResult::err(cancelled.clone()));
        }
        let _ = self.state.delete_prefix(&keys::batch_prefix(batch));
        self.targets.write().unwrap().retain(|k, _| !k.starts_with(&format!("{batch}\0")));
        self.retain_segments();
        self.send_identify().map_err(|e| value_err(&me, e.to_string()))?;
        tracing::info!(node = %me, batch, "batch cleaned up");
        Ok(Some(CommandResult::ok()))
    }

    /// Unmaps segments no batch refers to any more.
    fn retain_segments(&mut self) {
        let mut used = std::collections::HashSet::new();
        for b in self.batches.values() {
            for t in &b.reg.tensors {
                if let Memory::Shm { name, .. } = &t.memory {
                    used.insert(name.clone());
                }
            }
        }
        // Peers' segments that built plans point into.
        for (id, b) in &self.batches {
            if b.exec.is_some() {
                for ident in self.dir.nodes.values() {
                    if let Some(r) = ident.batches.get(id) {
                        for t in &r.tensors {
                            if let Memory::Shm { name, .. } = &t.memory {
                                used.insert(name.clone());
                            }
                        }
                    }
                }
            }
        }
        self.segments.retain(|k, _| used.contains(k));
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        batch: &str,
        kind: EventKind,
        seq: u64,
        epoch: Option<u64>,
        bytes: u64,
        seconds: f64,
        checksum: u64,
    ) {
        self.event_id += 1;
        let ev = Event {
            id: self.event_id,
            timestamp: tensorbus_protocol::control::now_rfc3339(),
            node_id: self.cfg.node_id.clone(),
            signal: batch.to_string(),
            epoch: epoch.map(Epoch::Root),
            value: EventValue { batch_id: batch.to_string(), kind, seq, bytes, seconds, checksum },
        };
        let m = Message::new(&self.cfg.node_id, Body::Event(vec![ev]));
        let json = m.to_json();
        if let Err(e) = self.dealer.send(json.as_bytes(), zmq::DONTWAIT) {
            tracing::error!("sending event: {e}");
        }
        let _ = self.outbox.send_multipart([b"event".as_slice(), json.as_bytes()], zmq::DONTWAIT);
    }

    fn handle_control(&mut self, m: Message) {
        match m.body {
            Body::Announce(dir) => {
                let me = self.identify_value();
                self.joined =
                    dir.nodes.get(&self.cfg.node_id).is_some_and(|v| v.pairs == me.pairs && v.batches == me.batches);
                if self.joined {
                    self.unjoined_since = Instant::now();
                }
                // A peer that re-registered a batch (e.g. restarted) has new memory: rebuild plans.
                for (id, b) in self.batches.iter_mut() {
                    let holders = |d: &AnnounceValue| -> Vec<(String, Option<BatchReg>)> {
                        d.nodes
                            .iter()
                            .map(|(n, v)| (n.clone(), v.batches.get(id).cloned()))
                            .filter(|(_, r)| r.is_some())
                            .collect()
                    };
                    if b.exec.is_some() && holders(&self.dir) != holders(&dir) {
                        b.exec = None;
                    }
                }
                self.dir = dir;
                self.check_pairs();
                self.check_batches();
            }
            Body::Ping(()) => {
                // A (new) command node asks who we are: our subscription must be confirmed again
                // by a publication of its own.
                self.subscribed = false;
                let _ = self.send_identify();
            }
            Body::Process(p) => {
                let Epoch::Root(epoch) = p.epoch else { return };
                if !self.batches.contains_key(&p.input.batch_id) {
                    return;
                }
                self.epochs.insert(epoch, (p.input.batch_id.clone(), p.input.seq));
                if let Some(side) = &p.input.from {
                    // A controller's epoch: run it without the worker.
                    let b = self.batches.get_mut(&p.input.batch_id).expect("checked");
                    let mine = b.reg.pairs.first().and_then(|p| self.pairs.get(p)).map(|p| p.side.local_name.clone());
                    let dir =
                        if mine.as_deref() == Some(side.as_str()) { TransferType::Send } else { TransferType::Recv };
                    b.pending.push_front(PendingTransfer { seq: p.input.seq, dir, sem: None, epoch: None });
                }
                self.process(epoch, &p.input.batch_id);
            }
            Body::Deinit(()) => self.deinit(),
            Body::Init(()) => {
                if self.status == NodeStatus::Closed {
                    self.status = NodeStatus::Waiting;
                    tracing::info!(node = %self.cfg.node_id, "init: rejoining");
                }
                for b in self.batches.values_mut() {
                    b.exec = None;
                }
                let _ = self.send_identify();
            }
            Body::EpochEnded(Epoch::Root(epoch)) => self.epoch_ended(epoch),
            Body::Error(e) => self.remote_error(e),
            _ => {}
        }
    }

    fn process(&mut self, epoch: u64, batch: &str) {
        let Some(b) = self.batches.get_mut(batch) else { return };
        let Some(p) = b.pending.iter_mut().find(|p| p.epoch.is_none()) else { return };
        p.epoch = Some(epoch);
        let (dir, seq) = (p.dir, p.seq);
        // Every rank of both sides must still hold the batch (a peer's worker may have exited).
        match self.batch_complete(batch) {
            Ok(true) => {}
            Ok(false) => {
                self.report_error(
                    batch,
                    epoch,
                    "ConnectionError",
                    format!("batch {batch:?} lost a rank: a peer released it"),
                );
                return;
            }
            Err(m) => {
                self.report_error(batch, epoch, "ValueError", m);
                return;
            }
        }
        if dir == TransferType::Recv {
            // Same-host senders write into our worker's memory themselves; bytes from other
            // hosts arrive over TCP, and the receive is done when all of them are in.
            let expected = match self.remote_bytes(batch) {
                Ok(n) => n,
                Err(m) => return self.report_error(batch, epoch, "ValueError", m),
            };
            if expected == 0 {
                self.emit(batch, EventKind::Done, seq, Some(epoch), 0, 0.0, 0);
            } else {
                self.awaiting.insert(epoch, (batch.to_string(), seq, expected));
                self.check_received(epoch);
            }
            return;
        }
        let plan = match self.batches[batch].exec.clone() {
            Some(p) => Ok(p),
            None => self.build_exec(batch).map(Arc::new),
        };
        let plan = match plan {
            Ok(p) => p,
            Err(msg) => {
                self.report_error(batch, epoch, "ValueError", msg);
                return;
            }
        };
        let b = self.batches.get_mut(batch).expect("present");
        b.exec = Some(plan.clone());
        b.copying = true;
        self.status = NodeStatus::Running;
        let segments: Vec<Arc<ShmSegment>> = self.segments.values().cloned().collect();
        let job = CopyJob { batch: batch.to_string(), epoch, plan, segments };
        if self.copy_jobs.send(job).is_err() {
            self.report_error(batch, epoch, "TransferError", "the agent's copy thread is gone".into());
        }
    }

    /// Resolves this rank's share of the batch (as sender) into executable operations.
    fn build_exec(&mut self, batch: &str) -> Result<ExecPlan, String> {
        let reg = self.batches[batch].reg.clone();
        let bucket_size = reg.bucket_size.unwrap_or(tensorbus_planner::DEFAULT_BUCKET_SIZE);
        let mut out = ExecPlan { buckets: Vec::new(), bucket_size, links: Vec::new(), device: None };
        let dir = self.dir.clone();
        let segments = &mut self.segments;
        let gpus = &mut self.gpus;
        let key = self.cfg.secret.as_deref().map_or_else(Secret::none, Secret::new);
        // TCP streams per peer node on another host (opened once per plan, i.e. per batch).
        let mut streams: HashMap<String, Vec<usize>> = HashMap::new();
        let mut bucket_no = 0usize;
        for pair in Self::batch_pairs(&reg) {
            let p = &self.pairs[&pair];
            let (mine, theirs) =
                (directory::side(&dir, &pair, &p.side.local_name)?, directory::side(&dir, &pair, &p.side.remote_name)?);
            let their_layout =
                theirs.values().next().ok_or("peer side vanished")?.2.layout().map_err(|e| e.to_string())?;
            let plan = PairPlan::new(p.layout.clone(), their_layout).map_err(|e| format!("pair {pair}: {e}"))?;
            let metas = directory::pair_metas(&mine, &p.layout, p.side.world_size, batch, &pair)?;
            let bp = BatchPlan::build(&[&plan], &metas, reg.bucket_size, Scope::Rank(Side::Src, p.side.rank))
                .map_err(|e| e.to_string())?;
            let reduce_op = plan.src().partial_op();
            // Resolve every (rank, tensor) location once.
            let mut locs: HashMap<(bool, u32, u32), Loc> = HashMap::new();
            let mut resolve = |src_side: bool, rank: u32, k: u32| -> Result<Loc, String> {
                if let Some(l) = locs.get(&(src_side, rank, k)) {
                    return Ok(*l);
                }
                let side = if src_side { &mine } else { &theirs };
                let (id, ident, _) = side.get(&(rank as usize)).ok_or_else(|| format!("rank {rank} vanished"))?;
                let d = directory::tensors_on(ident, batch, &pair)
                    .and_then(|ts| ts.get(k as usize).cloned().cloned())
                    .ok_or_else(|| format!("{id} no longer holds batch {batch}"))?;
                let l = match &d.memory {
                    Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                        gpus.locate(&d.memory, d.nbytes).map_err(|e| format!("{id}: tensor {k}: {e}"))?.expect("device")
                    }
                    Memory::Shm { name, offset } => {
                        let seg = map_segment(segments, name)?;
                        if offset + d.nbytes > seg.len() as u64 {
                            return Err(format!("{id}: tensor {k} lies outside shared memory {name}"));
                        }
                        // SAFETY: offset checked against the mapping's length.
                        Loc::Local(unsafe { seg.as_ptr().add(*offset as usize) })
                    }
                    Memory::Cma { pid, addr } => Loc::Remote { pid: *pid, addr: *addr },
                };
                locs.insert((src_side, rank, k), l);
                Ok(l)
            };
            for bucket in bp.buckets() {
                let mut ops = Vec::new();
                let (dst_id, dst_ident, _) = theirs
                    .get(&(bucket.dst_rank as usize))
                    .ok_or_else(|| format!("rank {} vanished", bucket.dst_rank))?;
                let link = if dst_ident.host != self.cfg.host_id {
                    let links = match streams.get(*dst_id) {
                        Some(l) => l.clone(),
                        None => {
                            let mut l = Vec::new();
                            for _ in 0..self.cfg.data_streams.max(1) {
                                let mut s = std::net::TcpStream::connect(&dst_ident.data_addr)
                                    .map_err(|e| format!("connecting to {dst_id} at {}: {e}", dst_ident.data_addr))?;
                                let _ = s.set_nodelay(true);
                                tcp::handshake(&mut s, &key, false).map_err(|e| format!("{dst_id}: {e}"))?;
                                out.links.push(std::sync::Mutex::new(s));
                                l.push(out.links.len() - 1);
                            }
                            streams.insert(dst_id.to_string(), l.clone());
                            l
                        }
                    };
                    bucket_no += 1;
                    Some(links[bucket_no % links.len()])
                } else {
                    None
                };
                for ch in bp.chunks(bucket) {
                    let contributors = plan.contributors(ch.src_rank as usize);
                    if let Some(link) = link {
                        let key: std::sync::Arc<str> = format!("{batch}\0{pair}\0{}", ch.tensor).into();
                        if let (Some(op), true) = (reduce_op, contributors.len() > 1) {
                            // Reduce here, from contributors on this host, then send the result.
                            let dtype = bp.tensors[ch.tensor as usize].meta.dtype;
                            if !reduce::supported(dtype) {
                                return Err(format!("Partial reduction of {dtype} is not supported"));
                            }
                            for &r in &contributors {
                                if mine.get(&(r as usize)).is_some_and(|(_, i, _)| i.host != self.cfg.host_id) {
                                    return Err(format!(
                                        "pair {pair}: Partial contributors on other hosts than their reducer are not supported yet"
                                    ));
                                }
                            }
                            let srcs: Vec<Loc> =
                                contributors.iter().map(|&r| resolve(true, r, ch.tensor)).collect::<Result<_, _>>()?;
                            for (so, doff, len) in ch.runs() {
                                ops.push(Op::ReduceSend {
                                    link,
                                    key: key.clone(),
                                    offset: doff,
                                    srcs: srcs.iter().map(|s| s.offset(so)).collect(),
                                    len,
                                    dtype,
                                    op,
                                });
                            }
                            continue;
                        }
                        let src = resolve(true, ch.src_rank, ch.tensor)?;
                        for (so, doff, len) in ch.runs() {
                            ops.push(Op::Send { link, key: key.clone(), offset: doff, src: src.offset(so), len });
                        }
                        continue;
                    }
                    let dst = resolve(false, ch.dst_rank, ch.tensor)?;
                    let dtype = bp.tensors[ch.tensor as usize].meta.dtype;
                    let srcs: Vec<Loc> =
                        contributors.iter().map(|&r| resolve(true, r, ch.tensor)).collect::<Result<_, _>>()?;
                    for (so, doff, len) in ch.runs() {
                        match (reduce_op, srcs.len()) {
                            (Some(op), n) if n > 1 => {
                                if !reduce::supported(dtype) {
                                    return Err(format!("Partial reduction of {dtype} is not supported"));
                                }
                                ops.push(Op::Reduce {
                                    srcs: srcs.iter().map(|s| s.offset(so)).collect(),
                                    dst: dst.offset(doff),
                                    len,
                                    dtype,
                                    op,
                                })
                            }
                            _ => ops.push(Op::Copy { src: srcs[0].offset(so), dst: dst.offset(doff), len }),
                        }
                    }
                }
                out.buckets.push(ops);
            }
        }
        out.device = self.gpus.engine();
        Ok(out)
    }

    /// Publishes this worker's tensors of `batch` as destinations for agents on other hosts.
    fn publish_targets(&mut self, batch: &str) -> Result<(), String> {
        let reg = self.batches[batch].reg.clone();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut new = Vec::new();
        for (pair, d) in reg.pairs.iter().zip(&reg.tensors) {
            let k = index.entry(pair).or_default();
            let (loc, seg) = match &d.memory {
                Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                    (self.gpus.locate(&d.memory, d.nbytes)?.expect("device"), None)
                }
                Memory::Shm { name, offset } => {
                    let seg = self.map_segment(name)?;
                    // SAFETY: the registration checked offset + nbytes against the mapping.
                    (Loc::Local(unsafe { seg.as_ptr().add(*offset as usize) }), Some(seg))
                }
                Memory::Cma { pid, addr } => (Loc::Remote { pid: *pid, addr: *addr }, None),
            };
            let dev = if matches!(loc, Loc::Device(_)) { self.gpus.engine() } else { None };
            new.push((format!("{batch}\0{pair}\0{k}"), Target { loc, nbytes: d.nbytes, dev, _segment: seg }));
            *k += 1;
        }
        self.targets.write().unwrap().extend(new);
        Ok(())
    }

    /// Bytes this rank receives per epoch of `batch` from senders on other hosts.
    fn remote_bytes(&mut self, batch: &str) -> Result<u64, String> {
        if let Some(n) = self.batches[batch].remote_bytes {
            return Ok(n);
        }
        let reg = &self.batches[batch].reg;
        let mut total = 0;
        for pair in Self::batch_pairs(reg) {
            let p = &self.pairs[&pair];
            let theirs = directory::side(&self.dir, &pair, &p.side.remote_name)?;
            let mine = directory::side(&self.dir, &pair, &p.side.local_name)?;
            let src = theirs.values().next().ok_or("peer side vanished")?.2.layout().map_err(|e| e.to_string())?;
            let plan = PairPlan::new(src, p.layout.clone()).map_err(|e| format!("pair {pair}: {e}"))?;
            let metas = directory::pair_metas(&mine, &p.layout, p.side.world_size, batch, &pair)?;
            let bp = BatchPlan::build(&[&plan], &metas, reg.bucket_size, Scope::Rank(Side::Dst, p.side.rank))
                .map_err(|e| e.to_string())?;
            for b in bp.buckets() {
                if theirs.get(&(b.src_rank as usize)).is_some_and(|(_, i, _)| i.host != self.cfg.host_id) {
                    total += b.bytes;
                }
            }
        }
        self.batches.get_mut(batch).expect("present").remote_bytes = Some(total);
        Ok(total)
    }

    fn data_event(&mut self, ev: DataEvent) {
        match ev {
            DataEvent::Received { epoch, bytes } => {
                *self.received.entry(epoch).or_default() += bytes;
                self.check_received(epoch);
            }
            DataEvent::Failed { key, epoch, message } => {
                let batch = key.split('\0').next().unwrap_or_default().to_string();
                self.report_error(&batch, epoch, "TransferError", message);
            }
        }
    }

    /// Completes a receive once every byte from other hosts has arrived.
    fn check_received(&mut self, epoch: u64) {
        let Some((batch, seq, expected)) = self.awaiting.get(&epoch).cloned() else { return };
        let got = self.received.get(&epoch).copied().unwrap_or(0);
        if got >= expected {
            self.awaiting.remove(&epoch);
            self.received.remove(&epoch);
            self.emit(&batch, EventKind::Done, seq, Some(epoch), got, 0.0, 0);
        }
    }

    fn copy_finished(&mut self, done: CopyDone) {
        let Some(b) = self.batches.get_mut(&done.batch) else { return };
        b.copying = false;
        self.status = NodeStatus::Ready;
        let seq = b.pending.iter().find(|p| p.epoch == Some(done.epoch)).map(|p| p.seq);
        match done.result {
            Ok((bytes, checksum)) => {
                let gbps = bytes as f64 / done.seconds.max(1e-9) / 1e9;
                tracing::info!(node = %self.cfg.node_id, batch = %done.batch, epoch = done.epoch, bytes, seconds = done.seconds, gbps, checksum, "copied");
                if let Some(seq) = seq {
                    self.emit(&done.batch, EventKind::Done, seq, Some(done.epoch), bytes, done.seconds, checksum);
                }
            }
            Err(msg) => self.report_error(&done.batch, done.epoch, "TransferError", msg),
        }
    }

    fn report_error(&mut self, batch: &str, epoch: u64, err_type: &str, msg: String) {
        tracing::error!(node = %self.cfg.node_id, batch, epoch, "{msg}");
        let v = ErrorValue {
            err_type: err_type.into(),
            err_args: vec![serde_json::Value::String(msg), serde_json::json!({"origin": self.cfg.node_id})],
            traceback: None,
            batch_id: Some(batch.to_string()),
            epoch: Some(Epoch::Root(epoch)),
        };
        let _ = self.send(Body::Error(v));
    }

    fn epoch_ended(&mut self, epoch: u64) {
        if let Some((batch, seq)) = self.epochs.remove(&epoch) {
            if let Some(b) = self.batches.get_mut(&batch) {
                b.ended = b.ended.max(seq + 1);
                let ended = b.ended;
                let (done, keep): (Vec<_>, Vec<_>) = b.waits.drain(..).partition(|(n, _)| *n < ended);
                b.waits = keep;
                for (_, sem) in done {
                    self.complete(sem.as_deref(), CommandResult::value(true));
                }
            }
        }
        let mut hit = None;
        for (id, b) in self.batches.iter_mut() {
            if let Some(i) = b.pending.iter().position(|p| p.epoch == Some(epoch)) {
                let p = b.pending.remove(i).expect("present");
                b.signal = true;
                hit = Some((id.clone(), p));
                break;
            }
        }
        if let Some((id, p)) = hit {
            self.replies.store_signal(&id, true);
            let _ = self.state.put(&keys::epoch_ended(&id), &p.seq.to_le_bytes());
            self.complete(p.sem.as_deref(), CommandResult::ok());
        }
    }

    fn remote_error(&mut self, e: ErrorValue) {
        let Some(batch) = e.batch_id.clone() else { return };
        self.awaiting.retain(|_, (b, _, _)| *b != batch);
        let Some(b) = self.batches.get_mut(&batch) else { return };
        let origin = e
            .err_args
            .iter()
            .find_map(|a| a.get("origin").and_then(|o| o.as_str()).map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let message = e.err_args.first().and_then(|a| a.as_str()).unwrap_or("remote failure").to_string();
        let kind = match e.err_type.as_str() {
            "ValueError" => ErrorKind::ValueError,
            "ConnectionError" => ErrorKind::ConnectionError,
            "TimeoutError" => ErrorKind::TimeoutError,
            _ => ErrorKind::TransferError,
        };
        let err =
            RemoteError { kind, message: format!("transfer of batch {batch:?} failed on {origin}: {message}"), origin };
        // Fail the transfers of the failed epoch (or all armed ones when no epoch is named).
        let failed: Vec<PendingTransfer> = match &e.epoch {
            Some(Epoch::Root(ep)) => {
                let (f, keep): (Vec<_>, Vec<_>) =
                    b.pending.drain(..).partition(|p| p.epoch == Some(*ep) || p.epoch.is_none());
                b.pending = keep.into();
                f
            }
            _ => b.pending.drain(..).collect(),
        };
        for p in failed {
            self.complete(p.sem.as_deref(), CommandResult::err(err.clone()));
        }
    }
}

/// Maps a shared-memory segment once per agent lifetime.
fn map_segment(segments: &mut HashMap<String, Arc<ShmSegment>>, name: &str) -> Result<Arc<ShmSegment>, String> {
    if let Some(s) = segments.get(name) {
        return Ok(s.clone());
    }
    let s = Arc::new(ShmSegment::open(name).map_err(|e| e.to_string())?);
    segments.insert(name.to_string(), s.clone());
    Ok(s)
}

fn rmp_serde_head(bytes: &[u8]) -> Option<CommandHead> {
    tensorbus_protocol::host::decode_head(bytes).map(|(ty, semaphore_name)| CommandHead { ty, semaphore_name })
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// `endpoint` (`tcp://HOST:PORT` or `HOST:PORT`) with its host replaced by `advertise`.
fn advertised(endpoint: &str, advertise: Option<&str>) -> String {
    match (advertise, endpoint.rsplit_once(':')) {
        (Some(host), Some((head, port))) => {
            let scheme = if head.starts_with("tcp://") { "tcp://" } else { "" };
            format!("{scheme}{host}:{port}")
        }
        _ => endpoint.to_string(),
    }
}

/// This machine's hostname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}
