//! A new user's first minutes on one host: `up --dir` makes its directory and a private job file,
//! `status` / `ctl` / workers find the job from it without the secret being copied by hand, each
//! refusal says what it is, and logs are plain text off a terminal (or JSON when asked).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_listen, BIN, T};
use tensorbus_host::client::TensorBusClient;

/// `tensorbus up` in `dir`, returned once it printed its banner (agents started, job file written).
fn up(dir: &Path, agents: usize, extra_env: &[(&str, &str)]) -> (Child, Vec<String>) {
    let mut c = Command::new(BIN);
    c.args(["up", "--agents", &agents.to_string(), "--listen", &free_listen(), "--dir"])
        .arg(dir)
        .env("TENSORBUS_LOG", "info")
        .env_remove("TENSORBUS_SECRET")
        .env_remove("TENSORBUS_JOB")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "up exited early: {lines:?}");
        let done = l.contains("Ctrl-C to stop");
        lines.push(l);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in out.lines() {});
    (child, lines)
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
}

fn tool(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("TENSORBUS_SECRET").env_remove("TENSORBUS_JOB").env_remove("TENSORBUS_COMMAND_INBOX");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn up_makes_its_directory_and_tools_and_workers_find_the_job() {
    let root = common::tmpdir("first");
    let dir = root.join("new/job dir");
    let (child, banner) = up(&dir, 2, &[]);
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700, "a new job directory is private");
    let job = dir.join("tensorbus-job.json");
    assert_eq!(std::fs::metadata(&job).unwrap().permissions().mode() & 0o777, 0o600);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&job).unwrap()).unwrap();
    assert_eq!(j["agents"], 2);
    assert!(j["secret"].as_str().is_some_and(|s| s.len() >= 32), "{j}");
    assert!(banner.iter().all(|l| !l.contains(j["secret"].as_str().unwrap())), "the secret is not printed: {banner:?}");
    let d = dir.to_str().unwrap();

    // status, by flag and by environment, without the secret.
    let (ok, out, err) = tool(&["status", "--job", d], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("agent:0") && out.contains("agent:1"), "{out}");
    let (ok, out, err) = tool(&["status", "--json"], &[("TENSORBUS_JOB", d)]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["nodes"].as_object().unwrap().len(), 2);
    // ctl too.
    let (ok, _, err) = tool(&["ctl", "--job", d, "init"], &[]);
    assert!(ok, "{err}");

    // A worker finds its agent from TENSORBUS_JOB and AGENT_RANK alone.
    let env = |k: &str| match k {
        "TENSORBUS_JOB" => Some(d.to_string()),
        "AGENT_RANK" => Some("1".into()),
        _ => None,
    };
    // The bootstrap reads TENSORBUS_JOB from the process environment for its defaults.
    std::env::set_var("TENSORBUS_JOB", d);
    let info = tensorbus_host::bootstrap::resolve(env, None).unwrap();
    std::env::remove_var("TENSORBUS_JOB");
    assert_eq!(info.command_queue_path, dir.join("agent_rank1_command.lmdb"));
    let c = TensorBusClient::new(1, Some(&info.command_queue_path), Some(&info.state_path), T).unwrap();
    assert!(c.agent_pid().is_ok());
    drop(c);

    // A second `up` on the same directory is refused, naming the first.
    let (ok, _, err) = tool(&["up", "--listen", &free_listen(), "--dir", d], &[]);
    assert!(!ok);
    assert!(err.contains("another `tensorbus up`") && err.contains(&format!("pid {}", child.id())), "{err}");

    stop(child);
    assert!(!job.exists(), "the job file is removed on stop");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn every_refusal_says_what_it_is() {
    let root = common::tmpdir("refusals");
    let (child, _) = up(&root, 1, &[]);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tensorbus-job.json")).unwrap()).unwrap();
    let inbox = j["inbox"].as_str().unwrap();

    // No secret.
    let (ok, _, err) = tool(&["status", "--command-inbox", inbox], &[]);
    assert!(!ok);
    assert!(err.contains("requires the job secret") && err.contains(inbox) && err.contains("--job"), "{err}");
    // A wrong secret.
    let (ok, _, err) = tool(&["status", "--command-inbox", inbox], &[("TENSORBUS_SECRET", "guess")]);
    assert!(!ok);
    assert!(err.contains("refused this client's job secret"), "{err}");
    let (ok, _, err) = tool(&["ctl", "--command-inbox", inbox, "deinit"], &[("TENSORBUS_SECRET", "guess")]);
    assert!(!ok);
    assert!(err.contains("refused this client's job secret"), "{err}");
    // The right one, by hand, still works.
    let (ok, _, err) =
        tool(&["status", "--command-inbox", inbox], &[("TENSORBUS_SECRET", j["secret"].as_str().unwrap())]);
    assert!(ok, "{err}");
    stop(child);

    // Nobody at the address: the address is named.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let (ok, _, err) = tool(&["status", "--command-inbox", &addr], &[]);
    assert!(!ok);
    assert!(err.contains(&format!("no command node answered at {addr}")), "{err}");
    // A job directory that does not exist, and one without a job file.
    let (ok, _, err) = tool(&["status", "--job", "/nonexistent/tb-job"], &[]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/tb-job") && err.contains("does not exist"), "{err}");
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = tool(&["status", "--job", empty.to_str().unwrap()], &[("TENSORBUS_COMMAND_INBOX", &addr)]);
    assert!(!ok && err.contains(&addr), "{err}");
    let (ok, _, err) = tool(&["status", "--job", empty.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("no job file") && err.contains(empty.to_str().unwrap()), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_when_asked() {
    let root = common::tmpdir("logs");
    let run = |fmt: Option<&str>| {
        let log = root.join(format!("agent-{}.log", fmt.unwrap_or("text")));
        let mut c = Command::new(BIN);
        c.args(["agent", "--rank", "0", "--command-inbox", "tcp://127.0.0.1:1", "--command-queue"])
            .arg(root.join(format!("q-{}.lmdb", fmt.unwrap_or("text"))))
            .arg("--state")
            .arg(root.join(format!("s-{}.lmdb", fmt.unwrap_or("text"))))
            .env("TENSORBUS_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null());
        if let Some(f) = fmt {
            c.args(["--log-format", f]);
        }
        let mut child = c.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().contains("agent started") {
            assert!(std::time::Instant::now() < deadline, "no start line in {}", log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        common::stop([&mut child]);
        std::fs::read_to_string(&log).unwrap()
    };
    let text = run(None);
    assert!(!text.contains('\x1b'), "ANSI escapes in a log file: {text:?}");
    let json = run(Some("json"));
    let lines: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect();
    assert!(lines.iter().any(|v| v["fields"]["message"] == "agent started" && v["level"] == "INFO"), "{json}");
    let _ = std::fs::remove_dir_all(&root);
}
