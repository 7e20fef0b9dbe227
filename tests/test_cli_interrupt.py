"""Ctrl-C at any point (issue 10, item 4): one line on stderr, exit code 130, never a segfault or a thread's
traceback. Each test starts the real command, waits for a point it can see (a status line, streamed tokens,
a group committed by the converter), sends SIGINT, and checks how the process ended.

Before the fix, SIGINT during XLA compilation ended in a segfault (exit -11) in 3 of 4 tries: the
KeyboardInterrupt unwound and JAX's atexit hook then cleared its caches under the half-finished compile; and
an interrupted `gptoss-convert` printed "cannot schedule new futures after interpreter shutdown" from an
Orbax writer thread.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
from clitools import cli_env, command
from conftest import make_tiny_cfg

from gptoss_jax.checkpoint.synthetic import write_checkpoint
from gptoss_jax.config import Config
from gptoss_jax.progress import exit_on_interrupt


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own Ctrl-C handler during each test, also where the tests run with SIGINT ignored (a background
    job of a non-interactive shell, nohup): a caught signal is reset to the default at exec, so the commands
    started here get Python's Ctrl-C handling, and the guard tested in-process does not stand aside."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def interrupt(cmd, ready, delay: float, cwd=None, timeout: float = 240) -> tuple[int, str, str, float]:
    """Runs `cmd` and sends SIGINT `delay` s after `ready(stdout, stderr)` first holds.

    Returns (exit code, stdout, stderr, seconds from the signal to the exit)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=cli_env()
    )
    got = {"out": [], "err": []}
    readers = [
        threading.Thread(target=lambda s, k: got[k].extend(iter(lambda: s.read(1), "")), args=a, daemon=True)
        for a in ((proc.stdout, "out"), (proc.stderr, "err"))
    ]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready("".join(got["out"]), "".join(got["err"])):
            assert proc.poll() is None, f"ended before it could be interrupted: {''.join(got['err'])[-2000:]}"
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    for t in readers:
        t.join(timeout=10)
    return proc.returncode, "".join(got["out"]), "".join(got["err"]), waited


def assert_interrupted(code: int, err: str, last_line: str) -> None:
    assert code == 130, f"exit {code}: {err[-3000:]}"  # a signal death (-11: segfault) would show as negative
    for bad in ("Traceback", "Fatal Python error", "Segmentation", "cannot schedule"):
        assert bad not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(last_line), err[-3000:]
    assert sum("interrupted" in ln for ln in lines) == 1, err[-3000:]


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    """24 layers (the depth of gpt-oss-20b): compiling its prefill takes seconds, a window to interrupt."""
    return write_checkpoint(
        tmp_path_factory.mktemp("deep") / "deep", make_tiny_cfg(num_hidden_layers=24), shards=2
    )


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_ctrl_c_during_compilation(deep_ckpt, delay):
    cmd = [
        *command("gptoss-jax"),
        "generate",
        str(deep_ckpt),
        "--tokens",
        "1 2 3",
        "--max-new-tokens",
        "4",
        "--compile-cache",
        "off",
    ]
    code, _, err, waited = interrupt(
        cmd, lambda out, err: "compiling (first run for these shapes)..." in err, delay
    )
    assert_interrupted(code, err, "gptoss-jax: interrupted")
    assert waited < 8, f"took {waited:.1f} s to stop"  # not after the whole compile


def test_ctrl_c_during_decode(hf_ckpt):
    cmd = [*command("gptoss-jax"), "generate", str(hf_ckpt), "--tokens", "1 2 3", "--max-new-tokens", "20000"]
    code, out, err, _ = interrupt(cmd, lambda out, err: len(out.split()) > 10, 0.1)
    assert_interrupted(code, err, "gptoss-jax: interrupted")
    assert len(out.split()) > 10  # the tokens streamed before the interrupt stay printed


def test_ctrl_c_during_conversion(tmp_path):
    """Interrupted while Orbax writes a group (50 MB real-vocabulary embeddings in 26 MiB groups): the
    line saying how to resume, exit 130, and no traceback from Orbax's threads."""
    src = write_checkpoint(tmp_path / "src", Config.tiny(), shards=2)
    for i, delay in enumerate((0.03, 0.06, 0.1)):
        dst = tmp_path / f"out{i}"
        journal = tmp_path / f"out{i}.converting" / "progress.jsonl"
        cmd = [*command("gptoss-convert"), str(src), str(dst), "--group-mib", "26", "--quiet"]
        code, _, err, _ = interrupt(
            cmd, lambda out, err, j=journal: j.is_file() and j.read_text().strip(), delay
        )
        assert_interrupted(code, err, "gptoss-convert: error: interrupted")
        assert "rerun the same command to resume" in err and not dst.exists()


def test_exit_on_interrupt_restores_signal_state():
    """The guard is scoped: in-process callers (tests, notebooks) get their wakeup fd back."""
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    with exit_on_interrupt("x"):
        inside = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(inside)
        assert inside != before
    after = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(after)
    assert after == before
