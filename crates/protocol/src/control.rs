//! The control protocol (command node ↔ agents): JSON envelopes
//! `{"type", "node_id", "timestamp", "value"}`, wire-faithful to noob's `network.message`.
//!
//! Frames: PUB sockets send `[type, json]`, DEALER→ROUTER sends `[json]`; receivers parse the last
//! frame. Decoding ignores unknown keys and accepts timestamps with `Z`, an offset, or none.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::payload::{PairSide, TensorDesc};
use crate::ProtocolError;

/// Version of the control protocol, sent in `identify`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A node's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    #[default]
    Stopped,
    Waiting,
    Ready,
    Running,
    Closed,
}

/// An epoch: a bare integer, or `[root, [node_id, index], ...]` for sub-epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Epoch {
    Root(u64),
    Sub(Vec<serde_json::Value>),
}

/// One batch as registered on one agent, published in `identify` so peers can plan and copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReg {
    /// Pair name of each tensor, in registration order.
    pub pairs: Vec<String>,
    pub tensors: Vec<TensorDesc>,
    #[serde(default)]
    pub bucket_size: Option<u64>,
}

/// `identify` value: who a node is and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct IdentifyValue {
    pub node_id: String,
    pub outbox: String,
    #[serde(default)]
    pub status: NodeStatus,
    /// Pairs this node sends on.
    #[serde(default)]
    pub signals: Vec<String>,
    /// Pairs this node receives on.
    #[serde(default)]
    pub slots: Vec<String>,
    /// The node receives the command node's outbox (it has seen a publication on it): only then
    /// can it take part in epochs without missing their messages (no slow-joiner loss).
    #[serde(default)]
    pub subscribed: bool,
    #[serde(default)]
    pub protocol: u32,
    /// The host this node runs on: peers on the same host copy through memory, others over TCP.
    #[serde(default)]
    pub host: String,
    /// Where the node accepts data connections from agents on other hosts (`IP:PORT`).
    #[serde(default)]
    pub data_addr: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub pairs: BTreeMap<String, PairSide>,
    #[serde(default)]
    pub batches: BTreeMap<String, BatchReg>,
}

/// `announce` value: the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AnnounceValue {
    pub inbox: String,
    pub nodes: BTreeMap<String, IdentifyValue>,
    /// Recently ended epochs: only in answers to a status query (a `ping` from outside the job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs_ended: Vec<crate::coordinator::EndedEpoch>,
    /// Errors the command node kept: only in answers to a status query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ErrorValue>,
}

/// `process` value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessValue {
    pub epoch: Epoch,
    pub input: ProcessInput,
}

/// What a `process` epoch runs: the `seq`-th transfer of `batch_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInput {
    pub batch_id: String,
    #[serde(default)]
    pub seq: u64,
    /// For epochs a controller asked for (`process`/`start`), the name of the sending side; the
    /// agents run them without waiting for their workers. `None` for epochs workers armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The node's worker asked for the `seq`-th transfer of the batch; its memory is ready.
    Armed,
    /// The node finished its share of an epoch.
    Done,
}

/// An event's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventValue {
    pub batch_id: String,
    pub kind: EventKind,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub checksum: u64,
}

/// One event `{id, timestamp, node_id, signal, epoch, value}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub timestamp: String,
    pub node_id: String,
    /// The pair name (or the batch id for batch-wide events).
    pub signal: String,
    pub epoch: Option<Epoch>,
    pub value: EventValue,
}

/// `error` value: plain JSON, never a pickle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorValue {
    pub err_type: String,
    pub err_args: Vec<serde_json::Value>,
    #[serde(default)]
    pub traceback: Option<String>,
    /// The batch whose epoch this error fails, when there is one.
    #[serde(default)]
    pub batch_id: Option<String>,
    #[serde(default)]
    pub epoch: Option<Epoch>,
}

/// A control message body: its type tag and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Body {
    Announce(AnnounceValue),
    Identify(IdentifyValue),
    Process(ProcessValue),
    Init(()),
    Deinit(()),
    Ping(()),
    Start(Option<u64>),
    Status(NodeStatus),
    Stop(()),
    Event(Vec<Event>),
    Error(ErrorValue),
    EpochEnded(Epoch),
}

impl Body {
    pub fn type_name(&self) -> &'static str {
        match self {
            Body::Announce(_) => "announce",
            Body::Identify(_) => "identify",
            Body::Process(_) => "process",
            Body::Init(_) => "init",
            Body::Deinit(_) => "deinit",
            Body::Ping(_) => "ping",
            Body::Start(_) => "start",
            Body::Status(_) => "status",
            Body::Stop(_) => "stop",
            Body::Event(_) => "event",
            Body::Error(_) => "error",
            Body::EpochEnded(_) => "epoch_ended",
        }
    }
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    #[serde(flatten)]
    pub body: Body,
    pub node_id: String,
    pub timestamp: String,
}

impl Message {
    pub fn new(node_id: &str, body: Body) -> Self {
        Message { body, node_id: node_id.to_string(), timestamp: now_rfc3339() }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("messages always encode")
    }

    pub fn from_json(s: &[u8]) -> Result<Self, ProtocolError> {
        let m: Message = serde_json::from_slice(s).map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
        parse_rfc3339(&m.timestamp)
            .ok_or_else(|| ProtocolError::BadMessage(format!("bad timestamp {:?}", m.timestamp)))?;
        Ok(m)
    }
}

/// The current time as RFC 3339 UTC with microseconds, e.g. `2026-11-29T07:30:00.123456Z`.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format_rfc3339(d.as_secs() as i64, d.subsec_micros())
}

fn format_rfc3339(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod / 60 % 60, sod % 60)
}

// Howard Hinnant's days <-> civil date algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac][Z|±HH:MM]` (no zone means UTC) to seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        frac = format!("0.{}", &r[..n]).parse().ok()?;
        rest = &r[n..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0i64,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = &rest[1..];
            let (oh, om) = match o.len() {
                5 if &o[2..3] == ":" => (o[..2].parse::<i64>().ok()?, o[3..].parse::<i64>().ok()?),
                4 => (o[..2].parse::<i64>().ok()?, o[2..].parse::<i64>().ok()?),
                2 => (o.parse::<i64>().ok()?, 0),
                _ => return None,
            };
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y as i64, mo, d) * 86400 + (h * 3600 + mi * 60 + se) as i64 - offset;
    Some(secs as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_accept_zones() {
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(1_795_000_000, 5), "2026-11-18T11:06:40.000005Z");
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40.000005Z").unwrap(), 1_795_000_000.000005);
        assert_eq!(parse_rfc3339("2026-11-18T12:06:40+01:00").unwrap(), 1_795_000_000.0);
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40").unwrap(), 1_795_000_000.0);
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z").unwrap(), 1_709_164_800.0);
        for bad in ["", "2026-13-01T00:00:00Z", "2026-11-18T11:06:40.Z", "2026-11-18T11:06:40+1", "yesterday"] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }
}

#[cfg(test)]
mod golden {
    use super::*;
    use serde_json::json;

    fn roundtrip(body: Body, value: serde_json::Value) {
        let m = Message { body, node_id: "agent:0".into(), timestamp: "2026-11-29T07:00:00.000000Z".into() };
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type": m.body.type_name(), "node_id": "agent:0", "timestamp": "2026-11-29T07:00:00.000000Z", "value": value})
        );
        assert_eq!(Message::from_json(m.to_json().as_bytes()).unwrap(), m);
    }

    #[test]
    fn envelopes_match_the_wire_form() {
        roundtrip(Body::Ping(()), json!(null));
        roundtrip(Body::Start(Some(3)), json!(3));
        roundtrip(Body::Status(NodeStatus::Ready), json!("ready"));
        roundtrip(Body::EpochEnded(Epoch::Root(7)), json!(7));
        roundtrip(Body::EpochEnded(Epoch::Sub(vec![json!(7), json!(["agent:1", 2])])), json!([7, ["agent:1", 2]]));
        roundtrip(
            Body::Process(ProcessValue {
                epoch: Epoch::Root(1),
                input: ProcessInput { batch_id: "w".into(), seq: 4, from: None },
            }),
            json!({"epoch": 1, "input": {"batch_id": "w", "seq": 4}}),
        );
        roundtrip(
            Body::Error(ErrorValue {
                err_type: "ValueError".into(),
                err_args: vec![json!("bad")],
                traceback: None,
                batch_id: None,
                epoch: None,
            }),
            json!({"err_type": "ValueError", "err_args": ["bad"], "traceback": null, "batch_id": null, "epoch": null}),
        );
    }

    #[test]
    fn decoding_tolerates_unknown_keys_and_zones_but_not_garbage() {
        let m = Message::from_json(
            br#"{"type":"ping","node_id":"c","timestamp":"2026-11-29T07:00:00+02:00","value":null,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(m.body, Body::Ping(()));
        let m = Message::from_json(br#"{"type":"identify","node_id":"a","timestamp":"2026-11-29T07:00:00","value":{"node_id":"a","outbox":"tcp://x","status":"waiting","signals":[],"slots":[],"future_key":true}}"#).unwrap();
        assert!(matches!(m.body, Body::Identify(v) if v.status == NodeStatus::Waiting));
        for bad in [
            &br#"{"type":"explode","node_id":"a","timestamp":"2026-11-29T07:00:00Z","value":null}"#[..],
            br#"{"type":"ping","node_id":"a","timestamp":"noon","value":null}"#,
            b"[1,2",
        ] {
            assert!(Message::from_json(bad).is_err());
        }
    }
}
