"""`gptoss-jax serve` rejects bad options with exit code 2 and one line naming the option, before loading."""

from __future__ import annotations

import subprocess

import pytest
from apitools import (
    SERVE,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
)


@pytest.mark.parametrize("args, needle", [
    (["/no/such/checkpoint"], "/no/such/checkpoint: No such file or directory"),
    (["{ckpt}", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["{ckpt}", "--max-seqs", "0"], "--max-seqs must be at least 1, got 0"),
    (["{ckpt}", "--max-queue", "-1"], "--max-queue must be at least 0, got -1"),
    (["{ckpt}", "--kv-memory", "0"], "--kv-memory must be a positive number of GiB, got 0.0"),
    (["{ckpt}", "--memory-fraction", "1.5"], "--memory-fraction must be in (0, 1], got 1.5"),
    (["{ckpt}", "--api-key", " "], "--api-key: empty key"),
    (["{ckpt}", "--request-timeout", "0"], "--request-timeout must be a positive number of seconds, got 0.0"),
    (["{ckpt}", "--request-timeout", "nan"], "--request-timeout must be a positive number of seconds, got nan"),
    (["{ckpt}", "--allowed-origins", " , "], "--allowed-origins: no origin given"),
    (["{ckpt}", "--date", "yesterday"], "--date must be today, none or YYYY-MM-DD, got 'yesterday'"),
    (["{ckpt}", "--adapters", "{ckpt}"], "no adapter_config.json (not a PEFT adapter folder)"),
    (["{ckpt}", "--adapters", "a={ckpt}"], "--adapters a: {ckpt}: no adapter_config.json"),
    (["{ckpt}", "--adapters", "a=/x", "--adapters", "a=/y"], "--adapters: the name 'a' is given twice"),
    (["{ckpt}", "--adapters", "{ckpt}", "--adapters", "a=/y"], "--adapters: give either one DIR"),
    (["{ckpt}", "--max-adapters", "-1"], "--max-adapters must be at least 0, got -1"),
    (["{ckpt}", "--lora-targets", "qq"], "--lora-targets: unknown LoRA target 'qq'"),
])  # fmt: skip
def test_bad_options_exit_2_with_one_line(args, needle, serve_ckpt):
    args = [a.format(ckpt=serve_ckpt) for a in args]
    r = subprocess.run([*SERVE, *args], check=False, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle.format(ckpt=serve_ckpt) in lines[0]
