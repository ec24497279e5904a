"""A real one-host job for the Python tests: a command node and agents from the `tensorbus` binary
(TENSORBUS_BIN, else target/release/tensorbus), started per test and stopped after."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("TENSORBUS_BIN", str(ROOT / "target" / "release" / "tensorbus"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))


class Job:
    def __init__(self, tmp: pathlib.Path, agents: int, log: bool = False):
        self.dir = tmp
        self.log = log
        self.node = subprocess.Popen(
            [BIN, "command-node", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        words = self.node.stdout.readline().split()
        assert "inbox" in words, f"command node did not start: {words}"
        self.inbox = words[words.index("inbox") + 1]
        self.outbox = words[words.index("outbox") + 1]
        self.agents = {}
        for r in range(agents):
            self.start_agent(r)

    def paths(self, rank: int):
        return str(self.dir / f"agent_rank{rank}_command.lmdb"), str(self.dir / f"agent_rank{rank}_state.lmdb")

    def start_agent(self, rank: int):
        q, s = self.paths(rank)
        self.agents[rank] = subprocess.Popen(
            [BIN, "agent", "--rank", str(rank), "--command-inbox", self.inbox, "--command-outbox", self.outbox,
             "--command-queue", q, "--state", s],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path(rank), "ab") if self.log else subprocess.DEVNULL,
            env={**os.environ, "TENSORBUS_LOG": "info" if self.log else "warn"},
        )

    def log_path(self, rank: int) -> pathlib.Path:
        """Agent `rank`'s log (jobs made with log=True)."""
        return self.dir / f"agent{rank}.log"

    def env(self, rank: int):
        """Environment for a worker of agent `rank`, for bootstrap_client()."""
        q, s = self.paths(rank)
        return {"AGENT_RANK": str(rank), "TENSORBUS_COMMAND_QUEUE_PATH": q, "TENSORBUS_STATE_PATH": s}

    def stop(self):
        procs = list(self.agents.values()) + [self.node]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def job_factory(tmp_path):
    jobs = []

    def make(agents: int, log: bool = False) -> Job:
        j = Job(tmp_path, agents, log)
        jobs.append(j)
        return j

    yield make
    for j in jobs:
        j.stop()
