//! `tensorbus ctl`: drive a job's epochs from outside (a controller): run one epoch of a batch,
//! start or stop back-to-back epochs, (de)initialize the agents.

use std::time::Duration;

use tensorbus_protocol::control::{Body, Epoch, Message, ProcessInput, ProcessValue};

#[derive(clap::Subcommand)]
pub enum Ctl {
    /// Run one epoch of a batch now, without waiting for the workers.
    Process {
        #[arg(long)]
        batch: String,
        /// The sending side's name (its `local_name`).
        #[arg(long)]
        from: String,
    },
    /// Run the next N epochs of the last processed batch back to back (no N: until `stop`).
    Start { n: Option<u64> },
    /// Finish the epoch in flight, then stop.
    Stop,
    /// Agents rejoin after a deinit.
    Init,
    /// Agents release every pair, batch and mapping and report `closed`.
    Deinit,
}

/// Sends `body` to the command node as controller `ctl:{pid}`; returns its direct answer, if any
/// arrives within `wait`.
pub fn send(inbox: &str, secret: Option<&[u8]>, body: Body, wait: Duration) -> Result<Option<Message>, String> {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::DEALER).map_err(|e| e.to_string())?;
    let id = format!("ctl:{}", std::process::id());
    s.set_identity(id.as_bytes()).map_err(|e| e.to_string())?;
    tensorbus_command::secure::client(&s, secret).map_err(|e| e.to_string())?;
    s.set_linger(1000).map_err(|e| e.to_string())?;
    s.connect(inbox).map_err(|e| format!("{inbox}: {e}"))?;
    match s.send(Message::new(&id, body).to_json().as_bytes(), zmq::DONTWAIT) {
        Err(zmq::Error::EAGAIN) => return Ok(None), // no connection: nobody to answer
        r => r.map_err(|e| e.to_string())?,
    }
    let mut items = [s.as_poll_item(zmq::POLLIN)];
    if zmq::poll(&mut items, wait.as_millis() as i64).map_err(|e| e.to_string())? == 0 {
        return Ok(None);
    }
    let frames = s.recv_multipart(0).map_err(|e| e.to_string())?;
    Message::from_json(frames.last().map_or(&[][..], |f| f)).map(Some).map_err(|e| e.to_string())
}

pub fn run(target: &crate::job::Target, c: Ctl) -> Result<(), String> {
    let inbox = target.inbox.as_str();
    // Reachable, and this client admitted? (A refused handshake is otherwise silent.)
    crate::status::query(inbox, target.secret.as_deref(), Duration::from_secs(3))?;
    let (body, answer) = match c {
        Ctl::Process { batch, from } => (
            Body::Process(ProcessValue {
                epoch: Epoch::Root(0),
                input: ProcessInput { batch_id: batch, seq: 0, from: Some(from) },
            }),
            true,
        ),
        Ctl::Start { n } => (Body::Start(n), false),
        Ctl::Stop => (Body::Stop(()), false),
        Ctl::Init => (Body::Init(()), false),
        Ctl::Deinit => (Body::Deinit(()), false),
    };
    let wait = Duration::from_millis(if answer { 3000 } else { 300 });
    match send(inbox, target.secret.as_deref(), body, wait)? {
        Some(Message { body: Body::Error(e), .. }) => {
            Err(e.err_args.first().and_then(|a| a.as_str()).unwrap_or("refused").to_string())
        }
        Some(Message { body: Body::Process(p), .. }) => {
            println!("epoch {:?} of batch {} started", p.epoch, p.input.batch_id);
            Ok(())
        }
        _ if answer => Err(format!("no answer from the command node at {inbox}")),
        _ => Ok(()),
    }
}
