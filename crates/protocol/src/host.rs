//! Host commands (worker → agent): msgpack maps tagged with `"type"`, laid out exactly like a
//! Python `msgspec.Struct(tag=True, kw_only=True)` subclass of Etha's `BaseCommand`: the tag, the
//! command's own fields in declaration order, then `timestamp` and `semaphore_name`.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ProtocolError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitPair {
    pub pair_name: String,
    pub local_name: String,
    pub remote_name: String,
    pub expected_world_size: u64,
    #[serde(default)]
    pub mesh_shape_payload: Option<ByteBuf>,
    #[serde(default)]
    pub placements_payload: Option<ByteBuf>,
    #[serde(default)]
    pub timestamp: Option<f64>,
    #[serde(default)]
    pub semaphore_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterTensors {
    pub batch_id: String,
    /// `(pair_name, tensor_payload)`.
    pub tensors: Vec<(String, ByteBuf)>,
    #[serde(default)]
    pub bucket_size: Option<u64>,
    #[serde(default)]
    pub timestamp: Option<f64>,
    #[serde(default)]
    pub semaphore_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub batch_id: String,
    pub transfer_type: TransferType,
    #[serde(default)]
    pub timestamp: Option<f64>,
    #[serde(default)]
    pub semaphore_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferType {
    Send,
    Recv,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryStatus {
    pub batch_id: String,
    pub state_name: String,
    #[serde(default)]
    pub timestamp: Option<f64>,
    #[serde(default)]
    pub semaphore_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanupBatch {
    pub batch_id: String,
    #[serde(default)]
    pub timestamp: Option<f64>,
    #[serde(default)]
    pub semaphore_name: Option<String>,
}

/// One host command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    InitPair(InitPair),
    RegisterTensors(RegisterTensors),
    Transfer(Transfer),
    QueryStatus(QueryStatus),
    CleanupBatch(CleanupBatch),
}

impl Command {
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::InitPair(_) => "InitPair",
            Command::RegisterTensors(_) => "RegisterTensors",
            Command::Transfer(_) => "Transfer",
            Command::QueryStatus(_) => "QueryStatus",
            Command::CleanupBatch(_) => "CleanupBatch",
        }
    }

    pub fn semaphore_name(&self) -> Option<&str> {
        match self {
            Command::InitPair(c) => c.semaphore_name.as_deref(),
            Command::RegisterTensors(c) => c.semaphore_name.as_deref(),
            Command::Transfer(c) => c.semaphore_name.as_deref(),
            Command::QueryStatus(c) => c.semaphore_name.as_deref(),
            Command::CleanupBatch(c) => c.semaphore_name.as_deref(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("commands always encode")
    }

    /// Decodes a command; unknown types and malformed maps are [`ProtocolError::BadCommand`].
    pub fn decode(bytes: &[u8]) -> Result<Command, ProtocolError> {
        rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::BadCommand(e.to_string()))
    }
}

/// The structured result an agent stores for a command before posting its semaphore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<RemoteError>,
    /// Command-specific value (e.g. the transfer signal for `QueryStatus`).
    #[serde(default)]
    pub value: Option<bool>,
}

impl CommandResult {
    pub fn ok() -> Self {
        CommandResult { ok: true, error: None, value: None }
    }

    pub fn value(v: bool) -> Self {
        CommandResult { ok: true, error: None, value: Some(v) }
    }

    pub fn err(e: RemoteError) -> Self {
        CommandResult { ok: false, error: Some(e), value: None }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("results always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::BadPayload(format!("command result: {e}")))
    }
}

/// The kind of a failure, chosen so that each maps to one Python exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bad input: malformed command, unknown pair or batch, layout or shape mismatch.
    ValueError,
    /// A deadline passed.
    TimeoutError,
    /// A party (agent, command node, peer) is gone.
    ConnectionError,
    /// A transfer failed somewhere in the job.
    TransferError,
}

/// A failure carried across a process boundary: what kind, what happened, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
    /// The node id where the failure happened.
    pub origin: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} on {}: {}", self.kind, self.origin, self.message)
    }
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(default)]
    semaphore_name: Option<String>,
}

/// The `type` and `semaphore_name` of a command that does not decode, so that the agent can still
/// answer its sender with an error.
pub fn decode_head(bytes: &[u8]) -> Option<(Option<String>, Option<String>)> {
    let h: Head = rmp_serde::from_slice(bytes).ok()?;
    Some((h.ty, h.semaphore_name))
}
