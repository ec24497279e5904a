"""Plots transfer throughput per tensor size against the limits measured in the same run."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
suite = json.load(open(src))["suite"]
rows = suite["sizes"]
x = [r["bytes"] for r in rows]
fig, ax = plt.subplots(figsize=(8, 5))
for key, label, style in [
    ("best_gbps", "tensorbus transfer (best)", "o-"),
    ("median_gbps", "tensorbus transfer (median)", "o--"),
    ("memcpy_1thread_gbps", "memcpy, 1 thread", "s:"),
    ("memcpy_nthread_gbps", "memcpy, all threads", "s:"),
    ("process_vm_readv_gbps", "process_vm_readv", "^:"),
]:
    ax.plot(x, [r[key] for r in rows], style, label=label)
ax.set_xscale("log", base=2)
ax.set_xlabel("tensor size (bytes)")
ax.set_ylabel("GB/s")
ax.set_title(f"tensorbus one-host transfer, 1 -> 1 rank\n{suite['machine']}", fontsize=9)
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=120)
print(f"wrote {out}")
