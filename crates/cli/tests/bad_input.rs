//! Bad input and dead parties, with real agents, a real command node and real semaphores: each
//! gets a clear error to the right party, the agent keeps serving everyone else, nothing hangs.

mod common;

use common::Job;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tensorbus_host::client::{generate_semaphore_name, TensorBusClient};
use tensorbus_host::HostError;
use tensorbus_planner::Placement;
use tensorbus_protocol::host::{ErrorKind, TransferType};
use tensorbus_protocol::payload::{Memory, TensorDesc};
use tensorbus_transport::shm::ShmSegment;

use common::{pair_up, register_both, shm_desc, T};

fn remote_kind(e: &HostError) -> Option<ErrorKind> {
    match e {
        HostError::Remote(r) => Some(r.kind),
        _ => None,
    }
}

fn desc(seg: &str, offset: u64, shape: &[u64]) -> TensorDesc {
    shm_desc(seg, offset, shape, "float32")
}

#[test]
fn malformed_and_unknown_commands_get_errors_and_the_agent_keeps_serving() {
    let job = Job::start("malformed", 1);
    let c = job.client(0);
    // Garbage: nobody can be told, the agent logs it and goes on.
    let mut p = c.submit_raw(b"\x93not a command", &generate_semaphore_name("Garbage", "x"), T).unwrap();
    assert!(matches!(p.wait(Duration::from_millis(500)), Err(HostError::Timeout { .. })));
    // An unknown command type with a semaphore: a ValueError naming the type.
    #[derive(serde::Serialize)]
    struct Bogus {
        #[serde(rename = "type")]
        ty: &'static str,
        semaphore_name: String,
    }
    let sem = generate_semaphore_name("Bogus", "x");
    let bytes = rmp_serde::to_vec_named(&Bogus { ty: "Explode", semaphore_name: sem.clone() }).unwrap();
    let e = c.submit_raw(&bytes, &sem, T).unwrap().wait(T).unwrap_err();
    assert_eq!(remote_kind(&e), Some(ErrorKind::ValueError));
    assert!(e.to_string().contains("unknown command type \"Explode\""), "{e}");
    // Unknown batch ids.
    let e = c.transfer("nope", TransferType::Send, true, T).err().unwrap();
    assert!(e.to_string().contains("unknown batch \"nope\""), "{e}");
    let e = c.query_transfer_signal("nope", T).unwrap_err();
    assert!(e.to_string().contains("unknown batch"), "{e}");
    let e = c.cleanup_batch("nope", T).unwrap_err();
    assert!(e.to_string().contains("unknown batch"), "{e}");
    // Bad layouts.
    let e = c.init_pair("p", "a", "b", 4, Some((vec![2, 2], 0)), Some(&[Placement::Shard(0)]), true, T).err().unwrap();
    assert_eq!(remote_kind(&e), Some(ErrorKind::ValueError));
    assert!(e.to_string().contains("1 placements given for a 2-dimensional mesh"), "{e}");
    let e = c.init_pair("p", "a", "b", 3, Some((vec![2, 2], 0)), None, true, T).err().unwrap();
    assert!(e.to_string().contains("world size is 3 but its mesh [2, 2] has 4 ranks"), "{e}");
    let e = c.init_pair("p", "a", "b", 4, Some((vec![2, 2], 7)), None, true, T).err().unwrap();
    assert!(e.to_string().contains("rank 7 is outside"), "{e}");
    // Unknown pair in a registration.
    let e = c.register_tensors("b", &[(desc("/x", 0, &[4]), "ghost")], None, T).err().unwrap();
    assert!(e.to_string().contains("unknown pair \"ghost\""), "{e}");
    // Still serving.
    assert!(c.agent_pid().is_ok());
}

#[test]
fn memory_the_worker_does_not_own_is_refused() {
    let job = Job::start("memory", 2);
    let (a, _b) = pair_up(&job);
    let e = a.register_tensors("b", &[(desc("/tb-it-no-such-segment", 0, &[4]), "p")], None, T).err().unwrap();
    assert_eq!(remote_kind(&e), Some(ErrorKind::ValueError));
    assert!(e.to_string().contains("/tb-it-no-such-segment"), "{e}");
    let name = format!("/tb-it-mem-{}", std::process::id());
    let seg = ShmSegment::create(&name, 64).unwrap();
    let e = a.register_tensors("b", &[(desc(&name, 32, &[16]), "p")], None, T).err().unwrap();
    assert!(e.to_string().contains("outside shared memory"), "{e}");
    let mut d = desc(&name, 0, &[4]);
    d.memory = Memory::Cma { pid: std::process::id(), addr: 16 };
    let e = a.register_tensors("b", &[(d, "p")], None, T).err().unwrap();
    assert!(e.to_string().contains("no mapping"), "{e}");
    let mut d = desc(&name, 0, &[4, 2]);
    d.strides = vec![1, 4];
    let e = a.register_tensors("b", &[(d, "p")], None, T).err().unwrap();
    assert!(e.to_string().contains("not contiguous"), "{e}");
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn sides_that_disagree_on_shape_or_dtype_both_fail() {
    let job = Job::start("mismatch", 2);
    let (a, b) = pair_up(&job);
    let name = format!("/tb-it-mm-{}", std::process::id());
    let seg = ShmSegment::create(&name, 1024).unwrap();
    let ta = [(desc(&name, 0, &[8, 4]), "p")];
    let tb = [(desc(&name, 256, &[8, 5]), "p")];
    let ea = std::thread::scope(|s| {
        let h = s.spawn(|| a.register_tensors("w", &ta, None, T).err());
        let eb = b.register_tensors("w", &tb, None, T).err().unwrap();
        assert!(eb.to_string().contains("global shapes differ"), "{eb}");
        (h.join().unwrap().unwrap(), eb.to_string())
    });
    let (ea, eb_shape) = ea;
    assert_eq!(remote_kind(&ea), Some(ErrorKind::ValueError));
    // Both sides name each side's shape the same way, whichever side reads it.
    for e in [ea.to_string(), eb_shape.clone()] {
        assert!(e.contains("inference [8, 5], trainer [8, 4]"), "{e}");
    }
    // Dtypes.
    let mut d = desc(&name, 256, &[8, 4]);
    d.dtype = "int32".into();
    let tb = [(d, "p")];
    std::thread::scope(|s| {
        let h = s.spawn(|| a.register_tensors("w2", &ta, None, T).err());
        let eb = b.register_tensors("w2", &tb, None, T).err().unwrap();
        // The destination (inference, int32) names the sides the right way round.
        assert!(eb.to_string().contains("dtypes differ between the sides: inference int32, trainer float32"), "{eb}");
        let ea = h.join().unwrap().expect("the other side fails too");
        assert!(ea.to_string().contains("inference int32, trainer float32"), "{ea}");
    });
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn transfer_cleanup_and_reuse_of_a_batch_id() {
    let job = Job::start("reuse", 2);
    let (a, b) = pair_up(&job);
    let name = format!("/tb-it-reuse-{}", std::process::id());
    let seg = ShmSegment::create(&name, 1024).unwrap();
    for round in 0..2u8 {
        // SAFETY: no transfer runs while we fill.
        unsafe { seg.as_mut_slice()[..128].fill(round + 1) };
        let ta = [(desc(&name, 0, &[8, 4]), "p")];
        let (ha, hb) = register_both(&a, &b, "w", desc(&name, 0, &[8, 4]), desc(&name, 512, &[8, 4]));
        assert!(!ha.query_transfer_signal(T).unwrap());
        let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
        let mut pr = hb.transfer(TransferType::Recv, false, T).unwrap();
        pr.wait(T).unwrap();
        ps.wait(T).unwrap();
        assert!(ha.query_transfer_signal(T).unwrap());
        // SAFETY: the transfer is over.
        assert!(unsafe { seg.as_slice()[512..640].iter().all(|&x| x == round + 1) });
        // A second registration under the same id is refused until cleanup.
        let e = a.register_tensors("w", &ta, None, T).err().unwrap();
        assert!(e.to_string().contains("already registered"), "{e}");
        ha.close(T).unwrap();
        hb.close(T).unwrap();
    }
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn an_agent_started_twice_on_the_same_paths_is_refused() {
    let job = Job::start("twice", 1);
    let _ = job.client(0);
    let out = job.agent_command(0, &job.inbox, &job.outbox).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(job.client(0).agent_pid().is_ok(), "the first agent is unharmed");
}

#[test]
fn no_agent_is_a_connection_error() {
    let dir = common::tmpdir("noagent");
    let e = TensorBusClient::new(9, Some(&dir.join("q.lmdb")), Some(&dir.join("s.lmdb")), Duration::from_millis(300))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionError);
    assert!(e.to_string().contains("no live agent 9"), "{e}");
}

#[test]
fn a_missing_command_node_fails_pairing_with_a_connection_error() {
    let job = Job::start("nonode", 0);
    // An endpoint nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut agent = job.spawn_agent(0, &format!("tcp://127.0.0.1:{port}"), &format!("tcp://127.0.0.1:{}", port + 1));
    let c = job.client(0);
    let e = c.init_pair("p", "a", "b", 1, None, None, true, Duration::from_secs(60)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionError, "{e}");
    assert!(e.to_string().contains("command node"), "{e}");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn a_killed_agent_is_reported_by_its_heartbeat_not_at_the_timeout() {
    let mut job = Job::start("killed", 1);
    let c = job.client(0);
    // Pairing waits for a peer that never comes.
    let mut p = c.init_pair("p", "a", "b", 1, None, None, false, Duration::from_secs(60)).unwrap();
    job.kill_agent(0);
    let t0 = Instant::now();
    let e = p.wait(Duration::from_secs(60)).unwrap_err();
    assert!(matches!(e, HostError::AgentDied { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::ConnectionError);
    eprintln!("agent death noticed after {:.2} s", t0.elapsed().as_secs_f64());
}

#[test]
fn cross_memory_attach_at_either_end() {
    let job = Job::start("cma", 2);
    let (a, b) = pair_up(&job);
    // Let the agents (our children) read and write this process's memory.
    tensorbus_host::bootstrap::setup_ptrace(a.agent_pid().unwrap()).unwrap();
    let name = format!("/tb-it-cma-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let mut src_heap = vec![0u8; 1024];
    let mut dst_heap = vec![0u8; 1024];
    let cma = |v: &mut Vec<u8>| Memory::Cma { pid: std::process::id(), addr: v.as_mut_ptr() as u64 };
    for (round, (src_cma, dst_cma)) in [(true, false), (false, true), (true, true)].into_iter().enumerate() {
        let fill = 10 + round as u8;
        let mut ds = desc(&name, 0, &[16, 16]);
        let mut dd = desc(&name, 2048, &[16, 16]);
        if src_cma {
            src_heap.fill(fill);
            ds.memory = cma(&mut src_heap);
        } else {
            // SAFETY: no transfer runs while we fill.
            unsafe { seg.as_mut_slice()[..1024].fill(fill) };
        }
        if dst_cma {
            dst_heap.fill(0);
            dd.memory = cma(&mut dst_heap);
        }
        let (ha, hb) = register_both(&a, &b, "c", ds, dd);
        let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
        hb.transfer(TransferType::Recv, true, T).unwrap();
        ps.wait(T).unwrap();
        // SAFETY: the transfer is over.
        let got: &[u8] = if dst_cma { &dst_heap } else { unsafe { &seg.as_slice()[2048..3072] } };
        assert!(got.iter().all(|&x| x == fill), "round {round}: src cma {src_cma}, dst cma {dst_cma}");
        ha.close(T).unwrap();
        hb.close(T).unwrap();
    }
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn up_starts_agents_and_cleans_up_on_ctrl_c() {
    let dir = common::tmpdir("up");
    let mut up = std::process::Command::new(common::BIN)
        .args(["up", "--agents", "2", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .env("TENSORBUS_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for r in 0..2 {
        let q = dir.join(format!("agent_rank{r}_command.lmdb"));
        let s = dir.join(format!("agent_rank{r}_state.lmdb"));
        let c = TensorBusClient::new(r, Some(&q), Some(&s), T).unwrap();
        assert!(c.agent_pid().is_ok());
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let status = up.wait().unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn binding_every_address_needs_an_advertised_one() {
    let out = std::process::Command::new(common::BIN)
        .args(["agent", "--rank", "0", "--listen-host", "0.0.0.0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --advertise"));
}

#[test]
fn the_command_outbox_publishes_only_to_peers_with_the_secret() {
    let dir = common::tmpdir("outbox-secret");
    let file = dir.join("secret");
    std::fs::write(&file, "outbox-s3cret\n").unwrap();
    let job = Job::start_with("outbox", 0, "127.0.0.1:0", &["--secret-file", file.to_str().unwrap()]);
    // The command node publishes a heartbeat every 250 ms: only an authenticated subscriber sees it.
    let heard = |secret: Option<&[u8]>| {
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::SUB).unwrap();
        tensorbus_command::secure::client(&s, secret).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&job.outbox).unwrap();
        s.set_subscribe(b"").unwrap();
        let mut items = [s.as_poll_item(zmq::POLLIN)];
        zmq::poll(&mut items, 1500).unwrap() > 0
    };
    assert!(heard(Some(b"outbox-s3cret")));
    assert!(!heard(Some(b"guess")));
    assert!(!heard(None));
    let _ = std::fs::remove_dir_all(&dir);
}
