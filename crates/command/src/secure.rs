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
    fn only_peers_with_the_secret_get_through() {
        assert!(exchange(Some(b"s3cret"), Some(b"s3cret")));
        assert!(!exchange(Some(b"s3cret"), Some(b"guess")));
        assert!(!exchange(Some(b"s3cret"), None));
        assert!(exchange(None, None));
    }
}
