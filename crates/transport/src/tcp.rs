//! The data plane across hosts: authenticated TCP links between agents and the frames they carry.
//!
//! Handshake (both sides, before anything else): send `TBDATA01` and a 32-byte random nonce; then
//! send `blake3_keyed(key, role || peer_nonce || own_nonce)` where `key = blake3(job secret)`, and
//! check the peer's proof. A peer without the secret cannot produce a proof, so it is refused
//! before it can make the agent read or write any memory. Without a secret on both sides (a
//! one-user loopback job) the proofs are keyed with the all-zero key.
//!
//! Frame: `magic u32 | epoch u64 | key_len u16 | key | offset u64 | len u64 | payload`, all little
//! endian. `key` names a registered destination tensor (`batch \0 pair \0 index`); the receiver
//! writes `payload` at `offset` of that tensor, after checking the bounds.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::TransportError;

const HELLO: &[u8; 8] = b"TBDATA01";
pub const FRAME_MAGIC: u32 = 0x4644_4254; // "TBDF"

/// The job's shared secret, reduced to a 32-byte key.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(secret: &[u8]) -> Self {
        Secret(*blake3::hash(secret).as_bytes())
    }

    /// No secret: the all-zero key (only peers without a secret accept it).
    pub fn none() -> Self {
        Secret([0; 32])
    }
}

fn io(what: &str, e: std::io::Error) -> TransportError {
    TransportError::Io { what: what.into(), source: e }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // SAFETY: getrandom writes at most n.len() bytes into n.
    let got = unsafe { libc::getrandom(n.as_mut_ptr() as *mut libc::c_void, n.len(), 0) };
    assert_eq!(got, 32, "getrandom failed");
    n
}

fn proof(key: &Secret, role: u8, peer: &[u8; 32], own: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&[role]);
    h.update(peer);
    h.update(own);
    *h.finalize().as_bytes()
}

/// Mutual authentication; `server` is true on the accepting side.
pub fn handshake(s: &mut TcpStream, key: &Secret, server: bool) -> Result<(), TransportError> {
    let own = nonce();
    s.write_all(HELLO).and_then(|_| s.write_all(&own)).map_err(|e| io("handshake send", e))?;
    let mut hello = [0u8; 8];
    let mut peer = [0u8; 32];
    s.read_exact(&mut hello).and_then(|_| s.read_exact(&mut peer)).map_err(|e| io("handshake receive", e))?;
    if &hello != HELLO {
        return Err(TransportError::Refused("not a tensorbus data connection".into()));
    }
    let (mine, theirs) = if server { (1u8, 0u8) } else { (0u8, 1u8) };
    s.write_all(&proof(key, mine, &peer, &own)).map_err(|e| io("handshake send", e))?;
    let mut got = [0u8; 32];
    s.read_exact(&mut got).map_err(|e| io("handshake receive", e))?;
    if got != proof(key, theirs, &own, &peer) {
        return Err(TransportError::Refused("the peer does not know the job secret".into()));
    }
    Ok(())
}

/// The header of a frame carrying `len` bytes to `offset` of tensor `key` in `epoch`.
pub fn frame_header(epoch: u64, key: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(30 + key.len());
    h.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&(key.len() as u16).to_le_bytes());
    h.extend_from_slice(key.as_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// A received frame header.
pub struct Frame {
    pub epoch: u64,
    pub key: String,
    pub offset: u64,
    pub len: u64,
}

/// Reads the next frame header; `Ok(None)` at a clean end of stream.
pub fn read_header(s: &mut impl Read) -> Result<Option<Frame>, TransportError> {
    let mut b = [0u8; 14];
    match s.read_exact(&mut b[..4]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io("frame", e)),
    }
    if u32::from_le_bytes(b[..4].try_into().expect("4")) != FRAME_MAGIC {
        return Err(TransportError::Refused("bad frame magic".into()));
    }
    s.read_exact(&mut b[4..14]).map_err(|e| io("frame", e))?;
    let epoch = u64::from_le_bytes(b[4..12].try_into().expect("8"));
    let klen = u16::from_le_bytes(b[12..14].try_into().expect("2")) as usize;
    let mut key = vec![0u8; klen];
    let mut tail = [0u8; 16];
    s.read_exact(&mut key).and_then(|_| s.read_exact(&mut tail)).map_err(|e| io("frame", e))?;
    Ok(Some(Frame {
        epoch,
        key: String::from_utf8(key).map_err(|_| TransportError::Refused("bad frame key".into()))?,
        offset: u64::from_le_bytes(tail[..8].try_into().expect("8")),
        len: u64::from_le_bytes(tail[8..].try_into().expect("8")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(a: Secret, b: Secret) -> (Result<(), TransportError>, Result<(), TransportError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            handshake(&mut s, &a, true)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let rc = handshake(&mut c, &b, false);
        (t.join().unwrap(), rc)
    }

    #[test]
    fn same_secret_passes_other_secret_or_none_is_refused() {
        let (a, b) = pair(Secret::new(b"s3cret"), Secret::new(b"s3cret"));
        assert!(a.is_ok() && b.is_ok());
        let (a, b) = pair(Secret::new(b"s3cret"), Secret::new(b"guess"));
        assert!(matches!(a, Err(TransportError::Refused(_))) && matches!(b, Err(TransportError::Refused(_))));
        let (a, _) = pair(Secret::new(b"s3cret"), Secret::none());
        assert!(matches!(a, Err(TransportError::Refused(_))));
        let (a, b) = pair(Secret::none(), Secret::none());
        assert!(a.is_ok() && b.is_ok());
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = frame_header(7, "w\0p\0x3", 128, 4096);
        buf.extend_from_slice(&[1, 2, 3]);
        let mut r = &buf[..];
        let f = read_header(&mut r).unwrap().unwrap();
        assert_eq!((f.epoch, f.key.as_str(), f.offset, f.len), (7, "w\0p\0x3", 128, 4096));
        assert_eq!(r, &[1, 2, 3]);
        assert!(read_header(&mut &b""[..]).unwrap().is_none());
        assert!(read_header(&mut &b"XXXXXXXXXXXXXXXX"[..]).is_err());
    }
}
