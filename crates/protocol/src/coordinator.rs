//! The command node's state machine, sans-IO (in the style of quinn-proto): the driver passes in
//! each decoded message and the current time, and takes out the messages to send.
//!
//! It owns membership (the directory of `identify` values, re-announced on every change) and the
//! epoch barrier of batch transfers: when every node holding batch `b` has armed its `seq`-th
//! transfer, it publishes `process {epoch, input: {batch_id: b, seq}}`; when every one of them
//! reports that epoch done, it publishes `epoch_ended(epoch)`. An `error` from any node fails the
//! epoch for everyone and is kept for `status`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::control::{
    AnnounceValue, Body, Epoch, ErrorValue, EventKind, IdentifyValue, Message, NodeStatus, ProcessInput, ProcessValue,
};

/// A message the driver must send.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// To every subscriber of the command node's outbox.
    Publish(Message),
    /// To one node, through the inbox it connected to.
    To(String, Message),
}

#[derive(Debug, Clone)]
struct Node {
    ident: IdentifyValue,
    status: NodeStatus,
    last_seen: Instant,
}

#[derive(Debug, Clone)]
struct Running {
    batch_id: String,
    participants: BTreeSet<String>,
    done: BTreeSet<String>,
    bytes: u64,
}

/// A finished epoch, for `status` and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedEpoch {
    pub epoch: u64,
    pub batch_id: String,
    pub seq: u64,
    pub nodes: usize,
    pub bytes: u64,
}

/// The command node's state.
pub struct Coordinator {
    node_id: String,
    inbox: String,
    nodes: BTreeMap<String, Node>,
    armed: BTreeMap<(String, u64), BTreeSet<String>>,
    running: BTreeMap<u64, (u64, Running)>,
    next_epoch: u64,
    ended: VecDeque<EndedEpoch>,
    errors: Vec<(String, ErrorValue)>,
    out: VecDeque<Outgoing>,
}

impl Coordinator {
    pub fn new(node_id: impl Into<String>, inbox: impl Into<String>) -> Self {
        Coordinator {
            node_id: node_id.into(),
            inbox: inbox.into(),
            nodes: BTreeMap::new(),
            armed: BTreeMap::new(),
            running: BTreeMap::new(),
            next_epoch: 0,
            ended: VecDeque::new(),
            errors: Vec::new(),
            out: VecDeque::new(),
        }
    }

    /// Processes one message from node `msg.node_id`.
    pub fn handle_message(&mut self, now: Instant, msg: Message) {
        let from = msg.node_id.clone();
        if let Some(n) = self.nodes.get_mut(&from) {
            n.last_seen = now;
        }
        match msg.body {
            Body::Identify(v) => {
                let status = v.status;
                let changed = self.nodes.get(&from).is_none_or(|n| n.ident != v);
                self.nodes.insert(from.clone(), Node { ident: v, status, last_seen: now });
                // Always answer, so a node whose first announce was lost (slow joiner) learns it
                // has joined; announce to all when the directory changed.
                if changed {
                    self.announce();
                } else {
                    let m = self.msg(Body::Announce(self.directory()));
                    self.out.push_back(Outgoing::To(from, m));
                }
                let keys: Vec<_> = self.armed.keys().cloned().collect();
                for (b, s) in keys {
                    self.check_armed(&b, s);
                }
            }
            Body::Status(s) => {
                if let Some(n) = self.nodes.get_mut(&from) {
                    n.status = s;
                }
            }
            Body::Event(events) => {
                for e in events {
                    match e.value.kind {
                        EventKind::Armed => {
                            self.armed.entry((e.value.batch_id.clone(), e.value.seq)).or_default().insert(from.clone());
                            self.check_armed(&e.value.batch_id, e.value.seq);
                        }
                        EventKind::Done => {
                            let Some(Epoch::Root(epoch)) = e.epoch else { continue };
                            self.mark_done(epoch, &from, e.value.bytes);
                        }
                    }
                }
            }
            Body::Error(mut err) => {
                if !err.err_args.iter().any(|a| a.get("origin").is_some()) {
                    err.err_args.push(serde_json::json!({ "origin": from }));
                }
                if let Some(Epoch::Root(e)) = err.epoch {
                    self.running.remove(&e);
                }
                if let Some(b) = &err.batch_id {
                    self.armed.retain(|(batch, _), _| batch != b);
                }
                self.errors.push((from, err.clone()));
                let m = self.msg(Body::Error(err));
                self.out.push_back(Outgoing::Publish(m));
            }
            // Commands flow from the command node, not to it; answers to ping are identifies.
            _ => {}
        }
    }

    fn msg(&self, body: Body) -> Message {
        Message::new(&self.node_id, body)
    }

    fn announce(&mut self) {
        let m = self.msg(Body::Announce(self.directory()));
        self.out.push_back(Outgoing::Publish(m));
    }

    /// Nodes that hold batch `b`.
    fn participants(&self, b: &str) -> BTreeSet<String> {
        self.nodes.iter().filter(|(_, n)| n.ident.batches.contains_key(b)).map(|(id, _)| id.clone()).collect()
    }

    fn check_armed(&mut self, batch_id: &str, seq: u64) {
        let key = (batch_id.to_string(), seq);
        let Some(armed) = self.armed.get(&key) else { return };
        let participants = self.participants(batch_id);
        if participants.is_empty() || !participants.is_subset(armed) {
            return;
        }
        self.armed.remove(&key);
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.running.insert(
            epoch,
            (seq, Running { batch_id: batch_id.to_string(), participants, done: BTreeSet::new(), bytes: 0 }),
        );
        let m = self.msg(Body::Process(ProcessValue {
            epoch: Epoch::Root(epoch),
            input: ProcessInput { batch_id: batch_id.to_string(), seq },
        }));
        self.out.push_back(Outgoing::Publish(m));
    }

    fn mark_done(&mut self, epoch: u64, node: &str, bytes: u64) {
        let Some((_, r)) = self.running.get_mut(&epoch) else { return };
        r.done.insert(node.to_string());
        r.bytes += bytes;
        if r.participants.is_subset(&r.done) {
            let (seq, r) = self.running.remove(&epoch).expect("present");
            self.ended.push_back(EndedEpoch {
                epoch,
                batch_id: r.batch_id,
                seq,
                nodes: r.participants.len(),
                bytes: r.bytes,
            });
            if self.ended.len() > 64 {
                self.ended.pop_front();
            }
            let m = self.msg(Body::EpochEnded(Epoch::Root(epoch)));
            self.out.push_back(Outgoing::Publish(m));
        }
    }

    /// The next message to send, if any.
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// The directory as announced.
    pub fn directory(&self) -> AnnounceValue {
        AnnounceValue {
            inbox: self.inbox.clone(),
            nodes: self.nodes.iter().map(|(id, n)| (id.clone(), n.ident.clone())).collect(),
        }
    }

    /// Node ids with their last reported status.
    pub fn statuses(&self) -> Vec<(String, NodeStatus)> {
        self.nodes.iter().map(|(id, n)| (id.clone(), n.status)).collect()
    }

    /// Recently ended epochs, oldest first.
    pub fn ended(&self) -> impl Iterator<Item = &EndedEpoch> {
        self.ended.iter()
    }

    /// Errors reported by nodes, with the reporting node.
    pub fn errors(&self) -> &[(String, ErrorValue)] {
        &self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BatchReg, Event, EventValue};

    fn ident(id: &str, batches: &[&str]) -> Message {
        let v = IdentifyValue {
            node_id: id.into(),
            outbox: format!("tcp://127.0.0.1:0/{id}"),
            batches: batches
                .iter()
                .map(|b| (b.to_string(), BatchReg { pairs: vec![], tensors: vec![], bucket_size: None }))
                .collect(),
            ..Default::default()
        };
        Message::new(id, Body::Identify(v))
    }

    fn event(id: &str, kind: EventKind, batch: &str, seq: u64, epoch: Option<u64>) -> Message {
        Message::new(
            id,
            Body::Event(vec![Event {
                id: 0,
                timestamp: crate::control::now_rfc3339(),
                node_id: id.into(),
                signal: batch.into(),
                epoch: epoch.map(Epoch::Root),
                value: EventValue { batch_id: batch.into(), kind, seq, bytes: 10, seconds: 0.0, checksum: 0 },
            }]),
        )
    }

    fn drain(c: &mut Coordinator) -> Vec<Outgoing> {
        std::iter::from_fn(|| c.poll_outgoing()).collect()
    }

    #[test]
    fn epoch_runs_only_once_every_holder_armed_and_ends_once_all_done() {
        let now = Instant::now();
        let mut c = Coordinator::new("command", "tcp://127.0.0.1:1");
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(now, ident(id, &["w"]));
        }
        assert_eq!(c.directory().nodes.len(), 3);
        drain(&mut c);
        c.handle_message(now, event("a:0", EventKind::Armed, "w", 0, None));
        c.handle_message(now, event("b:0", EventKind::Armed, "w", 0, None));
        assert!(drain(&mut c).is_empty(), "a:1 has not armed yet");
        c.handle_message(now, event("a:1", EventKind::Armed, "w", 0, None));
        let out = drain(&mut c);
        assert!(
            matches!(
                &out[..],
                [Outgoing::Publish(Message { body: Body::Process(ProcessValue { epoch: Epoch::Root(0), .. }), .. })]
            ),
            "{out:?}"
        );
        c.handle_message(now, event("a:0", EventKind::Done, "w", 0, Some(0)));
        c.handle_message(now, event("a:1", EventKind::Done, "w", 0, Some(0)));
        assert!(drain(&mut c).is_empty());
        c.handle_message(now, event("b:0", EventKind::Done, "w", 0, Some(0)));
        let out = drain(&mut c);
        assert!(
            matches!(&out[..], [Outgoing::Publish(Message { body: Body::EpochEnded(Epoch::Root(0)), .. })]),
            "{out:?}"
        );
        assert_eq!(c.ended().next().unwrap().bytes, 30);
    }

    #[test]
    fn errors_fail_the_epoch_and_are_kept() {
        let now = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        c.handle_message(now, ident("a:0", &["w"]));
        c.handle_message(now, ident("b:0", &["w"]));
        c.handle_message(now, event("a:0", EventKind::Armed, "w", 0, None));
        let err = ErrorValue {
            err_type: "ValueError".into(),
            err_args: vec!["boom".into()],
            traceback: None,
            batch_id: Some("w".into()),
            epoch: None,
        };
        c.handle_message(now, Message::new("b:0", Body::Error(err)));
        let out = drain(&mut c);
        assert!(out.iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Error(_), .. }))));
        c.handle_message(now, event("b:0", EventKind::Armed, "w", 0, None));
        assert!(drain(&mut c).is_empty(), "the failed arming was dropped");
        assert_eq!(c.errors().len(), 1);
    }

    #[test]
    fn repeated_identify_is_answered_directly() {
        let now = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        c.handle_message(now, ident("a:0", &[]));
        assert!(matches!(drain(&mut c)[..], [Outgoing::Publish(_)]));
        c.handle_message(now, ident("a:0", &[]));
        assert!(matches!(&drain(&mut c)[..], [Outgoing::To(id, _)] if id == "a:0"));
    }
}
