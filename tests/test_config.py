"""Config: the released config files, round trips, validation errors, and the full-size presets' sizes.

The 20b/120b presets are only ever built abstractly here (`nnx.eval_shape`): their parameter counts and
bytes are checked against totals computed independently from the spec's tensor shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import assert_one_line
from hf_reference import HUB_CONFIG_20B, HUB_CONFIG_120B, ORIGINAL_CONFIG_20B, ORIGINAL_CONFIG_120B

from gptoss_jax.config import ORIGINAL_KEYS, Config
from gptoss_jax.model import abstract_model
from gptoss_jax.weights import param_bytes, param_count, param_specs, storage_specs

PRESETS = {"20b": (Config.gpt_oss_20b, HUB_CONFIG_20B, ORIGINAL_CONFIG_20B),
           "120b": (Config.gpt_oss_120b, HUB_CONFIG_120B, ORIGINAL_CONFIG_120B)}  # fmt: skip


def same_model(a: Config, b: Config) -> None:
    """Equal as networks: every field that changes the computation (order of eos ids aside)."""
    for f in ORIGINAL_KEYS + ("rms_norm_eps", "swiglu_alpha", "sliding_layers", "context_length", "pad_token_id"):
        assert getattr(a, f) == getattr(b, f), f
    assert set(a.eos_token_ids) == set(b.eos_token_ids)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", PRESETS)
def test_released_config_files_give_the_presets(name):
    preset, hub, original = PRESETS[name]
    same_model(Config.from_hf_config(hub), preset())
    assert Config.from_original_config(original) == preset()
    assert preset().sliding_layers[:2] == (True, False) and preset().context_length == 131072


@pytest.mark.parametrize("name", PRESETS)
def test_round_trips(name):
    cfg = PRESETS[name][0]()
    assert Config.from_original_config(cfg.to_original_config()) == cfg
    via_hf = Config.from_hf_config(cfg.to_hf_config())
    same_model(via_hf, cfg)
    assert Config.from_hf_config(via_hf.to_hf_config()) == via_hf  # a fixed point after one trip
    # the HF dict is also what transformers itself reads as this architecture
    from transformers import GptOssConfig

    hf = GptOssConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "quantization_config"})
    assert (hf.num_local_experts, hf.num_experts_per_tok, hf.num_key_value_heads, hf.sliding_window) == (
        cfg.num_experts, cfg.experts_per_token, cfg.num_key_value_heads, cfg.sliding_window)  # fmt: skip
    assert hf.layer_types == ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]


def test_runtime_fields_are_not_saved():
    cfg = Config.gpt_oss_20b(dtype="float32", expert_format="dequantized", prefill_chunk=64)
    arch = cfg.architecture_dict()
    assert not {"dtype", "expert_format", "attention_impl", "moe_impl", "prefill_chunk"} & set(arch)
    assert Config(**arch) == Config.gpt_oss_20b()


# ---------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("field", ["num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size",
                                   "hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads"])  # fmt: skip
def test_hf_config_missing_field(field):
    d = {k: v for k, v in HUB_CONFIG_20B.items() if k != field}
    if field == "num_experts_per_tok":
        d.pop("experts_per_token")  # either name is accepted; remove both
    with pytest.raises(ValueError) as e:
        Config.from_hf_config(d)
    assert_one_line(e, field)


@pytest.mark.parametrize("field", ORIGINAL_KEYS)
def test_original_config_missing_field(field):
    d = {k: v for k, v in ORIGINAL_CONFIG_20B.items() if k != field}
    with pytest.raises(ValueError) as e:
        Config.from_original_config(d)
    assert_one_line(e, field)


@pytest.mark.parametrize(
    "change, names",
    [
        ({"num_key_value_heads": 7}, ["num_attention_heads", "num_key_value_heads"]),
        ({"num_local_experts": 3}, ["experts_per_token", "num_experts"]),
        ({"layer_types": ["sliding_attention", "full_attention"] * 11}, ["layer_types", "22", "24"]),
        ({"layer_types": ["sliding_attention", "global"] * 12}, ["layer_types", "global"]),
        ({"hidden_size": 2880 + 16}, ["hidden_size"]),
        ({"head_dim": 63}, ["head_dim"]),
        ({"vocab_size": 0}, ["vocab_size"]),
        ({"num_hidden_layers": "24"}, ["num_hidden_layers"]),
        ({"model_type": "llama"}, ["model_type"]),
        ({"rope_scaling": {**HUB_CONFIG_20B["rope_scaling"], "truncate": True}}, ["truncate"]),
    ],
    ids=lambda x: "-".join(x) if isinstance(x, list) else None,
)
def test_hf_config_inconsistent_fields(change, names):
    with pytest.raises(ValueError) as e:
        Config.from_hf_config(HUB_CONFIG_20B | change)
    assert_one_line(e, *names)


def test_inconsistent_fields_in_presets_and_replace():
    with pytest.raises(ValueError) as e:
        Config.gpt_oss_20b().replace(num_attention_heads=60)
    assert_one_line(e, "num_attention_heads", "num_key_value_heads")
    with pytest.raises(ValueError) as e:
        Config.tiny(layer_types=("full_attention",) * 3)
    assert_one_line(e, "layer_types")
    with pytest.raises(ValueError) as e:
        Config.tiny(dtype="float16")
    assert_one_line(e, "dtype", "float16")


def test_unknown_override_replace():
    with pytest.raises(ValueError) as e:
        Config.gpt_oss_20b().replace(num_heads=8)
    assert_one_line(e, "num_heads")


@pytest.mark.parametrize("how", ["preset", "from_hf_config", "from_original_config"])
def test_unknown_override_constructors(how):
    """Overrides passed to the constructors must fail the same way as `replace` (ValueError, not TypeError)."""
    make = {"preset": lambda **kw: Config.preset("gpt-oss-20b", **kw),
            "from_hf_config": lambda **kw: Config.from_hf_config(HUB_CONFIG_20B, **kw),
            "from_original_config": lambda **kw: Config.from_original_config(ORIGINAL_CONFIG_20B, **kw)}[how]  # fmt: skip
    assert make(dtype="float32").dtype == "float32"  # known overrides work
    with pytest.raises(ValueError) as e:
        make(num_heads=8)
    assert_one_line(e, "num_heads")


def test_unknown_preset():
    with pytest.raises(ValueError) as e:
        Config.preset("gpt-oss-7b")
    assert_one_line(e, "gpt-oss-7b")


# ------------------------------------------------------------------------------------- the test config
def test_tiny_config_sizes_are_distinct(tiny_cfg):
    """A swapped axis (heads <-> kv heads, experts <-> top-k, ...) must change a shape and fail loudly."""
    c = tiny_cfg
    sizes = {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
             "num_experts": c.num_experts, "experts_per_token": c.experts_per_token, "head_dim": c.head_dim,
             "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
             "vocab_size": c.vocab_size, "sliding_window": c.sliding_window}  # fmt: skip
    assert len(set(sizes.values())) == len(sizes), sizes
    assert 1 < c.num_key_value_heads < c.num_attention_heads and 1 < c.experts_per_token < c.num_experts
    assert c.hidden_size != c.num_attention_heads * c.head_dim  # o_proj is not square
    assert c.sliding_layers[:2] == (True, False)


# ------------------------------------------------------------------------------------ full-size presets
def expected_sizes(cfg: Config) -> dict[str, int]:
    """Parameter count and bytes from the spec's tensor shapes (§3.1, §4), written out independently.

    Storage: bf16 for every non-expert weight; norm scales and sinks float32 (exact upcasts that the
    model keeps in float32); experts packed: 32 fp4 values in 16 bytes + 1 E8M0 scale byte per block.
    """
    V, D, E, F = cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    N, K, H, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    qkv = (N + 2 * K) * H
    dense_bf16 = qkv * D + qkv + D * N * H + D + E * D + E  # qkv, out, router (weights + biases)
    expert_bias = E * 2 * F + E * D
    expert_w = E * 2 * F * D + E * D * F
    f32 = 2 * D + N  # two norms, sinks
    count = 2 * V * D + D + L * (dense_bf16 + expert_bias + expert_w + f32)
    expert_bytes = L * (expert_w // 2 + expert_w // 32 + 2 * expert_bias)
    total = 2 * (2 * V * D) + 4 * D + L * (2 * dense_bf16 + 4 * f32) + expert_bytes
    return {"count": count, "bytes": total, "expert_bytes": expert_bytes}


@pytest.mark.parametrize(
    "name, billions, gib, expert_gib", [("20b", 20.91, 12.8, 9.47), ("120b", 116.83, 60.7, 56.8)]
)
def test_preset_sizes(name, billions, gib, expert_gib):
    cfg = PRESETS[name][0]()
    want = expected_sizes(cfg)
    count, nbytes, ebytes = param_count(cfg), param_bytes(cfg), param_bytes(cfg, experts_only=True)
    assert count == want["count"] and nbytes == want["bytes"] and ebytes == want["expert_bytes"]
    assert abs(count / 1e9 - billions) < 0.01
    assert abs(nbytes / 2**30 - gib) < 0.1 and abs(ebytes / 2**30 - expert_gib) < 0.01


def test_20b_abstract_model_has_the_spec_shapes_and_allocates_nothing():
    import flax.nnx as nnx

    cfg = Config.gpt_oss_20b()
    assert cfg.layer_unit == (True, False) and cfg.layer_repeats == 12  # scanned: (sliding, full) x 12
    before = len(jax.live_arrays())
    state = nnx.state(abstract_model(cfg), nnx.Param)
    assert len(jax.live_arrays()) == before
    model_flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in model_flat.values())
    # the model's parameters are the declarations' stacked ones: unit position j holds layers j, j+2, ...
    assert {k: (v.shape, v.dtype) for k, v in model_flat.items()} == {
        k: (v.shape, v.dtype) for k, v in param_specs(cfg).items()}
    assert model_flat["blocks.1.mlp.mlp1_blocks"].shape == (12, 32, 5760, 90, 16)
    # what a checkpoint stores (and the loader expects), one array per layer
    flat = storage_specs(cfg)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items() if k.startswith("layers.0.") or "." not in k}
    shapes = {k: v for k, v in shapes.items() if k != "norm.scale"}
    assert len([k for k in flat if k.endswith("mlp1_blocks")]) == 24
    # spec §4: 265,420,800 B of mlp1 blocks and 16,588,800 B of scales per 20b layer
    assert int(np.prod(flat["layers.0.mlp.mlp1_blocks"].shape)) == 265_420_800
    assert int(np.prod(flat["layers.0.mlp.mlp1_scales"].shape)) == 16_588_800
    assert dataclasses.replace(cfg).context_length == 131072
