//! The command node's state in a real etcd server (Debian's etcd-server, started here on loopback):
//! a command node killed during a job and restarted resumes it from etcd — membership, batches,
//! epoch numbering — and the next epoch succeeds without restarting agents or workers.

mod common;

use common::{pair_up, register_both, shm_desc, Job, T};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus_protocol::host::TransferType;
use tensorbus_transport::shm::ShmSegment;

struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = common::tmpdir("etcd-data");
        let (client, peer) = {
            let l = common::free_listen();
            let p: u16 = l.rsplit_once(':').unwrap().1.parse().unwrap();
            (p, p + 1)
        };
        let c = |p: u16| format!("http://127.0.0.1:{p}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &c(client), "--advertise-client-urls", &c(client)])
            .args(["--listen-peer-urls", &c(peer), "--initial-advertise-peer-urls", &c(peer)])
            .args(["--initial-cluster", &format!("default={}", c(peer))])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server) is needed for this test; scripts/test.sh installs it");
        let url = format!("127.0.0.1:{client}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&url).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Etcd { child, dir, url }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status(job: &Job) -> serde_json::Value {
    let out = Command::new(common::BIN).args(["status", "--json", "--command-inbox", &job.inbox]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_restarted_command_node_resumes_the_job_from_etcd() {
    let etcd = Etcd::start();
    let registry = format!("etcd://{}/job-{}", etcd.url, std::process::id());
    let mut job = Job::start_with("etcd", 2, &common::free_listen(), &["--registry", &registry]);
    let name = format!("/tb-it-etcd-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let (a, b) = pair_up(&job);
    let (ha, hb) =
        register_both(&a, &b, "w", shm_desc(&name, 0, &[64], "float32"), shm_desc(&name, 1024, &[64], "float32"));
    let transfer = || {
        let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
        hb.transfer(TransferType::Recv, true, T).unwrap();
        ps.wait(T).unwrap();
    };
    transfer();
    transfer();
    let before = status(&job);
    let last_epoch = before["epochs_ended"].as_array().unwrap().last().unwrap()["epoch"].as_u64().unwrap();

    job.kill_node();
    job.restart_node();
    // Straight after the restart, before any agent speaks again, the directory is back.
    let after = status(&job);
    assert_eq!(after["nodes"].as_object().unwrap().len(), 2, "{after}");
    assert!(after["nodes"]["agent:0"]["batches"].get("w").is_some(), "{after}");
    assert_eq!(after["epochs_ended"].as_array().unwrap().len(), 2);

    // The next epoch succeeds without restarting agents or workers, numbered after the old ones.
    // SAFETY: no transfer runs while we fill.
    unsafe { seg.as_mut_slice()[..256].fill(3) };
    transfer();
    // SAFETY: the transfer is over.
    assert!(unsafe { seg.as_slice()[1024..1280].iter().all(|&x| x == 3) });
    let now = status(&job);
    let epoch = now["epochs_ended"].as_array().unwrap().last().unwrap()["epoch"].as_u64().unwrap();
    assert!(epoch > last_epoch, "epochs continue: {epoch} after {last_epoch}");
    drop(seg);
    ShmSegment::unlink(&name);
}
