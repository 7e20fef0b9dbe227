"""Random gpt-oss checkpoints written in the exact released on-disk layouts.

`write_checkpoint(path, cfg, layout="hf" | "original" | "both")` writes bf16 tensors and MXFP4 experts
(uint8 blocks + E8M0 scales) with the released names, shard naming, index and config files, so tests and
the demo exercise the same loader as real weights. Tensors are generated in the Hugging Face naming; the
`original/` layout is derived from them (fused qkv), the way OpenAI's and Hugging Face's files relate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import Config
from .safetensors import save_file

BF16 = ml_dtypes.bfloat16


def _random_mxfp4(rng, shape_out_in: tuple[int, ...]):
    """Random packed weight (..., rows, cols): uniform codes, scales chosen so rms(w) ~ 1/sqrt(cols)."""
    *pre, rows, cols = shape_out_in
    blocks = rng.integers(0, 256, size=(*pre, rows, cols // 32, 16), dtype=np.uint8)
    # uniform E2M1 codes have rms ~2.9; pick 2**e so the weight rms is ~1/sqrt(fan_in)
    e = -math.log2(2.9 * math.sqrt(cols))
    scales = (127 + np.round(e) + rng.integers(-1, 2, size=(*pre, rows, cols // 32))).astype(np.uint8)
    return blocks, scales


def hf_tensors(cfg: Config, seed: int = 0):
    """Yields (name, array) in the Hugging Face naming, one tensor at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    V, D, E, F = cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(BF16)

    yield "model.embed_tokens.weight", normal((V, D), 1.0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (1 + normal((D,), 0.1).astype(np.float32)).astype(BF16)
        yield f"{p}.self_attn.q_proj.weight", normal((N * H, D), D**-0.5)
        yield f"{p}.self_attn.q_proj.bias", normal((N * H,), 0.1)
        yield f"{p}.self_attn.k_proj.weight", normal((K * H, D), D**-0.5)
        yield f"{p}.self_attn.k_proj.bias", normal((K * H,), 0.1)
        yield f"{p}.self_attn.v_proj.weight", normal((K * H, D), D**-0.5)
        yield f"{p}.self_attn.v_proj.bias", normal((K * H,), 0.1)
        yield f"{p}.self_attn.o_proj.weight", normal((D, N * H), (N * H) ** -0.5)
        yield f"{p}.self_attn.o_proj.bias", normal((D,), 0.1)
        yield f"{p}.self_attn.sinks", normal((N,), 1.0)
        yield f"{p}.post_attention_layernorm.weight", (1 + normal((D,), 0.1).astype(np.float32)).astype(BF16)
        yield f"{p}.mlp.router.weight", normal((E, D), D**-0.5)
        yield f"{p}.mlp.router.bias", normal((E,), 0.1)
        b, s = _random_mxfp4(rng, (E, 2 * F, D))
        yield f"{p}.mlp.experts.gate_up_proj_blocks", b
        yield f"{p}.mlp.experts.gate_up_proj_scales", s
        yield f"{p}.mlp.experts.gate_up_proj_bias", normal((E, 2 * F), 0.1)
        b, s = _random_mxfp4(rng, (E, D, F))
        yield f"{p}.mlp.experts.down_proj_blocks", b
        yield f"{p}.mlp.experts.down_proj_scales", s
        yield f"{p}.mlp.experts.down_proj_bias", normal((E, D), 0.1)
    yield "model.norm.weight", (1 + normal((D,), 0.1).astype(np.float32)).astype(BF16)
    yield "lm_head.weight", normal((V, D), D**-0.5)


def _to_original(items):
    """HF-named tensors -> original-named tensors (fuses q/k/v back into qkv, as OpenAI stores it)."""
    pending: dict[str, np.ndarray] = {}
    simple = {
        "model.embed_tokens.weight": "embedding.weight",
        "lm_head.weight": "unembedding.weight",
        "model.norm.weight": "norm.scale",
    }
    sub = {
        "input_layernorm.weight": "attn.norm.scale",
        "self_attn.sinks": "attn.sinks",
        "self_attn.o_proj.weight": "attn.out.weight",
        "self_attn.o_proj.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp.norm.scale",
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.router.bias": "mlp.gate.bias",
        "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
        "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
        "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
        "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
        "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
        "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
    }
    for name, arr in items:
        if name in simple:
            yield simple[name], arr
            continue
        _, _, i, rest = name.split(".", 3)
        if rest in sub:
            yield f"block.{i}.{sub[rest]}", arr
            continue
        pending[name] = arr  # q/k/v projections
        for kind in ("weight", "bias"):
            parts = [f"model.layers.{i}.self_attn.{x}_proj.{kind}" for x in "qkv"]
            if all(p in pending for p in parts):
                yield f"block.{i}.attn.qkv.{kind}", np.concatenate([pending.pop(p) for p in parts], axis=0)


def _shards(items, n_shards: int, total: int):
    """Groups a stream of tensors into n_shards lists of about total/n_shards bytes each."""
    cap = -(-total // n_shards)
    cur, size = [], 0
    for name, arr in items:
        cur.append((name, arr))
        size += arr.nbytes
        if size >= cap:
            yield cur
            cur, size = [], 0
    if cur:
        yield cur


def checkpoint_bytes(cfg: Config) -> int:
    """Payload bytes of a checkpoint of this config (bf16 tensors + packed experts)."""
    V, D, E, F = cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = 2 * (2 * D + (N * H + 2 * K * H) * (D + 1) + D * N * H + D + N + E * D + E + E * 2 * F + E * D)
    per_layer += E * 2 * F * D // 2 + E * 2 * F * D // 32 + E * D * F // 2 + E * D * F // 32
    return 2 * (2 * V * D + D) + cfg.num_hidden_layers * per_layer


def _write_layout(dst: Path, cfg: Config, layout: str, seed: int, n_shards: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    items = hf_tensors(cfg, seed)
    total = checkpoint_bytes(cfg)
    if layout == "hf":
        weight_map = {}
        groups = list(_shards(items, n_shards, total)) if n_shards > 1 else [list(items)]
        if len(groups) == 1:
            names = ["model.safetensors"]
        else:  # released naming is zero-based: model-00000-of-00002 ... model-00002-of-00002
            names = [f"model-{j:05d}-of-{len(groups) - 1:05d}.safetensors" for j in range(len(groups))]
        for fname, group in zip(names, groups):
            save_file(dict(group), dst / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n, _ in group})
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (dst / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
        gen = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
               "pad_token_id": 199999}  # fmt: skip
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    else:
        orig = _to_original(items)
        groups = list(_shards(orig, n_shards, total)) if n_shards > 1 else [list(orig)]
        if len(groups) == 1:
            save_file(dict(groups[0]), dst / "model.safetensors")
        else:  # 120b naming: model--00001-of-00007.safetensors (note the double dash, one-based)
            for j, group in enumerate(groups):
                save_file(dict(group), dst / f"model--{j + 1:05d}-of-{len(groups):05d}.safetensors")
        (dst / "config.json").write_text(json.dumps(cfg.to_original_config(), indent=2))
        dtypes = {}
        for group in groups:
            for n, a in group:
                dtypes[n] = "FP4" if n.endswith(".blocks") else "UE8" if n.endswith(".scales") else "BF16"
        (dst / "dtypes.json").write_text(json.dumps(dtypes, indent=2))


def write_checkpoint(path: str | os.PathLike, cfg: Config, *, layout: str = "hf", seed: int = 0,
                     shards: int = 1) -> Path:  # fmt: skip
    """Writes a random checkpoint to `path` (a folder; created atomically: temp folder, then rename).

    layout "hf": top-level HF files; "original": OpenAI's original/ files directly in `path`;
    "both": HF files at the top and the same weights in `path/original/` (a downloaded repo).
    """
    if layout not in ("hf", "original", "both"):
        raise ValueError(f"layout must be 'hf', 'original' or 'both', got {layout!r}")
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        if layout in ("hf", "both"):
            _write_layout(tmp, cfg, "hf", seed, shards)
        if layout == "original":
            _write_layout(tmp, cfg, "original", seed, shards)
        if layout == "both":
            _write_layout(tmp / "original", cfg, "original", seed, shards)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
