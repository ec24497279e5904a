"""Python rows of the benchmarks, in one run: a torch tensor moved from Python on the demo layout
(8192x4096 float32, 2x4 [S(0),S(1)] -> 4 [S(0)]) with its shards in shared memory (handed over as
file descriptors: one copy) and as plain tensors (by address), next to the same transfer from Rust
(`tensorbus demo --shape`) and to single-thread memcpy (torch `copy_` on one thread); and the
per-call time of `transfer(blocking=True)` on a one-element batch next to `tensorbus bench rtt`.

    python scripts/bench_python.py [--smoke] [--out docs/bench/python.md]

Uses `tensorbus` from PATH (the wheel's command) or TENSORBUS_BIN. No timing is asserted.
"""

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROWS, COLS = 8192, 4096


def tool():
    exe = os.environ.get("TENSORBUS_BIN") or shutil.which("tensorbus")
    if not exe:
        sys.exit("bench_python: no `tensorbus` command (install the wheel, or set TENSORBUS_BIN)")
    return exe


def free_port():
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue


def worker(env, side, rank, shared, repeat, barrier, out):
    os.environ.update(env)
    import torch
    import tensorbus

    torch.set_num_threads(1)
    client, _ = tensorbus.bootstrap_client()
    if side == "src":
        mesh, pl, local = tensorbus.DeviceMesh((2, 4), rank), (tensorbus.Shard(0), tensorbus.Shard(1)), (ROWS // 2, COLS // 4)
        client.init_pair("w", "trainer", "inference", 8, device_mesh=mesh, placements=pl)
    else:
        mesh, pl, local = tensorbus.DeviceMesh((4,), rank), (tensorbus.Shard(0),), (ROWS // 4, COLS)
        client.init_pair("w", "inference", "trainer", 4, device_mesh=mesh, placements=pl)
    t = torch.full(local, float(rank + 1)) if side == "src" else torch.zeros(local)
    if shared:
        t.share_memory_()
    batch = client.register_tensors("b", [(t, "w")])
    times = []
    for _ in range(repeat):
        barrier.wait(120)
        t0 = time.perf_counter()
        batch.transfer("send" if side == "src" else "recv", blocking=True, timeout=120)
        times.append(time.perf_counter() - t0)
    out.put((side, rank, batch.memory_paths[0], times))
    barrier.wait(120)
    batch.close()


def rtt_worker(env, side, n, out):
    os.environ.update(env)
    import numpy as np
    import tensorbus

    client, _ = tensorbus.bootstrap_client()
    mesh = tensorbus.DeviceMesh((1,), 0)
    local, remote = ("tiny-src", "tiny-dst") if side == "src" else ("tiny-dst", "tiny-src")
    client.init_pair("tiny", local, remote, 1, device_mesh=mesh, placements=(tensorbus.Replicate(),))
    a = np.zeros(1, np.float32)
    batch = client.register_tensors("tiny", [(a, "tiny")])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        batch.transfer("send" if side == "src" else "recv", blocking=True, timeout=60)
        times.append(time.perf_counter() - t0)
    out.put((side, times))
    batch.close()


def memcpy_1thread(nbytes):
    import torch

    torch.set_num_threads(1)
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def python_transfer(exe, shared, repeat):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="tb-bench-py-") as d:
        up = subprocess.Popen([exe, "up", "--agents", "14", "--dir", d, "--listen", f"127.0.0.1:{free_port()}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            while "Ctrl-C to stop" not in (line := up.stdout.readline()):
                if not line:
                    raise RuntimeError("tensorbus up did not start")
            env = {"TENSORBUS_JOB": d}
            barrier, out = ctx.Barrier(12), ctx.Queue()
            procs = [ctx.Process(target=worker, args=({**env, "AGENT_RANK": str(r)}, "src", r, shared, repeat, barrier, out))
                     for r in range(8)]
            procs += [ctx.Process(target=worker, args=({**env, "AGENT_RANK": str(8 + r)}, "dst", r, shared, repeat, barrier, out))
                      for r in range(4)]
            for p in procs:
                p.start()
            res = [out.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(60)
            rtt = None
            if shared:  # once per run: the one-element round trip on agents 12 and 13
                out2 = ctx.Queue()
                n = 300
                rp = [ctx.Process(target=rtt_worker, args=({**env, "AGENT_RANK": "12"}, "src", n, out2)),
                      ctx.Process(target=rtt_worker, args=({**env, "AGENT_RANK": "13"}, "dst", n, out2))]
                for p in rp:
                    p.start()
                r = dict(out2.get(timeout=300) for _ in rp)
                for p in rp:
                    p.join(60)
                rtt = statistics.median(r["src"][20:]) * 1e6
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(30)
    dst = [r for r in res if r[0] == "dst"]
    per_transfer = [max(r[3][i] for r in dst) for i in range(repeat)]
    paths = sorted({r[2] for r in res})
    nbytes = ROWS * COLS * 4
    return {"paths": paths, "best": nbytes / min(per_transfer) / 1e9,
            "median": nbytes / statistics.median(per_transfer) / 1e9}, rtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="2 transfers, no claims")
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    exe = tool()
    repeat = 2 if a.smoke else 8
    mem = memcpy_1thread(ROWS * COLS * 4)
    shared, rtt = python_transfer(exe, True, repeat)
    plain, _ = python_transfer(exe, False, repeat)
    demo = subprocess.run([exe, "demo", "--src-mesh", "2x4", "--src-placements", "S(0),S(1)", "--dst-mesh", "4",
                           "--dst-placements", "S(0)", "--dtype", "float32", "--shape", f"{ROWS}x{COLS}",
                           "--repeat", str(repeat), "--json"], check=True, capture_output=True, text=True)
    rust = json.loads(demo.stdout)
    rtt_out = subprocess.run([exe, "bench", "rtt", "--iters", "5000"], check=True, capture_output=True, text=True).stdout
    cores = os.cpu_count()
    lines = [
        f"### Python (torch {__import__('torch').__version__}, {cores} cores)\n",
        f"One {ROWS}x{COLS} float32 tensor, 2x4 [S(0),S(1)] -> 4 [S(0)], {repeat} transfers; "
        f"single-thread memcpy (torch `copy_`, 1 thread) {mem:.2f} GB/s in the same run.\n",
        "| path | memory | best GB/s | median GB/s | best / memcpy 1-thread |",
        "|---|---|---:|---:|---:|",
        f"| Python, `share_memory_()` tensors | {', '.join(shared['paths'])} | {shared['best']:.2f} | {shared['median']:.2f} | {shared['best'] / mem:.2f} |",
        f"| Python, plain tensors | {', '.join(plain['paths'])} | {plain['best']:.2f} | {plain['median']:.2f} | {plain['best'] / mem:.2f} |",
        f"| Rust (`tensorbus demo --shape`) | shm | {rust['best_gbps']:.2f} | {rust['median_gbps']:.2f} | {rust['best_gbps'] / mem:.2f} |",
        "",
        f"`transfer(blocking=True)` of a one-element batch from Python: median {rtt:.1f} us per call "
        f"(300 calls); `tensorbus bench rtt`: {rtt_out.strip()}.",
        "",
    ]
    md = "\n".join(lines)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md)


if __name__ == "__main__":
    main()
