"""Every kernel lowers for TPU (Mosaic) and CUDA (Triton) from this CPU-only machine, at gpt-oss-20b shapes.

`jax.export` with platforms=["tpu"] / ["cuda"] runs the real Pallas lowering (interpret=False) and returns
the StableHLO a TPU / GPU runtime would compile. We check that the module holds our kernels as custom calls
(`tpu_custom_call` / `__gpu$xla.gpu.triton`) under their names, i.e. the kernel was lowered and not replaced
by the reference fallback. Compiling and running them needs the hardware (docs/kernels.md).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from gptoss_jax.config import Config
from gptoss_jax.kernels.attention import decode_attention, flash_attention
from gptoss_jax.kernels.mxfp4_matmul import moe_experts_pallas

CFG = Config.gpt_oss_20b()
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "__gpu$xla.gpu.triton")}
SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def export_text(fn, platform: str, *args) -> str:
    target = PLATFORMS[platform][1]
    # Triton calls carry no serialization-compatibility guarantee; we only inspect the module, never store it.
    disabled = [export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args).mlir_module()


def kernel_calls(text: str, platform: str) -> int:
    target = PLATFORMS[platform][1]
    return len(re.findall(rf"custom_call @{re.escape(target)}\(", text))


def attn_args(T: int, S: int):
    K, G, H = CFG.num_key_value_heads, CFG.q_per_kv, CFG.head_dim
    kv = SDS((1, S, K, H), BF16)
    return (SDS((1, T, K, G, H), BF16), kv, kv, SDS((K, G), jnp.float32), SDS((1, T), jnp.int32),
            SDS((1, S), jnp.int32))  # fmt: skip


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("window", [0, 128])
def test_attention_lowers(platform, window):
    backend = PLATFORMS[platform][0]
    kw = dict(window=window, sm_scale=CFG.sm_scale, backend=backend, interpret=False)
    prefill = export_text(lambda *a: flash_attention(*a, **kw), platform, *attn_args(1024, 1024))
    # decode: one token over a 4096-slot cache (full layer) or the ring + the new token (sliding layer)
    cache = 129 if window else 4096
    decode = export_text(lambda *a: decode_attention(*a, **kw), platform, *attn_args(1, cache))
    assert kernel_calls(prefill, platform) >= 1 and kernel_calls(decode, platform) >= 1
    if platform == "tpu":  # the kernels' names survive into the Mosaic payload's metadata
        assert "gptoss_flash_attention" in prefill and "gptoss_decode_attention" in decode


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("T", [1, 512])  # decode tiles (T <= decode_max_tokens) and prefill tiles
def test_moe_lowers(platform, T):
    E, D, F, X = CFG.num_experts, CFG.hidden_size, CFG.intermediate_size, CFG.experts_per_token
    p = dict(mlp1_blocks=SDS((E, 2 * F, D // 32, 16), jnp.uint8),
             mlp1_scales=SDS((E, 2 * F, D // 32), jnp.uint8), mlp1_bias=SDS((E, 2 * F), BF16),
             mlp2_blocks=SDS((E, D, F // 32, 16), jnp.uint8), mlp2_scales=SDS((E, D, F // 32), jnp.uint8),
             mlp2_bias=SDS((E, D), BF16))  # fmt: skip
    fn = lambda x, i, w, p: moe_experts_pallas(x, i, w, p, alpha=CFG.swiglu_alpha, limit=CFG.swiglu_limit,  # noqa: E731
                                               backend=PLATFORMS[platform][0], interpret=False)  # fmt: skip
    text = export_text(fn, platform, SDS((T, D), BF16), SDS((T, X), jnp.int32), SDS((T, X), BF16), p)
    assert kernel_calls(text, platform) == 2  # mlp1 (+ bias + SwiGLU) and mlp2 (+ bias)
    # The weights stay packed: no dequantized (E, 2F, D) or (E, D, F) tensor exists anywhere in the module.
    assert f"{E}x{2 * F}x{D}x" not in text and f"{E}x{D}x{F}x" not in text
    assert f"tensor<{E}x{2 * F}x{D // 32}x16xui8>" in text
