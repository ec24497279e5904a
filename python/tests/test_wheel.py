"""The wheel alone is enough: a fresh venv with only the built wheel installed runs `tensorbus
demo`, `tensorbus up`, the README's torch quick start under real `torchrun` (trainer and inference
in two process groups), `tensorbus status` without the secret being set, and an orderly stop.

torch is too large to install twice, so the fresh venv sees the test venv's torch through a
`.pth` file placed after its own site-packages: tensorbus, its `tensorbus` command and everything
it starts come from the fresh venv.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
torch = pytest.importorskip("torch")


def _wheel() -> pathlib.Path:
    w = os.environ.get("TENSORBUS_WHEEL")
    if w:
        return pathlib.Path(w)
    found = sorted((ROOT / "target" / "wheels").glob("tensorbus-*.whl"))
    if not found:
        pytest.skip("no built wheel in target/wheels (./scripts/test.sh builds it)")
    return found[-1]


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    d = tmp_path_factory.mktemp("fresh-venv")
    venv.create(d, with_pip=True)
    py = d / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(_wheel())], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch (and numpy, its dependency here) from the test venv, after the fresh venv's own packages.
    (pathlib.Path(site) / "zz_test_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return d


def _env(fresh, job):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORBUS_")}
    env["PATH"] = f"{fresh / 'bin'}:{env.get('PATH', '')}"
    env["TENSORBUS_JOB"] = str(job)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_fresh_venv_has_the_command_and_runs_the_demo(fresh, tmp_path):
    exe = fresh / "bin" / "tensorbus"
    assert exe.exists(), "the wheel installs a `tensorbus` command"
    env = _env(fresh, tmp_path)
    out = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, check=True).stdout
    for sub in ("up", "agent", "command-node", "status", "ctl", "demo", "bench", "doctor", "plan"):
        assert f"  {sub}" in out, f"{sub} missing from --help:\n{out}"
    demo = subprocess.run([str(exe), "demo", "--scale", "64", "--repeat", "1", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert '"verified":true' in demo.stdout.replace(" ", ""), demo.stdout


def test_readme_quick_start_from_the_fresh_venv(fresh, tmp_path):
    job = tmp_path / "job"  # does not exist yet: `up` creates it
    env = _env(fresh, job)
    tb = str(fresh / "bin" / "tensorbus")
    up = subprocess.Popen([tb, "up", "--agents", "3", "--listen", f"127.0.0.1:{_free_port()}"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    try:
        deadline = time.time() + 60
        while not any("Ctrl-C to stop" in l for l in banner):
            line = up.stdout.readline()
            assert line and time.time() < deadline, f"up did not come up: {banner}"
            banner.append(line)
        assert (job / "tensorbus-job.json").exists()

        torchrun = [str(fresh / "bin" / "python"), "-m", "torch.distributed.run", "--standalone"]
        ex = ROOT / "examples" / "quickstart"
        trainer = subprocess.Popen([*torchrun, "--nproc-per-node", "2", str(ex / "trainer.py")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        inference = subprocess.Popen([*torchrun, "--nproc-per-node", "1", str(ex / "inference.py")],
                                     env={**env, "AGENT_RANK_OFFSET": "2"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t_out, _ = trainer.communicate(timeout=180)
        i_out, _ = inference.communicate(timeout=180)
        assert trainer.returncode == 0, t_out
        assert inference.returncode == 0, i_out
        assert i_out.count("every element exact") == 3 and "inference: done" in i_out, i_out
        assert t_out.count("pushed step") == 6, t_out

        # status from the job's directory alone: no secret in the environment.
        st = subprocess.run([tb, "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        d = json.loads(st.stdout)
        assert len(d["nodes"]) == 3, d
        assert sum(1 for e in d["epochs_ended"] if e["batch_id"] == "step") == 3, d["epochs_ended"]
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=30)
    assert up.returncode == 0, "".join(banner) + rest
    assert "stopping" in rest
    assert not (job / "tensorbus-job.json").exists(), "the job file is removed on stop"
    left = [p.name for p in job.iterdir()]
    assert left == [], f"files left behind: {left}"
