//! Where the command node keeps its state: in memory (the default), or in etcd so that a restarted
//! command node resumes the job (membership, pair layouts, batches, epoch numbering, ended epochs)
//! without restarting agents or workers.
//!
//! etcd is reached through its v3 JSON gateway (`POST /v3/kv/put`, `/v3/kv/range`, keys and values
//! base64); the whole coordinator snapshot is one key, `tensorbus/{job}/coordinator`, rewritten when
//! it changes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tensorbus_protocol::coordinator::Snapshot;

use crate::CommandError;

pub enum Registry {
    Memory,
    Etcd { base: String, key: String },
}

impl Registry {
    /// `None` or `"memory"`: in memory; `etcd://HOST:PORT[/JOB]`: etcd.
    pub fn parse(spec: Option<&str>) -> Result<Registry, CommandError> {
        match spec {
            None | Some("memory") => Ok(Registry::Memory),
            Some(s) => {
                let rest = s.strip_prefix("etcd://").ok_or_else(|| {
                    CommandError::Registry(format!("unknown registry {s:?}: use memory or etcd://HOST:PORT[/JOB]"))
                })?;
                let (addr, job) = rest.split_once('/').unwrap_or((rest, "default"));
                Ok(Registry::Etcd { base: format!("http://{addr}"), key: format!("tensorbus/{job}/coordinator") })
            }
        }
    }

    fn post(base: &str, path: &str, body: serde_json::Value) -> Result<serde_json::Value, CommandError> {
        let err = |e: String| CommandError::Registry(format!("etcd at {base}: {e}"));
        let r = ureq::post(&format!("{base}{path}"))
            .timeout(std::time::Duration::from_secs(2))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(|e| err(e.to_string()))?;
        let text = r.into_string().map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// The stored snapshot, if any.
    pub fn load(&self) -> Result<Option<Snapshot>, CommandError> {
        let Registry::Etcd { base, key } = self else { return Ok(None) };
        let v = Self::post(base, "/v3/kv/range", serde_json::json!({ "key": B64.encode(key) }))?;
        let Some(value) = v["kvs"].get(0).and_then(|kv| kv["value"].as_str()) else { return Ok(None) };
        let bytes = B64.decode(value).map_err(|e| CommandError::Registry(format!("bad value in etcd: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CommandError::Registry(format!("bad snapshot in etcd: {e}")))
    }

    /// Stores `s` (nothing in memory mode).
    /// Whether [`Registry::store`] keeps anything (in memory there is nothing to keep).
    pub fn persists(&self) -> bool {
        matches!(self, Registry::Etcd { .. })
    }

    pub fn store(&self, s: &Snapshot) -> Result<(), CommandError> {
        let Registry::Etcd { base, key } = self else { return Ok(()) };
        let value = serde_json::to_vec(s).expect("snapshots encode");
        Self::post(base, "/v3/kv/put", serde_json::json!({ "key": B64.encode(key), "value": B64.encode(value) }))?;
        Ok(())
    }
}
