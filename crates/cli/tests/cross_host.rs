//! Across hosts: agents in separate network namespaces ("hosts") joined by a veth pair, data over
//! authenticated TCP, element-exact; same-host peers keep the memory path (the choice is per peer);
//! a peer without the job secret is refused.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const SECRET: &str = "test-job-secret";
static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out =
        Command::new("ip").args(args).output().expect("the `ip` tool (iproute2) is needed for the cross-host tests");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two "hosts": network namespaces joined by a veth pair, 10.77.N.1 and 10.77.N.2.
struct Hosts {
    ns: [String; 2],
    addr: [String; 2],
    dir: std::path::PathBuf,
    procs: Vec<Child>,
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let n = (std::process::id() % 200) as u32 * 4 + NEXT.fetch_add(1, Ordering::Relaxed) % 4;
        let (a, b) = (format!("tb{n}a"), format!("tb{n}b"));
        let subnet = format!("10.77.{}", n % 250);
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let (va, vb) = (format!("{a}v"), format!("{b}v"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        for (ns, dev, host) in [(&a, &va, 1), (&b, &vb, 2)] {
            ip(&["-n", ns, "addr", "add", &format!("{subnet}.{host}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts {
            ns: [a, b],
            addr: [format!("{subnet}.1"), format!("{subnet}.2")],
            dir: common::tmpdir(tag),
            procs: Vec::new(),
        }
    }

    fn in_ns(&self, host: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[host], common::BIN])
            .env("TENSORBUS_LOG", "warn")
            .env("TENSORBUS_SECRET", SECRET)
            .stderr(Stdio::null());
        c
    }

    /// A command node on host 0; returns (inbox, outbox).
    fn command_node(&mut self) -> (String, String) {
        let mut c = self
            .in_ns(0)
            .args(["command-node", "--listen", &format!("{}:0", self.addr[0])])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap()).read_line(&mut line).unwrap();
        self.procs.push(c);
        let w: Vec<&str> = line.split_whitespace().collect();
        assert!(w.len() >= 6, "command node did not start: {line:?}");
        (w[3].to_string(), w[5].to_string())
    }

    fn agent(&mut self, host: usize, rank: usize, ep: &(String, String), secret: &str) {
        let (q, s) = self.paths(rank);
        // Odd ranks bind every address and advertise the namespace's one.
        let listen: Vec<&str> = if rank % 2 == 1 {
            vec!["--listen-host", "0.0.0.0", "--advertise", &self.addr[host]]
        } else {
            vec!["--listen-host", &self.addr[host]]
        };
        let c = self
            .in_ns(host)
            .args(["agent", "--rank", &rank.to_string(), "--command-inbox", &ep.0, "--command-outbox", &ep.1])
            .args(listen)
            .args(["--host-id", &format!("host{host}")])
            .arg("--command-queue")
            .arg(q)
            .arg("--state")
            .arg(s)
            .env("TENSORBUS_SECRET", secret)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.push(c);
    }

    fn paths(&self, rank: usize) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.dir.join(format!("agent_rank{rank}_command.lmdb")), self.dir.join(format!("agent_rank{rank}_state.lmdb")))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        common::stop(&mut self.procs);
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one transfer job: source ranks on host 0, destination rank r on host `dst_hosts[r]`.
/// Returns the workers' final reports (or their errors).
fn run(
    tag: &str,
    src: (&[usize], &str),
    dst: (&[usize], &str),
    dst_hosts: &[usize],
    shape: &[u64],
    dst_secret: &str,
) -> Vec<String> {
    let mut h = Hosts::new(tag);
    let ep = h.command_node();
    let n_src: usize = src.0.iter().product();
    let n_dst: usize = dst.0.iter().product();
    for r in 0..n_src {
        h.agent(0, r, &ep, SECRET);
    }
    for (r, &host) in dst_hosts.iter().enumerate().take(n_dst) {
        h.agent(host, n_src + r, &ep, dst_secret);
    }
    let spec = |side: &str, rank: usize, agent: usize| {
        let (q, s) = h.paths(agent);
        serde_json::json!({
            "agent_rank": agent, "command_queue": q, "state": s, "side": side, "rank": rank,
            "pairs": [{"name": "p", "src_mesh": src.0, "src_placements": src.1, "dst_mesh": dst.0, "dst_placements": dst.1}],
            "tensors": [{"pair": 0, "name": "w", "shape": shape, "dtype": "float32"},
                        {"pair": 0, "name": "v", "shape": [shape[0] + 3, 5], "dtype": "int16"}],
            "batch_id": "b", "bucket_size": 4096, "repeat": 3, "timeout_s": 20.0
        })
        .to_string()
    };
    let workers: Vec<(String, Child)> = (0..n_src)
        .map(|r| ("src".to_string(), spec("src", r, r)))
        .chain((0..n_dst).map(|r| ("dst".to_string(), spec("dst", r, n_src + r))))
        .map(|(side, s)| {
            let c = Command::new(common::BIN)
                .args(["worker", "--spec", &s])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (side, c)
        })
        .collect();
    let mut out = Vec::new();
    for (side, mut w) in workers {
        let lines: Vec<String> =
            std::io::BufReader::new(w.stdout.take().unwrap()).lines().map_while(Result::ok).collect();
        let _ = w.wait();
        out.push(format!("{side}: {}", lines.last().cloned().unwrap_or_default()));
    }
    out
}

fn assert_verified(reports: &[String]) {
    for r in reports {
        assert!(r.contains("\"phase\":\"done\""), "{r}");
        if r.starts_with("dst") {
            assert!(r.contains("\"verified\":true"), "{r}");
        }
    }
}

#[test]
fn row_to_column_shards_across_hosts() {
    assert_verified(&run("rc", (&[2], "S(0)"), (&[2], "S(1)"), &[1, 1], &[37, 29], SECRET));
}

#[test]
fn replicated_2d_source_to_uneven_destination_across_hosts() {
    assert_verified(&run("ru", (&[2, 2], "S(0),R"), (&[3], "S(0)"), &[1, 1, 1], &[41, 7], SECRET));
}

#[test]
fn replicated_on_both_sides_across_hosts() {
    assert_verified(&run("rb", (&[2, 2], "R,S(0)"), (&[2, 2], "S(1),R"), &[1, 1, 1, 1], &[30, 12], SECRET));
}

#[test]
fn nested_uneven_destination_across_hosts() {
    assert_verified(&run("nu", (&[3], "S(0)"), (&[2, 2], "S(0),S(0)"), &[1, 1, 1, 1], &[27, 5], SECRET));
}

#[test]
fn partial_sources_reduced_on_their_host_then_sent() {
    assert_verified(&run("ps", (&[2, 2], "S(0),P"), (&[3], "S(1)"), &[1, 1, 1], &[23, 17], SECRET));
}

#[test]
fn same_host_and_remote_destinations_in_one_job() {
    // Destination rank 0 shares host 0 with the sources (memory path), rank 1 is remote (TCP).
    assert_verified(&run("mix", (&[2], "S(1)"), (&[2], "S(0)"), &[0, 1], &[19, 64], SECRET));
}

#[test]
fn an_agent_without_the_secret_cannot_join_the_job() {
    // Its control connections fail authentication: it never joins, and its worker is told so.
    let reports = run("secret", (&[1], "R"), (&[1], "R"), &[1], &[8, 8], "not-the-secret");
    let dst = reports.iter().find(|r| r.starts_with("dst")).unwrap();
    assert!(dst.contains("\"phase\":\"error\"") && dst.contains("command node"), "{dst}");
}

#[test]
fn a_raw_connection_without_the_secret_gets_nothing() {
    let mut h = Hosts::new("raw");
    let ep = h.command_node();
    h.agent(1, 0, &ep, SECRET);
    // Find the agent's data port through the command node's directory.
    let mut addr = String::new();
    for _ in 0..100 {
        let out = h.in_ns(0).args(["status", "--json", "--command-inbox", &ep.0]).output().unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if let Some(a) = v["nodes"]["agent:0"]["data_addr"].as_str() {
                addr = a.to_string();
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!addr.is_empty(), "agent did not register");
    // Connect from host 0's namespace with a made-up proof: the agent closes the connection.
    let script = format!(
        "exec 3<>/dev/tcp/{}/{}; printf 'TBDATA01%032d%032d' 0 0 >&3; cat <&3 | head -c 200 | wc -c",
        addr.split(':').next().unwrap(),
        addr.split(':').nth(1).unwrap()
    );
    let out = Command::new("ip").args(["netns", "exec", &h.ns[0], "bash", "-c", &script]).output().unwrap();
    let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(999);
    // It sent its hello and proof (72 bytes) and nothing more before closing.
    assert_eq!(n, 72, "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_command_node_answers_only_peers_with_the_secret() {
    let mut h = Hosts::new("ctl");
    let ep = h.command_node();
    let status = |secret: &str| {
        h.in_ns(0)
            .args(["status", "--json", "--command-inbox", &ep.0])
            .env("TENSORBUS_SECRET", secret)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let ok = status(SECRET);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    for (wrong, why) in [("guess", "refused this client's job secret"), ("", "requires the job secret")] {
        let out = status(wrong);
        assert!(!out.status.success(), "answered a peer with secret {wrong:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why) && err.contains(&ep.0), "{err}");
    }
}
