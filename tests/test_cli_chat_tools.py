"""`gptoss-jax chat --tools python`: the model's python calls run in the real sandbox between generations, each
call and its result shown, and the kernel kept for the session. The model's replies are scripted (generation
replaced by fixed harmony text fed token by token, as in tests/test_cli.py); the tool is real."""

from __future__ import annotations

import sys

import pytest
from apitools import serve_ckpt_fixture  # noqa: F401 - the session's checkpoint fixture
from clitools import run_main

from gptoss_jax import cli
from gptoss_jax import tokenizer as tk
from gptoss_jax.tools import PythonTool, SandboxUnavailable


def call(code: str) -> str:
    return (f"<|channel|>analysis<|message|>Compute.<|end|><|start|>assistant<|channel|>analysis to=python code"
            f"<|message|>{code}<|call|>")  # fmt: skip


@pytest.fixture
def replies(monkeypatch):
    """Each generation emits the next queued reply; records the prompts."""
    queue: list[str] = []
    prompts: list[list[int]] = []

    def fake_generate(model, prompt, *, callback, stop_tokens, max_new_tokens, **kw):
        prompts.append(list(prompt))
        out = tk.encode(queue.pop(0), allowed_special="all")[:max_new_tokens]
        for t in out:
            callback([t])
        return [out]

    monkeypatch.setattr(sys.modules["gptoss_jax.generate"], "generate", fake_generate)
    monkeypatch.setattr(cli, "_load", lambda args: None)
    return queue, prompts


def test_chat_runs_python_and_shows_each_call_and_result(capsys, replies, serve_ckpt):
    try:
        PythonTool(timeout_s=20).shutdown()
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    queue, prompts = replies
    queue += [call("x = 6 * 7"), call("print(x)"), "<|channel|>final<|message|>42.<|return|>",
              call("print(x + 1)"), "<|channel|>final<|message|>43.<|return|>"]  # fmt: skip
    rc, out, err = run_main(capsys, "chat", serve_ckpt, "--tools", "python", "-m", "6*7?", "-m", "Plus one?")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines == [
        "[analysis] Compute.",
        "[call python] x = 6 * 7",
        "[result python] [no output: print() what you want to see]",
        "[analysis] Compute.",
        "[call python] print(x)",
        "[result python] 42",
        "[final] 42.",
        "[analysis] Compute.",
        "[call python] print(x + 1)",  # the second message: the same kernel
        "[result python] 43",
        "[final] 43.",
    ]
    assert not queue and len(prompts) == 5
    first, second = tk.decode(prompts[0]), tk.decode(prompts[1])
    assert "# Tools\n\n## python" in first  # declared in the system message, as harmony defines it
    # the next prompt: the call as the model wrote it, the tool's answer on its channel, the assistant's turn
    assert second.startswith(first) and second.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Compute.<|end|>"
        "<|start|>assistant to=python<|channel|>analysis code<|message|>x = 6 * 7<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>[no output: print() what you want to see]<|end|>"
        "<|start|>assistant"
    )


def test_chat_tools_are_checked(capsys, serve_ckpt):
    rc, _, err = run_main(capsys, "chat", serve_ckpt, "--tools", "shell", "-m", "hi")
    assert rc == 2 and "--tools: unknown tool 'shell' (available: python, browser)" in err
    rc, _, err = run_main(capsys, "chat", serve_ckpt, "--tools", "browser", "-m", "hi")
    assert (
        rc == 2 and "--tools browser: give one backend, --browser-index DIR, --browser-search-url URL" in err
    )


def test_chat_browses_a_local_index(capsys, replies, serve_ckpt, tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\n\nThe launch code is 1234.\n")
    queue, prompts = replies
    queue += [
        '<|channel|>analysis to=browser.search <|constrain|>json<|message|>{"query": "launch code"}<|call|>',
        "<|channel|>final<|message|>It is 1234 【0†L0】.<|return|>",
    ]
    rc, out, err = run_main(capsys, "chat", serve_ckpt, "--tools", "browser", "--browser-index", tmp_path, "-m",
                            "The launch code?")  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == '[call browser.search] {"query": "launch code"}'
    assert lines[1].startswith("[result browser.search] ") and "# Notes The launch code is 1234." in out
    assert lines[-1] == "[final] It is 1234 【0†L0】."
    assert "## browser" in tk.decode(prompts[0]) and "# Search Results" in tk.decode(prompts[1])
