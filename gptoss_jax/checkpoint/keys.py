"""Key tables: released tensor names (Hugging Face or `original/`) -> our parameter tree, with transforms.

Our parameter names are the Flax NNX state paths joined by dots (`layers.3.attn.q_weight`). Weights are
stored in the layout the math wants (see `gptoss_jax/model.py`), so only this table transposes, splits
or reshapes:

  q_weight (D,K,G,H)  k/v_weight (D,K,H)  o_weight (K,G,H,D)  sinks (K,G)  gate_weight (D,E)
  mlp1_blocks (E,2F,D/32,16) uint8 + mlp1_scales (E,2F,D/32) uint8, rows interleaved gate/linear, kept
  as released; mlp2 likewise (E,D,F/32,16). With dequantized experts: mlp1_weight (E,2F,D), mlp2_weight (E,D,F).

Every rule names its source tensor(s), their expected shape and dtype; `check_sources` fails on missing,
unexpected or wrong-shape tensors before anything is converted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .. import mxfp4
from ..config import Config
from .untrusted import CheckpointError, show

FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Rule:
    target: str  # our parameter name
    sources: tuple[str, ...]  # released tensor name(s)
    shapes: tuple[tuple[int, ...], ...]  # their expected shapes
    dtypes: tuple[tuple[str, ...], ...]  # allowed safetensors dtypes of each
    transform: Callable[..., np.ndarray]  # source arrays -> our layout (dtype cast done by the caller)
    kind: str = "float"  # "float" (cast to the model dtype), "f32" (kept float32), "uint8" (packed MXFP4)


def identity(a):
    """The transform of a tensor stored in our layout already."""
    return a


def _layer_rules(cfg: Config, i: int, layout: str, expert_format: str, stored: str) -> list[Rule]:
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    K, G, H, N = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, cfg.num_attention_heads
    a, m = f"layers.{i}.attn", f"layers.{i}.mlp"
    R = []

    def add(target, src, shape, transform=identity, kind="float", dtypes=FLOAT_DTYPES):
        R.append(Rule(target, (src,), (shape,), (dtypes,), transform, kind))

    q_t = lambda w: w.reshape(K, G, H, D).transpose(3, 0, 1, 2)  # noqa: E731  (N*H, D) -> (D,K,G,H)
    kv_t = lambda w: w.reshape(K, H, D).transpose(2, 0, 1)  # noqa: E731  (K*H, D) -> (D,K,H)
    nq, nk = N * H, K * H
    if layout == "hf":
        p = f"model.layers.{i}"
        add(f"{a}.norm.scale", f"{p}.input_layernorm.weight", (D,), kind="f32")
        add(f"{a}.q_weight", f"{p}.self_attn.q_proj.weight", (nq, D), q_t)
        add(f"{a}.q_bias", f"{p}.self_attn.q_proj.bias", (nq,), lambda b: b.reshape(K, G, H))
        add(f"{a}.k_weight", f"{p}.self_attn.k_proj.weight", (nk, D), kv_t)
        add(f"{a}.k_bias", f"{p}.self_attn.k_proj.bias", (nk,), lambda b: b.reshape(K, H))
        add(f"{a}.v_weight", f"{p}.self_attn.v_proj.weight", (nk, D), kv_t)
        add(f"{a}.v_bias", f"{p}.self_attn.v_proj.bias", (nk,), lambda b: b.reshape(K, H))
        add(f"{a}.o_weight", f"{p}.self_attn.o_proj.weight", (D, nq), lambda w: w.reshape(D, K, G, H).transpose(1, 2, 3, 0))
        add(f"{a}.o_bias", f"{p}.self_attn.o_proj.bias", (D,))
        add(f"{a}.sinks", f"{p}.self_attn.sinks", (N,), lambda s: s.reshape(K, G), kind="f32")
        add(f"{m}.norm.scale", f"{p}.post_attention_layernorm.weight", (D,), kind="f32")
        add(f"{m}.gate_weight", f"{p}.mlp.router.weight", (E, D), lambda w: w.T)
        add(f"{m}.gate_bias", f"{p}.mlp.router.bias", (E,))
        ex = f"{p}.mlp.experts"
        names = {"mlp1": (f"{ex}.gate_up_proj", 2 * F, D), "mlp2": (f"{ex}.down_proj", D, F)}
    else:
        p = f"block.{i}"
        qkv = f"{p}.attn.qkv"
        add(f"{a}.norm.scale", f"{p}.attn.norm.scale", (D,), kind="f32")
        add(f"{a}.q_weight", f"{qkv}.weight", (nq + 2 * nk, D), lambda w: q_t(w[:nq]))
        add(f"{a}.k_weight", f"{qkv}.weight", (nq + 2 * nk, D), lambda w: kv_t(w[nq : nq + nk]))
        add(f"{a}.v_weight", f"{qkv}.weight", (nq + 2 * nk, D), lambda w: kv_t(w[nq + nk :]))
        add(f"{a}.q_bias", f"{qkv}.bias", (nq + 2 * nk,), lambda b: b[:nq].reshape(K, G, H))
        add(f"{a}.k_bias", f"{qkv}.bias", (nq + 2 * nk,), lambda b: b[nq : nq + nk].reshape(K, H))
        add(f"{a}.v_bias", f"{qkv}.bias", (nq + 2 * nk,), lambda b: b[nq + nk :].reshape(K, H))
        add(f"{a}.o_weight", f"{p}.attn.out.weight", (D, nq), lambda w: w.reshape(D, K, G, H).transpose(1, 2, 3, 0))
        add(f"{a}.o_bias", f"{p}.attn.out.bias", (D,))
        add(f"{a}.sinks", f"{p}.attn.sinks", (N,), lambda s: s.reshape(K, G), kind="f32")
        add(f"{m}.norm.scale", f"{p}.mlp.norm.scale", (D,), kind="f32")
        add(f"{m}.gate_weight", f"{p}.mlp.gate.weight", (E, D), lambda w: w.T)
        add(f"{m}.gate_bias", f"{p}.mlp.gate.bias", (E,))
        names = {"mlp1": (f"{p}.mlp.mlp1", 2 * F, D), "mlp2": (f"{p}.mlp.mlp2", D, F)}

    for ours, (src, rows, cols) in names.items():
        if layout == "hf":
            blocks, scales, bias = f"{src}_blocks", f"{src}_scales", f"{src}_bias"
        else:
            blocks, scales, bias = f"{src}_weight.blocks", f"{src}_weight.scales", f"{src}_bias"
        bshape, sshape = (E, rows, cols // 32, 16), (E, rows, cols // 32)
        if stored == "dequantized":  # transformers' dense experts: (E, in, out)
            add(f"{m}.{ours}_weight", src, (E, cols, rows), lambda w: w.transpose(0, 2, 1))
        elif expert_format == "mxfp4":
            add(f"{m}.{ours}_blocks", blocks, bshape, kind="uint8", dtypes=("U8",))
            add(f"{m}.{ours}_scales", scales, sshape, check_scales, kind="uint8", dtypes=("U8",))
        else:
            R.append(Rule(f"{m}.{ours}_weight", (blocks, scales), (bshape, sshape), (("U8",), ("U8",)),
                          lambda b, s: mxfp4.dequantize_np(b, check_scales(s)), "float"))  # fmt: skip
        add(f"{m}.{ours}_bias", bias, (E, rows))
    return R


def check_scales(s: np.ndarray) -> np.ndarray:
    """E8M0 255 is NaN in the OCP MX spec (the reference would turn it into inf): refuse it."""
    if (s == 255).any():
        first = np.unravel_index(int(np.argmax(s == 255)), s.shape)
        raise ValueError(f"E8M0 scale byte 255 (NaN in the MX spec) at index {tuple(map(int, first))}")
    return s


# The exponent bits of each float format: all set means Inf or NaN. Testing them on an unsigned view
# is several times faster than np.isfinite on bfloat16 and needs no float temporaries.
_EXPONENT = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float16): (np.uint16, 0x7C00),
             np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}  # fmt: skip
FLOAT_NP = frozenset(_EXPONENT)
_CHUNK = 1 << 22  # elements tested at a time: temporaries stay a few MB whatever the tensor


def check_finite(a: np.ndarray) -> np.ndarray:
    """Raises ValueError if the float array `a` (bf16, f16 or f32) holds NaN or Inf; returns it otherwise.

    One pass over the data (a contiguous array is read in place), the first bad index in the message.
    """
    uint, exp = _EXPONENT[a.dtype]
    flat = a.reshape(-1).view(uint)
    first, count = -1, 0
    for i in range(0, flat.size, _CHUNK):
        hit = (flat[i : i + _CHUNK] & exp) == exp
        n = int(np.count_nonzero(hit))
        if n and first < 0:
            first = i + int(np.argmax(hit))
        count += n
    if count:
        at = tuple(map(int, np.unravel_index(first, a.shape)))
        raise ValueError(f"{count} NaN or Inf value(s), the first at index {at}")
    return a


def rules(cfg: Config, layout: str, expert_format: str | None = None, stored: str = "mxfp4") -> list[Rule]:
    """The full table for a checkpoint `layout` ("hf" or "original") whose experts are `stored` as packed
    "mxfp4" (every release) or "dequantized" (Hugging Face's dense `gate_up_proj` (E, D, 2F) and `down_proj`
    (E, F, D), as `gptoss-jax merge --experts dequantized` writes them; they load only dequantized)."""
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    expert_format = expert_format or cfg.expert_format
    if stored == "dequantized" and (layout != "hf" or expert_format != "dequantized"):
        raise ValueError("dequantized experts (no MXFP4 blocks) load only from the Hugging Face layout and "
                         "with expert_format='dequantized'")  # fmt: skip
    V, D = cfg.vocab_size, cfg.hidden_size
    if layout == "hf":
        top = [("embedding", "model.embed_tokens.weight", (V, D), "float"),
               ("unembedding", "lm_head.weight", (V, D), "float"),
               ("norm.scale", "model.norm.weight", (D,), "f32")]  # fmt: skip
    else:
        top = [("embedding", "embedding.weight", (V, D), "float"),
               ("unembedding", "unembedding.weight", (V, D), "float"),
               ("norm.scale", "norm.scale", (D,), "f32")]  # fmt: skip
    R = [Rule(t, (s,), (shape,), (FLOAT_DTYPES,), identity, kind) for t, s, shape, kind in top]
    for i in range(cfg.num_hidden_layers):
        R += _layer_rules(cfg, i, layout, expert_format, stored)
    return R


def check_sources(rule_list: list[Rule], available: dict[str, tuple[tuple[int, ...], str, str]],
                  where: str = "checkpoint", config: str = "the config") -> None:  # fmt: skip
    """available: source name -> (shape, safetensors dtype name, file). Raises CheckpointError on the first
    missing, unexpected, wrong-shape or wrong-dtype tensor. `where` (the folder) and `config` (its
    config.json) are named in the messages."""
    needed: dict[str, tuple] = {}
    for r in rule_list:
        for src, shape, dts in zip(r.sources, r.shapes, r.dtypes):
            needed[src] = (shape, dts)
    missing = [s for s in needed if s not in available]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(s for s in available if s not in needed)
    if extra:
        raise CheckpointError(f"{available[extra[0]][2]}: unexpected tensor {show(extra[0])} (not part of this "
                              f"gpt-oss config)" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))  # fmt: skip
    for src, (shape, dts) in needed.items():
        got_shape, got_dtype, file = available[src]
        if tuple(got_shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {src} has shape {show(tuple(got_shape))}, expected {tuple(shape)} "
                                  f"from {config}")  # fmt: skip
        if got_dtype not in dts:
            raise CheckpointError(f"{file}: tensor {src} has dtype {got_dtype}, expected {' or '.join(dts)}")
