"""Prompts from a file or stdin, and chat as a user types it (issue 10, item 10): /reset, /exit, line editing
with history (readline) on a terminal, and how to leave. Also the --min-p and --repetition-penalty flags,
passed through to `generate` (the sampling itself is tested with sampling.py).

The text tests use a checkpoint with the real o200k_harmony vocabulary (`Config.tiny()`, random weights).
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import time

import pytest
from clitools import assert_error_line, cli_env, command, run, token_ids
from hf_reference import our_model

import gptoss_jax
from gptoss_jax import cli
from gptoss_jax import harmony as hm
from gptoss_jax import tokenizer as tk
from gptoss_jax.checkpoint.synthetic import write_checkpoint
from gptoss_jax.config import Config

TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("text") / "tiny", Config.tiny(), shards=2)


@pytest.fixture(scope="module")
def completion(text_ckpt):
    model = gptoss_jax.load(text_ckpt, dtype="float32", quiet=True)
    return tk.decode(gptoss_jax.generate(model, tk.encode(TEXT), max_new_tokens=4)[0])


def test_prompt_from_stdin(text_ckpt, completion):
    res = run(
        "gptoss-jax",
        "generate",
        text_ckpt,
        "--prompt",
        "-",
        "--max-new-tokens",
        4,
        "--dtype",
        "float32",
        "--no-stream",
        "--quiet",
        input=TEXT + "\n",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == completion + "\n"


def test_prompt_from_file(capsys, text_ckpt, completion, tmp_path):
    (tmp_path / "prompt.txt").write_text(TEXT + "\n")
    rc = cli.main(
        [
            "generate",
            str(text_ckpt),
            "--prompt-file",
            str(tmp_path / "prompt.txt"),
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == completion + "\n"
    rc = cli.main(["generate", str(text_ckpt), "--prompt-file", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.strip()
        == f"gptoss-jax: error: --prompt-file {tmp_path / 'missing.txt'}: No such file or directory"
    )
    (tmp_path / "empty.txt").write_text("\n")
    rc = cli.main(["generate", str(text_ckpt), "--prompt-file", str(tmp_path / "empty.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "gptoss-jax: error: --prompt-file: the prompt is empty"


def _prompts(out: str) -> list[list[int]]:
    return [
        [int(t) for t in line.split("] ", 1)[1].split()]
        for line in out.splitlines()
        if line.startswith("[prompt ")
    ]


def _render(*user: str) -> list[int]:
    return hm.render_chat_prompt([("user", u) for u in user], conversation_start_date="2025-08-05")


CHAT = ("chat", "--show-prompt", "--max-new-tokens", 2, "--date", "2025-08-05", "--dtype", "float32")


def test_chat_reset_and_exit_from_stdin(text_ckpt):
    """Random weights give unparsable replies, which stay out of the history; the user turns stay, so a
    second message renders both, and /reset starts again from the first."""
    res = run("gptoss-jax", CHAT[0], text_ckpt, *CHAT[1:], input="Hi\nBye\n/reset\nHi\n/exit\nnever read\n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _prompts(res.stdout) == [_render("Hi"), _render("Hi", "Bye"), _render("Hi")]
    assert "(new conversation)" in res.stderr


def test_interactive_chat_has_line_editing_and_history(text_ckpt):
    """On a terminal: the hint on how to leave, a `user> ` prompt, the up arrow recalling the last message
    (readline), /exit leaving with exit code 0."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    proc = subprocess.Popen(
        [*command("gptoss-jax"), CHAT[0], str(text_ckpt), *map(str, CHAT[1:])],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env(TERM="xterm", NO_COLOR="1"),
    )
    os.close(slave)
    seen = b""

    def wait_for(needle: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 240
        while seen.count(needle) < count:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")[-2000:]
            seen += os.read(master, 4096)

    try:
        wait_for(b"user> ", 1)
        os.write(master, b"Where is Paris?\r")
        wait_for(b"user> ", 2)
        os.write(master, b"\x1b[A\r")  # up arrow: the previous message again
        wait_for(b"user> ", 3)
        os.write(master, b"/exit\r")
        assert proc.wait(timeout=60) == 0
        with_rest = seen
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            with_rest += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = with_rest.decode(errors="replace")
    assert cli.CHAT_HELP in text
    prompts = _prompts(text.replace("\r", ""))
    assert prompts == [_render("Where is Paris?"), _render("Where is Paris?", "Where is Paris?")]


def test_min_p_and_repetition_penalty_reach_generate(capsys, hf_ckpt):
    """CONTRACT with generate.py/sampling.py: generate(..., min_p=, repetition_penalty=). The CLI passes them
    only when given, so the other tests do not depend on them."""
    prompt = [5, 17, 230, 999, 0, 42, 7]
    ref = gptoss_jax.generate(
        our_model(hf_ckpt),
        prompt,
        max_new_tokens=6,
        temperature=1.0,
        seed=3,
        min_p=0.2,
        repetition_penalty=1.3,
    )[0]
    rc = cli.main(
        [
            "generate",
            str(hf_ckpt),
            "--tokens",
            " ".join(map(str, prompt)),
            "--max-new-tokens",
            "6",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--min-p",
            "0.2",
            "--repetition-penalty",
            "1.3",
            "--dtype",
            "float32",
            "--no-stream",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert token_ids(out) == ref


def test_prompt_and_tokens_are_exclusive(hf_ckpt):
    assert_error_line(
        run("gptoss-jax", "generate", hf_ckpt, "--prompt", "-", "--prompt-file", "x"),
        "--prompt-file",
        "not allowed with argument --prompt",
    )
