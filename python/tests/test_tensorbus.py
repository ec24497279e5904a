"""The Python package against real agents, a real command node and real worker processes."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

import tensorbus
from workers import run_worker

CTX = mp.get_context("spawn")


def run_flow(job, src_mesh, src_pl, dst_mesh, dst_pl, shapes, dtype=np.float32, repeat=2, use_torch=False, device="cpu", env=None):
    n_src = int(np.prod(src_mesh))
    n_dst = int(np.prod(dst_mesh))
    q = CTX.Queue()
    procs = []
    for r in range(n_src):
        procs.append(CTX.Process(target=run_worker, args=({**job.env(r), **(env or {})}, "src", r, src_mesh, src_pl, n_src, shapes, dtype, repeat, q, use_torch, device)))
    for r in range(n_dst):
        procs.append(CTX.Process(target=run_worker, args=({**job.env(n_src + r), **(env or {})}, "dst", r, dst_mesh, dst_pl, n_dst, shapes, dtype, repeat, q, use_torch, device)))
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    bad = [r for r in results if not r[2]]
    assert not bad, bad
    assert all(r[3] == "direct" for r in results)


SHAPES = [(37, 16), (8, 5), (64, 3)]


@pytest.mark.parametrize(
    "src_mesh,src_pl,dst_mesh,dst_pl",
    [
        ((2,), ["S(0)"], (2,), ["S(1)"]),
        ((2,), ["S(0)"], (4,), ["S(0)"]),
        ((2,), ["R"], (4,), ["S(1)"]),
        ((2,), ["P"], (2,), ["R"]),
        ((2,), ["S(1)"], (2, 2), ["S(0)", "R"]),
    ],
    ids=["shard-to-shard", "2-to-4", "replicate-to-4", "partial-sum", "to-2d-mesh"],
)
def test_quick_start_flow_numpy(job_factory, src_mesh, src_pl, dst_mesh, dst_pl):
    job = job_factory(int(np.prod(src_mesh)) + int(np.prod(dst_mesh)))
    run_flow(job, src_mesh, src_pl, dst_mesh, dst_pl, SHAPES)


def test_int_dtype_and_uneven_shards(job_factory):
    job = job_factory(5)
    run_flow(job, (2,), ["S(0)"], (3,), ["S(0)"], [(7, 3), (2, 2)], dtype=np.int16)


def test_torch_tensors(job_factory):
    torch = pytest.importorskip("torch")
    job = job_factory(4)
    run_flow(job, (2,), ["S(0)"], (2,), ["S(1)"], SHAPES, use_torch=True)


def test_bootstrap_from_environment(job_factory, monkeypatch):
    job = job_factory(1)
    for k, v in job.env(0).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AGENT_RANK")
    monkeypatch.setenv("LOCAL_RANK", "0")
    client, info = tensorbus.bootstrap_client(connection_timeout=10)
    assert (info.agent_rank, info.method, info.rank_offset) == (0, "offset", 0)
    assert info.command_queue_path == job.paths(0)[0]
    client, info = tensorbus.bootstrap_client(path_naming_fn=lambda r: job.paths(r), connection_timeout=10)
    assert info.state_path == job.paths(0)[1]
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match="AGENT_RANK"):
        tensorbus.bootstrap_client()


def test_exceptions_for_their_causes(job_factory, tmp_path):
    # ConnectionError: no agent.
    with pytest.raises(ConnectionError, match="no live agent"):
        tensorbus.TensorBusClient(7, str(tmp_path / "q"), str(tmp_path / "s"), connection_timeout=0.3)
    job = job_factory(2)
    a = tensorbus.TensorBusClient(0, *job.paths(0), connection_timeout=10)
    b = tensorbus.TensorBusClient(1, *job.paths(1), connection_timeout=10)
    # ValueError: bad layout, bad arguments, non-contiguous memory.
    with pytest.raises(ValueError, match="placements given"):
        a.init_pair("p", "t", "i", 4, device_mesh=tensorbus.DeviceMesh((2, 2), 0), placements=[tensorbus.Shard(0)])
    with pytest.raises(ValueError, match="outside a mesh"):
        tensorbus.DeviceMesh((2,), 5)
    with pytest.raises(ValueError, match="send"):
        a.transfer("nope", "sideways")
    sa = a.init_pair("p", "t", "i", 1, device_mesh=tensorbus.DeviceMesh((1,), 0), placements=[tensorbus.Replicate()], blocking=False)
    b.init_pair("p", "i", "t", 1, device_mesh=tensorbus.DeviceMesh((1,), 0), placements=[tensorbus.Replicate()])
    sa.acquire(10)
    with pytest.raises(ValueError, match="not C-contiguous"):
        a.register_tensors("x", [(np.zeros((4, 4), np.float32).T, "p")])
    with pytest.raises(ValueError, match="unknown batch"):
        a.transfer("nope", "send", blocking=True)
    x, y = np.arange(16, dtype=np.float32), np.zeros(16, np.float32)
    import threading

    hb = {}
    t = threading.Thread(target=lambda: hb.setdefault("b", b.register_tensors("w", [(y, "p")], timeout=10)))
    t.start()
    ha = a.register_tensors("w", [(x, "p")], timeout=10)
    t.join()
    hb = hb["b"]
    # TimeoutError: an epoch that never comes; a receive nobody sends.
    with pytest.raises(TimeoutError):
        ha.wait_epoch(5, timeout=0.3)
    sem = hb.transfer("recv")
    assert sem.name.startswith("/tb-")
    with pytest.raises(TimeoutError):
        sem.acquire(0.3)
    # The matching send completes it; the data landed.
    ha.transfer("send", blocking=True, timeout=10)
    sem.acquire(10)
    assert np.array_equal(x, y)
    assert ha.query_transfer_signal()
    # TransferError: the batch is cleaned up under an armed transfer; it names the node.
    pending = ha.transfer("send")
    ha.close()
    with pytest.raises(tensorbus.TransferError) as ei:
        pending.acquire(10)
    assert ei.value.node_id == "agent:0" and "cleaned up" in str(ei.value)
    hb.close()
    # A closed client says so.
    a.close()
    a.close()
    with pytest.raises(ValueError, match="closed"):
        a.transfer("w", "send")


def _exit_without_closing(env, q):
    os.environ.update(env)
    import tensorbus

    c, _ = tensorbus.bootstrap_client(connection_timeout=10)
    c.init_pair("p", "t", "i", 1, device_mesh=tensorbus.DeviceMesh((1,), 0), placements=[tensorbus.Replicate()], blocking=False)
    q.put(os.getpid())
    q.close()
    q.join_thread()
    os._exit(0)  # no close, no cleanup


def test_a_worker_that_exits_without_closing_leaves_nothing_behind(job_factory):
    job = job_factory(2)
    b = tensorbus.TensorBusClient(1, *job.paths(1), connection_timeout=10)
    q = CTX.Queue()
    p = CTX.Process(target=_exit_without_closing, args=(job.env(0), q))
    p.start()
    q.get(timeout=30)
    b.init_pair("p", "i", "t", 1, device_mesh=tensorbus.DeviceMesh((1,), 0), placements=[tensorbus.Replicate()], timeout=10)
    p.join(10)
    # A second worker on the same agent registers and transfers (the first one's state is gone).
    a = tensorbus.TensorBusClient(0, *job.paths(0), connection_timeout=10)
    x, y = np.ones(8, np.float64), np.zeros(8, np.float64)
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", b.register_tensors("w", [(y, "p")], timeout=10)))
    t.start()
    ha = a.register_tensors("w", [(x, "p")], timeout=10)
    t.join()
    ha.transfer("send")
    out["b"].transfer("recv", blocking=True, timeout=10)
    assert np.array_equal(x, y)
    # That worker's batch is released by the agent once it notices the exit.
    proc = CTX.Process(target=_register_and_exit, args=(job.env(0), q))
    proc.start()
    assert q.get(timeout=30) == "registered"
    proc.join(10)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            a.query_transfer_signal("gone")
        except ValueError as e:
            assert "unknown batch" in str(e)
            break
        time.sleep(0.1)
    else:
        pytest.fail("the dead worker's batch was not released")


def _register_and_exit(env, q):
    os.environ.update(env)
    import tensorbus

    c, _ = tensorbus.bootstrap_client(connection_timeout=10)
    arr = np.zeros(4, np.float32)
    # Registration needs the peer; do not wait for it: the agent holds the batch meanwhile.
    try:
        c.register_tensors("gone", [(arr, "p")], timeout=0.5)
        q.put("registered without a peer?")
    except TimeoutError:
        q.put("registered")
    except BaseException as e:
        q.put(repr(e))
    q.close()
    q.join_thread()  # flush before the abrupt exit
    os._exit(0)


def test_python_dash_m_forwards_to_the_cli():
    import subprocess
    import sys

    from conftest import BIN

    out = subprocess.run([sys.executable, "-m", "tensorbus", "--version"], env={**os.environ, "TENSORBUS_BIN": BIN}, capture_output=True, text=True)
    assert out.returncode == 0 and "tensorbus" in out.stdout


def test_shared_memory_torch_tensors_are_mapped_by_the_agent(job_factory):
    """Tensors in shared memory (`share_memory_()`, or `module.share_memory()`) are handed over as
    file descriptors the agent maps: one copy per byte; others go by address."""
    torch = pytest.importorskip("torch")
    from test_reference_api import _pair_and_register

    job = job_factory(2)
    model = torch.nn.Linear(64, 48)
    model.share_memory()  # every parameter moved to shared memory, in place
    src = model.weight.detach()
    dst = torch.zeros(48, 64).share_memory_()
    a, b, ha, hb = _pair_and_register(job, src, dst)
    assert ha.memory_paths == ["fd"] and hb.memory_paths == ["fd"]
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        s = ha.transfer("send")
        hb.transfer("recv", blocking=True)
        s.acquire(30.0)
        assert torch.equal(dst, model.weight.detach()), step
    # A view into shared memory: the offset into its storage travels with the descriptor.
    big = torch.arange(100, dtype=torch.float32).share_memory_()
    view = big[40:72]
    out = torch.zeros(32)
    a2, b2, h2a, h2b = _pair_and_register(job, view, out, batch="v")  # a plain destination goes by address
    assert h2a.memory_paths == ["fd"] and h2b.memory_paths == ["cma"]
    h2a.transfer("send")
    h2b.transfer("recv", blocking=True)
    assert torch.equal(out, view)
