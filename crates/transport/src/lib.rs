//! # tensorbus-transport
//!
//! The data plane on one host: worker memory the agent can reach ([`shm`] segments mapped by name,
//! or another process's memory through cross-memory attach, [`cma`]), reductions of partial values
//! ([`reduce`]), and the parallel executor of a rank's share of a batch plan ([`exec`]).

pub mod cma;
pub mod exec;
pub mod reduce;
pub mod shm;

/// Why a data-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid shared-memory name {0:?}")]
    BadName(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("memory not accessible: {0}")]
    NoSuchMemory(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}
