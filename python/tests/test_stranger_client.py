"""A stranger's client, written only from docs/protocol.md with stock parts — msgspec for the
commands, py-lmdb (LMDB 0.9) for the queue and the state store, posix_ipc for the semaphores, a
plain Unix socket for the session — drives a live agent: pairs, registers, transfers against a
peer that uses the tensorbus package, and is refused hostile payloads while the agent serves on.
"""

import ctypes
import os
import socket
import threading
import time

import numpy as np
import pytest

import tensorbus

lmdb = pytest.importorskip("lmdb")
posix_ipc = pytest.importorskip("posix_ipc")
msgspec = pytest.importorskip("msgspec")


class BaseCommand(msgspec.Struct, tag=True, kw_only=True):
    timestamp: float | None = None
    semaphore_name: str | None = None


class InitPair(BaseCommand):
    pair_name: str
    local_name: str
    remote_name: str
    expected_world_size: int
    mesh_shape_payload: bytes | None = None
    placements_payload: bytes | None = None


class RegisterTensors(BaseCommand):
    batch_id: str
    tensors: list[tuple[str, bytes]]
    bucket_size: int | None = None


class Transfer(BaseCommand):
    batch_id: str
    transfer_type: str


class Stranger:
    """The client of docs/protocol.md: queue, state store, session, completion semaphores."""

    def __init__(self, queue_path: str, state_path: str):
        self.q = self.s = None
        try:
            self._open(queue_path, state_path)
        except BaseException:
            self.close()  # LMDB allows one open environment per path and process: release it
            raise

    def close(self):
        for env in (self.q, self.s):
            if env is not None:
                env.close()
        self.q = self.s = None

    def _open(self, queue_path, state_path):
        self.q = lmdb.open(queue_path, subdir=False, lock=True, max_dbs=0, map_size=1 << 30)
        self.s = lmdb.open(state_path, subdir=False, lock=True, max_dbs=0, map_size=1 << 30, readonly=True)
        with self.q.begin() as t:
            self.capacity = int.from_bytes(t.get(b"capacity"), "little")
            self.items = posix_ipc.Semaphore(t.get(b"sem:items").decode())
            self.free = posix_ipc.Semaphore(t.get(b"sem:free").decode())
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(queue_path + ".sock")
        hello = msgspec.json.decode(self.sock.makefile("rb").readline())
        assert hello["version"] == 1 and hello["error"] is None, hello
        self.token, self.pid = hello["token"], hello["pid"]
        self.n = 0

    def heartbeat(self):
        with self.s.begin() as t:
            return msgspec.msgpack.decode(t.get(b"agent/state:heartbeat"))

    def run(self, cmd, timeout=30.0):
        """Enqueues `cmd` with a fresh semaphore, waits for the post, returns the stored result."""
        self.n += 1
        name = f"/tb-stranger-{os.getpid()}-{self.n}"
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
        try:
            cmd.semaphore_name = name
            cmd.timestamp = time.time()
            self.free.acquire(timeout)
            with self.q.begin(write=True) as t:
                tail = int.from_bytes(t.get(b"tail"), "little")
                t.put(f"slot:{tail % self.capacity}".encode(), msgspec.msgpack.encode(cmd))
                t.put(b"tail", (tail + 1).to_bytes(8, "little"))
            self.items.release()
            sem.acquire(timeout)
            with self.s.begin() as t:
                return msgspec.msgpack.decode(t.get(f"command:{name}/state:result".encode()))
        finally:
            sem.unlink()
            sem.close()


def tensor_payload(a: np.ndarray, token, **over):
    d = {"version": 1, "name": "w", "dtype": "float32", "shape": list(a.shape), "strides": [1],
         "device": "cpu", "memory": {"kind": "cma", "pid": os.getpid(), "addr": a.__array_interface__["data"][0]},
         "nbytes": a.nbytes, "pid": os.getpid(), "session": token}
    d.update(over)
    return msgspec.msgpack.encode(d)


def test_a_client_from_the_docs_drives_a_live_agent(job_factory):
    job = job_factory(2)
    deadline = time.time() + 20
    while True:  # the agent may still be starting: its files appear, then its heartbeat
        try:
            st = Stranger(*job.paths(0))
            hb = st.heartbeat()
            break
        except (lmdb.Error, TypeError, OSError, posix_ipc.ExistentialError):
            if "st" in locals():
                st.close()
                del st
            assert time.time() < deadline, "agent 0 did not come up"
            time.sleep(0.05)
    assert hb["alive"] and hb["pid"] > 0
    # Let the agent reach our memory (Yama): PR_SET_PTRACER for its pid alone.
    ctypes.CDLL(None, use_errno=True).prctl(0x59616D61, ctypes.c_ulong(hb["pid"]), 0, 0, 0)

    peer = tensorbus.TensorBusClient(1, *job.paths(1))
    dst = np.zeros(8, np.float32)
    done = {}

    def peer_side():
        peer.init_pair("p", "inference", "trainer", 1, device_mesh=tensorbus.DeviceMesh((1,), 0),
                       placements=(tensorbus.Replicate(),))
        done["h"] = peer.register_tensors("b", [(dst, "p")])

    th = threading.Thread(target=peer_side)
    th.start()
    mesh = msgspec.msgpack.encode({"version": 1, "shape": [1], "rank": 0})
    pl = msgspec.msgpack.encode({"version": 1, "placements": ["R"]})
    r = st.run(InitPair(pair_name="p", local_name="trainer", remote_name="inference", expected_world_size=1,
                        mesh_shape_payload=mesh, placements_payload=pl))
    assert r["ok"], r

    src = np.arange(8, dtype=np.float32) + 0.5
    # Hostile payloads first: each refused by name, nothing else breaks.
    bad = [
        (tensor_payload(src, st.token, memory={"kind": "shm", "name": "/x", "offset": 2**64 - 8}), "memory.offset"),
        (tensor_payload(src, st.token, shape=[2**62, 8], strides=[8, 1], nbytes=0), "shape"),
        (tensor_payload(src, st.token, memory={"kind": "cma", "pid": 1, "addr": 4096}), "memory.pid"),
        (tensor_payload(src, st.token, pid=1), "not the registering process"),
        (tensor_payload(src, None), "session"),
        (tensor_payload(src, "ab" * 16), "no open session"),
    ]
    for payload, why in bad:
        r = st.run(RegisterTensors(batch_id="bad", tensors=[("p", payload)]))
        assert not r["ok"] and r["error"]["kind"] == "ValueError" and why in r["error"]["message"], r

    r = st.run(RegisterTensors(batch_id="b", tensors=[("p", tensor_payload(src, st.token))]))
    assert r["ok"], r
    th.join(30)
    recv = done["h"].transfer("recv")
    r = st.run(Transfer(batch_id="b", transfer_type="send"))
    assert r["ok"], r
    recv.acquire(30.0)
    assert np.array_equal(dst, src)
    st.sock.close()
    st.close()
