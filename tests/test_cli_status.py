"""The waits explain themselves (issue 10, items 7 and 8): a "compiling" status line until the first token,
redrawn with the elapsed time on a terminal and plain elsewhere; progress bars on a terminal, plain periodic
lines in pipes and logs, never tqdm's `\\r` redraws there.

The CLI runs on a 12-layer checkpoint (tiny widths): its first compile takes several seconds, longer than
the status line's 1 s delay.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import termios

import pytest
from clitools import cli_env, command
from conftest import make_tiny_cfg

from gptoss_jax.checkpoint.synthetic import write_checkpoint
from gptoss_jax.progress import PlainProgress, StatusLine, progress_bar

COMPILING = "compiling (first run for these shapes)"


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("deep") / "deep", make_tiny_cfg(num_hidden_layers=12), shards=2
    )


def _generate(ckpt) -> list[str]:
    return [
        *command("gptoss-jax"),
        "generate",
        str(ckpt),
        "--tokens",
        "1 2 3",
        "--max-new-tokens",
        "3",
        "--compile-cache",
        "off",
    ]


def test_status_and_timing_lines_in_a_pipe(deep_ckpt):
    res = subprocess.run(
        _generate(deep_ckpt), capture_output=True, text=True, env=cli_env(), timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr and "\033" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith(f"loaded {deep_ckpt}: 12 layers")
    assert lines[1] == f"{COMPILING}..."
    assert re.fullmatch(rf"{re.escape(COMPILING)}: done in \d+\.\d s", lines[2]), lines
    # item 10: the one-line timing summary
    assert re.fullmatch(
        r"3 prompt tokens, 3 new tokens in \d+\.\d\d s: first after \d+\.\d\d s, then [\d.]+ tokens/s",
        lines[3],
    ), lines
    assert len(lines) == 4


def test_status_line_and_progress_bar_on_a_terminal(deep_ckpt):
    """stderr on a pseudo-terminal: tqdm draws the loading bar, the status line is redrawn in place with the
    elapsed seconds and erased at the first token."""
    master, slave = pty.openpty()
    fcntl.ioctl(
        slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0)
    )  # tqdm draws nothing at width 0
    proc = subprocess.Popen(_generate(deep_ckpt), stdout=subprocess.PIPE, stderr=slave, env=cli_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.communicate(timeout=300)[0]
    os.close(master)
    tty = b"".join(chunks).decode()
    assert proc.returncode == 0, tty[-2000:]
    assert len(out.split()) == 3
    assert re.search(r"loading deep: .*%\|", tty), tty[:2000]  # tqdm's bar
    ticks = [int(s) for s in re.findall(rf"\r\033\[K{re.escape(COMPILING)}\.\.\. (\d+) s", tty)]
    assert len(ticks) >= 2 and ticks == sorted(ticks), tty[-2000:]  # redrawn, counting up
    after = tty[tty.rindex(f"{COMPILING}...") :]
    assert (
        "\r\033[K" in after and "3 prompt tokens, 3 new tokens" in after.split("\r\033[K", 1)[1]
    )  # erased first
    assert f"{COMPILING}: done" not in tty  # the plain-text ending is for logs only


def test_plain_progress_lines():
    buf = io.StringIO()
    with PlainProgress(2 * 2**30, "converting", interval=0, transient=False, file=buf) as bar:
        bar.update(2**30 // 2)
        bar.update(2**30)
        bar.update(2**30 // 2)
    lines = buf.getvalue().splitlines()
    assert lines[:4] == [
        "converting: 0% 0.0/2.0 GiB",
        "converting: 25% 0.5/2.0 GiB",
        "converting: 75% 1.5/2.0 GiB",
        "converting: 100% 2.0/2.0 GiB",
    ]
    assert re.fullmatch(r"converting: 100% 2\.0/2\.0 GiB in \d+\.\d s \([\d.]+ MiB/s\)", lines[4]), lines
    buf = io.StringIO()
    with PlainProgress(10 * 2**20, "loading tiny", interval=3600, file=buf) as bar:
        bar.update(10 * 2**20)
    assert buf.getvalue() == ""  # a short transient load says nothing (the caller prints "loaded ...")


def test_progress_bar_kind_follows_stderr(capsys):
    assert isinstance(progress_bar(10, "x", quiet=False), PlainProgress)  # captured stderr: not a terminal
    bar = progress_bar(10, "x", quiet=True)
    assert not isinstance(bar, PlainProgress) and bar.disable


def test_status_line_quiet_and_plain():
    buf = io.StringIO()
    with StatusLine("waiting", quiet=True, delay=0, file=buf):
        pass
    assert buf.getvalue() == ""
    with StatusLine("waiting", delay=0, file=buf) as st:
        while not st.shown:
            pass
    assert buf.getvalue().splitlines()[0] == "waiting..." and "done in" in buf.getvalue()
