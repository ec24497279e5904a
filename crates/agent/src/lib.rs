//! # tensorbus-agent
//!
//! The agent: one daemon per rank. It owns its worker's command queue and state store, speaks the
//! control protocol with the command node, and executes transfers directly against workers' memory.
//!
//! Threads: the *queue thread* blocks on the command queue's semaphore, answers status queries
//! itself and hands every other command to the main loop over an in-process ZeroMQ socket; the *heartbeat thread* rewrites the heartbeat in
//! the state store; the *main loop* waits (zmq poll, no busy loop) on commands, control messages
//! and finished copies; *copy threads* run a rank's share of an epoch.

mod agent;
mod commands;
mod directory;
mod gpu;

pub use agent::{hostname, run, AgentConfig};

/// Why an agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("another agent is already running on {path} (pid {pid}); stop it or use other paths")]
    AlreadyRunning { path: String, pid: String },
    #[error(transparent)]
    Host(#[from] tensorbus_host::HostError),
    #[error("ZeroMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}
