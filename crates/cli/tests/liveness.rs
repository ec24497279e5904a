//! Dead parties, for real: an agent, a worker or the command node killed with SIGKILL is noticed
//! by the others, whose waiting transfers fail with an error naming it (not at their timeout),
//! and a restarted process rejoins and transfers again without restarting the job.

mod common;

use common::Job;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus_host::client::{BatchHandler, TensorBusClient};
use tensorbus_host::HostError;
use tensorbus_planner::Placement;
use tensorbus_protocol::host::{ErrorKind, TransferType};
use tensorbus_transport::shm::ShmSegment;

use common::{pair_up, register_both, shm_desc, T};

fn pair(c: &TensorBusClient, local: &str, remote: &str) -> tensorbus_host::client::Pending {
    c.init_pair("p", local, remote, 1, Some((vec![1], 0)), Some(&[Placement::Replicate]), false, T).unwrap()
}

/// Pairs agents 0 and 1 and registers a 256-byte batch "b" (source at 0, destination at 1024).
fn setup(job: &Job, seg: &str) -> (TensorBusClient, TensorBusClient, BatchHandler, BatchHandler) {
    let (a, b) = pair_up(job);
    let (ha, hb) = register_both(&a, &b, "b", desc(seg, 0), desc(seg, 1024));
    (a, b, ha, hb)
}

fn desc(seg: &str, offset: u64) -> tensorbus_protocol::payload::TensorDesc {
    shm_desc(seg, offset, &[64], "float32")
}

fn transfer_once(ha: &BatchHandler, hb: &BatchHandler) -> Result<(), HostError> {
    let mut ps = ha.transfer(TransferType::Send, false, T)?;
    let mut pr = hb.transfer(TransferType::Recv, false, T)?;
    pr.wait(T)?;
    ps.wait(T).map(|_| ())
}

struct Seg(String, ShmSegment);
impl Seg {
    fn new(tag: &str) -> Seg {
        let name = format!("/tb-it-live-{tag}-{}", std::process::id());
        ShmSegment::unlink(&name);
        let s = ShmSegment::create(&name, 4096).unwrap();
        Seg(name, s)
    }
}
impl Drop for Seg {
    fn drop(&mut self) {
        ShmSegment::unlink(&self.0);
    }
}

#[test]
fn a_killed_peer_agent_fails_the_transfer_naming_it_and_a_restart_rejoins() {
    let mut job = Job::start("peer", 2);
    let seg = Seg::new("peer");
    let (a, b, ha, hb) = setup(&job, &seg.0);
    // The sender arms; its peer's agent dies before the receiver arms.
    let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
    job.kill_agent(1);
    let t0 = Instant::now();
    let e = ps.wait(T).unwrap_err();
    eprintln!("peer death reported after {:.2} s: {e}", t0.elapsed().as_secs_f64());
    assert_eq!(e.kind(), ErrorKind::ConnectionError, "{e}");
    assert!(e.to_string().contains("agent:1"), "{e}");
    // Restart the dead agent at the same paths; a new receiver joins; transfers work again.
    // The old handles to the dead agent's files go first (LMDB allows one open per path).
    drop((hb, b));
    let (inbox, outbox) = (job.inbox.clone(), job.outbox.clone());
    job.agents[1] = Some(job.spawn_agent(1, &inbox, &outbox));
    let b2 = job.client(1);
    let mut pb = pair(&b2, "inference", "trainer");
    pb.wait(T).unwrap();
    let tb = [(desc(&seg.0, 1024), "p")];
    let hb2 = b2.register_tensors("b", &tb, None, T).unwrap();
    // The sender's batch is intact; its next transfer pairs with the new receiver.
    // SAFETY: no transfer runs while we fill.
    unsafe { seg.1.as_mut_slice()[..256].fill(7) };
    transfer_once(&ha, &hb2).unwrap();
    // SAFETY: the transfer is over.
    assert!(unsafe { seg.1.as_slice()[1024..1280].iter().all(|&x| x == 7) });
    drop(a);
}

#[test]
fn a_killed_command_node_is_noticed_and_a_restarted_one_takes_over() {
    let mut job = Job::start_on("node", 2, &common::free_listen());
    let seg = Seg::new("node");
    let (_a, _b, ha, hb) = setup(&job, &seg.0);
    transfer_once(&ha, &hb).unwrap();
    let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
    job.kill_node();
    let e = ps.wait(T).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionError, "{e}");
    assert!(e.to_string().contains("command node"), "{e}");
    job.restart_node();
    // Agents rejoin by themselves; the registered batch transfers again.
    // SAFETY: no transfer runs while we fill.
    unsafe { seg.1.as_mut_slice()[..256].fill(9) };
    transfer_once(&ha, &hb).unwrap();
    // SAFETY: the transfer is over.
    assert!(unsafe { seg.1.as_slice()[1024..1280].iter().all(|&x| x == 9) });
}

#[test]
fn a_killed_worker_is_noticed_by_its_agent_and_its_peers() {
    // Both workers are real processes: `tensorbus worker`, transferring in a loop.
    let job = Job::start("worker", 2);
    let spec = |side: &str, rank: usize| {
        let (q, s) = job.paths(rank);
        serde_json::json!({
            "agent_rank": rank, "command_queue": q, "state": s, "side": side, "rank": 0,
            "pairs": [{"name": "p", "src_mesh": [1], "src_placements": "R", "dst_mesh": [1], "dst_placements": "R"}],
            "tensors": [{"pair": 0, "name": "w", "shape": [1024], "dtype": "float32"}],
            "batch_id": "b", "bucket_size": null, "repeat": 1000000, "timeout_s": 30.0
        })
        .to_string()
    };
    let spawn = |s: String| {
        Command::new(common::BIN)
            .args(["worker", "--spec", &s])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut src = spawn(spec("src", 0));
    let mut dst = spawn(spec("dst", 1));
    // Let them transfer a while, then kill the receiver.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(src.stdout.take().unwrap()));
    let mut transfers = 0;
    while transfers < 5 {
        let l = lines.next().unwrap().unwrap();
        transfers += l.contains("\"phase\":\"transfer\"") as usize;
    }
    dst.kill().unwrap();
    dst.wait().unwrap();
    // A worker killed with SIGKILL cannot remove its shared memory; do it for it.
    ShmSegment::unlink(&format!("/tb-{}-dst-0", dst.id()));
    let err =
        lines.map_while(Result::ok).find(|l| l.contains("\"phase\":\"error\"")).expect("the sender reports an error");
    assert!(err.contains("worker pid") || err.contains("agent:1"), "{err}");
    assert!(!src.wait().unwrap().success());
    // The receiver's agent released the batch: a new worker can register it again.
    let b = job.client(1);
    let mut p = pair(&b, "destination", "source");
    let _ = p.wait(Duration::from_secs(2));
}
