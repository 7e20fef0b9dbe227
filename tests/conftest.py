"""Shared fixtures: tiny random checkpoints in the real released layouts, written once per session.

`tiny_cfg` uses distinct sizes on every axis (6 q heads, 2 kv heads, 5 experts, top-3, head_dim 16,
hidden 64, expert width 96) and a sliding window of 8 so that short test sequences span several windows.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices so mesh tests run in-process; single-device code keeps using device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The CLI's persistent compilation cache stays off in tests (test_cli turns it on in a subprocess).
os.environ["GPTOSS_JAX_COMPILE_CACHE"] = "off"

import pytest

from gptoss_jax.config import Config

TEST_VOCAB = 1000
TEST_WINDOW = 8


def make_tiny_cfg(**kw) -> Config:
    base = dict(vocab_size=TEST_VOCAB, sliding_window=TEST_WINDOW, pad_token_id=TEST_VOCAB - 1,
                eos_token_ids=(TEST_VOCAB - 2,))  # fmt: skip
    return Config.tiny(**(base | kw))


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return make_tiny_cfg()


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory, tiny_cfg):
    """A 3-shard Hugging Face layout checkpoint (index + model-0000N-of-00002.safetensors)."""
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", tiny_cfg, layout="hf", shards=3, seed=1)


@pytest.fixture(scope="session")
def original_ckpt(tmp_path_factory, tiny_cfg):
    """The same weights in OpenAI's original/ layout (fused qkv, 2 shards with the 120b naming)."""
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "orig", tiny_cfg, layout="original", shards=2, seed=1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_vocab_cache(tmp_path_factory):
    # openai-harmony reads the vocabulary from a cache folder: keep the materialized copy out of ~/.cache
    # while testing (TIKTOKEN_ENCODINGS_BASE, when the environment sets it, is honoured as it is).
    mp = pytest.MonkeyPatch()
    mp.setenv("GPTOSS_JAX_CACHE", str(tmp_path_factory.mktemp("encodings")))
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs. XLA:CPU maps memory for every compiled program
    it keeps, and the whole suite in one process came within reach of the kernel's limit on mappings
    (vm.max_map_count, 65530 by default): the serving tests alone leave ~9,300, and past the limit XLA
    crashes inside its next compile (a segfault, not an error)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def assert_one_line(excinfo, *needles) -> None:
    """The error message is one line and names each of `needles`."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
