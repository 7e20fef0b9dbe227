"""Loading released safetensors folders, MXFP4 kept packed, and the API's one-line errors on bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line, make_tiny_cfg

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.synthetic import write_checkpoint


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, size=(2, 20), dtype=np.int32)


@pytest.fixture(scope="module")
def model(hf_ckpt):
    return gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True)


# ------------------------------------------------------------------------------------- what is loaded
def test_experts_stay_packed_in_memory(model, tiny_cfg):
    """Expert weights are the checkpoint's uint8 blocks and E8M0 scales; nothing is inflated at load."""
    import flax.nnx as nnx

    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    E, F, D, R = tiny_cfg.num_experts, tiny_cfg.intermediate_size, tiny_cfg.hidden_size, tiny_cfg.layer_repeats
    mlp = model.blocks[0].mlp
    assert mlp.mlp1_blocks[...].dtype == jnp.uint8 and mlp.mlp1_blocks[...].shape == (R, E, 2 * F, D // 32, 16)
    assert mlp.mlp1_scales[...].dtype == jnp.uint8 and mlp.mlp1_scales[...].shape == (R, E, 2 * F, D // 32)
    assert mlp.mlp2_blocks[...].shape == (R, E, D, F // 32, 16)
    assert not any(n.endswith("_weight") and ".mlp.mlp" in n for n in names)


def test_packed_and_dequantized_and_both_layouts_give_the_same_logits(model, hf_ckpt, original_ckpt, tokens):
    ref = np.asarray(model(tokens))
    deq = gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True, expert_format="dequantized")
    assert deq.blocks[0].mlp.mlp1_weight[...].dtype == jnp.float32
    orig = gptoss_jax.load(original_ckpt, dtype="float32", quiet=True)
    np.testing.assert_allclose(np.asarray(deq(tokens)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(orig(tokens)), ref)


def test_repo_folder_with_both_layouts_uses_the_top_level(tmp_path, hf_ckpt, original_ckpt, tokens, model, capsys):
    root = tmp_path / "repo"
    shutil.copytree(hf_ckpt, root)
    shutil.copytree(original_ckpt, root / "original")
    m = gptoss_jax.load(root, dtype="float32")
    assert "both layouts" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(m(tokens)), np.asarray(model(tokens)))


def test_bf16_default_keeps_compute_and_weights_in_bf16(hf_ckpt, tokens):
    m = gptoss_jax.load(hf_ckpt, quiet=True)
    assert m.cfg.dtype == "bfloat16" and m.embedding[...].dtype == jnp.bfloat16
    assert m.blocks[0].attn.sinks[...].dtype in (jnp.bfloat16, jnp.float32)
    out = m(tokens)
    assert out.dtype == jnp.float32 and out.shape == (2, 20, m.cfg.vocab_size)


# ---------------------------------------------------------------------------------------------- MXFP4
def test_mxfp4_dequantize_matches_numpy_and_quantize_round_trips():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(3, 5, 4, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, size=(3, 5, 4), dtype=np.uint8)
    ref = mxfp4.dequantize_np(blocks, scales)
    np.testing.assert_array_equal(np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)), ref)
    # each byte: low nibble first; value = FP4_LUT[code] * 2**(scale - 127)
    b, s = blocks[0, 0, 0, 0], scales[0, 0, 0]
    assert ref[0, 0, 0] == mxfp4.FP4_LUT[b & 15] * 2.0 ** (int(s) - 127)
    assert ref[0, 0, 1] == mxfp4.FP4_LUT[b >> 4] * 2.0 ** (int(s) - 127)
    b2, s2 = mxfp4.quantize_np(ref)
    np.testing.assert_array_equal(mxfp4.dequantize_np(b2, s2), ref)


# ----------------------------------------------------------------------------------------- bad input
def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(tmp_path)
    assert_one_line(e, tmp_path, "not a gpt-oss checkpoint")


def test_missing_path(tmp_path):
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(tmp_path / "nope")
    assert_one_line(e, "nope")


def test_config_with_missing_fields(tmp_path, tiny_cfg):
    path = write_checkpoint(tmp_path / "c", make_tiny_cfg(num_hidden_layers=2), layout="hf", seed=0)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_local_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(path)
    assert_one_line(e, "config.json", "num_local_experts")


def test_config_that_does_not_match_the_tensors(tmp_path):
    path = write_checkpoint(tmp_path / "c", make_tiny_cfg(num_hidden_layers=2), layout="hf", seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(path)
    assert_one_line(e, "mlp")


def test_unknown_load_option(hf_ckpt):
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(hf_ckpt, attention="pallas")
    assert_one_line(e, "attention")


def test_token_ids_outside_the_vocabulary(model, tiny_cfg):
    bad = np.array([[1, 2, tiny_cfg.vocab_size]], np.int32)
    with pytest.raises(ValueError) as e:
        model(bad)
    assert_one_line(e, tiny_cfg.vocab_size, "outside the vocabulary")
    with pytest.raises(ValueError) as e:
        gptoss_jax.generate(model, [[3, -1, 4]], max_new_tokens=2)
    assert_one_line(e, "-1", "outside the vocabulary")


def test_context_longer_than_the_cache(model):
    with pytest.raises(ValueError) as e:
        gptoss_jax.generate(model, [[1, 2, 3, 4]], max_new_tokens=10, cache_length=8)
    assert_one_line(e, "context of 14 tokens")


def test_bad_max_new_tokens(model):
    with pytest.raises(ValueError) as e:
        gptoss_jax.generate(model, [[1, 2]], max_new_tokens=0)
    assert_one_line(e, "max_new_tokens")
