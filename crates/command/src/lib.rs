//! # tensorbus-command
//!
//! The command node's I/O driver: binds the ROUTER inbox and the XPUB outbox, feeds every decoded
//! message to the sans-IO [`Coordinator`](tensorbus_protocol::coordinator::Coordinator), and sends
//! what it asks for. All decisions live in the coordinator; this crate only moves bytes.

pub mod registry;
pub mod secure;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tensorbus_protocol::control::Message;
use tensorbus_protocol::coordinator::{Coordinator, Outgoing};

/// Why the command node could not run.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot bind {endpoint}: {source}")]
    Bind { endpoint: String, source: zmq::Error },
    #[error("ZeroMQ: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("bad listen address {0:?}: use HOST:PORT (PORT 0 picks free ports)")]
    BadListen(String),
    #[error("registry: {0}")]
    Registry(String),
}

/// The endpoints a running command node bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub inbox: String,
    pub outbox: String,
}

/// Binds the inbox on `listen` (`HOST:PORT`) and the outbox on `PORT+1` (both free ports when
/// `PORT` is 0).
/// With a `secret`, both sockets admit only peers that prove it (see [`secure`]).
pub fn bind(ctx: &zmq::Context, listen: &str, secret: Option<&[u8]>) -> Result<Bound, CommandError> {
    // The authentication handler must be there before the first handshake.
    let zap = secure::Zap::start(ctx, secret)?;
    let (host, port) = listen.rsplit_once(':').ok_or_else(|| CommandError::BadListen(listen.into()))?;
    let port: u16 = port.parse().map_err(|_| CommandError::BadListen(listen.into()))?;
    let (inbox_ep, outbox_ep) = if port == 0 {
        (format!("tcp://{host}:*"), format!("tcp://{host}:*"))
    } else {
        (format!("tcp://{host}:{port}"), format!("tcp://{host}:{}", port + 1))
    };
    let router = ctx.socket(zmq::ROUTER)?;
    router.set_linger(0)?;
    router.set_router_mandatory(true)?;
    secure::server(&router, secret)?;
    router.bind(&inbox_ep).map_err(|source| CommandError::Bind { endpoint: inbox_ep.clone(), source })?;
    let xpub = ctx.socket(zmq::XPUB)?;
    xpub.set_linger(0)?;
    // Never drop announcements silently: a full subscriber queue blocks the (non-blocking) send,
    // which is logged.
    xpub.set_sndhwm(100_000)?;
    secure::server(&xpub, secret)?;
    xpub.bind(&outbox_ep).map_err(|source| CommandError::Bind { endpoint: outbox_ep.clone(), source })?;
    let inbox = router.get_last_endpoint()?.unwrap_or(inbox_ep);
    let outbox = xpub.get_last_endpoint()?.unwrap_or(outbox_ep);
    Ok(Bound { router, xpub, zap, endpoints: Endpoints { inbox, outbox } })
}

/// A command node's bound sockets, ready to [`serve`].
pub struct Bound {
    router: zmq::Socket,
    xpub: zmq::Socket,
    zap: Option<secure::Zap>,
    pub endpoints: Endpoints,
}

/// Runs the command node on bound sockets until `stop` is set.
pub fn serve(bound: Bound, registry: registry::Registry, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
    let Bound { router, xpub, zap, endpoints } = bound;
    let endpoints = &endpoints;
    let mut coord = Coordinator::new("command", endpoints.inbox.clone());
    if let Some(s) = registry.load()? {
        tracing::info!(nodes = s.nodes.len(), next_epoch = s.next_epoch, "resuming the job from the registry");
        coord.restore(Instant::now(), s);
    }
    tracing::info!(inbox = %endpoints.inbox, outbox = %endpoints.outbox, "command node started");
    let mut ended_seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        coord.handle_timeout(Instant::now());
        let wait = coord
            .poll_timeout()
            .map_or(200, |t| t.saturating_duration_since(Instant::now()).as_millis().min(200) as i64);
        let mut items = vec![router.as_poll_item(zmq::POLLIN), xpub.as_poll_item(zmq::POLLIN)];
        if let Some(z) = &zap {
            items.push(z.poll_item());
        }
        match zmq::poll(&mut items, wait) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if items[0].is_readable() {
            while let Ok(frames) = router.recv_multipart(zmq::DONTWAIT) {
                let (Some(identity), Some(last)) = (frames.first(), frames.last()) else { continue };
                match Message::from_json(last) {
                    Ok(m) => {
                        if m.node_id.as_bytes() != identity.as_slice() {
                            tracing::warn!(node = %m.node_id, "message sender differs from its connection identity");
                        }
                        if !matches!(m.body, tensorbus_protocol::control::Body::Status(_)) {
                            tracing::debug!(from = %m.node_id, kind = m.body.type_name(), "received");
                        }
                        coord.handle_message(Instant::now(), m);
                    }
                    Err(e) => {
                        tracing::warn!(from = %String::from_utf8_lossy(identity), "dropped malformed message: {e}")
                    }
                }
            }
        }
        if items.get(2).is_some_and(|i| i.is_readable()) {
            zap.as_ref().expect("polled").handle();
        }
        if items[1].is_readable() {
            while let Ok(sub) = xpub.recv_bytes(zmq::DONTWAIT) {
                tracing::debug!(subscribe = sub.first() == Some(&1), "outbox subscription change");
            }
        }
        if coord.take_dirty() && registry.persists() {
            if let Err(e) = registry.store(&coord.snapshot()) {
                tracing::error!("{e}");
            }
        }
        while let Some(out) = coord.poll_outgoing() {
            let res = match &out {
                Outgoing::Publish(m) => {
                    xpub.send_multipart([m.body.type_name().as_bytes(), m.to_json().as_bytes()], zmq::DONTWAIT)
                }
                Outgoing::To(id, m) => router.send_multipart([id.as_bytes(), m.to_json().as_bytes()], zmq::DONTWAIT),
            };
            match res {
                Ok(()) => {
                    let (to, m) = match &out {
                        Outgoing::Publish(m) => ("all", m),
                        Outgoing::To(id, m) => (id.as_str(), m),
                    };
                    if !matches!(m.body, tensorbus_protocol::control::Body::Status(_)) {
                        tracing::debug!(to, kind = m.body.type_name(), "sent");
                    }
                }
                Err(e) => tracing::warn!("could not send {:?}: {e}", out),
            }
        }
        let mut last = ended_seen;
        for e in coord.ended().filter(|e| e.epoch >= ended_seen) {
            tracing::info!(epoch = e.epoch, batch = %e.batch_id, seq = e.seq, nodes = e.nodes, bytes = e.bytes, "epoch ended");
            last = last.max(e.epoch + 1);
        }
        ended_seen = last;
    }
    tracing::info!("command node stopped");
    Ok(())
}
