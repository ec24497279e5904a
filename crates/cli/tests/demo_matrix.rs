//! End to end on one host, real processes: `tensorbus demo` starts a command node, agents and two
//! groups of worker processes, transfers, and verifies every received element against the logical
//! tensor. The matrix covers 1-D and 2-D meshes, Shard / Replicate / Partial, nested and uneven
//! shards, several dtypes, several pairs in one batch, and repeated transfers.

mod common;

use std::process::Command;

fn demo(args: &[&str]) -> serde_json::Value {
    let out = Command::new(common::BIN)
        .args(["demo", "--json", "--timeout", "60"])
        .args(args)
        .env("TENSORBUS_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo {args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
    v
}

fn layout(src_mesh: &str, src: &str, dst_mesh: &str, dst: &str, dtype: &str, scale: &str) {
    demo(&[
        "--src-mesh",
        src_mesh,
        "--src-placements",
        src,
        "--dst-mesh",
        dst_mesh,
        "--dst-placements",
        dst,
        "--dtype",
        dtype,
        "--scale",
        scale,
        "--tensors",
        "24",
        "--repeat",
        "2",
    ]);
}

#[test]
fn one_d_row_shards() {
    layout("4", "S(0)", "2", "S(0)", "bfloat16", "32");
}

#[test]
fn two_d_to_one_d_uneven_column_shards() {
    // Dimensions divided by 3 are odd; 3 destination ranks split them unevenly.
    layout("2x2", "S(0),S(1)", "3", "S(1)", "float32", "3");
}

#[test]
fn replicated_on_both_sides() {
    layout("2x2", "R,S(0)", "2x2", "S(1),R", "float16", "32");
}

#[test]
fn partial_sum_source_is_reduced() {
    layout("2x2", "S(0),P", "2", "S(0)", "float32", "32");
}

#[test]
fn partial_max_to_replicated() {
    layout("2", "P(max)", "2", "R", "bfloat16", "32");
}

#[test]
fn nested_uneven_destination_int8() {
    layout("3", "S(0)", "2x2", "S(0),S(0)", "int8", "7");
}

#[test]
fn fp8_to_a_single_rank() {
    layout("2", "S(1)", "1", "R", "float8_e4m3fn", "32");
}

#[test]
fn several_pairs_in_one_batch_repeated() {
    // The default workload: colwise, rowwise and replicated pairs in one batch.
    let v = demo(&["--scale", "32", "--tensors", "40", "--repeat", "3"]);
    assert_eq!(v["repeat"], 3);
    assert_eq!(v["seconds"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_layout_flags_are_refused_before_anything_starts() {
    let out =
        Command::new(common::BIN).args(["demo", "--src-mesh", "2x2", "--src-placements", "S(0)"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 placements given for a 2-dimensional mesh"), "{err}");
    let out = Command::new(common::BIN).args(["demo", "--dst-mesh", "2", "--dst-placements", "P"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("receiving side"));
}
