//! A real one-host job for tests: a command node process and agent processes, stopped on drop.

#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_tensorbus");

pub struct Job {
    /// Extra arguments of the command node (kept for restarts).
    pub node_args: Vec<String>,
    pub dir: PathBuf,
    pub inbox: String,
    pub outbox: String,
    pub node: Option<Child>,
    pub agents: Vec<Option<Child>>,
}

/// A loopback address whose port and port + 1 are both free right now.
pub fn free_listen() -> String {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return format!("127.0.0.1:{p}");
        }
    }
    panic!("no free port pair");
}

fn start_node(listen: &str, extra: &[String]) -> (Child, String, String) {
    let mut node = Command::new(BIN)
        .args(["command-node", "--listen", listen])
        .args(extra)
        .env("TENSORBUS_LOG", if std::env::var_os("TB_TEST_LOGS").is_some() { "debug" } else { "warn" })
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TB_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(node.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "command node: inbox tcp://... outbox tcp://..."
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words.len() >= 6, "command node did not start: {line:?}");
    let inbox = words[words.iter().position(|w| *w == "inbox").unwrap() + 1].to_string();
    let outbox = words[words.iter().position(|w| *w == "outbox").unwrap() + 1].to_string();
    (node, inbox, outbox)
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
        Self::start_on(tag, agents, "127.0.0.1:0")
    }

    /// Starts a command node listening on `listen` and `agents` agents.
    pub fn start_on(tag: &str, agents: usize, listen: &str) -> Job {
        Self::start_with(tag, agents, listen, &[])
    }

    /// As `start_on`, with extra command-node arguments.
    pub fn start_with(tag: &str, agents: usize, listen: &str, node_args: &[&str]) -> Job {
        let dir = tmpdir(tag);
        let node_args: Vec<String> = node_args.iter().map(|a| a.to_string()).collect();
        let (node, inbox, outbox) = start_node(listen, &node_args);
        let mut job = Job { node_args, dir, inbox, outbox, node: Some(node), agents: Vec::new() };
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
        // TB_TEST_LOGS=1 shows the agents' logs.
        let err = if std::env::var_os("TB_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() };
        self.agent_command(rank, inbox, outbox)
            .env("TENSORBUS_LOG", if std::env::var_os("TB_TEST_LOGS").is_some() { "debug" } else { "warn" })
            .stderr(err)
            .spawn()
            .unwrap()
    }

    pub fn client(&self, rank: usize) -> tensorbus_host::client::TensorBusClient {
        let (q, s) = self.paths(rank);
        tensorbus_host::client::TensorBusClient::new(rank, Some(&q), Some(&s), Duration::from_secs(20)).unwrap()
    }

    /// Kills the command node with SIGKILL.
    pub fn kill_node(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new command node on the same endpoints.
    pub fn restart_node(&mut self) {
        let listen = self.inbox.trim_start_matches("tcp://").to_string();
        let (node, inbox, _) = start_node(&listen, &self.node_args);
        assert_eq!(inbox, self.inbox);
        self.node = Some(node);
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
        stop(self.agents.iter_mut().flatten().chain(self.node.iter_mut()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops child processes in order: SIGTERM to all (agents then remove their queues and
/// semaphores), up to 2 s each to exit, then SIGKILL.
pub fn stop<'a>(children: impl IntoIterator<Item = &'a mut Child>) {
    let mut children: Vec<&mut Child> = children.into_iter().collect();
    for c in &children {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for c in &mut children {
        for _ in 0..100 {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub const T: Duration = Duration::from_secs(30);

/// A contiguous local shard of `shape` in shared memory `seg` at `offset`.
pub fn shm_desc(seg: &str, offset: u64, shape: &[u64], dtype: &str) -> tensorbus_protocol::payload::TensorDesc {
    let es = dtype.parse::<tensorbus_planner::DType>().unwrap().size() as u64;
    tensorbus_protocol::payload::TensorDesc {
        version: tensorbus_protocol::payload::PAYLOAD_VERSION,
        name: Some("w".into()),
        dtype: dtype.into(),
        shape: shape.to_vec(),
        strides: tensorbus_planner::contiguous_strides(shape),
        device: "cpu".into(),
        memory: tensorbus_protocol::payload::Memory::Shm { name: seg.into(), offset },
        nbytes: shape.iter().product::<u64>() * es,
        pid: None,
        session: None,
    }
}

/// Pairs agent 0 (side "trainer", 1 rank) with agent 1 ("inference", 1 rank) on pair "p".
pub fn pair_up(job: &Job) -> (tensorbus_host::client::TensorBusClient, tensorbus_host::client::TensorBusClient) {
    let (a, b) = (job.client(0), job.client(1));
    let pl = [tensorbus_planner::Placement::Replicate];
    let mut pa = a.init_pair("p", "trainer", "inference", 1, Some((vec![1], 0)), Some(&pl), false, T).unwrap();
    let mut pb = b.init_pair("p", "inference", "trainer", 1, Some((vec![1], 0)), Some(&pl), false, T).unwrap();
    pa.wait(T).unwrap();
    pb.wait(T).unwrap();
    (a, b)
}

/// Registers batch `id` on both sides at once (registration completes only when both have).
pub fn register_both(
    a: &tensorbus_host::client::TensorBusClient,
    b: &tensorbus_host::client::TensorBusClient,
    id: &str,
    ta: tensorbus_protocol::payload::TensorDesc,
    tb: tensorbus_protocol::payload::TensorDesc,
) -> (tensorbus_host::client::BatchHandler, tensorbus_host::client::BatchHandler) {
    let (ta, tb) = ([(ta, "p")], [(tb, "p")]);
    std::thread::scope(|s| {
        let h = s.spawn(|| a.register_tensors(id, &ta, None, T).unwrap());
        let hb = b.register_tensors(id, &tb, None, T).unwrap();
        (h.join().unwrap(), hb)
    })
}
