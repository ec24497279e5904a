//! # tensorbus-host
//!
//! The host side of tensorbus: everything a worker and its agent share on one machine.
//! - [`store`]: the LMDB command queue (bounded, many producers, one consumer; the consumer waits
//!   on a POSIX semaphore, never polls) and the state store (states, per-command results,
//!   heartbeat);
//! - [`sem`]: POSIX named semaphores;
//! - [`session`]: the Unix-socket session that proves to the agent which process registers memory;
//! - [`bootstrap`]: finding one's agent from the launch environment, and `setup_ptrace`;
//! - [`client`]: `TensorBusClient` and `BatchHandler`, the worker API.

pub mod bootstrap;
pub mod client;
pub mod keys;
pub mod sem;
pub mod session;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use tensorbus_protocol::host::{ErrorKind, RemoteError};

/// How often the agent rewrites its heartbeat.
/// Whether process `pid` exists (it may belong to another user). Pids that are not ordinary
/// process ids (0, or beyond `pid_t`) count as alive: nothing is judged dead by mistake.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A heartbeat older than this means the agent is gone.
pub const HEARTBEAT_STALE: Duration = Duration::from_millis(1000);

/// Everything that can go wrong between a worker and its agent.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no agent: {0}")]
    NoAgent(String),
    #[error("agent {node_id} (pid {pid}) is dead: {reason}")]
    AgentDied { node_id: String, pid: u32, reason: String },
    #[error("{what} timed out after {:.1} s", after.as_secs_f64())]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Remote(RemoteError),
    #[error("command queue full ({capacity} commands) for {:.1} s: the agent is not keeping up", waited.as_secs_f64())]
    QueueFull { capacity: u64, waited: Duration },
    #[error("semaphore {name}: {source}")]
    Semaphore { name: String, source: std::io::Error },
    #[error("invalid semaphore name {0:?}")]
    BadSemaphoreName(String),
    #[error("LMDB {}: {message}", path.display())]
    Lmdb { path: PathBuf, message: String },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// GPU memory that cannot be shared with the agent (or a build without GPU support).
    #[error("{0}")]
    Gpu(String),
    #[error(transparent)]
    Protocol(#[from] tensorbus_protocol::ProtocolError),
}

impl HostError {
    /// Which Python exception this becomes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HostError::NoAgent(_) | HostError::AgentDied { .. } => ErrorKind::ConnectionError,
            HostError::Timeout { .. } | HostError::QueueFull { .. } => ErrorKind::TimeoutError,
            HostError::Remote(e) => e.kind,
            HostError::Bootstrap(_) | HostError::BadSemaphoreName(_) | HostError::Protocol(_) | HostError::Gpu(_) => {
                ErrorKind::ValueError
            }
            HostError::Semaphore { .. } | HostError::Lmdb { .. } => ErrorKind::ConnectionError,
        }
    }
}
