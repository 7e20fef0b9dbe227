"""The tiny model with attention_impl="pallas", moe_impl="pallas" (interpreted on CPU) equals the XLA path.

float32 checkpoint read through the real loader; prompts longer than the sliding window (8), so sliding
layers skip kv blocks in prefill and decode over the ring buffer; generate() right-pads the shorter prompt
(negative positions) and decodes one token at a time with the decode kernels.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import numpy as np

import gptoss_jax
from gptoss_jax.model import forward

PROMPTS = [[(7 * i + 3) % 990 for i in range(21)], [(11 * i + 5) % 990 for i in range(13)]]
NEW = 16


def test_pallas_model_equals_xla(hf_ckpt):
    xla = gptoss_jax.load(hf_ckpt, dtype="float32", attention_impl="xla", moe_impl="xla", quiet=True)
    pal = gptoss_jax.load(hf_ckpt, dtype="float32", attention_impl="pallas", moe_impl="pallas", quiet=True)
    tokens = np.asarray(PROMPTS[0], np.int32)[None]
    # The kernels are really in the graph (no silent fallback): one attention and two expert kernels a layer.
    graphdef, state = nnx.split(pal)
    pos = np.arange(tokens.shape[1], dtype=np.int32)[None]
    jaxpr = str(jax.make_jaxpr(lambda st, t: forward(nnx.merge(graphdef, st), t, pos)[0])(state, tokens))
    # the layers are scanned: the graph holds one unit of layers (sliding, full), run layer_repeats times
    assert jaxpr.count("pallas_call") == 3 * len(pal.cfg.layer_unit)
    assert "gptoss_flash_attention" in jaxpr and "gptoss_moe_mlp1" in jaxpr and "gptoss_moe_mlp2" in jaxpr
    want, got = np.asarray(xla(tokens)), np.asarray(pal(tokens))
    # float32 on both paths; only the summation order differs (online softmax, nibble-split expert dots):
    # ~1e-6 relative after 3 layers, against O(1) differences from any wrong mask, sink or weight.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()

    kw = dict(max_new_tokens=NEW, stop_tokens=())  # no stop token: all 16 tokens every time
    out_xla, out_pal = gptoss_jax.generate(xla, PROMPTS, **kw), gptoss_jax.generate(pal, PROMPTS, **kw)
    assert [len(r) for r in out_pal] == [NEW, NEW]
    assert out_pal == out_xla
