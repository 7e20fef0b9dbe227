"""Running the installed `gptoss-jax` and `gptoss-convert` commands in subprocesses, as a user does.

The console scripts next to the test interpreter are used when they exist (an installed checkout), else
`python -m` of the same entry points. PYTHONPATH points at this checkout so its code is what runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_MODULES = {"gptoss-jax": "gptoss_jax", "gptoss-convert": "conversion.cli"}


def command(name: str) -> list[str]:
    """argv prefix of a console script: its installed launcher, else `python -m`."""
    exe = shutil.which(name, path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", _MODULES[name]]


def cli_env(**extra) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    bin_dir = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )  # the console scripts
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, PATH=bin_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(name: str, *argv, cwd=None, env=None, input=None, timeout=300) -> subprocess.CompletedProcess:
    """Runs `name ARGV` to completion; text stdout and stderr captured."""
    return subprocess.run(
        [*command(name), *map(str, argv)],
        cwd=cwd,
        env=env or cli_env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_error_line(res: subprocess.CompletedProcess, *needles, code: int = 2) -> str:
    """Exit `code` and exactly one line on stderr naming each of `needles`; returns that line."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """`gptoss-jax ARGV` in this process (`cli.main`): (exit code, stdout, stderr)."""
    from gptoss_jax import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def token_ids(stdout: str) -> list[int]:
    return [int(t) for t in stdout.split()]


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a server or a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def workers(argvs: list[list[str]], logs: list[Path], *, env: dict, cwd, timeout: float):
    """Starts one process per argv, each writing to its log, for the block (which can compute a reference
    meanwhile); on leaving it, waits for all of them (`timeout` s in all, then kills) and asserts that each
    exited 0, showing the failed one's log."""
    with contextlib.ExitStack() as stack:
        procs = [subprocess.Popen(argv, env=env, stdout=stack.enter_context(open(log, "w")),
                                  stderr=subprocess.STDOUT, cwd=cwd)
                 for argv, log in zip(argvs, logs, strict=True)]  # fmt: skip
        try:
            yield procs
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i].read_text()[-4000:]}"
