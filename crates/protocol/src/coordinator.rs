//! The command node's state machine, sans-IO (in the style of quinn-proto): the driver passes in
//! each decoded message and the current time, calls [`Coordinator::handle_timeout`] when
//! [`Coordinator::poll_timeout`] says so, and sends what [`Coordinator::poll_outgoing`] returns.
//!
//! It owns:
//! - membership: the directory of `identify` values, re-announced on every change;
//! - liveness: it publishes a `status` heartbeat every [`HEARTBEAT_INTERVAL`]; a node silent for
//!   [`DEAD_AFTER`] (agents send `status` every 250 ms) or reporting `closed` leaves the directory,
//!   and every epoch or armed transfer of its batches fails with an error naming it;
//! - the epoch barrier: each `event` of kind `armed` queues one transfer of a batch on its node;
//!   when every node holding the batch has one queued, it publishes
//!   `process {epoch, input: {batch_id, seq}}`; when every one of them reports that epoch `done`,
//!   it publishes `epoch_ended(epoch)`. An `error` from any node fails the epoch for everyone and
//!   is kept for `status`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::control::{
    AnnounceValue, Body, Epoch, ErrorValue, EventKind, IdentifyValue, Message, NodeStatus, ProcessInput, ProcessValue,
};

/// How often the command node publishes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A node silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);

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
    /// Known only from a registry snapshot: it has not identified to this command node yet.
    restored: bool,
}

#[derive(Debug, Clone)]
struct Running {
    batch_id: String,
    seq: u64,
    participants: BTreeSet<String>,
    done: BTreeSet<String>,
    bytes: u64,
    checksum: u64,
}

/// A finished epoch, for `status` and logs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndedEpoch {
    pub epoch: u64,
    pub batch_id: String,
    pub seq: u64,
    pub nodes: usize,
    pub bytes: u64,
    /// Wrapping sum of the senders' checksums (0 when agents do not compute them).
    #[serde(default)]
    pub checksum: u64,
}

/// What a command node persists to resume a job after a restart.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct Snapshot {
    pub nodes: BTreeMap<String, IdentifyValue>,
    pub next_epoch: u64,
    pub seqs: BTreeMap<String, u64>,
    pub ended: Vec<EndedEpoch>,
}

/// The command node's state.
pub struct Coordinator {
    /// Something a [`Snapshot`] holds changed since the last [`Coordinator::take_dirty`].
    dirty: bool,
    node_id: String,
    inbox: String,
    nodes: BTreeMap<String, Node>,
    /// Per batch, per node: transfers armed and not yet run.
    armed: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per batch: epochs started so far.
    seqs: BTreeMap<String, u64>,
    running: BTreeMap<u64, Running>,
    next_epoch: u64,
    next_heartbeat: Option<Instant>,
    ended: VecDeque<EndedEpoch>,
    errors: Vec<(String, ErrorValue)>,
    out: VecDeque<Outgoing>,
    /// Controller-driven epochs: `(batch, sending side)` of the last `process`, and how many more
    /// to run back to back (`Some(0)`: none; `None`: until `stop`).
    free: Option<(String, String)>,
    free_remaining: Option<u64>,
    free_in_flight: Option<u64>,
}

impl Coordinator {
    /// A fresh command node. Its first output is a `ping`, so that agents of a job it rejoins
    /// (after a restart) identify at once.
    pub fn new(node_id: impl Into<String>, inbox: impl Into<String>) -> Self {
        let mut c = Coordinator {
            dirty: false,
            node_id: node_id.into(),
            inbox: inbox.into(),
            nodes: BTreeMap::new(),
            armed: BTreeMap::new(),
            seqs: BTreeMap::new(),
            running: BTreeMap::new(),
            next_epoch: 0,
            next_heartbeat: None,
            ended: VecDeque::new(),
            errors: Vec::new(),
            out: VecDeque::new(),
            free: None,
            free_remaining: Some(0),
            free_in_flight: None,
        };
        let m = c.msg(Body::Ping(()));
        c.out.push_back(Outgoing::Publish(m));
        c
    }

    /// Processes one message from node `msg.node_id`.
    pub fn handle_message(&mut self, now: Instant, msg: Message) {
        let from = msg.node_id.clone();
        if let Some(n) = self.nodes.get_mut(&from) {
            n.last_seen = now;
        }
        match msg.body {
            Body::Identify(v) if v.status == NodeStatus::Closed => self.remove_node(&from, "it closed"),
            Body::Identify(v) => {
                let status = v.status;
                let changed = self.nodes.get(&from).is_none_or(|n| n.ident != v);
                self.nodes.insert(from.clone(), Node { ident: v, status, last_seen: now, restored: false });
                // Always answer, so a node whose first announce was lost (slow joiner) learns it
                // has joined; announce to all when the directory changed.
                if changed {
                    self.announce();
                } else {
                    let m = self.msg(Body::Announce(self.directory()));
                    self.out.push_back(Outgoing::To(from, m));
                }
                let batches: Vec<String> = self.armed.keys().cloned().collect();
                for b in batches {
                    self.check_armed(&b);
                }
            }
            Body::Status(NodeStatus::Closed) if self.nodes.contains_key(&from) => self.remove_node(&from, "it closed"),
            Body::Status(s) => {
                // A node we do not know (we restarted) or whose subscription is unconfirmed
                // (restored from the registry) is asked to identify again.
                let confirmed = match self.nodes.get_mut(&from) {
                    Some(n) => {
                        n.status = s;
                        !n.restored
                    }
                    None => false,
                };
                if !confirmed && s != NodeStatus::Closed {
                    let m = self.msg(Body::Ping(()));
                    self.out.push_back(Outgoing::To(from, m));
                }
            }
            // A ping from outside the directory is a status query (e.g. `tensorbus status`).
            Body::Ping(()) if !self.nodes.contains_key(&from) => {
                let mut d = self.directory();
                d.epochs_ended = self.ended.iter().cloned().collect();
                d.errors = self.errors.iter().map(|(_, e)| e.clone()).collect();
                let m = self.msg(Body::Announce(d));
                self.out.push_back(Outgoing::To(from, m));
            }
            Body::Event(events) => {
                for e in events {
                    match e.value.kind {
                        EventKind::Armed => {
                            *self
                                .armed
                                .entry(e.value.batch_id.clone())
                                .or_default()
                                .entry(from.clone())
                                .or_default() += 1;
                            self.check_armed(&e.value.batch_id);
                        }
                        EventKind::Done => {
                            let Some(Epoch::Root(epoch)) = e.epoch else { continue };
                            self.mark_done(epoch, &from, e.value.bytes, e.value.checksum);
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
                    if self.free_in_flight == Some(e) {
                        self.free_in_flight = None;
                        self.free_remaining = Some(0);
                    }
                }
                if let Some(b) = &err.batch_id {
                    self.armed.remove(b);
                }
                self.errors.push((from, err.clone()));
                let m = self.msg(Body::Error(err));
                self.out.push_back(Outgoing::Publish(m));
            }
            // Requests of a controller (a node outside the directory, e.g. `tensorbus ctl`).
            Body::Process(p) if !self.nodes.contains_key(&from) => {
                let Some(side) = p.input.from.clone() else {
                    return self.reply_error(&from, "process needs input.from: the name of the sending side");
                };
                self.free = Some((p.input.batch_id.clone(), side));
                self.free_remaining = Some(0);
                self.run_free(&from);
            }
            Body::Start(n) if !self.nodes.contains_key(&from) => {
                if self.free.is_none() {
                    return self.reply_error(&from, "start needs a batch: send process {batch_id, from} first");
                }
                self.free_remaining = n;
                if self.free_in_flight.is_none() {
                    self.run_free(&from);
                }
            }
            Body::Stop(()) if !self.nodes.contains_key(&from) => self.free_remaining = Some(0),
            Body::Init(()) | Body::Deinit(()) if !self.nodes.contains_key(&from) => {
                let m = self.msg(msg.body);
                self.out.push_back(Outgoing::Publish(m));
            }
            // Commands flow from the command node, not to it.
            _ => {}
        }
    }

    fn reply_error(&mut self, to: &str, message: &str) {
        let err = ErrorValue {
            err_type: "ValueError".into(),
            err_args: vec![message.into()],
            traceback: None,
            batch_id: None,
            epoch: None,
        };
        let m = self.msg(Body::Error(err));
        self.out.push_back(Outgoing::To(to.to_string(), m));
    }

    /// Starts one controller-driven epoch of the current free-run batch.
    fn run_free(&mut self, requester: &str) {
        let Some((batch, side)) = self.free.clone() else { return };
        if self.participants(&batch).is_none() {
            self.free_remaining = Some(0);
            let msg = format!(
                "batch {batch:?} is not registered on every rank of both sides (or a node is not subscribed yet)"
            );
            if requester == self.node_id {
                // Continuing a `start`: nobody to answer; publish and keep it for `status`.
                let err = ErrorValue {
                    err_type: "ValueError".into(),
                    err_args: vec![msg.into()],
                    traceback: None,
                    batch_id: Some(batch),
                    epoch: None,
                };
                self.errors.push((self.node_id.clone(), err.clone()));
                let m = self.msg(Body::Error(err));
                self.out.push_back(Outgoing::Publish(m));
                return;
            }
            return self.reply_error(requester, &msg);
        }
        let epoch = self.start_epoch(&batch, Some(side));
        self.free_in_flight = Some(epoch);
        if let Some(Outgoing::Publish(m)) = self.out.back().cloned() {
            if requester != self.node_id {
                self.out.push_back(Outgoing::To(requester.to_string(), m));
            }
        }
    }

    /// Heartbeat and liveness: call when [`Coordinator::poll_timeout`] is reached (calling earlier
    /// is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_heartbeat.is_none_or(|t| now >= t) {
            let m = self.msg(Body::Status(NodeStatus::Running));
            self.out.push_back(Outgoing::Publish(m));
            self.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
        }
        let dead: Vec<(String, Duration)> = self
            .nodes
            .iter()
            .map(|(id, n)| (id.clone(), now.saturating_duration_since(n.last_seen)))
            .filter(|(_, silent)| *silent > DEAD_AFTER)
            .collect();
        for (id, silent) in dead {
            self.remove_node(&id, &format!("silent for {:.1} s", silent.as_secs_f64()));
        }
    }

    /// When to call [`Coordinator::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deaths = self.nodes.values().map(|n| n.last_seen + DEAD_AFTER).min();
        match (self.next_heartbeat, deaths) {
            (None, _) => None,
            (Some(h), Some(d)) => Some(h.min(d)),
            (Some(h), None) => Some(h),
        }
    }

    /// Takes `id` out of the directory and fails everything that waited on it.
    fn remove_node(&mut self, id: &str, reason: &str) {
        let Some(node) = self.nodes.remove(id) else { return };
        let closed = node.status == NodeStatus::Closed || reason == "it closed";
        for batch in node.ident.batches.keys() {
            let err_type = if closed { "TransferError" } else { "ConnectionError" };
            self.fail_batch(batch, err_type, &format!("agent {id} left the job ({reason})"), id);
        }
        self.announce();
    }

    /// Fails every running epoch and armed transfer of `batch` with one error each.
    fn fail_batch(&mut self, batch: &str, err_type: &str, message: &str, origin: &str) {
        let epochs: Vec<u64> = self.running.iter().filter(|(_, r)| r.batch_id == batch).map(|(e, _)| *e).collect();
        let had_armed = self.armed.remove(batch).is_some_and(|a| !a.is_empty());
        let mut targets: Vec<Option<u64>> = epochs.iter().map(|e| Some(*e)).collect();
        if had_armed || targets.is_empty() {
            targets.push(None);
        }
        for epoch in targets {
            if let Some(e) = epoch {
                self.running.remove(&e);
                if self.free_in_flight == Some(e) {
                    self.free_in_flight = None;
                    self.free_remaining = Some(0);
                }
            }
            let err = ErrorValue {
                err_type: err_type.into(),
                err_args: vec![message.into(), serde_json::json!({ "origin": origin })],
                traceback: None,
                batch_id: Some(batch.to_string()),
                epoch: epoch.map(Epoch::Root),
            };
            self.errors.push((origin.to_string(), err.clone()));
            let m = self.msg(Body::Error(err));
            self.out.push_back(Outgoing::Publish(m));
        }
    }

    fn msg(&self, body: Body) -> Message {
        Message::new(&self.node_id, body)
    }

    fn announce(&mut self) {
        self.dirty = true;
        let m = self.msg(Body::Announce(self.directory()));
        self.out.push_back(Outgoing::Publish(m));
    }

    /// The nodes holding batch `b`, once every rank of both sides of each of its pairs does
    /// (an epoch never runs while a rank is missing, e.g. an agent still rejoining) and every holder
    /// has confirmed it receives the outbox.
    fn participants(&self, b: &str) -> Option<BTreeSet<String>> {
        let holders: Vec<(&String, &Node)> =
            self.nodes.iter().filter(|(_, n)| n.ident.batches.contains_key(b)).collect();
        if holders.iter().any(|(_, n)| !n.ident.subscribed) {
            return None;
        }
        let pairs: BTreeSet<&String> = holders.iter().flat_map(|(_, n)| n.ident.batches[b].pairs.iter()).collect();
        for pair in pairs {
            // Per side name: its world size and the ranks present.
            let mut sides: BTreeMap<&str, (usize, BTreeSet<usize>)> = BTreeMap::new();
            let mut remote = None;
            for (_, n) in &holders {
                if let Some(ps) = n.ident.pairs.get(pair.as_str()) {
                    sides.entry(&ps.local_name).or_insert((ps.world_size, BTreeSet::new())).1.insert(ps.rank);
                    remote.get_or_insert(ps.remote_name.as_str());
                }
            }
            let complete = sides.len() == 2
                && remote.is_some_and(|r| sides.contains_key(r))
                && sides.values().all(|(ws, ranks)| ranks.len() == *ws);
            if !complete {
                return None;
            }
        }
        let ids: BTreeSet<String> = holders.iter().map(|(id, _)| (*id).clone()).collect();
        (!ids.is_empty()).then_some(ids)
    }

    fn check_armed(&mut self, batch_id: &str) {
        let Some(participants) = self.participants(batch_id) else { return };
        let Some(armed) = self.armed.get_mut(batch_id) else { return };
        if !participants.iter().all(|p| armed.get(p).is_some_and(|n| *n > 0)) {
            return;
        }
        for p in &participants {
            *armed.get_mut(p).expect("checked") -= 1;
        }
        self.start_epoch(batch_id, None);
        // Another round may already be armed everywhere.
        self.check_armed(batch_id);
    }

    /// Publishes `process` for the next epoch of `batch_id` (whose participants are complete).
    fn start_epoch(&mut self, batch_id: &str, from: Option<String>) -> u64 {
        let participants = self.participants(batch_id).unwrap_or_default();
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.dirty = true;
        let seq = self.seqs.entry(batch_id.to_string()).or_default();
        let this_seq = *seq;
        *seq += 1;
        self.running.insert(
            epoch,
            Running {
                batch_id: batch_id.to_string(),
                seq: this_seq,
                participants,
                done: BTreeSet::new(),
                bytes: 0,
                checksum: 0,
            },
        );
        let m = self.msg(Body::Process(ProcessValue {
            epoch: Epoch::Root(epoch),
            input: ProcessInput { batch_id: batch_id.to_string(), seq: this_seq, from },
        }));
        self.out.push_back(Outgoing::Publish(m));
        epoch
    }

    fn mark_done(&mut self, epoch: u64, node: &str, bytes: u64, checksum: u64) {
        let Some(r) = self.running.get_mut(&epoch) else { return };
        if r.done.insert(node.to_string()) {
            r.bytes += bytes;
            r.checksum = r.checksum.wrapping_add(checksum);
        }
        if r.participants.is_subset(&r.done) {
            let r = self.running.remove(&epoch).expect("present");
            self.ended.push_back(EndedEpoch {
                epoch,
                batch_id: r.batch_id,
                seq: r.seq,
                nodes: r.participants.len(),
                bytes: r.bytes,
                checksum: r.checksum,
            });
            if self.ended.len() > 64 {
                self.ended.pop_front();
            }
            self.dirty = true;
            let m = self.msg(Body::EpochEnded(Epoch::Root(epoch)));
            self.out.push_back(Outgoing::Publish(m));
            if self.free_in_flight == Some(epoch) {
                self.free_in_flight = None;
                self.continue_free();
            }
        }
    }

    /// After a controller-driven epoch: the next one, while `start` asks for more.
    fn continue_free(&mut self) {
        match self.free_remaining {
            Some(0) => {}
            Some(n) => {
                self.free_remaining = Some(n - 1);
                self.run_free(&self.node_id.clone());
            }
            None => self.run_free(&self.node_id.clone()),
        }
    }

    /// What to persist to resume after a restart.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self.nodes.iter().map(|(id, n)| (id.clone(), n.ident.clone())).collect(),
            next_epoch: self.next_epoch,
            seqs: self.seqs.clone(),
            ended: self.ended.iter().cloned().collect(),
        }
    }

    /// Resumes from a snapshot taken by an earlier command node of the job. Its nodes count as
    /// just seen: each must speak within [`DEAD_AFTER`] or it leaves the directory.
    pub fn restore(&mut self, now: Instant, s: Snapshot) {
        self.nodes = s
            .nodes
            .into_iter()
            .map(|(id, mut ident)| {
                let status = ident.status;
                // Their subscriptions were to the previous command node: each must confirm anew.
                ident.subscribed = false;
                (id, Node { ident, status, last_seen: now, restored: true })
            })
            .collect();
        self.next_epoch = self.next_epoch.max(s.next_epoch);
        self.seqs = s.seqs;
        self.ended = s.ended.into();
        self.announce();
    }

    /// True once after every change a snapshot would show.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
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
            ..Default::default()
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

    /// Errors reported by or about nodes, with the node.
    pub fn errors(&self) -> &[(String, ErrorValue)] {
        &self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BatchReg, Event, EventValue};

    /// Node "x:r" is rank r of side x of pair "p"; side a has 2 ranks, side b 1.
    fn ident(id: &str, batches: &[&str]) -> Message {
        let (side, rank) = id.split_once(':').unwrap();
        let (remote, ws) = if side == "a" { ("b", 2) } else { ("a", 1) };
        let ps = crate::payload::PairSide {
            local_name: side.into(),
            remote_name: remote.into(),
            world_size: ws,
            rank: rank.parse().unwrap(),
            mesh: vec![ws],
            placements: vec!["R".into()],
        };
        let v = IdentifyValue {
            node_id: id.into(),
            outbox: format!("tcp://127.0.0.1:0/{id}"),
            subscribed: true,
            pairs: [("p".to_string(), ps)].into_iter().collect(),
            batches: batches
                .iter()
                .map(|b| (b.to_string(), BatchReg { pairs: vec!["p".into()], tensors: vec![], bucket_size: None }))
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
        drain(&mut c);
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
        drain(&mut c);
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(now, ident(id, &["w"]));
        }
        c.handle_message(now, event("a:0", EventKind::Armed, "w", 0, None));
        c.handle_message(now, event("a:1", EventKind::Armed, "w", 0, None));
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
        drain(&mut c);
        c.handle_message(now, ident("a:0", &[]));
        assert!(matches!(drain(&mut c)[..], [Outgoing::Publish(_)]));
        c.handle_message(now, ident("a:0", &[]));
        assert!(matches!(&drain(&mut c)[..], [Outgoing::To(id, _)] if id == "a:0"));
    }

    #[test]
    fn heartbeats_and_a_silent_node_is_dead_after_a_second() {
        let t0 = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        assert!(matches!(&drain(&mut c)[..], [Outgoing::Publish(Message { body: Body::Ping(()), .. })]));
        c.handle_timeout(t0);
        assert!(matches!(
            &drain(&mut c)[..],
            [Outgoing::Publish(Message { body: Body::Status(NodeStatus::Running), .. })]
        ));
        assert_eq!(c.poll_timeout(), Some(t0 + HEARTBEAT_INTERVAL));
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, ident(id, &["w"]));
        }
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, event(id, EventKind::Armed, "w", 0, None));
        }
        drain(&mut c);
        // The a side keeps talking, b:0 falls silent during the epoch.
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_millis(250);
            c.handle_message(t, Message::new("a:0", Body::Status(NodeStatus::Running)));
            c.handle_message(t, Message::new("a:1", Body::Status(NodeStatus::Running)));
            c.handle_timeout(t);
        }
        let out = drain(&mut c);
        let err = out
            .iter()
            .find_map(|o| match o {
                Outgoing::Publish(Message { body: Body::Error(e), .. }) => Some(e.clone()),
                _ => None,
            })
            .expect("an error for the epoch");
        assert_eq!(err.err_type, "ConnectionError");
        assert_eq!(err.epoch, Some(Epoch::Root(0)));
        assert!(err.err_args[0].as_str().unwrap().contains("agent b:0 left the job (silent for 1.2 s)"), "{err:?}");
        assert_eq!(c.directory().nodes.keys().collect::<Vec<_>>(), vec!["a:0", "a:1"]);
        // Arming without b:0 runs nothing; once it rejoins and re-registers, the epoch runs.
        c.handle_message(t, event("a:0", EventKind::Armed, "w", 0, None));
        c.handle_message(t, event("a:1", EventKind::Armed, "w", 0, None));
        assert!(!drain(&mut c).iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Process(_), .. }))));
        c.handle_message(t, ident("b:0", &["w"]));
        c.handle_message(t, event("b:0", EventKind::Armed, "w", 0, None));
        assert!(drain(&mut c).iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Process(_), .. }))));
    }

    #[test]
    fn a_closing_node_fails_armed_transfers_and_leaves() {
        let t0 = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, ident(id, &["w"]));
        }
        c.handle_message(t0, event("a:0", EventKind::Armed, "w", 0, None));
        drain(&mut c);
        let mut v = match ident("b:0", &["w"]).body {
            Body::Identify(v) => v,
            _ => unreachable!(),
        };
        v.status = NodeStatus::Closed;
        c.handle_message(t0, Message::new("b:0", Body::Identify(v)));
        let out = drain(&mut c);
        assert!(out.iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Error(e), .. }) if e.epoch.is_none() && e.batch_id.as_deref() == Some("w"))));
        assert_eq!(c.directory().nodes.len(), 2);
    }

    #[test]
    fn status_query_from_outside_gets_the_directory_errors_and_epochs() {
        let t0 = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, ident(id, &["w"]));
            c.handle_message(t0, event(id, EventKind::Armed, "w", 0, None));
        }
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, event(id, EventKind::Done, "w", 0, Some(0)));
        }
        drain(&mut c);
        c.handle_message(t0, Message::new("observer:1", Body::Ping(())));
        let out = drain(&mut c);
        match &out[..] {
            [Outgoing::To(id, Message { body: Body::Announce(d), .. })] => {
                assert_eq!(id, "observer:1");
                assert_eq!(d.nodes.len(), 3);
                assert_eq!(d.epochs_ended.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn controller_process_start_and_stop() {
        let t0 = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, ident(id, &["w"]));
        }
        drain(&mut c);
        let process = |from: Option<&str>| {
            Message::new(
                "ctl:1",
                Body::Process(ProcessValue {
                    epoch: Epoch::Root(0),
                    input: ProcessInput { batch_id: "w".into(), seq: 0, from: from.map(str::to_string) },
                }),
            )
        };
        c.handle_message(t0, process(None));
        assert!(matches!(&drain(&mut c)[..], [Outgoing::To(_, Message { body: Body::Error(_), .. })]));
        c.handle_message(t0, process(Some("a")));
        let out = drain(&mut c);
        assert!(
            matches!(&out[0], Outgoing::Publish(Message { body: Body::Process(p), .. }) if p.input.from.as_deref() == Some("a"))
        );
        assert!(matches!(&out[1], Outgoing::To(id, _) if id == "ctl:1"));
        // Two more back to back, then stop.
        c.handle_message(t0, Message::new("ctl:1", Body::Start(Some(2))));
        let mut processes = 0;
        for epoch in 0..4u64 {
            for id in ["a:0", "a:1", "b:0"] {
                c.handle_message(t0, event(id, EventKind::Done, "w", 0, Some(epoch)));
            }
            processes += drain(&mut c)
                .iter()
                .filter(|o| matches!(o, Outgoing::Publish(Message { body: Body::Process(_), .. })))
                .count();
        }
        assert_eq!(processes, 2, "start 2 runs exactly two more epochs");
        // Until stop: one epoch starts at once; stop lets it finish and starts no other.
        c.handle_message(t0, Message::new("ctl:1", Body::Start(None)));
        assert!(drain(&mut c).iter().any(
            |o| matches!(o, Outgoing::Publish(Message { body: Body::Process(p), .. }) if p.epoch == Epoch::Root(3))
        ));
        c.handle_message(t0, Message::new("ctl:1", Body::Stop(())));
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, event(id, EventKind::Done, "w", 0, Some(3)));
        }
        let out = drain(&mut c);
        assert!(out
            .iter()
            .any(|o| matches!(o, Outgoing::Publish(Message { body: Body::EpochEnded(Epoch::Root(3)), .. }))));
        assert!(!out.iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Process(_), .. }))), "stopped");
    }

    #[test]
    fn a_restored_command_node_resumes_membership_and_epoch_numbers() {
        let t0 = Instant::now();
        let mut c = Coordinator::new("command", "inbox");
        for id in ["a:0", "a:1", "b:0"] {
            c.handle_message(t0, ident(id, &["w"]));
            c.handle_message(t0, event(id, EventKind::Armed, "w", 0, None));
        }
        assert!(c.take_dirty());
        let snap = c.snapshot();
        assert_eq!(snap.next_epoch, 1);
        let mut d = Coordinator::new("command", "inbox");
        d.restore(t0, snap);
        drain(&mut d);
        assert_eq!(d.directory().nodes.len(), 3);
        assert!(d.directory().nodes.values().all(|n| !n.subscribed), "subscriptions must be confirmed anew");
        // A heartbeat from an unconfirmed node is answered with a ping.
        d.handle_message(t0, Message::new("a:0", Body::Status(NodeStatus::Ready)));
        assert!(matches!(&drain(&mut d)[..], [Outgoing::To(id, Message { body: Body::Ping(()), .. })] if id == "a:0"));
        // Once all re-identify (subscribed), the next epoch is numbered after the old ones.
        for id in ["a:0", "a:1", "b:0"] {
            d.handle_message(t0, ident(id, &["w"]));
            d.handle_message(t0, event(id, EventKind::Armed, "w", 0, None));
        }
        let out = drain(&mut d);
        assert!(out.iter().any(|o| matches!(o, Outgoing::Publish(Message { body: Body::Process(p), .. }) if p.epoch == Epoch::Root(1) && p.input.seq == 1)), "{out:?}");
    }
}
