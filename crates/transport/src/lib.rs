//! # tensorbus-transport
//!
//! The data plane on one host: worker memory the agent can reach ([`shm`] segments mapped by name,
//! or another process's memory through cross-memory attach, [`cma`]), reductions of partial values
//! ([`reduce`]), the parallel executor of a rank's share of a batch plan ([`exec`]), and the
//! authenticated TCP links between agents on different hosts ([`tcp`]). With the `cuda` feature,
//! GPU memory too ([`cuda`]): CUDA IPC handoff and copies on the device's copy engines.

pub mod cma;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod exec;
pub mod reduce;
pub mod shm;
pub mod tcp;

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
    #[error("refused: {0}")]
    Refused(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A run of a plan that would reach outside the tensor it names.
    #[error("bytes [{offset}, {offset} + {len}) lie outside a tensor of {nbytes} bytes")]
    OutOfBounds { offset: u64, len: u64, nbytes: u64 },
}
