//! # tensorbus-protocol
//!
//! The wire contracts of tensorbus, as data types with no I/O:
//! - [`host`]: the five host commands (worker → agent, msgpack, msgspec-compatible) and the
//!   structured per-command result the agent stores;
//! - [`payload`]: the versioned payloads inside host commands (mesh, placements, tensors);
//! - [`control`]: the control protocol between command node and agents (JSON envelopes over ZeroMQ);
//! - [`coordinator`]: the command node's state machine (membership, epochs, errors), sans-IO:
//!   messages and the time are passed in, messages to send come out.

pub mod control;
pub mod coordinator;
pub mod host;
pub mod payload;

/// Why a message or payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed host command: {0}")]
    BadCommand(String),
    #[error("malformed payload: {0}")]
    BadPayload(String),
    /// One field of a payload is out of range or inconsistent with the others.
    #[error("{field}: {why}")]
    BadField { field: String, why: String },
    #[error("malformed control message: {0}")]
    BadMessage(String),
    #[error(transparent)]
    Plan(#[from] tensorbus_planner::PlanError),
}
