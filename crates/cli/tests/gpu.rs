//! GPU tensors on one host, real processes: workers keep their shards in CUDA memory — one
//! `cuMemAlloc` allocation shared by IPC handle, or virtual-memory pieces shared by file
//! descriptor as PyTorch's expandable segments are — and every received element is verified.
//!
//! Where there is no CUDA driver or device (the development machine, CI), the same requests must
//! fail at once with an error that says so; the matrix runs on a GPU machine
//! (`scripts/gpu_check.sh`).

#![cfg(feature = "cuda")]

mod common;

use std::process::Command;

fn gpu_present() -> bool {
    tensorbus_transport::cuda::available()
}

fn demo(device: &str, args: &[&str]) -> std::process::Output {
    // On a GPU machine without Rust this test runs as a carried binary (scripts/gpu_check.sh).
    let bin = std::env::var("TENSORBUS_BIN").unwrap_or_else(|_| common::BIN.to_string());
    Command::new(bin)
        .args(["demo", "--json", "--timeout", "60", "--device", device, "--scale", "32", "--tensors", "24"])
        .args(["--dtype", "float32", "--repeat", "2"])
        .args(args)
        .env("TENSORBUS_LOG", "error")
        .output()
        .unwrap()
}

const LAYOUTS: [[&str; 8]; 6] = [
    ["--src-mesh", "4", "--src-placements", "S(0)", "--dst-mesh", "2", "--dst-placements", "S(1)"],
    ["--src-mesh", "2x2", "--src-placements", "S(0),S(1)", "--dst-mesh", "3", "--dst-placements", "S(0)"],
    ["--src-mesh", "2", "--src-placements", "R", "--dst-mesh", "2x2", "--dst-placements", "S(1),R"],
    ["--src-mesh", "2x2", "--src-placements", "S(0),P", "--dst-mesh", "2", "--dst-placements", "S(0)"],
    ["--src-mesh", "3", "--src-placements", "S(1)", "--dst-mesh", "2x2", "--dst-placements", "S(0),S(0)"],
    ["--src-mesh", "2x4", "--src-placements", "S(0),S(1)", "--dst-mesh", "4", "--dst-placements", "S(1)"],
];

fn matrix(device: &str) {
    if !gpu_present() {
        let out = demo(device, &LAYOUTS[0]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a GPU demo without a GPU must fail");
        assert!(err.contains("CUDA"), "the error must say CUDA is missing: {err}");
        eprintln!("no CUDA device here: checked the refusal only");
        return;
    }
    for l in LAYOUTS {
        let out = demo(device, &l);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{device} {l:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["mismatches"], 0, "{v}");
        eprintln!("{device} {:?}: {:.2} GB/s, {:.2} of a device copy", l, v["best_gbps"], v["ratio_to_d2d"]);
    }
}

#[test]
fn layouts_with_ipc_handles() {
    matrix("cuda");
}

#[test]
fn layouts_with_virtual_memory_pieces() {
    matrix("cuda-vmm");
}

#[test]
fn an_unknown_device_is_refused() {
    let out = demo("tpu", &LAYOUTS[0]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device \"tpu\""));
}
