//! The worker-side client: `TensorBusClient` and `BatchHandler`, with the reference API's methods
//! and semantics. Each command gets its own named semaphore; the agent stores the command's result
//! in the state store before posting it. While waiting, the client watches the agent's heartbeat,
//! so a dead agent is reported within about a second, not at the timeout.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tensorbus_planner::Placement;
use tensorbus_protocol::host::{
    CleanupBatch, Command, CommandResult, InitPair, QueryStatus, RegisterTensors, Transfer, TransferType,
};
use tensorbus_protocol::payload::{Memory, MeshPayload, PlacementsPayload, TensorDesc};

use crate::keys::{self, Heartbeat};
use crate::sem::Semaphore;
use crate::session::{self, ClientSession};
use crate::store::{CommandQueue, StateStore};
use crate::{bootstrap, HostError, HEARTBEAT_STALE};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A semaphore name unique to this process and call: `/tb-{command_type}-{context_id}-{pid}-{n}`.
pub fn generate_semaphore_name(command_type: &str, context_id: &str) -> String {
    let clean = |s: &str, max: usize| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).take(max).collect()
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/tb-{}-{}-{}-{n}", clean(command_type, 32), clean(context_id, 160), std::process::id())
}

struct Inner {
    agent_rank: usize,
    queue: CommandQueue,
    state: StateStore,
    /// Semaphores of completed commands, reused (creating and unlinking one per command costs
    /// more than the rest of a round trip). Only semaphores whose post was consumed come back.
    pool: Mutex<Vec<Semaphore>>,
    last_alive: Mutex<Option<Instant>>,
    /// Proves to the agent which process registers memory; open as long as the client lives.
    session: ClientSession,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for s in self.pool.get_mut().unwrap().drain(..) {
            Semaphore::unlink(s.name());
        }
    }
}

impl Inner {
    /// Checks the agent's heartbeat: fresh and from a live process.
    fn check_alive(&self) -> Result<Heartbeat, HostError> {
        let hb = self
            .state
            .get(keys::HEARTBEAT)?
            .and_then(|b| Heartbeat::decode(&b))
            .ok_or_else(|| HostError::NoAgent(format!("agent {} has no heartbeat", self.agent_rank)))?;
        let age = keys::unix_now() - hb.time;
        let exists = crate::pid_alive(hb.pid);
        if !hb.alive || !exists || age > HEARTBEAT_STALE.as_secs_f64() {
            return Err(HostError::AgentDied {
                node_id: hb.node_id,
                pid: hb.pid,
                reason: if !hb.alive {
                    "it shut down".into()
                } else if !exists {
                    "its process is gone".into()
                } else {
                    format!("its heartbeat is {age:.1} s old")
                },
            });
        }
        Ok(hb)
    }

    /// Enqueues the command `build` makes for a completion semaphore's name.
    fn submit(
        self: &Arc<Self>,
        (kind, context): (&str, &str),
        build: impl FnOnce(String) -> Command,
        timeout: Duration,
    ) -> Result<Pending, HostError> {
        // Liveness is checked again while waiting; before sending, a recent check suffices.
        let mut last = self.last_alive.lock().unwrap();
        if last.is_none_or(|t| t.elapsed() > Duration::from_millis(50)) {
            self.check_alive()?;
            *last = Some(Instant::now());
        }
        drop(last);
        let pooled = self.pool.lock().unwrap().pop();
        let sem = match pooled {
            Some(s) => s,
            // The name holds our pid and a per-process counter, so one that exists already was
            // left by a dead process that had our pid: replace it.
            None => Semaphore::recreate(&generate_semaphore_name(kind, context), 0)?,
        };
        let cmd = build(sem.name().to_string());
        let what = format!("{} on agent {}", cmd.type_name(), self.agent_rank);
        self.queue.enqueue(&cmd.encode(), timeout)?;
        Ok(Pending { inner: self.clone(), sem: Some(sem), what, result: None, consumed: false })
    }
}

/// How long a waiting client spins before it sleeps on its semaphore: `TENSORBUS_SPIN_US`, 50 µs
/// by default, 0 to never spin.
///
/// Waking a thread that sleeps on another (virtual) CPU costs tens of microseconds — most of a
/// command's round trip. The worker is blocked on its command anyway; spinning briefly, yielding
/// the CPU on each turn so a thread sharing it still runs, sees a quick answer without that wake-up.
fn spin_budget() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("TENSORBUS_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// Takes the semaphore if it is posted within `budget`, without sleeping.
fn spin_for(sem: &Semaphore, budget: Duration) -> bool {
    let start = Instant::now();
    loop {
        if sem.try_wait() {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// How an agent reaches `nbytes` of this process's GPU memory at `ptr` — the allocation's IPC
/// handle, or exported file descriptors of virtual-memory pieces — and the descriptor's device
/// string (`cuda:N`).
#[cfg(feature = "cuda")]
pub fn cuda_memory(ptr: u64, nbytes: u64) -> Result<(Memory, String), HostError> {
    use tensorbus_protocol::payload::CudaPiece;
    use tensorbus_transport::cuda::{share, Shared};
    let m = match share(ptr, nbytes).map_err(|e| HostError::Gpu(e.to_string()))? {
        Shared::Ipc { device, handle, alloc_size, offset } => {
            Memory::CudaIpc { device, handle: handle.to_vec(), alloc_size, offset }
        }
        Shared::Fds { device, pieces, offset } => Memory::CudaFd {
            device,
            pid: std::process::id(),
            pieces: pieces.into_iter().map(|(fd, size)| CudaPiece { fd, size }).collect(),
            offset,
        },
    };
    let device = format!("cuda:{}", m.cuda_device().unwrap_or(0));
    Ok((m, device))
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_memory(_ptr: u64, _nbytes: u64) -> Result<(Memory, String), HostError> {
    Err(HostError::Gpu("this build of tensorbus has no GPU support (the `cuda` feature)".into()))
}

/// A command in flight: wait on it now or later. Like the reference's semaphore, it can be waited
/// on with a timeout; unlike it, waiting also reports the command's outcome.
pub struct Pending {
    inner: Arc<Inner>,
    sem: Option<Semaphore>,
    what: String,
    result: Option<CommandResult>,
    /// The agent's post was taken: the semaphore is back at 0 and may be reused.
    consumed: bool,
}

impl Pending {
    /// The semaphore's name (what the agent posts).
    pub fn name(&self) -> &str {
        self.sem.as_ref().expect("present until drop").name()
    }

    /// Waits up to `timeout` for the command; returns its result value, or its error.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<bool>, HostError> {
        if let Some(r) = &self.result {
            return match &r.error {
                Some(e) => Err(HostError::Remote(e.clone())),
                None => Ok(r.value),
            };
        }
        let deadline = Instant::now() + timeout;
        let sem = self.sem.as_ref().expect("present until drop");
        if spin_for(sem, timeout.min(spin_budget())) {
            self.consumed = true;
        }
        while !self.consumed {
            let slice = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            if sem.wait_timeout(slice)? {
                self.consumed = true;
                break;
            }
            if Instant::now() >= deadline {
                return Err(HostError::Timeout { what: self.what.clone(), after: timeout });
            }
            self.inner.check_alive()?;
        }
        let key = keys::command_result(sem.name());
        let bytes = self.inner.state.get(&key)?.ok_or_else(|| {
            HostError::Protocol(tensorbus_protocol::ProtocolError::BadPayload(format!(
                "{}: no result stored",
                self.what
            )))
        })?;
        let r = CommandResult::decode(&bytes)?;
        let out = match &r.error {
            Some(e) => Err(HostError::Remote(e.clone())),
            None => Ok(r.value),
        };
        self.result = Some(r);
        out
    }

    /// True once the command completed (successfully or not) without blocking.
    pub fn is_done(&self) -> bool {
        self.result.is_some()
    }

    /// Posts the semaphore (as `posix_ipc`'s `release`). The semaphore is then never reused for
    /// another command.
    pub fn release(&mut self) -> Result<(), HostError> {
        self.consumed = false;
        self.sem.as_ref().expect("present until drop").post()
    }

    /// The semaphore's current count.
    pub fn value(&self) -> i32 {
        self.sem.as_ref().expect("present until drop").value()
    }

    /// Removes the semaphore's name now (it is never reused).
    pub fn unlink(&mut self) {
        self.consumed = false;
        Semaphore::unlink(self.name());
    }
}

/// The pid of the live agent whose state store is at `state_path`.
pub fn agent_pid_at(state_path: &Path) -> Result<u32, HostError> {
    let state = StateStore::open(state_path)?;
    let hb = state
        .get(keys::HEARTBEAT)?
        .and_then(|b| Heartbeat::decode(&b))
        .ok_or_else(|| HostError::NoAgent(format!("no agent heartbeat in {}", state_path.display())))?;
    if !hb.alive || !crate::pid_alive(hb.pid) {
        return Err(HostError::AgentDied { node_id: hb.node_id, pid: hb.pid, reason: "it is not running".into() });
    }
    Ok(hb.pid)
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(sem) = self.sem.take() else { return };
        let mut pool = self.inner.pool.lock().unwrap();
        if self.consumed && pool.len() < 16 {
            // Its result key is overwritten by the next command that uses it.
            pool.push(sem);
        } else {
            // A post may still come (or came and was not taken): never reuse this one.
            let _ = self.inner.state.delete(&keys::command_result(sem.name()));
            Semaphore::unlink(sem.name());
        }
    }
}

/// A worker's connection to its agent.
pub struct TensorBusClient {
    inner: Arc<Inner>,
    pub agent_rank: usize,
}

impl TensorBusClient {
    /// Connects to agent `agent_rank` (default paths unless given), waiting up to
    /// `connection_timeout` for it to be alive.
    pub fn new(
        agent_rank: usize,
        command_queue_path: Option<&Path>,
        state_path: Option<&Path>,
        connection_timeout: Duration,
    ) -> Result<Self, HostError> {
        let qp = command_queue_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| bootstrap::default_command_queue_path(agent_rank));
        let sp = state_path.map(Path::to_path_buf).unwrap_or_else(|| bootstrap::default_state_path(agent_rank));
        let deadline = Instant::now() + connection_timeout;
        loop {
            let attempt = (|| {
                let queue = CommandQueue::open(&qp)?;
                let state = StateStore::open(&sp)?;
                let session = session::connect(&session::socket_path(&qp), connection_timeout)?;
                let inner = Inner {
                    agent_rank,
                    queue,
                    state,
                    pool: Mutex::new(Vec::new()),
                    last_alive: Mutex::new(None),
                    session,
                };
                inner.check_alive()?;
                Ok::<_, HostError>(inner)
            })();
            match attempt {
                Ok(inner) => return Ok(TensorBusClient { inner: Arc::new(inner), agent_rank }),
                Err(e) if Instant::now() >= deadline => {
                    return Err(HostError::NoAgent(format!(
                        "no live agent {agent_rank} at {} after {:.1} s: {e}",
                        qp.display(),
                        connection_timeout.as_secs_f64()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The token of this client's session (tensor payloads carry it; see [`crate::session`]).
    pub fn session_token(&self) -> &str {
        &self.inner.session.token
    }

    /// The agent's pid (for [`bootstrap::setup_ptrace`]).
    pub fn agent_pid(&self) -> Result<u32, HostError> {
        Ok(self.inner.check_alive()?.pid)
    }

    fn run(
        &self,
        kind: (&str, &str),
        cmd: impl FnOnce(String) -> Command,
        blocking: bool,
        timeout: Duration,
    ) -> Result<Pending, HostError> {
        let mut p = self.inner.submit(kind, cmd, timeout)?;
        if blocking {
            p.wait(timeout)?;
        }
        Ok(p)
    }

    /// Registers this rank for a pair and (when blocking) waits until every rank of both sides
    /// has, and the pair is matched. `mesh` is this side's mesh shape and this worker's rank in it.
    #[allow(clippy::too_many_arguments)]
    pub fn init_pair(
        &self,
        pair_name: &str,
        local_name: &str,
        remote_name: &str,
        expected_world_size: usize,
        mesh: Option<(Vec<usize>, usize)>,
        placements: Option<&[Placement]>,
        blocking: bool,
        timeout: Duration,
    ) -> Result<Pending, HostError> {
        let kind = ("InitPair", pair_name);
        let cmd = move |sem: String| {
            Command::InitPair(InitPair {
                pair_name: pair_name.into(),
                local_name: local_name.into(),
                remote_name: remote_name.into(),
                expected_world_size: expected_world_size as u64,
                mesh_shape_payload: mesh.map(|(s, r)| MeshPayload::new(s, r).encode().into()),
                placements_payload: placements.map(|p| PlacementsPayload::new(p).encode().into()),
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        self.run(kind, cmd, blocking, timeout)
    }

    /// Registers tensors (local shards) across pairs under `batch_id`; blocks until both sides have
    /// registered the batch and their shapes and dtypes agree.
    pub fn register_tensors(
        &self,
        batch_id: &str,
        tensors: &[(TensorDesc, &str)],
        bucket_size: Option<u64>,
        timeout: Duration,
    ) -> Result<BatchHandler, HostError> {
        let kind = ("RegisterTensors", batch_id);
        let (token, pid) = (self.inner.session.token.clone(), self.inner.session.pid);
        let cmd = move |sem: String| {
            Command::RegisterTensors(RegisterTensors {
                batch_id: batch_id.into(),
                tensors: tensors
                    .iter()
                    .map(|(d, p)| {
                        let mut d = d.clone();
                        // The agent may see this process under another pid (another pid
                        // namespace): name ourselves as its kernel does.
                        let me = std::process::id();
                        match &mut d.memory {
                            Memory::Cma { pid: p, .. } | Memory::CudaFd { pid: p, .. } | Memory::Fd { pid: p, .. }
                                if *p == me =>
                            {
                                *p = pid
                            }
                            _ => {}
                        }
                        if d.pid.is_none_or(|p| p == me) {
                            d.pid = Some(pid);
                        }
                        d.session.get_or_insert_with(|| token.clone());
                        (p.to_string(), d.encode().into())
                    })
                    .collect(),
                bucket_size,
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        self.run(kind, cmd, true, timeout)?;
        let mut pair_names: Vec<String> = tensors.iter().map(|(_, p)| p.to_string()).collect();
        pair_names.dedup();
        Ok(BatchHandler {
            client: TensorBusClient { inner: self.inner.clone(), agent_rank: self.agent_rank },
            batch_id: batch_id.into(),
            pair_names,
        })
    }

    /// Sends or receives every tensor of the batch. Non-blocking by default: wait on the result.
    pub fn transfer(
        &self,
        batch_id: &str,
        transfer_type: TransferType,
        blocking: bool,
        timeout: Duration,
    ) -> Result<Pending, HostError> {
        let kind = ("Transfer", batch_id);
        let cmd = move |sem: String| {
            Command::Transfer(Transfer {
                batch_id: batch_id.into(),
                transfer_type,
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        self.run(kind, cmd, blocking, timeout)
    }

    /// Whether the sending side has finished its latest transfer of the batch.
    pub fn query_transfer_signal(&self, batch_id: &str, timeout: Duration) -> Result<bool, HostError> {
        let kind = ("QueryStatus", batch_id);
        let cmd = move |sem: String| {
            Command::QueryStatus(QueryStatus {
                batch_id: batch_id.into(),
                state_name: "transfer_signal".into(),
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        let mut p = self.run(kind, cmd, true, timeout)?;
        Ok(p.wait(timeout)?.unwrap_or(false))
    }

    /// Blocks until epoch `n` (0-based, counting every transfer of the batch, worker- or
    /// controller-driven) has ended on every agent taking part, on both sides.
    pub fn wait_epoch(&self, batch_id: &str, n: u64, timeout: Duration) -> Result<(), HostError> {
        let kind = ("QueryStatus", batch_id);
        let cmd = move |sem: String| {
            Command::QueryStatus(QueryStatus {
                batch_id: batch_id.into(),
                state_name: format!("epoch_ended:{n}"),
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        self.run(kind, cmd, true, timeout).map(|_| ())
    }

    /// Releases everything the agent holds for the batch; the id becomes reusable.
    pub fn cleanup_batch(&self, batch_id: &str, timeout: Duration) -> Result<(), HostError> {
        let kind = ("CleanupBatch", batch_id);
        let cmd = move |sem: String| {
            Command::CleanupBatch(CleanupBatch {
                batch_id: batch_id.into(),
                timestamp: Some(keys::unix_now()),
                semaphore_name: Some(sem),
            })
        };
        self.run(kind, cmd, true, timeout).map(|_| ())
    }

    /// Sends raw bytes as a command whose completion will be posted on `semaphore_name` (for
    /// tools and tests of malformed input).
    pub fn submit_raw(&self, bytes: &[u8], semaphore_name: &str, timeout: Duration) -> Result<Pending, HostError> {
        self.inner.check_alive()?;
        let sem = Semaphore::create(semaphore_name, 0)?;
        self.inner.queue.enqueue(bytes, timeout)?;
        Ok(Pending {
            inner: self.inner.clone(),
            sem: Some(sem),
            what: "raw command".into(),
            result: None,
            consumed: false,
        })
    }

    /// Closes the connection (the agent keeps running).
    pub fn close(self) {}
}

/// A registered batch: transfer it repeatedly, query it, release it.
pub struct BatchHandler {
    client: TensorBusClient,
    pub batch_id: String,
    pub pair_names: Vec<String>,
}

impl BatchHandler {
    pub fn transfer(
        &self,
        transfer_type: TransferType,
        blocking: bool,
        timeout: Duration,
    ) -> Result<Pending, HostError> {
        self.client.transfer(&self.batch_id, transfer_type, blocking, timeout)
    }

    pub fn query_transfer_signal(&self, timeout: Duration) -> Result<bool, HostError> {
        self.client.query_transfer_signal(&self.batch_id, timeout)
    }

    /// Blocks until epoch `n` of this batch has ended everywhere.
    pub fn wait_epoch(&self, n: u64, timeout: Duration) -> Result<(), HostError> {
        self.client.wait_epoch(&self.batch_id, n, timeout)
    }

    pub fn close(self, timeout: Duration) -> Result<(), HostError> {
        self.client.cleanup_batch(&self.batch_id, timeout)
    }
}
