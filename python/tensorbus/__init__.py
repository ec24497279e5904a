"""tensorbus: move sharded tensors between independently launched process groups.

The worker-side API of the reference (Etha's ``tensor_bus.client``)::

    client, info = tensorbus.bootstrap_client()
    client.init_pair("weights", "trainer", "inference", expected_world_size=2,
                     device_mesh=tensorbus.DeviceMesh((2,), rank), placements=(tensorbus.Shard(0),))
    batch = client.register_tensors("step", [(w, "weights")])
    batch.transfer("send", blocking=True)

Tensors are numpy arrays or torch CPU tensors (or DTensors), registered without copying: keep them
alive and in place while the batch is registered (the handler keeps a reference).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from . import _native
from .errors import TransferError
from .placement import DeviceMesh, Partial, Replicate, Shard, mesh_shape_and_rank, placement_str
from .tensors import describe, shared_fd

__all__ = [
    "TensorBusClient",
    "BatchHandler",
    "BootstrapInfo",
    "bootstrap_client",
    "setup_ptrace",
    "generate_semaphore_name",
    "DeviceMesh",
    "Shard",
    "Replicate",
    "Partial",
    "TransferError",
]

#: The semaphore of a command in flight, like ``posix_ipc.Semaphore``: ``acquire(timeout=None)``,
#: ``release()``, ``value``, ``unlink()``, ``name``, ``close()``; ``acquire`` also raises the
#: command's error.
Semaphore = _native.Pending


def generate_semaphore_name(command_type: str, context_id: str) -> str:
    """A POSIX semaphore name unique to this process and call."""
    return _native.generate_semaphore_name(command_type, context_id)


def setup_ptrace(agent_pid: Optional[int] = None) -> None:
    """Lets this process's agent (and only it) read and write this process's tensors.

    As the reference, ``setup_ptrace()`` takes no argument: the agent is the one the launch
    environment names (``AGENT_RANK``, or ``LOCAL_RANK + AGENT_RANK_OFFSET``), found through its
    heartbeat; unlike the reference it authorizes that agent's pid, not any process.
    ``agent_pid`` names the agent explicitly. ``TensorBusClient`` calls this for its agent; a
    kernel without Yama is not an error.
    """
    if agent_pid is None:
        state_path = _native.resolve_bootstrap()[5]
        agent_pid = _native.agent_pid_at(state_path)
    _native.setup_ptrace(int(agent_pid))


class BatchHandler:
    """A registered batch: transfer it repeatedly, query it, release it (also as a context manager)."""

    def __init__(self, client: "TensorBusClient", batch_id: str, pair_names: List[str],
                 owners: Optional[List[Any]] = None):
        self._client_ref = weakref.ref(client)
        self.batch_id = batch_id
        self.pair_names = pair_names
        self._owners = owners or []  # keeps registered memory alive
        self._closed = False
        #: How the agent reaches each tensor: ``"fd"`` (shared memory it maps: one copy, memory
        #: to memory), ``"cma"`` (this process's address space, cross-memory attach) or ``"cuda"``.
        self.memory_paths: List[str] = []

    @property
    def client(self) -> "TensorBusClient":
        """The client, held weakly as in the reference: RuntimeError once it was collected."""
        c = self._client_ref()
        if c is None:
            raise RuntimeError(f"the TensorBusClient of batch {self.batch_id!r} has been garbage collected")
        return c

    @property
    def _client(self) -> "TensorBusClient":
        return self.client

    def transfer(self, transfer_type: str, blocking: bool = False, timeout: float = 30.0) -> Semaphore:
        """Sends (``"send"``) or receives (``"recv"``) every tensor of the batch; returns the
        command's semaphore (already acquired when ``blocking``)."""
        return self._client.transfer(self.batch_id, transfer_type, blocking=blocking, timeout=timeout)

    def query_transfer_signal(self, blocking: bool = True, timeout: float = 30.0) -> bool:
        """Whether the sending side finished the latest transfer of the batch."""
        return self._client.query_transfer_signal(self.batch_id, blocking=blocking, timeout=timeout)

    def wait_epoch(self, n: int, timeout: float = 30.0) -> None:
        """Blocks until epoch ``n`` (0-based) of this batch has ended on every agent, both sides."""
        self._client.wait_epoch(self.batch_id, n, timeout=timeout)

    def close(self, blocking: bool = True, timeout: float = 30.0) -> None:
        """Releases the batch in the agent; the id becomes reusable. Idempotent."""
        if not self._closed:
            self._client._native.cleanup_batch(self.batch_id, float(timeout))
            self._closed = True
            self._owners = []

    def __enter__(self) -> "BatchHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBusClient:
    """A worker's connection to its agent.

    Raises ConnectionError when no live agent answers within ``connection_timeout`` seconds.
    """

    def __init__(
        self,
        agent_rank: int,
        lmdb_command_queue_path: Optional[str] = None,
        agent_state_lmdb_path: Optional[str] = None,
        connection_timeout: float = 30.0,
    ):
        self.agent_rank = int(agent_rank)
        self.lmdb_command_queue_path = lmdb_command_queue_path
        self.agent_state_lmdb_path = agent_state_lmdb_path
        self._client = _native.Client(
            self.agent_rank, lmdb_command_queue_path, agent_state_lmdb_path, float(connection_timeout)
        )
        setup_ptrace(self._client.agent_pid())

    @property
    def _native(self) -> "_native.Client":
        if self._client is None:
            raise ValueError("this TensorBusClient is closed")
        return self._client

    def init_pair(
        self,
        pair_name: str,
        local_name: str,
        remote_name: str,
        expected_world_size: int,
        device_mesh: Any = None,
        placements: Optional[Sequence[Any]] = None,
        blocking: bool = True,
        timeout: float = 30.0,
    ) -> Optional[Semaphore]:
        """Registers this rank for a pair; when ``blocking``, waits until every rank of both sides
        has and the pair is matched. ``device_mesh`` is a ``tensorbus.DeviceMesh`` or a torch
        ``DeviceMesh``; ``placements`` one per mesh dim (tensorbus or torch placements)."""
        shape, rank = (None, None) if device_mesh is None else mesh_shape_and_rank(device_mesh)
        pl = None if placements is None else [placement_str(p) for p in placements]
        sem = self._native.init_pair(
            pair_name,
            local_name,
            remote_name,
            int(expected_world_size),
            None if shape is None else list(shape),
            rank,
            pl,
            bool(blocking),
            float(timeout),
        )
        return None if blocking else sem

    def register_tensors(
        self, batch_id: str, tensors: Sequence[Tuple[Any, str]], bucket_size: Optional[int] = None, timeout: float = 30.0
    ) -> BatchHandler:
        """Registers local shards across pairs under ``batch_id`` (the same id on both sides);
        blocks until both sides registered it and agree on shapes and dtypes."""
        if not tensors:
            raise ValueError("register_tensors needs at least one (tensor, pair_name)")
        items, owners, pairs, paths = [], [], [], []
        for i, entry in enumerate(tensors):
            try:
                t, pair = entry
            except (TypeError, ValueError):
                raise ValueError(f"tensors[{i}] must be a (tensor, pair_name) tuple") from None
            dtype, shape, strides, addr, nbytes, device, owner = describe(t)
            fd = shared_fd(owner) if device == "cpu" else None
            items.append((str(pair), dtype, list(shape), list(strides), addr, nbytes, f"{pair}[{i}]", device, fd))
            owners.append(owner)
            paths.append("cuda" if device != "cpu" else "fd" if fd else "cma")
            if pair not in pairs:
                pairs.append(pair)
        self._native.register_tensors(batch_id, items, None if bucket_size is None else int(bucket_size), float(timeout))
        handler = BatchHandler(self, batch_id, pairs, owners)
        handler.memory_paths = paths
        return handler

    def transfer(self, batch_id: str, transfer_type: str, blocking: bool = False, timeout: float = 30.0) -> Semaphore:
        sem = self._native.transfer(batch_id, transfer_type, False, float(timeout))
        if blocking:
            sem.acquire(float(timeout))
        return sem

    def query_transfer_signal(self, batch_id: str, blocking: bool = True, timeout: float = 30.0) -> bool:
        return self._native.query_transfer_signal(batch_id, float(timeout))

    def wait_epoch(self, batch_id: str, n: int, timeout: float = 30.0) -> None:
        """Blocks until epoch ``n`` (0-based) of the batch has ended on every agent, both sides."""
        self._native.wait_epoch(batch_id, int(n), float(timeout))

    def close(self) -> None:
        """Drops the connection (the agent keeps running). Idempotent; later calls raise ValueError."""
        self._client = None

    def __enter__(self) -> "TensorBusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class BootstrapInfo:
    """How a worker found its agent, as the reference reports it: ``method`` is ``"direct"``
    (``AGENT_RANK``) or ``"offset"`` (``LOCAL_RANK + AGENT_RANK_OFFSET``, with ``rank_offset``
    set; ``None`` otherwise); ``device`` is ``cuda:{LOCAL_RANK}`` where torch sees CUDA, else
    ``"cpu"`` (``TENSORBUS_DEVICE`` overrides)."""

    agent_rank: int
    global_rank: int
    rank_offset: Optional[int]
    device: str
    command_queue_path: str
    state_path: str
    method: str


def _default_device() -> str:
    import sys

    torch = sys.modules.get("torch")  # only if the worker uses torch: never import it here
    try:
        if torch is not None and torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    except Exception:
        pass
    return "cpu"


def bootstrap_client(
    path_naming_fn: Optional[Callable[[int], Tuple[str, str]]] = None, connection_timeout: float = 30.0
) -> Tuple[TensorBusClient, BootstrapInfo]:
    """A client for this process's agent: ``AGENT_RANK``, else ``LOCAL_RANK + AGENT_RANK_OFFSET``.

    Paths come from ``path_naming_fn(agent_rank) -> (command_queue_path, state_path)``, else
    ``TENSORBUS_COMMAND_QUEUE_PATH`` / ``TENSORBUS_STATE_PATH``, else
    ``{dir}/agent_rank{N}_command.lmdb`` and ``{dir}/agent_rank{N}_state.lmdb`` with ``dir`` the
    job's directory ``TENSORBUS_JOB`` (what ``tensorbus up --dir`` was given), else ``/tmp``.
    """
    agent_rank, global_rank, rank_offset, device, q, s, method = _native.resolve_bootstrap()
    info = BootstrapInfo(agent_rank, global_rank, rank_offset, device or _default_device(), q, s, method)
    if path_naming_fn is not None:
        q, s = path_naming_fn(info.agent_rank)
        info = BootstrapInfo(info.agent_rank, info.global_rank, info.rank_offset, info.device, str(q), str(s), info.method)
    client = TensorBusClient(info.agent_rank, info.command_queue_path, info.state_path, connection_timeout)
    return client, info
