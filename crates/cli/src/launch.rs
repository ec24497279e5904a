//! Starting the pieces of a one-host job: an embedded command node and agent processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorbus_command::Endpoints;

/// A command node running on a thread of this process.
pub struct EmbeddedCommandNode {
    pub endpoints: Endpoints,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedCommandNode {
    pub fn start(listen: &str) -> Result<Self, String> {
        let ctx = zmq::Context::new();
        let secret = tensorbus_command::secure::secret_from_env();
        let bound = tensorbus_command::bind(&ctx, listen, secret.as_deref()).map_err(|e| e.to_string())?;
        let endpoints = bound.endpoints.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let _ctx = ctx;
            if let Err(e) = tensorbus_command::serve(bound, tensorbus_command::registry::Registry::Memory, s) {
                tracing::error!("command node: {e}");
            }
        });
        Ok(EmbeddedCommandNode { endpoints, stop, thread: Some(thread) })
    }
}

impl Drop for EmbeddedCommandNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Paths of agent `rank`'s files under `dir`.
pub fn agent_paths(dir: &Path, rank: usize) -> (PathBuf, PathBuf) {
    (dir.join(format!("agent_rank{rank}_command.lmdb")), dir.join(format!("agent_rank{rank}_state.lmdb")))
}

/// Agent child processes, stopped in order (SIGTERM, then SIGKILL) when dropped.
pub struct Agents {
    pub children: Vec<Child>,
}

impl Agents {
    /// Starts `n` agents of ranks `first..first+n` with files under `dir`.
    pub fn spawn(
        n: usize,
        first: usize,
        dir: &Path,
        ep: &Endpoints,
        copy_threads: usize,
        quiet: bool,
    ) -> Result<Self, String> {
        let mut children = Vec::new();
        for rank in first..first + n {
            let (q, s) = agent_paths(dir, rank);
            let child = crate::self_command()?
                .args([
                    "agent",
                    "--rank",
                    &rank.to_string(),
                    "--command-inbox",
                    &ep.inbox,
                    "--command-outbox",
                    &ep.outbox,
                ])
                .arg("--command-queue")
                .arg(&q)
                .arg("--state")
                .arg(&s)
                .args(["--copy-threads", &copy_threads.to_string()])
                .env(
                    "TENSORBUS_LOG",
                    std::env::var("TENSORBUS_LOG")
                        .unwrap_or_else(|_| if quiet { "warn".into() } else { "info".into() }),
                )
                .stdout(Stdio::null())
                .stderr(if quiet { Stdio::null() } else { Stdio::inherit() })
                .spawn()
                .map_err(|e| format!("starting agent {rank}: {e}"))?;
            children.push(child);
        }
        Ok(Agents { children })
    }

    /// Stops every agent: SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        for c in &self.children {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}
