//! A real one-host job for tests: a command node process and agent processes, stopped on drop.

#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_tensorbus");

pub struct Job {
    pub dir: PathBuf,
    pub inbox: String,
    pub outbox: String,
    pub node: Option<Child>,
    pub agents: Vec<Option<Child>>,
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tb-it-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Job {
    /// Starts a command node on free loopback ports and `agents` agents.
    pub fn start(tag: &str, agents: usize) -> Job {
        let dir = tmpdir(tag);
        let mut node = Command::new(BIN)
            .args(["command-node", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(node.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "command node: inbox tcp://... outbox tcp://..."
        let words: Vec<&str> = line.split_whitespace().collect();
        let inbox = words[words.iter().position(|w| *w == "inbox").unwrap() + 1].to_string();
        let outbox = words[words.iter().position(|w| *w == "outbox").unwrap() + 1].to_string();
        let mut job = Job { dir, inbox, outbox, node: Some(node), agents: Vec::new() };
        for r in 0..agents {
            let c = job.spawn_agent(r, &job.inbox.clone(), &job.outbox.clone());
            job.agents.push(Some(c));
        }
        job
    }

    pub fn paths(&self, rank: usize) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("agent_rank{rank}_command.lmdb")), self.dir.join(format!("agent_rank{rank}_state.lmdb")))
    }

    pub fn agent_command(&self, rank: usize, inbox: &str, outbox: &str) -> Command {
        let (q, s) = self.paths(rank);
        let mut c = Command::new(BIN);
        c.args(["agent", "--rank", &rank.to_string(), "--command-inbox", inbox, "--command-outbox", outbox])
            .arg("--command-queue")
            .arg(q)
            .arg("--state")
            .arg(s)
            .env("TENSORBUS_LOG", "warn")
            .stdout(Stdio::null());
        c
    }

    pub fn spawn_agent(&self, rank: usize, inbox: &str, outbox: &str) -> Child {
        self.agent_command(rank, inbox, outbox).stderr(Stdio::null()).spawn().unwrap()
    }

    pub fn client(&self, rank: usize) -> tensorbus_host::client::TensorBusClient {
        let (q, s) = self.paths(rank);
        tensorbus_host::client::TensorBusClient::new(rank, Some(&q), Some(&s), Duration::from_secs(20)).unwrap()
    }

    pub fn kill_agent(&mut self, rank: usize) {
        if let Some(mut c) = self.agents[rank].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for c in self.agents.iter_mut().flatten().chain(self.node.iter_mut()) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in self.agents.iter_mut().flatten().chain(self.node.iter_mut()) {
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
