"""Every argument is checked before any weight is read (issue 10, item 6), and the implementation choices
say what they do (item 5).

Without --quiet a successful load prints a "loaded ..." line, so exactly one stderr line (the error) shows
that the command stopped before loading. The vocabulary and context limits come from the checkpoint's
config (released folder or converted Orbax metadata) alone. `bench` printing what "auto" resolved to is
checked in test_cli.py's bench test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import assert_error_line, run, run_main

from conversion.convert import Options, convert
from gptoss_jax.kernels import VALIDATED_PLATFORMS

REPO = Path(__file__).resolve().parents[1]

BAD = [
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be >= 0 (0 = greedy), got nan"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
    (["--top-k", "1001"], "--top-k must be at most the vocabulary size 1000, got 1001"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1.0 = off), got 0.0"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--seed", str(2**63)], f"--seed must be in [0, 2**63), got {2**63}"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-context", "0"], "--max-context must be at least 1, got 0"),
    (
        ["--max-context", "8", "--max-new-tokens", "10"],
        "--tokens: prompt 3 + --max-new-tokens 10 = 13 tokens exceed the cache length 8 (--max-context)",
    ),
    (["--max-new-tokens", str(2**20)], "exceed the model's context length 131072"),
    (["--mesh", "expert=banana"], "expert=banana"),
]


def assert_rejected(rc: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err  # no "loaded ..." line: nothing was read but the config
    assert lines[0].startswith("gptoss-jax: error: ") and needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("extra, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_generate_rejects_before_loading(capsys, hf_ckpt, extra, needle):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1 2 3", *extra)
    assert_rejected(rc, err, needle)


def test_chat_and_bench_reject_before_loading(capsys, hf_ckpt):
    rc, _, err = run_main(capsys, "chat", hf_ckpt, "-m", "hi", "--seed", 2**64)
    assert_rejected(rc, err, f"--seed must be in [0, 2**63), got {2**64}")
    rc, _, err = run_main(capsys, "chat", hf_ckpt, "-m", "hi")
    assert_rejected(rc, err, "chat needs the o200k_harmony vocabulary (201088 tokens), this model has 1000")
    rc, _, err = run_main(capsys, "bench", hf_ckpt, "--prompt-len", 200000)
    assert_rejected(rc, err, "--prompt-len 200000 + --new 64 + 1 exceed the model's context length 131072")


def test_demo_seed_range(capsys):
    rc, _, err = run_main(capsys, "demo", "--seed", 2**63)
    assert_rejected(rc, err, f"--seed must be in [0, 2**63), got {2**63}")


def test_token_ids_checked_against_the_config(capsys, hf_ckpt, tmp_path):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "5 1000 3")
    assert_rejected(rc, err, f"--tokens: token id 1000 is outside the vocabulary [0, 1000) of {hf_ckpt}")
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--prompt", "Hello world")
    assert_rejected(rc, err, "outside the vocabulary [0, 1000)")
    orbax = tmp_path / "orbax"
    convert(
        hf_ckpt, orbax, Options(), quiet=True
    )  # a converted checkpoint: its metadata gives the vocabulary
    rc, _, err = run_main(capsys, "generate", orbax, "--tokens", "5 -1")
    assert_rejected(rc, err, "token id -1 is outside the vocabulary [0, 1000)")
    for bad in ("²", "--5", "1_0", "٣", "5-"):  # str.isdigit or int() alone accept some of these
        rc, _, err = run_main(capsys, "generate", hf_ckpt, f"--tokens=1 {bad}")
        assert_rejected(rc, err, f"--tokens: {bad!r} is not an integer token id")


def test_subprocess_exit_code_and_one_line(hf_ckpt):
    assert_error_line(
        run("gptoss-jax", "generate", hf_ckpt, "--tokens", "1", "--top-p", "1.5"),
        "--top-p must be in (0, 1], got 1.5",
    )


# ----------------------------------------------------------------------------------- item 5: impl help
def _platforms() -> str:
    return ", ".join(sorted(VALIDATED_PLATFORMS)) or "none yet"


def test_impl_help_tells_what_auto_means():
    res = run("gptoss-jax", "generate", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for what in ("attention", "expert computation"):
        assert (
            f"{what}: auto (default) = the Pallas kernel only on platforms where it has been validated "
            f"({_platforms()}), XLA everywhere else"
        ) in text
    assert "Pallas on GPU/TPU" not in text
    row = next(
        ln
        for ln in (REPO / "docs" / "cli.md").read_text().splitlines()
        if ln.startswith("| `--attention-impl")
    )
    assert "validated" in row and _platforms() in row, row
