"""The paged attention kernels lower for TPU (Mosaic) and CUDA (Triton) from this CPU-only machine, at
gpt-oss-20b shapes (a 131k-token page table, 16 decode rows or a 512-token chunk), checked as
tests/kernels/test_lowering.py checks the other kernels: the module holds our kernel as a custom call under
its name, not the XLA fallback. Compiling and running them needs the hardware (docs/kernels.md)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from test_lowering import CFG, PLATFORMS, SDS, export_text, kernel_calls

from gptoss_jax.kernels.paged_attention import paged_attention_pallas

BF16 = jnp.bfloat16


def args(B: int, T: int, NB: int, pages: int = 4096, page: int = 16):
    K, G, H = CFG.num_key_value_heads, CFG.q_per_kv, CFG.head_dim
    pool = SDS((CFG.layer_repeats, pages, page, K, H), BF16)
    rows = SDS((B,), jnp.int32)
    return (SDS((B, T, K, G, H), BF16), pool, pool, SDS((), jnp.int32), SDS((K, G), jnp.float32),
            SDS((B, T), jnp.int32), SDS((B, NB), jnp.int32), rows, rows)  # fmt: skip


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("B, T", [(16, 1), (1, 512)])
def test_paged_attention_lowers(platform, window, B, T):
    def fn(q, k, v, layer, sinks, q_pos, table, kv_len, first):
        return paged_attention_pallas(q, k, v, layer, sinks, q_pos, table, kv_len, window=window,
                                      sm_scale=CFG.sm_scale, first=first, backend=PLATFORMS[platform][0],
                                      interpret=False)  # fmt: skip

    NB = 131072 // 16 if not window else -(-(window - 1 + T) // 16) + 1  # full table, or the window's pages
    text = export_text(fn, platform, *args(B, T, NB))
    assert kernel_calls(text, platform) == 1
    if platform == "tpu":
        assert "gptoss_paged_attention" in text
