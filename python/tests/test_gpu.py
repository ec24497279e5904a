"""GPU tensors end to end: torch CUDA tensors handed to real agents by CUDA IPC (and by file
descriptor for expandable segments), moved on the device, verified element by element.

Skipped where torch or a CUDA device is missing (the development machine); run on a GPU machine
by scripts/gpu_check.sh."""

import re

import numpy as np
import pytest

from test_tensorbus import SHAPES, run_flow

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

LAYOUTS = [
    ((2,), ["S(0)"], (2,), ["S(1)"]),
    ((2,), ["S(0)"], (4,), ["S(0)"]),
    ((2,), ["R"], (4,), ["S(1)"]),
    ((2,), ["P"], (2,), ["R"]),
    ((2,), ["S(1)"], (2, 2), ["S(0)", "R"]),
]
IDS = ["shard-to-shard", "2-to-4", "replicate-to-4", "partial-sum", "to-2d-mesh"]


@pytest.mark.parametrize("src_mesh,src_pl,dst_mesh,dst_pl", LAYOUTS, ids=IDS)
def test_cuda_tensors(job_factory, src_mesh, src_pl, dst_mesh, dst_pl):
    job = job_factory(int(np.prod(src_mesh)) + int(np.prod(dst_mesh)))
    run_flow(job, src_mesh, src_pl, dst_mesh, dst_pl, SHAPES, device="cuda")


@pytest.mark.parametrize("src_mesh,src_pl,dst_mesh,dst_pl", LAYOUTS[:2], ids=IDS[:2])
def test_cuda_tensors_in_expandable_segments(job_factory, src_mesh, src_pl, dst_mesh, dst_pl):
    job = job_factory(int(np.prod(src_mesh)) + int(np.prod(dst_mesh)))
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    run_flow(job, src_mesh, src_pl, dst_mesh, dst_pl, SHAPES, device="cuda", env=env)


def opens_logged(job, rank):
    """The agent's count of CUDA allocations opened, from its log."""
    text = job.log_path(rank).read_text(errors="replace")
    counts = [int(m) for m in re.findall(r"opens=(\d+)", text)]
    return max(counts, default=0)


def test_a_thousand_tensors_open_a_few_handles(job_factory):
    job = job_factory(2, log=True)
    shapes = [(256,)] * 1000
    run_flow(job, (1,), ["R"], (1,), ["R"], shapes, repeat=1, device="cuda")
    opens = [opens_logged(job, r) for r in (0, 1)]
    print(f"CUDA allocations opened per agent for 1000 tensors: {opens}")
    # Every tensor lives in one of a few caching-allocator segments; each is opened once.
    assert 0 < max(opens) <= 8, opens
