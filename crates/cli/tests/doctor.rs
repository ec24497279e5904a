//! `tensorbus doctor` does each check for real between two processes and reports what works.

#![cfg(feature = "cuda")]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn every_host_check_passes_here_and_gpu_checks_match_the_machine() {
    let out = Command::new(common::BIN).args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let status = |name: &str| {
        checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}: {checks:?}"))["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for name in [
        "shared memory",
        "POSIX semaphores",
        "cross-memory attach from another process",
        "pidfd_getfd from another process",
    ] {
        assert_eq!(status(name), "ok", "{checks:?}");
    }
    let gpu = if tensorbus_transport::cuda::available() { "ok" } else { "skip" };
    for name in ["CUDA driver", "CUDA IPC handle to another process", "CUDA virtual memory by fd to another process"] {
        assert_eq!(status(name), gpu, "{checks:?}");
    }
}

#[test]
fn a_failing_check_says_why() {
    // The child half of the pidfd check, asked for a descriptor this process does not have.
    let mut c = Command::new(common::BIN)
        .args(["doctor-child", "--pidfd", &format!("{}:987654", std::process::id())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = c.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("error pidfd_getfd(process {}, fd 987654): ", std::process::id());
    assert!(line.starts_with(&prefix), "{line}");
    assert!(line.contains("Bad file descriptor"), "{line}");
}
