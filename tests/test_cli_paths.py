"""Checkpoint paths as a user types them (issue 10, items 1 and 3): relative, `~`, a trailing slash, and
a converted checkpoint whose experts are stored dequantized, found by the CLI's default --expert-format auto.

One workspace per module: the vocab-1000 test checkpoint copied to `work/tiny`, converted by the real
`gptoss-convert` with relative paths (run in `work/`) to `tiny-orbax` (packed) and `tiny-deq` (dequantized).
"""

from __future__ import annotations

import shutil

import pytest
from clitools import assert_error_line, run, token_ids
from hf_reference import our_model

import gptoss_jax
from gptoss_jax import hub

PROMPT = [5, 17, 230, 999, 0, 42, 7]
TOKENS = " ".join(map(str, PROMPT))


@pytest.fixture(scope="module")
def work(tmp_path_factory, hf_ckpt):
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(hf_ckpt, work / "tiny")
    runs = {
        dst: run("gptoss-convert", "tiny", dst, *extra, cwd=work)
        for dst, extra in (
            ("tiny-orbax", ()),
            ("tiny-deq", ("--experts", "dequantized", "--dtype", "float32")),
        )
    }
    return work, runs


@pytest.fixture(scope="module")
def reference(hf_ckpt):
    return gptoss_jax.generate(our_model(hf_ckpt), PROMPT, max_new_tokens=5)[0]


def test_convert_and_generate_with_relative_paths(work, reference):
    """`gptoss-convert tiny tiny-orbax` then `gptoss-jax generate tiny-orbax/` in the same folder: Orbax needs
    absolute paths, which the resolver gives it."""
    work, runs = work
    res = runs["tiny-orbax"]
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr  # the converter's progress in a log: plain lines, no tqdm redraws
    res = run(
        "gptoss-jax",
        "generate",
        "tiny-orbax/",
        "--tokens",
        TOKENS,
        "--max-new-tokens",
        5,
        "--dtype",
        "float32",
        "--no-stream",
        "--quiet",
        cwd=work,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert token_ids(res.stdout) == reference


def test_load_relative_home_and_trailing_slash(work, reference, monkeypatch):
    work, _ = work
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    for path in ("tiny-orbax", "tiny-orbax/", "./tiny-orbax", "~/tiny-orbax", "~/tiny"):
        model = gptoss_jax.load(path, dtype="float32", quiet=True)
        assert gptoss_jax.generate(model, PROMPT, max_new_tokens=5)[0] == reference, path
    assert hub.resolve_checkpoint("~/tiny-orbax/") == work / "tiny-orbax"
    with pytest.raises(ValueError, match="no such file or folder"):
        gptoss_jax.load("~/missing", quiet=True)


def test_dequantized_checkpoint_found_by_auto_expert_format(work, reference):
    """Issue item 3: the default --expert-format auto loads what the checkpoint's metadata records."""
    work, runs = work
    assert runs["tiny-deq"].returncode == 0, runs["tiny-deq"].stderr[-2000:]
    res = run(
        "gptoss-jax",
        "generate",
        "tiny-deq",
        "--tokens",
        TOKENS,
        "--max-new-tokens",
        5,
        "--dtype",
        "float32",
        "--no-stream",
        cwd=work,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        "(dequantized)" in res.stderr.splitlines()[0]
    )  # "loaded tiny-deq: 4 layers, 5 experts (dequantized)"
    assert token_ids(res.stdout) == reference


def test_load_expert_format_none_keeps_the_stored_format(work):
    """CONTRACT with loading.py: load(path, expert_format=None) means "as the checkpoint stores it"."""
    work, _ = work
    for name, stored in (("tiny-deq", "dequantized"), ("tiny-orbax", "mxfp4"), ("tiny", "mxfp4")):
        model = gptoss_jax.load(work / name, dtype="float32", quiet=True, expert_format=None)
        assert model.cfg.expert_format == stored, name


def test_missing_path_is_one_line(work):
    work, _ = work
    res = run("gptoss-jax", "generate", "no-such-folder/", "--tokens", TOKENS, cwd=work)
    assert_error_line(res, "no-such-folder", "no such file or folder")
