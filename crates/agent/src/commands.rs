//! The worker-facing end of the command path: the queue thread, completing commands (result
//! first, then the semaphore), and the fast lane for status queries.
//!
//! Every thread hand-off costs a scheduler wake-up (tens of microseconds on a loaded machine), so
//! the queue thread answers `QueryStatus` itself from the batches' *published* status instead of
//! passing it to the main loop — a query then costs two hand-offs (worker → queue thread →
//! worker), not three. Order is kept: the queue thread answers only while no earlier command is
//! still with the main loop, and the main loop publishes before it counts a command as handled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tensorbus_host::keys;
use tensorbus_host::sem::Semaphore;
use tensorbus_host::store::{CommandQueue, StateStore};
use tensorbus_protocol::host::{Command, CommandResult, ErrorKind, RemoteError};

use crate::AgentError;

/// What a status query can see of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BatchStatus {
    /// The last transfer completed.
    pub signal: bool,
    /// Epochs of the batch that ended everywhere.
    pub ended: u64,
}

/// The answer to a `QueryStatus`.
pub(crate) enum Answer {
    Now(bool),
    /// `epoch_ended:N` for an epoch that has not ended: completes when it does.
    WaitFor(u64),
}

pub(crate) fn value_err(origin: &str, msg: impl Into<String>) -> RemoteError {
    RemoteError { kind: ErrorKind::ValueError, message: msg.into(), origin: origin.into() }
}

/// `QueryStatus(batch, state_name)` against a batch's status (`None`: no such batch).
pub(crate) fn answer(
    me: &str,
    batch: &str,
    status: Option<BatchStatus>,
    state_name: &str,
) -> Result<Answer, RemoteError> {
    let b = status.ok_or_else(|| value_err(me, format!("QueryStatus: unknown batch {batch:?}")))?;
    if let Some(n) = state_name.strip_prefix("epoch_ended:") {
        let n: u64 = n.parse().map_err(|_| value_err(me, format!("QueryStatus: bad epoch in {state_name:?}")))?;
        return Ok(if b.ended > n { Answer::Now(true) } else { Answer::WaitFor(n) });
    }
    match state_name {
        "transfer_signal" => Ok(Answer::Now(b.signal)),
        "epoch_ended" => Ok(Answer::Now(b.ended > 0)),
        other => Err(value_err(
            me,
            format!("QueryStatus: unknown state {other:?} (known: transfer_signal, epoch_ended, epoch_ended:N)"),
        )),
    }
}

/// Writes command results and posts the workers' semaphores; shared by the main loop and the
/// queue thread.
pub(crate) struct Replies {
    state: Arc<StateStore>,
    /// Clients reuse their semaphores, so they stay open (a post to one whose client is gone is
    /// harmless: nobody waits on it).
    sems: Mutex<HashMap<String, Semaphore>>,
}

impl Replies {
    pub fn new(state: Arc<StateStore>) -> Self {
        Replies { state, sems: Mutex::default() }
    }

    /// Stores the result, then posts the semaphore (the order the client relies on).
    pub fn complete(&self, sem: Option<&str>, result: CommandResult) {
        let Some(sem) = sem else { return };
        if let Err(e) = self.state.put(&keys::command_result(sem), &result.encode()) {
            tracing::error!("storing result for {sem}: {e}");
            return;
        }
        let mut cache = self.sems.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(sem) {
            match Semaphore::open(sem) {
                Ok(s) => {
                    if cache.len() >= 1024 {
                        cache.clear();
                    }
                    cache.insert(sem.to_string(), s);
                }
                Err(e) => return tracing::warn!("client semaphore {sem} is gone (client gave up?): {e}"),
            }
        }
        let _ = cache[sem].post();
    }

    /// Records a batch's transfer signal where workers read it.
    pub fn store_signal(&self, batch: &str, signal: bool) {
        let _ = self.state.put(&keys::batch_state(batch, "transfer_signal"), if signal { b"\xc3" } else { b"\xc2" });
    }
}

/// What the main loop shares with the queue thread.
#[derive(Default)]
pub(crate) struct Lane {
    published: RwLock<HashMap<String, BatchStatus>>,
    /// Commands handed to the main loop and not yet handled.
    in_flight: AtomicU64,
}

impl Lane {
    /// The main loop's batches as they are now; call before [`Lane::handled`].
    pub fn publish(&self, batches: HashMap<String, BatchStatus>) {
        // Most loop turns change nothing: compare under the read lock the queue thread shares.
        if *self.published.read().unwrap_or_else(|p| p.into_inner()) != batches {
            *self.published.write().unwrap_or_else(|p| p.into_inner()) = batches;
        }
    }

    /// The main loop handled `n` commands (and published what they changed).
    pub fn handled(&self, n: u64) {
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Answers a status query at once when that keeps the command order; `None`: pass it on.
    fn try_answer(&self, me: &str, bytes: &[u8], replies: &Replies) -> Option<()> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        let Ok(Command::QueryStatus(q)) = Command::decode(bytes) else { return None };
        let status = self.published.read().unwrap_or_else(|p| p.into_inner()).get(&q.batch_id).copied();
        let result = match answer(me, &q.batch_id, status, &q.state_name) {
            Ok(Answer::WaitFor(_)) => return None,
            Ok(Answer::Now(v)) => {
                if q.state_name == "transfer_signal" {
                    replies.store_signal(&q.batch_id, v);
                }
                CommandResult::value(v)
            }
            Err(e) => {
                tracing::warn!(node = %me, "command failed: {}", e.message);
                CommandResult::err(e)
            }
        };
        replies.complete(q.semaphore_name.as_deref(), result);
        Some(())
    }
}

/// The queue thread: blocks on the command queue's semaphore, answers what it can, and hands
/// the rest to the main loop (`push`, an in-process socket the main loop polls).
pub(crate) fn queue_thread(
    queue: Arc<CommandQueue>,
    lane: Arc<Lane>,
    replies: Arc<Replies>,
    push: zmq::Socket,
    me: String,
    stop: Arc<AtomicBool>,
) -> Result<(), AgentError> {
    while !stop.load(Ordering::Relaxed) {
        match queue.dequeue(Duration::from_millis(200)) {
            Ok(Some(bytes)) => {
                if lane.try_answer(&me, &bytes, &replies).is_none() {
                    lane.in_flight.fetch_add(1, Ordering::AcqRel);
                    push.send(bytes, 0)?;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!("command queue: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(r: Result<Answer, RemoteError>) -> Option<bool> {
        match r.expect("answers") {
            Answer::Now(v) => Some(v),
            Answer::WaitFor(_) => None,
        }
    }

    #[test]
    fn queries_answer_from_the_status() {
        let s = Some(BatchStatus { signal: true, ended: 3 });
        assert_eq!(now(answer("a:0", "b", s, "transfer_signal")), Some(true));
        assert_eq!(now(answer("a:0", "b", s, "epoch_ended")), Some(true));
        assert_eq!(now(answer("a:0", "b", s, "epoch_ended:2")), Some(true));
        assert!(matches!(answer("a:0", "b", s, "epoch_ended:3"), Ok(Answer::WaitFor(3))));
        let fresh = Some(BatchStatus::default());
        assert_eq!(now(answer("a:0", "b", fresh, "transfer_signal")), Some(false));
        assert_eq!(now(answer("a:0", "b", fresh, "epoch_ended")), Some(false));
    }

    #[test]
    fn bad_queries_are_value_errors_naming_the_cause() {
        let e = answer("a:0", "nope", None, "transfer_signal").err().expect("unknown batch");
        assert_eq!(e.kind, ErrorKind::ValueError);
        assert!(e.message.contains("unknown batch \"nope\""), "{}", e.message);
        assert_eq!(e.origin, "a:0");
        let s = Some(BatchStatus::default());
        assert!(answer("a:0", "b", s, "epoch_ended:x").err().expect("bad epoch").message.contains("bad epoch"));
        assert!(answer("a:0", "b", s, "colour").err().expect("unknown state").message.contains("unknown state"));
    }
}
