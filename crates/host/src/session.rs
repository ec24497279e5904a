//! Sessions: the kernel's word for which process registers memory.
//!
//! A command in the LMDB queue could come from any process of the user, and its payload could
//! name any pid. So before a worker registers memory it opens a session: it connects to the
//! agent's Unix socket `{command_queue_path}.sock`, the agent asks the kernel who connected
//! (`SO_PEERCRED`: pid and uid, which the client cannot forge) and answers one JSON line with a
//! fresh random token. Tensor payloads carry the token; the agent reads or writes only memory
//! of the process the token was issued to. The worker keeps the connection open for as long as
//! it lives: when it closes (the worker exited — also as a zombie its parent has not reaped, its
//! descriptors are closed), the session ends, and the agent releases what it registered.
//! The wire format is in docs/protocol.md, "Sessions".

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::HostError;

/// The version of the session hello.
pub const SESSION_VERSION: u32 = 1;

/// The agent's session socket beside its command queue: `{command_queue_path}.sock`.
pub fn socket_path(command_queue_path: &Path) -> PathBuf {
    let mut p = command_queue_path.as_os_str().to_owned();
    p.push(".sock");
    PathBuf::from(p)
}

/// The one line the agent writes to a new connection (JSON, `\n`-terminated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// 32 hex digits; absent when `error` says why the connection was refused.
    #[serde(default)]
    pub token: Option<String>,
    /// The pid the kernel reported for the connecting process.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A worker's side of a session: keep it alive as long as registered memory is in use.
#[derive(Debug)]
pub struct ClientSession {
    _stream: UnixStream,
    pub token: String,
    /// This process, as the agent's kernel saw it.
    pub pid: u32,
}

/// Opens a session with the agent whose session socket is at `path`.
pub fn connect(path: &Path, timeout: Duration) -> Result<ClientSession, HostError> {
    let err = |m: String| HostError::NoAgent(format!("session socket {}: {m}", path.display()));
    let stream = UnixStream::connect(path).map_err(|e| err(e.to_string()))?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(|e| err(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line).map_err(|e| err(format!("no hello: {e}")))?;
    let hello: Hello = serde_json::from_str(&line).map_err(|e| err(format!("bad hello {line:?}: {e}")))?;
    if let Some(e) = hello.error {
        return Err(err(format!("refused: {e}")));
    }
    match (hello.version, hello.token, hello.pid) {
        (SESSION_VERSION, Some(token), Some(pid)) => {
            stream.set_read_timeout(None).map_err(|e| err(e.to_string()))?;
            Ok(ClientSession { _stream: stream, token, pid })
        }
        (v, ..) => Err(err(format!("hello of version {v} without a token"))),
    }
}

/// One worker process that proved who it is.
#[derive(Debug)]
pub struct Session {
    /// From `SO_PEERCRED`, at connect time.
    pub pid: u32,
    pub uid: u32,
    open: AtomicBool,
}

impl Session {
    /// False once the worker closed its connection (it exited, or closed the client).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

/// The agent's side: a listener thread issuing tokens, and the sessions still open.
#[derive(Debug)]
pub struct Sessions {
    path: PathBuf,
    /// Shared with the connections' threads, which never hold the `Sessions` itself: the socket
    /// file goes when its owner drops it, not later on another thread.
    open: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

fn peer_cred(s: &UnixStream) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

fn random_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: writes at most the remaining bytes of `b`.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sessions {
    /// Binds `path` (0600, replacing a stale socket: the caller holds the agent's lock) and
    /// starts accepting workers.
    pub fn serve(path: &Path) -> Result<Arc<Sessions>, HostError> {
        let io = |what: &str, e: std::io::Error| HostError::NoAgent(format!("{what} {}: {e}", path.display()));
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| io("binding the session socket", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("making the session socket private", e))?;
        let me = Arc::new(Sessions { path: path.to_path_buf(), open: Arc::default() });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("tb-sessions".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Some(me) = weak.upgrade() else { return };
                    match conn {
                        Ok(s) => me.admit(s),
                        Err(e) => tracing::warn!("session socket: {e}"),
                    }
                }
            })
            .map_err(|e| io("starting the session thread for", e))?;
        Ok(me)
    }

    fn admit(self: &Arc<Self>, mut s: UnixStream) {
        let reply = |s: &mut UnixStream, h: &Hello| {
            let mut line = serde_json::to_vec(h).expect("encodes");
            line.push(b'\n');
            s.write_all(&line)
        };
        let cred = match peer_cred(&s) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("session: no peer credentials: {e}");
                return;
            }
        };
        // SAFETY: geteuid has no preconditions.
        let me_uid = unsafe { libc::geteuid() };
        let refuse = |why: String| Hello { version: SESSION_VERSION, token: None, pid: None, error: Some(why) };
        if cred.uid != me_uid && cred.uid != 0 {
            tracing::warn!(pid = cred.pid, uid = cred.uid, "session refused: another user");
            let _ = reply(&mut s, &refuse(format!("uid {} is not this agent's user ({me_uid})", cred.uid)));
            return;
        }
        let token = match random_token() {
            Ok(t) => t,
            Err(e) => {
                let _ = reply(&mut s, &refuse(format!("no randomness: {e}")));
                return;
            }
        };
        let session = Arc::new(Session { pid: cred.pid as u32, uid: cred.uid, open: AtomicBool::new(true) });
        self.open.lock().expect("sessions lock").insert(token.clone(), session.clone());
        let hello = Hello { version: SESSION_VERSION, token: Some(token.clone()), pid: Some(session.pid), error: None };
        if reply(&mut s, &hello).is_err() {
            close(&self.open, &token, &session);
            return;
        }
        tracing::debug!(pid = session.pid, "session opened");
        let open = self.open.clone();
        let _ = std::thread::Builder::new().name("tb-session".into()).spawn(move || {
            // The worker never writes: anything it sends is ignored; EOF or an error ends it.
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            close(&open, &token, &session);
        });
    }

    /// The open session a token was issued for.
    pub fn get(&self, token: &str) -> Option<Arc<Session>> {
        self.open.lock().expect("sessions lock").get(token).cloned()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn close(open: &Mutex<HashMap<String, Arc<Session>>>, token: &str, session: &Session) {
    open.lock().expect("sessions lock").remove(token);
    session.open.store(false, Ordering::Release);
    tracing::debug!(pid = session.pid, "session closed");
}

impl Drop for Sessions {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_the_client_and_a_closed_connection_ends_the_session() {
        let path = std::env::temp_dir().join(format!("tb-session-test-{}.sock", std::process::id()));
        let server = Sessions::serve(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(c.pid, std::process::id());
        assert_eq!(c.token.len(), 32);
        let s = server.get(&c.token).expect("open");
        assert!(s.is_open());
        let other = connect(&path, Duration::from_secs(5)).unwrap();
        assert_ne!(other.token, c.token);
        drop(c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.is_open() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!s.is_open());
        assert!(server.get(&other.token).is_some());
        assert!(server.get("0123456789abcdef0123456789abcdef").is_none());
        drop(server);
        assert!(!path.exists());
    }
}
