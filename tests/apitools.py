"""Starting `gptoss-jax serve` in a subprocess for the tests (tests/server, tests/training), and its test hook."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from clitools import cli_env, free_port

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}  # the header of an authorized request
MODEL = "gpt-oss-tiny"
SERVE = [sys.executable, "-m", "gptoss_jax", "serve"]  # the real entry point


def start_server(ckpt: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The server on a free port of 127.0.0.1 with the test hook, once /health answers -> (process, url)."""
    port = free_port()
    env = cli_env(GPTOSS_JAX_SERVE_TEST_HOOKS=1)
    env.pop("XLA_FLAGS", None)  # one CPU device, not the test session's eight
    cmd = [
        *SERVE,
        str(ckpt),
        "--port",
        str(port),
        "--api-key",
        KEY,
        "--served-model-name",
        MODEL,
        "--dtype",
        "float32",
        "--no-warmup",
        *extra,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code (killed after a minute)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def script(url: str, *outputs) -> None:
    """Queues outputs (harmony text or token ids) the next generations are forced to emit."""
    r = httpx.post(
        f"{url}/v1/test/scripts", json={"scripts": list(outputs)}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=120).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


_CKPT: dict = {}


@pytest.fixture(scope="session", name="serve_ckpt")
def serve_ckpt_fixture(tmp_path_factory):
    """A random tiny checkpoint with the real o200k_harmony vocabulary (the server renders harmony), written
    once per session. A fixture here, imported by the test modules, not in a conftest.py: tests elsewhere
    import the top-level `conftest` by name."""
    if "path" not in _CKPT:
        from gptoss_jax.checkpoint.synthetic import write_checkpoint
        from gptoss_jax.config import Config

        folder = tmp_path_factory.mktemp("serve") / MODEL
        _CKPT["path"] = write_checkpoint(folder, Config.tiny(), layout="hf", shards=1, seed=3)
    return _CKPT["path"]
