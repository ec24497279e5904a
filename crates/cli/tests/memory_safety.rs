//! Hostile payloads through the public command queue, against real agents: each hole a client
//! written from docs/protocol.md could open is refused with an error naming the field, and the
//! agent goes on serving a correct client.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pair_up, register_both, shm_desc, Job, T};
use tensorbus_host::client::{generate_semaphore_name, TensorBusClient};
use tensorbus_host::HostError;
use tensorbus_protocol::host::{self, ErrorKind, TransferType};
use tensorbus_protocol::payload::{Memory, TensorDesc};
use tensorbus_transport::shm::ShmSegment;

fn refused(c: &TensorBusClient, batch: &str, d: TensorDesc) -> String {
    let e = c.register_tensors(batch, &[(d, "p")], None, T).err().expect("refused");
    match &e {
        HostError::Remote(r) => assert_eq!(r.kind, ErrorKind::ValueError, "{e}"),
        other => panic!("not a remote error: {other}"),
    }
    e.to_string()
}

/// A correct transfer of 32 floats still goes through, bit-exact.
fn still_serving(a: &TensorBusClient, b: &TensorBusClient, seg: &ShmSegment, id: &str) {
    // SAFETY: no transfer runs while we fill.
    unsafe { seg.as_mut_slice()[..128].iter_mut().enumerate().for_each(|(i, x)| *x = i as u8) };
    let (ha, hb) = register_both(
        a,
        b,
        id,
        shm_desc(seg.name(), 0, &[32], "float32"),
        shm_desc(seg.name(), 1024, &[32], "float32"),
    );
    let mut ps = ha.transfer(TransferType::Send, false, T).unwrap();
    hb.transfer(TransferType::Recv, true, T).unwrap();
    ps.wait(T).unwrap();
    // SAFETY: the transfer is over.
    let got = unsafe { &seg.as_slice()[1024..1152] };
    assert!(got.iter().enumerate().all(|(i, &x)| x == i as u8), "destination bytes wrong after hostile payloads");
    ha.close(T).unwrap();
    hb.close(T).unwrap();
}

/// A second process of this user, with a mapping whose address we know.
fn bystander() -> (Child, u64) {
    let child = Command::new("sleep").arg("60").stdout(Stdio::null()).spawn().unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    let start = maps.lines().next().unwrap().split('-').next().unwrap();
    (child, u64::from_str_radix(start, 16).unwrap())
}

#[test]
fn overflowing_offsets_and_shapes_are_refused_and_the_agent_keeps_serving() {
    let job = Job::start("wrap", 2);
    let (a, b) = pair_up(&job);
    let name = format!("/tb-it-wrap-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();

    // offset + nbytes wraps around 2^64: once passed, read 8 bytes *before* the mapping.
    let e = refused(&a, "w", shm_desc(&name, u64::MAX - 7, &[4], "float32"));
    assert!(e.contains("memory.offset") && e.contains("wraps around"), "{e}");
    let e = refused(&b, "w", shm_desc(&name, u64::MAX - 7, &[4], "float32"));
    assert!(e.contains("memory.offset"), "{e}");
    // Past the end without wrapping.
    let e = refused(&a, "w", shm_desc(&name, 4090, &[4], "float32"));
    assert!(e.contains("outside shared memory"), "{e}");
    // A shape whose byte size overflows u64, with the nbytes that wrapping gives (0).
    let mut d = shm_desc(&name, 0, &[1], "float32");
    d.shape = vec![1 << 62, 8];
    d.strides = vec![8, 1];
    d.nbytes = 0;
    let e = refused(&a, "w", d.clone());
    assert!(e.contains("shape") && e.contains("more than 2^64"), "{e}");
    d.shape = vec![1 << 61, 2];
    d.strides = vec![2, 1];
    let e = refused(&a, "w", d);
    assert!(e.contains("shape") && e.contains("more than 2^64 bytes"), "{e}");
    // nbytes that lies about the shape.
    let mut d = shm_desc(&name, 0, &[4], "float32");
    d.nbytes = 8;
    let e = refused(&a, "w", d);
    assert!(e.contains("nbytes") && e.contains("does not match"), "{e}");
    // cross-memory attach at an address whose end wraps.
    let mut d = shm_desc(&name, 0, &[4], "float32");
    d.memory = Memory::Cma { pid: std::process::id(), addr: u64::MAX - 3 };
    let e = refused(&a, "w", d);
    assert!(e.contains("memory.addr") && e.contains("wraps around"), "{e}");

    still_serving(&a, &b, &seg, "ok");
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn memory_of_another_process_is_refused_and_the_agent_keeps_serving() {
    let job = Job::start("owner", 2);
    let (a, b) = pair_up(&job);
    let name = format!("/tb-it-owner-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let (mut other, addr) = bystander();

    // A `cma` payload naming a second process of the same user at a mapped address.
    let mut d = shm_desc(&name, 0, &[4], "float32");
    d.memory = Memory::Cma { pid: other.id(), addr };
    for c in [&a, &b] {
        let e = refused(c, "w", d.clone());
        assert!(
            e.contains("memory.pid") && e.contains(&format!("pid {} is not the registering process", other.id())),
            "{e}"
        );
    }
    // A payload whose `pid` lies (the memory is ours, the claimed owner is not).
    let mut d = shm_desc(&name, 0, &[4], "float32");
    d.pid = Some(other.id());
    let e = refused(&a, "w", d);
    assert!(e.contains("pid:") && e.contains("not the registering process"), "{e}");
    // A segment this process does not hold (created, then unmapped: it still exists by name).
    let loose = format!("/tb-it-loose-{}", std::process::id());
    drop(ShmSegment::create(&loose, 4096).unwrap());
    let e = refused(&a, "w", shm_desc(&loose, 0, &[4], "float32"));
    assert!(e.contains("memory.name") && e.contains("has not mapped or opened"), "{e}");
    ShmSegment::unlink(&loose);

    // Shared memory by descriptor: only the registering process's own descriptors are taken.
    let mut d = shm_desc(&name, 0, &[4], "float32");
    d.memory = Memory::Fd { pid: other.id(), fd: 0, size: 16, offset: 0 };
    let e = refused(&a, "w", d.clone());
    assert!(e.contains("memory.pid") && e.contains("not the registering process"), "{e}");
    d.memory = Memory::Fd { pid: std::process::id(), fd: 1 << 20, size: 16, offset: 0 };
    let e = refused(&a, "w", d.clone());
    assert!(e.contains("memory.fd") && e.contains("pidfd_getfd"), "{e}");
    d.memory = Memory::Fd { pid: std::process::id(), fd: 3, size: 16, offset: u64::MAX - 3 };
    let e = refused(&a, "w", d.clone());
    assert!(e.contains("memory.offset") && e.contains("wraps around"), "{e}");
    // A descriptor that is not shared memory (a pipe) is refused.
    let mut fds = [0i32; 2];
    // SAFETY: pipe() fills two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    d.memory = Memory::Fd { pid: std::process::id(), fd: fds[0], size: 16, offset: 0 };
    let e = refused(&a, "w", d);
    assert!(e.contains("memory.fd") && e.contains("not shared memory"), "{e}");
    // SAFETY: our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }

    // Commands that skip the session or forge a token, written by hand.
    let raw = |d: &TensorDesc| {
        let sem = generate_semaphore_name("RegisterTensors", "raw");
        let cmd = host::Command::RegisterTensors(host::RegisterTensors {
            batch_id: "raw".into(),
            tensors: vec![("p".into(), d.encode().into())],
            bucket_size: None,
            timestamp: None,
            semaphore_name: Some(sem.clone()),
        });
        a.submit_raw(&cmd.encode(), &sem, T).unwrap().wait(T).unwrap_err().to_string()
    };
    let mut d = shm_desc(&name, 0, &[4], "float32");
    let e = raw(&d);
    assert!(e.contains("session: none given"), "{e}");
    d.session = Some("00".repeat(16));
    let e = raw(&d);
    assert!(e.contains("no open session has this token"), "{e}");
    // Another client's valid token, but for a process that does not hold the memory: the
    // token of a second client in this process works only for this process's memory.
    d.session = Some(b.session_token().to_string());
    let e = raw(&d);
    assert!(e.contains("no open session has this token"), "a token of another agent: {e}");

    still_serving(&a, &b, &seg, "ok");
    let _ = other.kill();
    let _ = other.wait();
    drop(seg);
    ShmSegment::unlink(&name);
}

#[test]
fn files_and_sockets_the_agent_creates_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let job = Job::start("modes", 1);
    let _c = job.client(0);
    let (q, _) = job.paths(0);
    let with = |ext: &str| {
        let mut o = q.as_os_str().to_owned();
        o.push(ext);
        std::path::PathBuf::from(o)
    };
    // Everything in the agent's directory: queue and state (and their lock files), `.pid`, `.sock`.
    let files: Vec<_> = std::fs::read_dir(&job.dir).unwrap().map(|e| e.unwrap().path()).collect();
    for f in [with(".pid"), with(".sock"), q.clone()] {
        assert!(files.contains(&f), "{} missing from {files:?}", f.display());
    }
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let mode = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {:o}", f.display(), mode & 0o777);
    }
    // Semaphores the agent owns (queue items / space) too.
    let mine = format!("{}", job.agents[0].as_ref().unwrap().id());
    let sems: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&mine))
        .collect();
    assert!(!sems.is_empty(), "no semaphores of the agent found");
    for e in sems {
        let mode = e.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{:?} is mode {:o}", e.path(), mode & 0o777);
    }
}

/// Run as a worker process by the zombie test: registers a destination on agent 1, then waits.
#[test]
fn zombie_worker_helper() {
    let Ok(dir) = std::env::var("TB_ZOMBIE_WORKER_DIR") else { return };
    let dir = std::path::PathBuf::from(dir);
    let c = TensorBusClient::new(
        1,
        Some(&dir.join("agent_rank1_command.lmdb")),
        Some(&dir.join("agent_rank1_state.lmdb")),
        T,
    )
    .unwrap();
    let pl = [tensorbus_planner::Placement::Replicate];
    c.init_pair("p", "inference", "trainer", 1, Some((vec![1], 0)), Some(&pl), true, T).unwrap();
    let name = format!("/tb-it-zombie-{}", std::process::id());
    let seg = ShmSegment::recreate(&name, 4096).unwrap();
    let _h = c.register_tensors("z", &[(shm_desc(&name, 0, &[32], "float32"), "p")], None, T).unwrap();
    println!("registered");
    ShmSegment::unlink(&name);
    std::thread::sleep(Duration::from_secs(60));
    drop(seg);
}

#[test]
fn a_worker_killed_and_not_reaped_is_noticed_within_a_second() {
    use std::io::BufRead;
    let job = Job::start("zombie", 2);
    let mut worker = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "zombie_worker_helper", "--nocapture", "--test-threads=1"])
        .env("TB_ZOMBIE_WORKER_DIR", &job.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let a = job.client(0);
    let pl = [tensorbus_planner::Placement::Replicate];
    a.init_pair("p", "trainer", "inference", 1, Some((vec![1], 0)), Some(&pl), true, T).unwrap();
    let name = format!("/tb-it-zsrc-{}", std::process::id());
    let seg = ShmSegment::create(&name, 4096).unwrap();
    let ha = a.register_tensors("z", &[(shm_desc(&name, 0, &[32], "float32"), "p")], None, T).unwrap();
    let mut out = std::io::BufReader::new(worker.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("registered") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the worker exited before registering");
    }
    // The send waits for its receiver, which will never arm.
    let mut send = ha.transfer(TransferType::Send, false, Duration::from_secs(20)).unwrap();
    // SIGKILL, and no wait(): the worker stays a zombie while we hold it.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGKILL) };
    let t0 = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", worker.id())).unwrap_or_default();
        if stat.contains(") Z") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "worker not a zombie: {stat}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = send.wait(Duration::from_secs(20)).expect_err("the send fails");
    let after = t0.elapsed();
    assert!(e.to_string().contains(&format!("worker pid {}", worker.id())) && e.to_string().contains("exited"), "{e}");
    eprintln!("zombie worker noticed by the sender after {:.2} s", after.as_secs_f64());
    // Still a zombie: nothing reaped it.
    assert!(std::fs::read_to_string(format!("/proc/{}/stat", worker.id())).unwrap().contains(") Z"));
    let _ = worker.wait();
    drop(seg);
    ShmSegment::unlink(&name);
}
