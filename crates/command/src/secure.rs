//! Authentication of control connections. With a job secret, the command node's sockets are
//! ZeroMQ PLAIN servers and a ZAP handler admits only clients that present the job token
//! (`blake3` of the secret, never the secret itself); everyone else's connection fails its
//! handshake before a single message is delivered, and is logged. Without a secret, sockets stay
//! plain (a one-user loopback job).
//!
//! Why not CURVE: the vendored libzmq of the `zmq` crate is built without libsodium, so CURVE is
//! not available. PLAIN proves knowledge of the token but does not encrypt it on the wire; the
//! data plane's own handshake (`tensorbus_transport::tcp`) never sends the secret or the token.

/// The token a client presents: derived from the secret, so the secret never travels.
fn token(secret: &[u8]) -> String {
    blake3::derive_key("tensorbus control-plane token v1", secret).iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes `s` an authenticating server for the job (before bind). Needs a running [`Zap`].
pub fn server(s: &zmq::Socket, secret: Option<&[u8]>) -> Result<(), zmq::Error> {
    if secret.is_some() {
        s.set_plain_server(true)?;
        s.set_zap_domain("tensorbus")?;
    }
    Ok(())
}

/// Makes `s` a client of the job's servers (before connect).
pub fn client(s: &zmq::Socket, secret: Option<&[u8]>) -> Result<(), zmq::Error> {
    if let Some(secret) = secret {
        s.set_plain_username(Some("tensorbus"))?;
        s.set_plain_password(Some(&token(secret)))?;
    }
    Ok(())
}

/// The job secret from `TENSORBUS_SECRET` (empty or unset: none).
pub fn secret_from_env() -> Option<Vec<u8>> {
    std::env::var("TENSORBUS_SECRET").ok().filter(|s| !s.is_empty()).map(String::into_bytes)
}

/// The ZAP handler of a context: answers libzmq's authentication requests for its PLAIN servers.
pub struct Zap {
    socket: zmq::Socket,
    token: String,
}

impl Zap {
    /// Binds the context's ZAP endpoint; `None` when there is no secret (nothing to check).
    pub fn start(ctx: &zmq::Context, secret: Option<&[u8]>) -> Result<Option<Zap>, zmq::Error> {
        let Some(secret) = secret else { return Ok(None) };
        let socket = ctx.socket(zmq::REP)?;
        socket.bind("inproc://zeromq.zap.01")?;
        Ok(Some(Zap { socket, token: token(secret) }))
    }

    pub fn poll_item(&self) -> zmq::PollItem<'_> {
        self.socket.as_poll_item(zmq::POLLIN)
    }

    /// Answers every waiting request; refusals are logged with the peer's address.
    pub fn handle(&self) {
        while let Ok(f) = self.socket.recv_multipart(zmq::DONTWAIT) {
            // version, request id, domain, address, identity, mechanism, credentials...
            let get = |i: usize| f.get(i).map(|x| String::from_utf8_lossy(x).into_owned()).unwrap_or_default();
            let ok = get(5) == "PLAIN" && get(7) == self.token;
            if !ok {
                tracing::warn!(peer = %get(3), mechanism = %get(5), "control connection refused: it does not know the job secret");
            }
            let (code, text) = if ok { ("200", "OK") } else { ("400", "refused") };
            let reply: [&[u8]; 6] = [b"1.0", &f[1.min(f.len() - 1)], code.as_bytes(), text.as_bytes(), b"", b""];
            let _ = self.socket.send_multipart(reply, 0);
        }
    }
}

/// Why a client's connection to a job's server failed its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HandshakeFailure {
    /// The server's authentication refused the token (a wrong secret).
    Refused,
    /// Client and server disagree on the mechanism: one of them has a secret, the other not.
    MechanismMismatch,
    /// Some other handshake failure.
    Other,
}

/// Watches a client socket's handshakes (a ZeroMQ socket monitor), so a tool can say why a
/// server did not answer instead of only that it did not.
pub struct HandshakeWatch {
    events: zmq::Socket,
    /// The most telling failure so far (a client reconnects, and later attempts may fail with
    /// less detail than the first).
    worst: std::cell::Cell<Option<HandshakeFailure>>,
}

impl HandshakeWatch {
    /// Starts watching `s`; call before `s` connects.
    pub fn start(ctx: &zmq::Context, s: &zmq::Socket) -> Result<HandshakeWatch, zmq::Error> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let ep = format!(
            "inproc://tb-handshake-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mask = zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32
            | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32
            | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32;
        s.monitor(&ep, mask)?;
        let events = ctx.socket(zmq::PAIR)?;
        events.connect(&ep)?;
        Ok(HandshakeWatch { events, worst: std::cell::Cell::new(None) })
    }

    /// The most telling handshake failure reported so far: a refusal, else a mechanism mismatch,
    /// else any other.
    pub fn failure(&self) -> Option<HandshakeFailure> {
        let mut last = self.worst.get();
        while let Ok(frames) = self.events.recv_multipart(zmq::DONTWAIT) {
            // First frame: the event (u16) and its value (u32), native byte order.
            let Some(ev) = frames.first().filter(|f| f.len() >= 2) else { continue };
            let ev = u16::from_ne_bytes([ev[0], ev[1]]) as i32;
            let f = if ev == zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32 {
                HandshakeFailure::Refused
            } else if ev == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32 {
                HandshakeFailure::MechanismMismatch
            } else {
                HandshakeFailure::Other
            };
            last = Some(last.map_or(f, |l: HandshakeFailure| l.min(f)));
        }
        self.worst.set(last);
        last
    }

    /// Why the server at `endpoint` did not answer a client with (or without) a secret, if a
    /// handshake said so.
    pub fn explain(&self, endpoint: &str, had_secret: bool) -> Option<String> {
        Some(match (self.failure()?, had_secret) {
            (HandshakeFailure::Refused, _) => format!(
                "the command node at {endpoint} refused this client's job secret: it is not this job's \
                 (check TENSORBUS_SECRET, or --job DIR / TENSORBUS_JOB for a job started with `tensorbus up --dir DIR`)"
            ),
            // A server that detects the mismatch first closes the connection (EPIPE, no detail).
            (HandshakeFailure::MechanismMismatch | HandshakeFailure::Other, false) => format!(
                "the command node at {endpoint} requires the job secret and this client has none: on the job's host \
                 pass --job DIR (or set TENSORBUS_JOB=DIR) where `tensorbus up --dir DIR` runs, elsewhere set TENSORBUS_SECRET"
            ),
            (HandshakeFailure::MechanismMismatch, true) => format!(
                "the command node at {endpoint} runs without a job secret but this client presented one (unset TENSORBUS_SECRET)"
            ),
            (HandshakeFailure::Other, true) => format!(
                "the command node at {endpoint} closed the connection during the handshake: its job secret differs \
                 from this client's, or it has none"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(server_secret: Option<&[u8]>, client_secret: Option<&[u8]>) -> bool {
        let ctx = zmq::Context::new();
        let zap = Zap::start(&ctx, server_secret).unwrap();
        let r = ctx.socket(zmq::ROUTER).unwrap();
        server(&r, server_secret).unwrap();
        r.bind("tcp://127.0.0.1:*").unwrap();
        let ep = r.get_last_endpoint().unwrap().unwrap();
        let d = ctx.socket(zmq::DEALER).unwrap();
        client(&d, client_secret).unwrap();
        d.set_linger(0).unwrap();
        d.connect(&ep).unwrap();
        d.send(&b"hello"[..], 0).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1000);
        while std::time::Instant::now() < deadline {
            if let Some(z) = &zap {
                let mut items = [z.poll_item(), r.as_poll_item(zmq::POLLIN)];
                zmq::poll(&mut items, 50).unwrap();
                if items[0].is_readable() {
                    z.handle();
                }
                if items[1].is_readable() {
                    return true;
                }
            } else {
                let mut items = [r.as_poll_item(zmq::POLLIN)];
                if zmq::poll(&mut items, 50).unwrap() > 0 {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn a_refused_client_learns_why() {
        for (server_secret, client_secret, expect) in [
            (Some(&b"s3cret"[..]), Some(&b"guess"[..]), HandshakeFailure::Refused),
            (Some(b"s3cret"), None, HandshakeFailure::MechanismMismatch),
            (None, Some(b"s3cret"), HandshakeFailure::MechanismMismatch),
        ] {
            let ctx = zmq::Context::new();
            let zap = Zap::start(&ctx, server_secret).unwrap();
            let r = ctx.socket(zmq::ROUTER).unwrap();
            server(&r, server_secret).unwrap();
            r.bind("tcp://127.0.0.1:*").unwrap();
            let ep = r.get_last_endpoint().unwrap().unwrap();
            let d = ctx.socket(zmq::DEALER).unwrap();
            client(&d, client_secret).unwrap();
            d.set_linger(0).unwrap();
            let watch = HandshakeWatch::start(&ctx, &d).unwrap();
            d.connect(&ep).unwrap();
            d.send(&b"hello"[..], 0).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            let mut seen = None;
            while seen.is_none() && std::time::Instant::now() < deadline {
                if let Some(z) = &zap {
                    let mut items = [z.poll_item()];
                    if zmq::poll(&mut items, 20).unwrap() > 0 {
                        z.handle();
                    }
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                seen = watch.failure();
            }
            assert_eq!(seen, Some(expect), "server {server_secret:?} client {client_secret:?}");
        }
    }

    #[test]
    fn only_peers_with_the_secret_get_through() {
        assert!(exchange(Some(b"s3cret"), Some(b"s3cret")));
        assert!(!exchange(Some(b"s3cret"), Some(b"guess")));
        assert!(!exchange(Some(b"s3cret"), None));
        assert!(exchange(None, None));
    }
}
