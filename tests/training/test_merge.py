"""`gptoss-jax merge` / `training.merge.merge` and `gptoss_jax.load(adapters=)`.

The tiny checkpoint of tests/conftest.py with adapters on every target (B nonzero, so they matter), merged
in float32. Dequantized experts: the merged folder gives the logits of the base with the adapters applied
(our loader and transformers' GptOssForCausalLM, both reading the folder); re-quantized ones: our loader and
transformers agree on the folder, and the reported error is recomputed here from the files and the PEFT
tensors directly (not through our adapter arrays).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from clitools import assert_error_line, run
from conftest import make_tiny_cfg
from hf_reference import hf_logits, hf_model, rel_err

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.adapters import WEIGHTS_FILE, apply_adapters, save_adapters
from gptoss_jax.checkpoint.safetensors import SafetensorsFile
from gptoss_jax.checkpoint.source import open_source
from gptoss_jax.checkpoint.synthetic import _random_mxfp4
from gptoss_jax.lora import LoraConfig, init_adapters
from gptoss_jax.training.merge import REPORT, merge

LCFG = LoraConfig(rank=4, alpha=8, targets="all")
TOKENS = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def adapter_dir(tiny_cfg, tmp_path_factory):
    ad = init_adapters(tiny_cfg.replace(dtype="float32"), LCFG, seed=3, b_std=0.05)
    return save_adapters(tmp_path_factory.mktemp("merge") / "ad", ad, tiny_cfg, LCFG)


@pytest.fixture(scope="module")
def reference(hf_ckpt, adapter_dir):
    """Logits of the base with the adapters applied (experts dequantized: the merge's float32 base)."""
    model = gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True, expert_format="dequantized")
    return np.asarray(apply_adapters(model, adapter_dir)(TOKENS))


@pytest.fixture(scope="module")
def merged(hf_ckpt, adapter_dir, tmp_path_factory):
    """{experts: (folder, report)}; small shards, so the index is written and read too."""
    out = {}
    for experts in ("dequantized", "mxfp4"):
        folder = tmp_path_factory.mktemp("merged") / experts
        rep = merge(
            hf_ckpt, adapter_dir, folder, experts=experts, dtype="float32", quiet=True, shard_bytes=2**20
        )
        out[experts] = folder, rep
    return out


def transformers_model(folder):
    import torch
    from transformers import GptOssForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GptOssForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager"
        )


def test_dequantized_merge_gives_the_adapted_logits(merged, reference):
    folder, rep = merged["dequantized"]
    assert (folder / "model.safetensors.index.json").is_file() and (
        folder / "generation_config.json"
    ).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ours = gptoss_jax.load(folder, dtype="float32", quiet=True, expert_format="dequantized")
    assert rel_err(np.asarray(ours(TOKENS)), reference) < 1e-5
    assert rel_err(hf_logits(transformers_model(folder).eval(), TOKENS), reference) < 1e-5
    assert json.loads((folder / REPORT).read_text())["experts"] == "dequantized" and not rep.errors


def test_dense_experts_load_as_stored_and_cannot_be_packed(merged):
    model = gptoss_jax.load(merged["dequantized"][0], dtype="float32", quiet=True)
    assert model.cfg.expert_format == "dequantized"
    with pytest.raises(ValueError, match="expert_format='dequantized'"):
        gptoss_jax.load(merged["dequantized"][0], dtype="float32", quiet=True, expert_format="mxfp4")


def test_requantized_merge_loads_in_ours_and_transformers(merged, reference):
    folder, _ = merged["mxfp4"]
    ours = np.asarray(gptoss_jax.load(folder, dtype="float32", quiet=True)(TOKENS))
    assert rel_err(hf_logits(hf_model(folder), TOKENS), ours) < 1e-5
    # ~9% RMS error on every expert weight moves the tiny random model's logits by ~0.19 (routing flips);
    # a wrong layout or a lost adapter moves them by O(1)
    assert rel_err(ours, reference) < 0.3


def test_reported_error_is_the_requantization_error(merged, hf_ckpt, adapter_dir, tiny_cfg):
    folder, rep = merged["mxfp4"]
    disk = json.loads((folder / REPORT).read_text())
    names = [f"model.layers.{i}.mlp.experts.{p}" for i in range(tiny_cfg.num_hidden_layers)
             for p in ("gate_up_proj", "down_proj")]  # fmt: skip
    assert sorted(disk["tensors"]) == sorted(names) and disk["tensors"] == rep.errors
    new, old = open_source(folder).files, open_source(hf_ckpt).files
    ad = SafetensorsFile(adapter_dir / WEIGHTS_FILE)
    E, s = tiny_cfg.num_experts, LCFG.alpha / LCFG.rank
    errs = []
    for name in names:
        w = mxfp4.dequantize_np(
            old[f"{name}_blocks"].get(f"{name}_blocks"), old[f"{name}_scales"].get(f"{name}_scales")
        )
        i, proj = name.split(".")[2], name.rsplit(".", 1)[1]
        mod = f"base_model.model.model.layers.{i}.mlp.experts" + (
            ".base_layer" if proj == "gate_up_proj" else ""
        )
        A = np.asarray(ad.get(f"{mod}.lora_A.weight"), np.float32)  # (E*r, in), expert e in rows e*r..
        B = np.asarray(ad.get(f"{mod}.lora_B.weight"), np.float32)  # (out, r*E), expert e in columns j*E + e
        r = A.shape[0] // E
        want = np.stack([w[e] + s * B[:, e::E] @ A[e * r : (e + 1) * r] for e in range(E)])
        got = mxfp4.dequantize_np(
            new[f"{name}_blocks"].get(f"{name}_blocks"), new[f"{name}_scales"].get(f"{name}_scales")
        )
        errs.append(rel_err(got, want))
        assert abs(rep.errors[name] - errs[-1]) <= 1e-4 * errs[-1], name
    assert 0 < max(errs) < 0.15  # MXFP4 of a smooth merged weight: ~10% relative RMS at most
    assert disk["max"] == pytest.approx(max(errs), rel=1e-4) and disk["mean"] == pytest.approx(
        np.mean(errs), rel=1e-4
    )


def test_quantizer_round_trip_is_exact_on_mxfp4_values():
    blocks, scales = _random_mxfp4(np.random.default_rng(5), (3, 40, 256))
    w = mxfp4.dequantize_np(blocks, scales)
    b2, s2 = mxfp4.quantize_np(w)
    np.testing.assert_array_equal(mxfp4.dequantize_np(b2, s2), w)


def test_load_with_adapters_applies_them(hf_ckpt, adapter_dir):
    got = gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True, adapters=adapter_dir)
    want = apply_adapters(gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True), adapter_dir)
    np.testing.assert_allclose(np.asarray(got(TOKENS)), np.asarray(want(TOKENS)), rtol=1e-6, atol=1e-6)
    assert "adapters:" in gptoss_jax.load.__doc__


def test_merge_cli_bad_inputs(hf_ckpt, adapter_dir, tmp_path):
    res = run("gptoss-jax", "merge", hf_ckpt, "--adapters", tmp_path / "none", "--out", tmp_path / "o")
    assert_error_line(res, "none", "no such adapters folder")
    other = make_tiny_cfg(intermediate_size=64)
    ad = init_adapters(other.replace(dtype="float32"), LCFG, seed=0)
    wrong = save_adapters(tmp_path / "wrong", ad, other, LCFG)
    res = run("gptoss-jax", "merge", hf_ckpt, "--adapters", wrong, "--out", tmp_path / "o")
    assert_error_line(res, WEIGHTS_FILE, "shape")
    (tmp_path / "exists").mkdir()
    res = run("gptoss-jax", "merge", hf_ckpt, "--adapters", adapter_dir, "--out", tmp_path / "exists")
    assert_error_line(res, "exists", "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "wrong"]  # nothing half-written
