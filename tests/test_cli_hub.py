"""Models by their Hugging Face id (issue 10, item 9), offline: `HF_HUB_OFFLINE=1` and a hub cache laid out
as huggingface_hub lays it (`models--org--name/{blobs, refs/main, snapshots/<commit>/...}`, each snapshot
file a relative symlink to its content-addressed blob), holding tiny synthetic checkpoints:

  acme/tiny-hf        the vocab-1000 test checkpoint, Hugging Face layout
  acme/tiny-original  the same weights in OpenAI's original/ layout only
  acme/tiny-config    only config.json cached (what `info` fetches)
"""

from __future__ import annotations

import hashlib
import os
import sys

import pytest
from clitools import assert_error_line, cli_env, run, token_ids
from hf_reference import our_model

import gptoss_jax
from gptoss_jax import hub
from gptoss_jax.checkpoint.orbax import is_orbax_checkpoint

PROMPT = [5, 17, 230, 999, 0, 42, 7]
TOKENS = " ".join(map(str, PROMPT))


def add_to_cache(cache, repo_id: str, files: dict, commit: str) -> None:
    """Stores `files` ({repo path: local file}) as huggingface_hub's cache does after a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # a ref file holds the bare commit hash
    blobs = repo / "blobs"
    blobs.mkdir(exist_ok=True)
    for rel, src in files.items():
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, hf_ckpt, original_ckpt):
    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    add_to_cache(cache, "acme/tiny-hf", {p.name: p for p in hf_ckpt.iterdir()}, "a" * 40)
    add_to_cache(
        cache, "acme/tiny-original", {f"original/{p.name}": p for p in original_ckpt.iterdir()}, "b" * 40
    )
    add_to_cache(cache, "acme/tiny-config", {"config.json": hf_ckpt / "config.json"}, "c" * 40)
    return cli_env(HF_HOME=root, HF_HUB_CACHE=cache, HF_HUB_OFFLINE=1), root


@pytest.fixture(scope="module")
def reference(hf_ckpt):
    return gptoss_jax.generate(our_model(hf_ckpt), PROMPT, max_new_tokens=5)[0]


def test_generate_by_model_id(hub_env, reference):
    env, root = hub_env
    res = run(
        "gptoss-jax",
        "generate",
        "acme/tiny-hf",
        "--tokens",
        TOKENS,
        "--max-new-tokens",
        5,
        "--dtype",
        "float32",
        "--no-stream",
        env=env,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert token_ids(res.stdout) == reference


def test_load_by_model_id_original_layout(hub_env, reference):
    """`gptoss_jax.load("org/name")` from Python; a repo with only original/ files is read in that layout."""
    env, root = hub_env
    code = (
        "import gptoss_jax; m = gptoss_jax.load('acme/tiny-original', dtype='float32', quiet=True); "
        f"print(*gptoss_jax.generate(m, {PROMPT}, max_new_tokens=5)[0])"
    )
    import subprocess

    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert token_ids(res.stdout) == reference


def test_info_and_convert_by_model_id(hub_env, tmp_path):
    env, root = hub_env
    res = run("gptoss-jax", "info", "acme/tiny-config", "--mesh", "expert=1", env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "acme/tiny-config" in res.stdout and "5 experts" not in res.stderr
    res = run("gptoss-convert", "acme/tiny-hf", tmp_path / "out", "--quiet", env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert is_orbax_checkpoint(tmp_path / "out")


def test_missing_model_offline_says_what_to_download(hub_env):
    env, root = hub_env
    for cmd in (
        ("gptoss-jax", "generate", "acme/absent", "--tokens", "1"),
        ("gptoss-jax", "info", "acme/absent"),
        ("gptoss-convert", "acme/absent", root / "never"),
    ):
        res = run(*cmd, env=env, cwd=root)
        assert_error_line(res, "acme/absent", "HF_HUB_OFFLINE", "huggingface-cli download acme/absent")
    # a partial snapshot (config.json only, left by `info`) is not taken for a checkpoint while offline
    res = run("gptoss-jax", "generate", "acme/tiny-config", "--tokens", "1", env=env, cwd=root)
    assert_error_line(res, "acme/tiny-config", "huggingface-cli download")


def test_model_id_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_model_id("openai/gpt-oss-20b") and hub.is_model_id("openai/gpt-oss-20b/")
    for text in (
        "gpt-oss-20b",
        "./openai/gpt-oss-20b",
        "/abs/path",
        "~/x/y",
        "a/b/c",
        "../a",
        "a/../b",
        "a--b/c",
    ):
        assert not hub.is_model_id(text), text
    (tmp_path / "openai" / "gpt-oss-20b").mkdir(parents=True)  # a local folder of that name wins
    assert not hub.is_model_id("openai/gpt-oss-20b")
    assert hub.resolve_checkpoint("openai/gpt-oss-20b/") == tmp_path / "openai" / "gpt-oss-20b"
