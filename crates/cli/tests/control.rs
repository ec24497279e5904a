//! The control plane with real processes: a controller drives epochs (`tensorbus ctl`), workers
//! wait for epochs to end everywhere, agents and workers start in any order, deinit/init.

mod common;

use common::Job;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus_host::client::{BatchHandler, TensorBusClient};
use tensorbus_host::HostError;
use tensorbus_transport::shm::ShmSegment;

use common::{pair_up, register_both, shm_desc, T};

/// Pairs agents 0 and 1 and registers a 256-byte batch "b" (source at 0, destination at 1024).
fn setup(job: &Job, seg: &str) -> (TensorBusClient, TensorBusClient, BatchHandler, BatchHandler) {
    let (a, b) = pair_up(job);
    let (ha, hb) = register_both(&a, &b, "b", shm_desc(seg, 0, &[256], "uint8"), shm_desc(seg, 1024, &[256], "uint8"));
    (a, b, ha, hb)
}

fn ctl(job: &Job, args: &[&str]) -> std::process::Output {
    Command::new(common::BIN).args(["ctl", "--command-inbox", &job.inbox]).args(args).output().unwrap()
}

fn status(job: &Job) -> serde_json::Value {
    let out = Command::new(common::BIN).args(["status", "--json", "--command-inbox", &job.inbox]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_controller_drives_epochs_and_workers_wait_for_them() {
    let job = Job::start("ctl", 2);
    let name = format!("/tb-it-ctl-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let (_a, _b, ha, hb) = setup(&job, &name);
    // SAFETY: no transfer runs while we fill.
    unsafe { seg.as_mut_slice()[..256].fill(5) };
    let out = ctl(&job, &["process", "--batch", "b", "--from", "trainer"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    hb.wait_epoch(0, T).unwrap();
    ha.wait_epoch(0, T).unwrap();
    // SAFETY: epoch 0 ended everywhere.
    assert!(unsafe { seg.as_slice()[1024..1280].iter().all(|&x| x == 5) });
    assert!(ctl(&job, &["start", "3"]).status.success());
    hb.wait_epoch(3, T).unwrap();
    assert!(ctl(&job, &["stop"]).status.success());
    let s = status(&job);
    assert!(s["epochs_ended"].as_array().unwrap().len() >= 4, "{s}");
    assert_eq!(s["nodes"].as_object().unwrap().len(), 2);
    // An epoch that does not come is a timeout, not a hang.
    let e = hb.wait_epoch(100, Duration::from_millis(400)).unwrap_err();
    assert!(matches!(e, HostError::Timeout { .. }), "{e}");
    // A controller asking for an unknown batch gets a clear refusal.
    let out = ctl(&job, &["process", "--batch", "nope", "--from", "trainer"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered on every rank"));
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn deinit_releases_everything_and_init_rejoins() {
    let job = Job::start("deinit", 2);
    let name = format!("/tb-it-deinit-{}", std::process::id());
    let _seg = ShmSegment::create(&name, 4096).unwrap();
    let (a, _b, _ha, _hb) = setup(&job, &name);
    assert!(ctl(&job, &["deinit"]).status.success());
    let deadline = Instant::now() + T;
    while !status(&job)["nodes"].as_object().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "agents did not close");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = a.query_transfer_signal("b", T).unwrap_err();
    assert!(e.to_string().contains("unknown batch"), "the batch was released: {e}");
    assert!(ctl(&job, &["init"]).status.success());
    while status(&job)["nodes"].as_object().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "agents did not rejoin");
        std::thread::sleep(Duration::from_millis(50));
    }
    ShmSegment::unlink(&name);
}

#[test]
fn agents_and_workers_start_in_any_order_and_late() {
    let job = Job::start("order", 0);
    // 2 trainer ranks (S(0)) -> 2 inference ranks (S(1)); agents 0,1 trainer, 2,3 inference.
    let spec = |side: &str, rank: usize, agent: usize| {
        let (q, s) = job.paths(agent);
        serde_json::json!({
            "agent_rank": agent, "command_queue": q, "state": s, "side": side, "rank": rank,
            "pairs": [{"name": "p", "src_mesh": [2], "src_placements": "S(0)", "dst_mesh": [2], "dst_placements": "S(1)"}],
            "tensors": [{"pair": 0, "name": "w", "shape": [37, 29], "dtype": "float32"}],
            "batch_id": "b", "bucket_size": 64, "repeat": 2, "timeout_s": 30.0
        })
        .to_string()
    };
    // A different order and different delays on every run.
    let mut seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 | 1;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut steps: Vec<(bool, usize)> = (0..4).flat_map(|i| [(true, i), (false, i)]).collect();
    for i in (1..steps.len()).rev() {
        steps.swap(i, rnd(i as u64 + 1) as usize);
    }
    eprintln!("start order (agent?, index): {steps:?}");
    let mut agents = Vec::new();
    let mut workers = Vec::new();
    for (is_agent, i) in steps {
        std::thread::sleep(Duration::from_millis(rnd(300)));
        if is_agent {
            agents.push(job.spawn_agent(i, &job.inbox, &job.outbox));
        } else {
            let (side, rank) = if i < 2 { ("src", i) } else { ("dst", i - 2) };
            let child = Command::new(common::BIN)
                .args(["worker", "--spec", &spec(side, rank, i)])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            workers.push((side, child));
        }
    }
    for (side, mut w) in workers {
        let lines: Vec<String> =
            std::io::BufReader::new(w.stdout.take().unwrap()).lines().map_while(Result::ok).collect();
        assert!(w.wait().unwrap().success(), "{side} worker failed: {lines:?}");
        let done = lines.iter().find(|l| l.contains("\"phase\":\"done\"")).expect("done report");
        if side == "dst" {
            assert!(done.contains("\"verified\":true"), "{done}");
        }
    }
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}

#[test]
fn epochs_carry_a_checksum_of_the_bytes_delivered() {
    let mut job = Job::start("checksum", 0);
    for r in 0..2 {
        let (inbox, outbox) = (job.inbox.clone(), job.outbox.clone());
        let c = job.agent_command(r, &inbox, &outbox).arg("--checksum").stderr(Stdio::null()).spawn().unwrap();
        job.agents.push(Some(c));
    }
    let name = format!("/tb-it-sum-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let (_a, _b, ha, _hb) = setup(&job, &name);
    let mut sums = Vec::new();
    for (n, fill) in [(0u64, 5u8), (1, 5), (2, 6)] {
        // SAFETY: no transfer runs while we fill.
        unsafe { seg.as_mut_slice()[..256].fill(fill) };
        assert!(ctl(&job, &["process", "--batch", "b", "--from", "trainer"]).status.success());
        ha.wait_epoch(n, T).unwrap();
        let s = status(&job);
        let ended = s["epochs_ended"].as_array().unwrap();
        sums.push(ended.last().unwrap()["checksum"].as_u64().unwrap());
    }
    assert_ne!(sums[0], 0);
    assert_eq!(sums[0], sums[1], "same bytes, same checksum");
    assert_ne!(sums[1], sums[2], "other bytes, other checksum");
    drop(seg);
    ShmSegment::unlink(&name);
}
