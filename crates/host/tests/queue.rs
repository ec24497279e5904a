//! The LMDB command queue and state store with real files, real semaphores and real processes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tensorbus_host::sem::Semaphore;
use tensorbus_host::store::{CommandQueue, StateStore};
use tensorbus_host::HostError;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tb-test-{}-{}", std::process::id(), name));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("q.lmdb")
}

/// Re-runs this test binary as a child process executing `child_main` with the given role.
fn spawn_child(role: &str, path: &Path, arg: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_main", "--nocapture", "--test-threads=1"])
        .env("TB_CHILD_ROLE", role)
        .env("TB_CHILD_PATH", path)
        .env("TB_CHILD_ARG", arg)
        .spawn()
        .unwrap()
}

/// Entry point of child processes; does nothing when run as a normal test.
#[test]
fn child_main() {
    let Ok(role) = std::env::var("TB_CHILD_ROLE") else { return };
    let path = PathBuf::from(std::env::var("TB_CHILD_PATH").unwrap());
    let arg = std::env::var("TB_CHILD_ARG").unwrap();
    let q = CommandQueue::open(&path).unwrap();
    match role.as_str() {
        "produce" => {
            for i in 0..50 {
                q.enqueue(format!("{arg}:{i}").as_bytes(), Duration::from_secs(10)).unwrap();
            }
        }
        "produce-forever" => {
            // Enqueue as fast as possible until killed.
            let mut i = 0u64;
            loop {
                let _ = q.enqueue(format!("{arg}:{i}").as_bytes(), Duration::from_millis(50));
                i += 1;
            }
        }
        _ => panic!("unknown role {role}"),
    }
}

#[test]
fn fifo_bounded_and_private() {
    let p = tmp("fifo");
    let q = CommandQueue::create(&p, 4).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "queue file must be private, mode {mode:o}");
    for i in 0..4u8 {
        q.enqueue(&[i], Duration::from_millis(10)).unwrap();
    }
    let e = q.enqueue(&[9], Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, HostError::QueueFull { capacity: 4, .. }), "{e}");
    for i in 0..4u8 {
        assert_eq!(q.dequeue(Duration::from_millis(10)).unwrap(), Some(vec![i]));
    }
    assert_eq!(q.dequeue(Duration::from_millis(20)).unwrap(), None);
    // Wrap around the ring several times.
    for i in 0..20u8 {
        q.enqueue(&[i, i], Duration::from_millis(10)).unwrap();
        assert_eq!(q.dequeue(Duration::from_millis(10)).unwrap(), Some(vec![i, i]));
    }
    q.remove();
    assert!(!p.exists());
}

#[test]
fn producers_need_a_consumer() {
    let p = tmp("noagent");
    let e = CommandQueue::open(&p).err().expect("no queue yet");
    assert!(matches!(e, HostError::NoAgent(_)), "{e}");
}

#[test]
fn many_producer_processes_one_consumer() {
    let p = tmp("mpsc");
    let q = CommandQueue::create(&p, 8).unwrap();
    let kids: Vec<_> = (0..4).map(|k| spawn_child("produce", &p, &format!("p{k}"))).collect();
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 200 && Instant::now() < deadline {
        if let Some(v) = q.dequeue(Duration::from_millis(200)).unwrap() {
            got.push(String::from_utf8(v).unwrap());
        }
    }
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(got.len(), 200);
    // Per producer, FIFO order is kept.
    for k in 0..4 {
        let mine: Vec<u32> =
            got.iter().filter_map(|s| s.strip_prefix(&format!("p{k}:")).map(|n| n.parse().unwrap())).collect();
        assert_eq!(mine, (0..50).collect::<Vec<_>>());
    }
    q.remove();
}

#[test]
fn producer_killed_mid_enqueue_breaks_nothing() {
    let p = tmp("killed");
    let q = CommandQueue::create(&p, 16).unwrap();
    for round in 0..3 {
        let mut k = spawn_child("produce-forever", &p, "k");
        // Let it get going, drain a little so it keeps enqueueing, then kill -9 at a random point.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(150 + 40 * round) {
            let _ = q.dequeue(Duration::from_millis(5)).unwrap();
        }
        k.kill().unwrap();
        k.wait().unwrap();
        // Whatever it left is whole and decodable; then the queue works for a new producer.
        while let Some(v) = q.dequeue(Duration::from_millis(50)).unwrap() {
            let s = String::from_utf8(v).unwrap();
            assert!(s.starts_with("k:"), "torn command {s:?}");
        }
        let mut k = spawn_child("produce", &p, "after");
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while n < 50 && Instant::now() < deadline {
            if let Some(v) = q.dequeue(Duration::from_millis(200)).unwrap() {
                assert_eq!(String::from_utf8(v).unwrap(), format!("after:{n}"));
                n += 1;
            }
        }
        assert!(k.wait().unwrap().success());
        assert_eq!(n, 50, "a new producer's commands all arrive after the kill");
    }
    q.remove();
}

#[test]
fn state_store_roundtrip_and_prefix_delete() {
    let p = tmp("state");
    let s = StateStore::create(&p).unwrap();
    s.put("batch:a/state:x", b"1").unwrap();
    s.put("batch:a/state:y", b"2").unwrap();
    s.put("batch:b/state:x", b"3").unwrap();
    assert_eq!(s.get("batch:a/state:y").unwrap(), Some(b"2".to_vec()));
    s.delete_prefix("batch:a/").unwrap();
    assert_eq!(s.get("batch:a/state:x").unwrap(), None);
    assert_eq!(s.get("batch:b/state:x").unwrap(), Some(b"3".to_vec()));
    // A second handle in the same process shares the open environment.
    let r = StateStore::open(&p).unwrap();
    assert_eq!(r.get("batch:b/state:x").unwrap(), Some(b"3".to_vec()));
    drop(r);
    s.remove();
}

#[test]
fn semaphores_count_and_time_out() {
    let name = format!("/tb-test-sem-{}", std::process::id());
    let s = Semaphore::recreate(&name, 2).unwrap();
    assert!(s.try_wait() && s.try_wait() && !s.try_wait());
    let t0 = Instant::now();
    assert!(!s.wait_timeout(Duration::from_millis(50)).unwrap());
    assert!(t0.elapsed() >= Duration::from_millis(45));
    let other = Semaphore::open(&name).unwrap();
    other.post().unwrap();
    assert!(s.wait_timeout(Duration::from_secs(1)).unwrap());
    assert!(Semaphore::create(&name, 0).is_err(), "exclusive create of an existing name");
    Semaphore::unlink(&name);
    assert!(Semaphore::open(&name).is_err());
    assert!(matches!(Semaphore::open("no-slash"), Err(HostError::BadSemaphoreName(_))));
}
