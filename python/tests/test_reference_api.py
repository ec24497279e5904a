"""The reference API (shared/reference: Etha's tensor_bus.commands, .client, .bootstrap), exactly:
names, parameters, defaults and values — checked against real agents."""

import gc
import inspect
import threading

import numpy as np
import pytest

import tensorbus
from tensorbus import _native


def test_commands_module_encodes_byte_identically_to_the_agents_decoder():
    commands = pytest.importorskip("tensorbus.commands")
    cmds = [
        commands.InitPair(pair_name="weights", local_name="trainer", remote_name="inference", expected_world_size=8,
                          mesh_shape_payload=memoryview(b"\x01\x02"), timestamp=1.5, semaphore_name="/tb-x"),
        commands.RegisterTensors(batch_id="step", tensors=[("weights", memoryview(b"\x81\xa1a\x01"))], bucket_size=1 << 20),
        commands.Transfer(batch_id="step", transfer_type="recv", semaphore_name="/tb-y"),
        commands.QueryStatus(batch_id="step", state_name="transfer_signal"),
        commands.CleanupBatch(batch_id="step", timestamp=2.25),
    ]
    for c in cmds:
        b = commands.encode(c)
        assert _native.roundtrip_command(b) == b, type(c).__name__
        assert commands.decode(b) == c
    # The reference's names and fields.
    # The reference's fields; kw_only puts the base's after the command's own, as on the wire.
    assert list(commands.InitPair.__struct_fields__) == [
        "pair_name", "local_name", "remote_name", "expected_world_size", "mesh_shape_payload",
        "placements_payload", "timestamp", "semaphore_name"]
    assert set(commands.__all__) >= {"BaseCommand", "InitPair", "RegisterTensors", "Transfer", "QueryStatus",
                                     "CleanupBatch", "Message"}


def test_signatures_match_the_reference():
    sig = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert sig(tensorbus.TensorBusClient.__init__) == [
        "self", "agent_rank", "lmdb_command_queue_path", "agent_state_lmdb_path", "connection_timeout"]
    assert inspect.signature(tensorbus.TensorBusClient.__init__).parameters["connection_timeout"].default == 30.0
    assert sig(tensorbus.TensorBusClient.init_pair) == [
        "self", "pair_name", "local_name", "remote_name", "expected_world_size", "device_mesh", "placements",
        "blocking", "timeout"]
    assert sig(tensorbus.TensorBusClient.register_tensors) == ["self", "batch_id", "tensors", "bucket_size", "timeout"]
    assert sig(tensorbus.TensorBusClient.transfer) == ["self", "batch_id", "transfer_type", "blocking", "timeout"]
    assert sig(tensorbus.BatchHandler.__init__)[:4] == ["self", "client", "batch_id", "pair_names"]
    assert sig(tensorbus.BatchHandler.close) == ["self", "blocking", "timeout"]
    assert sig(tensorbus.bootstrap_client) == ["path_naming_fn", "connection_timeout"]
    assert inspect.signature(tensorbus.setup_ptrace).parameters["agent_pid"].default is None


def test_bootstrap_info_values(job_factory, monkeypatch):
    job = job_factory(3)
    q, s = job.paths(2)
    monkeypatch.setenv("TENSORBUS_COMMAND_QUEUE_PATH", q)
    monkeypatch.setenv("TENSORBUS_STATE_PATH", s)
    monkeypatch.setenv("AGENT_RANK", "2")
    client, info = tensorbus.bootstrap_client()
    assert (info.agent_rank, info.method, info.rank_offset, info.device) == (2, "direct", None, "cpu")
    client.close()
    monkeypatch.delenv("AGENT_RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("AGENT_RANK_OFFSET", "1")
    client, info = tensorbus.bootstrap_client()
    assert (info.agent_rank, info.method, info.rank_offset) == (2, "offset", 1)
    # setup_ptrace() with no argument authorizes the environment's agent.
    tensorbus.setup_ptrace()
    client.close()


def _pair_and_register(job, a_t, b_t, batch="w"):
    """Agent 0 (trainer) and agent 1 (inference) paired 1:1 on pair "p" (once per job), and one
    tensor registered on each side under `batch`: (client_a, client_b, handler_a, handler_b)."""
    a = tensorbus.TensorBusClient(0, *job.paths(0))
    b = tensorbus.TensorBusClient(1, *job.paths(1))
    out = {}

    def side(name, c, local, remote, t):
        c.init_pair("p", local, remote, 1, device_mesh=tensorbus.DeviceMesh((1,), 0), placements=(tensorbus.Replicate(),))
        out[name] = c.register_tensors(batch, [(t, "p")])

    th = threading.Thread(target=side, args=("a", a, "trainer", "inference", a_t))
    th.start()
    side("b", b, "inference", "trainer", b_t)
    th.join(60)
    return a, b, out["a"], out["b"]


def test_semaphore_and_batch_handler_behave_like_the_reference(job_factory):
    job = job_factory(2)
    src = np.arange(32, dtype=np.float32)
    dst = np.zeros(32, dtype=np.float32)
    a, b, ha, hb = _pair_and_register(job, src, dst)
    sem = ha.transfer("send")
    for attr in ("acquire", "release", "value", "unlink", "name", "close"):
        assert hasattr(sem, attr), attr
    hb.transfer("recv", blocking=True)
    sem.acquire(30.0)
    assert sem.value == 0
    sem.release()
    assert sem.value == 1
    sem.unlink()
    assert np.array_equal(dst, src)
    # A handler made as the reference makes it: (client, batch_id, pair_names).
    h = tensorbus.BatchHandler(a, "w", ["p"])
    assert h.client is a and h.batch_id == "w" and h.pair_names == ["p"]
    assert h.query_transfer_signal() is True
    ha.close()
    hb.close()
    # The client is held weakly.
    del a, ha, sem
    gc.collect()
    with pytest.raises(RuntimeError, match="garbage collected"):
        h.client


def test_torch_contiguity_rule_size_one_dims(job_factory):
    torch = pytest.importorskip("torch")
    job = job_factory(2)
    x = torch.arange(50, dtype=torch.float32).reshape(5, 10)
    src = x[2:3, 0:5].clone()  # contiguous for torch, strides (10, 1) on a size-1 dimension
    assert src.is_contiguous() and src.stride()[1] == 1
    dst = torch.zeros(1, 5)
    a, b, ha, hb = _pair_and_register(job, src, dst)  # handlers hold their clients weakly: keep them
    ha.transfer("send")
    hb.transfer("recv", blocking=True)
    assert torch.equal(dst, src)
