//! The agent's event loop and its pair / batch bookkeeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tensorbus_host::keys::{self, Heartbeat};
use tensorbus_host::session::{self, Session, Sessions};
use tensorbus_host::store::{CommandQueue, StateStore};
use tensorbus_host::HEARTBEAT_INTERVAL;
use tensorbus_planner::{BatchPlan, DType, Layout, PairPlan, Placement, Scope, Side, TensorMeta};
use tensorbus_protocol::control::{
    AnnounceValue, BatchReg, Body, Epoch, ErrorValue, Event, EventKind, EventValue, IdentifyValue, Message, NodeStatus,
    PROTOCOL_VERSION,
};
use tensorbus_protocol::host::{Command, CommandResult, ErrorKind, RemoteError, TransferType};
use tensorbus_protocol::payload::{Memory, MeshPayload, PairSide, PlacementsPayload, TensorDesc};
use tensorbus_transport::exec::{self, ExecPlan, Loc, Op, Region};
use tensorbus_transport::shm::ShmSegment;
use tensorbus_transport::tcp::{self, Secret};
use tensorbus_transport::{cma, reduce};

mod data;
mod epochs;

use data::{serve_data, DataEvent, Target};
use epochs::{copier, CopyDone, CopyJob};

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
    /// The session of the worker that registered the batch: when it closes, the worker is gone.
    owner: Option<Arc<Session>>,
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
    /// Workers' sessions: who registers memory, as the kernel saw them connect.
    sessions: Arc<Sessions>,
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
    use std::os::unix::fs::OpenOptionsExt;
    let mut path = cfg.command_queue_path.as_os_str().to_owned();
    path.push(".pid");
    let path = PathBuf::from(path);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AgentError::Io { what: format!("open {}", path.display()), source: e })?;
    // Private like the queue: it names the agent's pid.
    let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
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
    let sessions = Sessions::serve(&session::socket_path(&cfg.command_queue_path))?;
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
        sessions,
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
        // A closed session is the surest sign (a zombie still answers `kill(pid, 0)`).
        let gone: Vec<(String, u32)> = self
            .batches
            .iter()
            .filter_map(|(id, b)| {
                if let Some(s) = b.owner.as_ref().filter(|s| !s.is_open()) {
                    return Some((id.clone(), s.pid));
                }
                b.reg
                    .tensors
                    .iter()
                    .filter_map(|t| t.pid)
                    .find(|&pid| !tensorbus_host::pid_alive(pid))
                    .map(|pid| (id.clone(), pid))
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

    /// The session a tensor's payload names, which must be open here and the same for the
    /// whole batch.
    fn owner_of(&self, i: usize, d: &TensorDesc, owner: &mut Option<Arc<Session>>) -> Result<(), String> {
        let Some(token) = d.session.as_deref() else {
            if matches!(d.memory, Memory::CudaIpc { .. }) {
                return Ok(()); // the IPC handle itself is the capability
            }
            return Err(format!(
                "tensor {i}: session: none given; open a session on {} first (docs/protocol.md, Sessions): \
                 the agent touches only memory of the process that registers it",
                self.sessions.path().display()
            ));
        };
        let s = self.sessions.get(token).ok_or_else(|| {
            format!("tensor {i}: session: no open session has this token (closed, or issued by another agent)")
        })?;
        match owner {
            Some(o) if !Arc::ptr_eq(o, &s) => {
                Err(format!("tensor {i}: session: differs from tensor 0's; one process registers a batch"))
            }
            Some(_) => Ok(()),
            None => {
                *owner = Some(s);
                Ok(())
            }
        }
    }

    /// Checks that a worker's tensor memory exists, is large enough, and is the registering
    /// process's own (`owner`: its session, the kernel's word for its pid).
    /// `held`: segments already found in the owner's mappings during this registration (a
    /// process's maps can be long; a batch has many tensors in few segments).
    fn check_memory(
        &mut self,
        i: usize,
        d: &TensorDesc,
        owner: Option<&Session>,
        held: &mut std::collections::HashSet<String>,
    ) -> Result<(), String> {
        let not_yours = |field: &str, pid: u32, q: u32| {
            format!(
                "tensor {i}: {field}: pid {pid} is not the registering process (pid {q}); \
                 the agent reads and writes only memory of the worker that registers it"
            )
        };
        if let (Some(o), Some(pid)) = (owner, d.pid) {
            if pid != o.pid {
                return Err(not_yours("pid", pid, o.pid));
            }
        }
        match &d.memory {
            Memory::CudaIpc { .. } | Memory::CudaFd { .. } => {
                if let (Memory::CudaFd { pid, .. }, Some(o)) = (&d.memory, owner) {
                    if *pid != o.pid {
                        return Err(not_yours("memory.pid", *pid, o.pid));
                    }
                }
                self.gpus.locate(&d.memory, d.nbytes).map_err(|e| format!("tensor {i}: {e}"))?;
            }
            Memory::Shm { name, offset } => {
                let seg = self.map_segment(name)?;
                let end = offset.checked_add(d.nbytes).filter(|&e| e <= seg.len() as u64);
                if end.is_none() {
                    return Err(format!(
                        "tensor {i}: memory.offset: bytes [{offset}, {offset} + {}) lie outside shared memory {name} of {} bytes",
                        d.nbytes,
                        seg.len()
                    ));
                }
                let o = owner.expect("shm needs a session");
                if held.contains(name) {
                    return Ok(());
                }
                if !cma::holds_file(o.pid, seg.file_id()).map_err(|e| format!("tensor {i}: memory.name: {e}"))? {
                    return Err(format!(
                        "tensor {i}: memory.name: the registering process (pid {}) has not mapped or opened {name}; \
                         the agent touches only memory its worker holds",
                        o.pid
                    ));
                }
                held.insert(name.clone());
            }
            Memory::Fd { pid, .. } => {
                let o = owner.expect("fd needs a session");
                if *pid != o.pid {
                    return Err(not_yours("memory.pid", *pid, o.pid));
                }
                // Taken from the session's own process: the kernel's word that it holds it.
                let (seg, offset) =
                    map_memory(&mut self.segments, &d.memory).map_err(|e| format!("tensor {i}: {e}"))?.expect("mapped");
                shm_loc(&seg, offset, d.nbytes).map_err(|e| format!("tensor {i}: memory.offset: {e}"))?;
            }
            Memory::Cma { pid, addr } => {
                let o = owner.expect("cma needs a session");
                if *pid != o.pid {
                    return Err(not_yours("memory.pid", *pid, o.pid));
                }
                if d.nbytes > 0 {
                    let mut b = [0u8; 1];
                    // validate() checked that addr + nbytes does not wrap.
                    for at in [*addr, *addr + (d.nbytes - 1)] {
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
        let mut owner: Option<Arc<Session>> = None;
        let mut held = std::collections::HashSet::new();
        for (i, (pair, payload)) in c.tensors.iter().enumerate() {
            let p = self
                .pairs
                .get(pair)
                .ok_or_else(|| bad(format!("tensor {i}: unknown pair {pair:?}; call InitPair first")))?;
            if !p.matched {
                return Err(bad(format!("tensor {i}: pair {pair:?} is not matched yet")));
            }
            let mut d = TensorDesc::decode(payload).map_err(|e| bad(format!("tensor {i}: {e}")))?;
            d.validate().map_err(|e| bad(format!("tensor {i}: {e}")))?;
            p.layout.check_ndim(d.shape.len()).map_err(|e| bad(format!("tensor {i}: {e}")))?;
            self.owner_of(i, &d, &mut owner).map_err(bad)?;
            self.check_memory(i, &d, owner.as_deref(), &mut held).map_err(bad)?;
            // Peers learn the owner's pid, never its token.
            d.session = None;
            if let Some(o) = &owner {
                d.pid = Some(o.pid);
            }
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
                owner,
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
            // Named by side, in one order on both sides: each side reads the same message.
            let (l, r) = (&p.side.local_name, &p.side.remote_name);
            for (a, b) in metas[0].iter().zip(&metas[1]) {
                let ((na, a), (nb, b)) = if l <= r { ((l, a), (r, b)) } else { ((r, b), (l, a)) };
                if a.shape != b.shape {
                    return Err(format!(
                        "tensor {}: global shapes differ between the sides: {na} {:?}, {nb} {:?}",
                        a.name, a.shape, b.shape
                    ));
                }
                if a.dtype != b.dtype {
                    return Err(format!(
                        "tensor {}: dtypes differ between the sides: {na} {}, {nb} {}",
                        a.name, a.dtype, b.dtype
                    ));
                }
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
            used.extend(b.reg.tensors.iter().filter_map(|t| segment_key(&t.memory)));
        }
        // Peers' segments that built plans point into.
        for (id, b) in &self.batches {
            if b.exec.is_some() {
                for ident in self.dir.nodes.values() {
                    if let Some(r) = ident.batches.get(id) {
                        used.extend(r.tensors.iter().filter_map(|t| segment_key(&t.memory)));
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

/// The cache key of host memory the agent maps: the shared-memory name, or `fd:{pid}:{fd}`.
fn segment_key(m: &Memory) -> Option<String> {
    match m {
        Memory::Shm { name, .. } => Some(name.clone()),
        Memory::Fd { pid, fd, .. } => Some(format!("fd:{pid}:{fd}")),
        Memory::Cma { .. } | Memory::CudaIpc { .. } | Memory::CudaFd { .. } => None,
    }
}

/// Maps (once, then from the cache) the segment `m` lies in, with the tensor's offset in it;
/// `None` for memory that is not mapped here (cross-memory attach, GPU memory). A descriptor is
/// taken from its process each time, so a cached mapping is reused only while that descriptor
/// still names the same object.
fn map_memory(
    segments: &mut HashMap<String, Arc<ShmSegment>>,
    m: &Memory,
) -> Result<Option<(Arc<ShmSegment>, u64)>, String> {
    match m {
        Memory::Shm { name, offset } => Ok(Some((map_segment(segments, name)?, *offset))),
        Memory::Fd { pid, fd, size, offset } => {
            use std::os::unix::fs::MetadataExt;
            let key = format!("fd:{pid}:{fd}");
            let file = std::fs::File::from(cma::take_fd(*pid, *fd).map_err(|e| format!("memory.fd: {e}"))?);
            let meta = file.metadata().map_err(|e| format!("memory.fd: fstat: {e}"))?;
            if let Some(s) = segments.get(&key).filter(|s| s.file_id() == (meta.dev(), meta.ino())) {
                return Ok(Some((s.clone(), *offset)));
            }
            let seg = Arc::new(ShmSegment::from_fd(&key, file.into(), *size).map_err(|e| format!("memory.fd: {e}"))?);
            segments.insert(key, seg.clone());
            Ok(Some((seg, *offset)))
        }
        Memory::Cma { .. } | Memory::CudaIpc { .. } | Memory::CudaFd { .. } => Ok(None),
    }
}

/// Where `nbytes` at `offset` of a mapped segment start, if they lie inside it.
fn shm_loc(seg: &ShmSegment, offset: u64, nbytes: u64) -> Result<Loc, String> {
    if offset.checked_add(nbytes).is_none_or(|end| end > seg.len() as u64) {
        return Err(format!(
            "bytes [{offset}, {offset} + {nbytes}) lie outside shared memory {} of {} bytes",
            seg.name(),
            seg.len()
        ));
    }
    // SAFETY: offset + nbytes <= len, checked above, so the pointer stays inside the mapping.
    Ok(Loc::Local(unsafe { seg.as_ptr().add(offset as usize) }))
}

fn rmp_serde_head(bytes: &[u8]) -> Option<CommandHead> {
    tensorbus_protocol::host::decode_head(bytes).map(|(ty, semaphore_name)| CommandHead { ty, semaphore_name })
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
