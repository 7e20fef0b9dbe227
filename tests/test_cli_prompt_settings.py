"""Prompt settings travel with adapters: `gptoss-jax finetune --date --reasoning-effort` records them beside the
adapters (prompt_settings.json), and `chat`, `generate` and `serve` with `--adapters` render with them by
default and say so in one line; a flag that overrides them prints a warning; adapters without the record
keep each command's own defaults.

The adapters come from a real one-step `finetune` on a tiny checkpoint with the real vocabulary. `chat` runs
in-process with its model replaced by a scripted reply (its prompts are printed by --show-prompt); `generate`
and `serve` run for real.
"""

from __future__ import annotations

import json
import shutil
import sys

import httpx
import pytest
from apitools import KEY, serve_ckpt_fixture, start_server, stop_server  # noqa: F401 - the checkpoint fixture
from clitools import run_main

from gptoss_jax import cli
from gptoss_jax import harmony as hm
from gptoss_jax.tokenizer import encode

TRAINED = hm.PromptSettings(reasoning_effort="high", date="2025-08-05")
NOTE = "prompt settings of the adapters ("


@pytest.fixture(scope="module")
def adapters(serve_ckpt, tmp_path_factory):
    """`gptoss-jax finetune ... --date 2025-08-05 --reasoning-effort high`, one step."""
    tmp = tmp_path_factory.mktemp("ft")
    data = tmp / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")  # fmt: skip
    out = tmp / "adapters"
    rc = cli.main([str(a) for a in ("finetune", serve_ckpt, data, "--out", out, "--steps", 1, "--batch", 1,
                                    "--seq-len", 128, "--rank", 2, "--targets", "q", "--dtype", "float32",
                                    "--date", "2025-08-05", "--reasoning-effort", "high", "--quiet")])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture
def scripted(monkeypatch):
    """`chat` with its model replaced: every turn answers "Hello." (loading is skipped too)."""
    reply = encode("<|channel|>final<|message|>Hello.<|return|>", allowed_special="all")

    def fake_generate(model, prompt, *, callback, stop_tokens, max_new_tokens, **kw):
        for t in reply:
            callback([t])
        return [reply]

    monkeypatch.setattr(sys.modules["gptoss_jax.generate"], "generate", fake_generate)
    monkeypatch.setattr(cli, "_load", lambda args: None)


def chat_prompt(capsys, ckpt, *extra) -> tuple[list[int], str]:
    rc, out, err = run_main(capsys, "chat", ckpt, "-m", "Hi", "--show-prompt", *extra)
    assert rc == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("[prompt ")]
    return [int(t) for t in line.split("] ", 1)[1].split()], err


def test_finetune_records_its_prompt_settings(adapters):
    assert hm.read_prompt_settings(adapters) == TRAINED
    record = json.loads((adapters / hm.SETTINGS_FILE).read_text())
    assert (
        record["conversation_start_date"] == "2025-08-05"
        and record["rendering_version"] == hm.RENDERING_VERSION
    )


def test_chat_renders_as_the_adapters_were_trained_and_says_so(capsys, scripted, serve_ckpt, adapters):
    prompt, err = chat_prompt(capsys, serve_ckpt, "--adapters", adapters)
    assert prompt == hm.render_chat_prompt([("user", "Hi")], reasoning_effort="high",
                                           conversation_start_date="2025-08-05")  # fmt: skip
    (note,) = [x for x in err.splitlines() if NOTE in x]
    assert "reasoning effort high, conversation date 2025-08-05" in note and "warning" not in err
    # flags equal to the recorded settings override nothing
    _, err = chat_prompt(capsys, serve_ckpt, "--adapters", adapters, "--date", "2025-08-05")
    assert "warning" not in err


def test_chat_flags_override_the_adapters_with_a_warning(capsys, scripted, serve_ckpt, adapters):
    prompt, err = chat_prompt(capsys, serve_ckpt, "--adapters", adapters, "--date", "none",
                              "--reasoning-effort", "low")  # fmt: skip
    assert prompt == hm.render_chat_prompt([("user", "Hi")], reasoning_effort="low")
    warnings = [x for x in err.splitlines() if x.startswith("gptoss-jax: warning: ")]
    assert len(warnings) == 2
    assert "--date none overrides the adapters' setting (conversation date 2025-08-05)" in warnings[0]
    assert "--reasoning-effort low overrides the adapters' setting (high)" in warnings[1]


def test_adapters_without_the_record_keep_the_defaults(capsys, scripted, serve_ckpt, adapters, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(adapters, plain)
    (plain / hm.SETTINGS_FILE).unlink()
    prompt, err = chat_prompt(capsys, serve_ckpt, "--adapters", plain)
    assert prompt == hm.render_chat_prompt([("user", "Hi")])  # no date, medium: chat's defaults
    assert NOTE not in err and "warning" not in err


def test_a_bad_record_is_one_error_line(capsys, scripted, serve_ckpt, adapters, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapters, bad)
    (bad / hm.SETTINGS_FILE).write_text("{")
    rc, _, err = run_main(capsys, "chat", serve_ckpt, "-m", "Hi", "--adapters", bad)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "prompt_settings.json: not valid JSON" in lines[0], err


def test_generate_says_which_settings_the_adapters_were_trained_with(capsys, serve_ckpt, adapters):
    rc, _, err = run_main(capsys, "generate", serve_ckpt, "--adapters", adapters, "--tokens", "1 2 3",
                            "--max-new-tokens", 1, "--no-stream", "--dtype", "float32")  # fmt: skip
    assert rc == 0, err
    (note,) = [x for x in err.splitlines() if NOTE in x]
    assert (
        "reasoning effort high, conversation date 2025-08-05" in note
        and "generate sends the prompt as given" in note
    )


def _ask(url: str) -> tuple[dict, dict]:
    """A Responses request and a chat-completions request, neither setting a reasoning effort."""
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(
        f"{url}/v1/responses", json={"input": "Hi", "max_output_tokens": 1}, headers=auth, timeout=300
    )
    assert r.status_code == 200, r.text
    c = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 1}, headers=auth, timeout=300)  # fmt: skip
    assert c.status_code == 200, c.text
    return r.json(), c.json()


def test_serve_renders_as_the_adapters_were_trained_and_warns_of_overrides(serve_ckpt, adapters, tmp_path):
    as_trained = hm.render_chat_prompt(
        [("user", "Hi")], reasoning_effort="high", conversation_start_date="2025-08-05"
    )
    proc, url = start_server(serve_ckpt, tmp_path / "a.log", "--adapters", str(adapters))
    try:
        resp, chat = _ask(url)
    finally:
        assert stop_server(proc) == 0
    log = (tmp_path / "a.log").read_text()
    assert resp["reasoning"]["effort"] == "high" and resp["usage"]["input_tokens"] == len(as_trained)
    assert chat["usage"]["prompt_tokens"] == len(as_trained)
    assert (
        NOTE in log
        and "reasoning effort high, conversation date 2025-08-05" in log
        and "overrides" not in log
    )

    overridden = hm.render_chat_prompt([("user", "Hi")], reasoning_effort="low")
    proc, url = start_server(serve_ckpt, tmp_path / "b.log", "--adapters", str(adapters), "--date", "none",
                             "--reasoning-effort", "low")  # fmt: skip
    try:
        resp, chat = _ask(url)
    finally:
        assert stop_server(proc) == 0
    log = (tmp_path / "b.log").read_text()
    assert resp["reasoning"]["effort"] == "low" and resp["usage"]["input_tokens"] == len(overridden)
    assert chat["usage"]["prompt_tokens"] == len(overridden)
    warnings = [x for x in log.splitlines() if " WARNING " in x and "overrides the adapters' setting" in x]
    assert len(warnings) == 2, log[-3000:]
