//! State-store keys and values shared by agent and client (modeled on Etha's key names).

use serde::{Deserialize, Serialize};

/// `pair:{name}/state:match`: whether the pair is matched.
pub fn pair_match(pair: &str) -> String {
    format!("pair:{pair}/state:match")
}

/// `batch:{id}/state:{state_name}` (e.g. `transfer_signal`).
pub fn batch_state(batch: &str, state: &str) -> String {
    format!("batch:{batch}/state:{state}")
}

/// `batch:{id}/` prefix of everything a batch holds.
pub fn batch_prefix(batch: &str) -> String {
    format!("batch:{batch}/")
}

/// `command:{semaphore}/state:result`: the structured result of one command.
pub fn command_result(semaphore: &str) -> String {
    format!("command:{semaphore}/state:result")
}

/// `batch:{id}/state:epoch_ended`: the last epoch sequence number of the batch that ended everywhere.
pub fn epoch_ended(batch: &str) -> String {
    batch_state(batch, "epoch_ended")
}

pub const HEARTBEAT: &str = "agent/state:heartbeat";

/// The agent's heartbeat, rewritten every [`HEARTBEAT_INTERVAL`](crate::HEARTBEAT_INTERVAL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub pid: u32,
    pub node_id: String,
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// False once the agent shut down in order.
    pub alive: bool,
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("encodes")
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        rmp_serde::from_slice(b).ok()
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
