"""Our model against transformers' GptOssForCausalLM: per function, per layer, and whole-model logits.

Both models read the same tiny random checkpoint from disk (written by `conversion.synthetic` in the
released layouts, MXFP4 experts): ours through `gptoss_jax.load`, transformers through `from_pretrained`
with its own MXFP4 dequantization. The tiny config has distinct sizes on every axis (6 q heads, 2 kv heads,
5 experts, top-3, head_dim 16), a window of 8 so 40 tokens span five windows, and layer 0 sliding, layer 1
full. One extra 2-layer checkpoint uses the real window of 128 on a 400-token sequence.
"""

from __future__ import annotations

import functools
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_cfg
from hf_reference import (
    HUB_CONFIG_20B,
    hf_cos_sin,
    hf_layer_mask,
    hf_logits,
    hf_mask,
    hf_model,
    hf_rotary,
    our_model,
    rel_err,
    torch_f32,
)

import gptoss_jax.kernels.attention  # noqa: F401  (the module: `kernels.attention` is also a function)
from gptoss_jax.config import Config
from gptoss_jax.kernels.attention import attention_reference, attention_xla
from gptoss_jax.model import (
    attention_layer,
    layer_params,
    moe_layer,
    rope_cos_sin,
    rope_inv_freq,
    route,
)
from gptoss_jax.moe import _tile_rows, moe_experts, moe_experts_gather, moe_experts_grouped
from gptoss_jax.ops import swiglu

F32_TOL = 1e-5  # per function / per layer in float32 (measured ~1e-7)
LOGITS_TOL = 1e-4  # whole model in float32 (the bound; measured ~6e-7)
SEQ = 40  # five windows of 8


@pytest.fixture(scope="module")
def hf(hf_ckpt):
    return hf_model(hf_ckpt)


@pytest.fixture(scope="module")
def ours(hf_ckpt):
    return our_model(hf_ckpt)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, (2, SEQ))


def test_fixture_layers_are_sliding_then_full(tiny_cfg, hf):
    # Every per-layer test below relies on layer 0 being sliding and layer 1 full, in both implementations.
    assert tiny_cfg.sliding_layers[:2] == (True, False)
    assert hf.model.layers[0].self_attn.sliding_window == tiny_cfg.sliding_window
    assert hf.model.layers[1].self_attn.sliding_window is None


# ------------------------------------------------------------------------------------------------ RoPE
def _positions():
    # Small positions, around the original context 4096, and far beyond it (up to the 131072 context).
    return np.concatenate([np.arange(0, 40), np.arange(4090, 4102), [8191, 65536, 100000, 131071]])[None]


def _check_rope(cfg, rotary):
    pos = _positions()
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.int32), cfg, jnp.float32)
    hcos, hsin = hf_cos_sin(rotary, pos)
    inv, conc = rope_inv_freq(cfg)
    np.testing.assert_allclose(inv, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert conc == pytest.approx(rotary.attention_scaling, rel=1e-7)
    # Both sides compute float32(pos) * inv_freq in float32: any difference left is the trig implementation,
    # which grows with the angle (|angle| <= pos). 2e-7 * pos is ~4 float32 ulps of the largest angle.
    tol = conc * (2e-6 + 2e-7 * pos[0])[:, None]
    assert np.all(np.abs(np.asarray(cos)[0] - hcos[0]) <= tol)
    assert np.all(np.abs(np.asarray(sin)[0] - hsin[0]) <= tol)


def test_rope_tables_match_hf_tiny(tiny_cfg, hf):
    _check_rope(tiny_cfg, hf.model.rotary_emb)


def test_rope_tables_match_hf_20b_settings():
    """The real settings (head_dim 64, theta 150000, YaRN factor 32, beta 32/1) from the hub config.json."""
    cfg = Config.gpt_oss_20b()
    _check_rope(cfg, hf_rotary(HUB_CONFIG_20B))
    inv, conc = rope_inv_freq(cfg)
    # values quoted in the spec (§2.3), computed there from the reference code
    assert inv[0] == pytest.approx(1.0, rel=1e-7)
    assert inv[8] == pytest.approx(0.0508133, rel=2e-6)
    assert inv[18] == pytest.approx(3.8309e-5, rel=2e-5)
    assert inv[31] == pytest.approx(3.0235e-7, rel=2e-5)
    assert conc == pytest.approx(1.3465736, rel=1e-7)
    # j <= 8 pure extrapolation (theta^(-2j/d)), j >= 18 pure interpolation (that / 32): no rounded ramp
    j = np.arange(32)
    base = 150000.0 ** (-2 * j / 64)
    np.testing.assert_allclose(inv[:9], base[:9], rtol=1e-6)
    np.testing.assert_allclose(inv[18:], base[18:] / 32, rtol=1e-6)
    assert np.all((inv[9:18] < base[9:18]) & (inv[9:18] > base[9:18] / 32))


# ------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize("q_len", [SEQ, 3], ids=["prefill", "decode"])
def test_attention_matches_hf_eager(layer, q_len, tiny_cfg, hf):
    """attention_xla vs HF's eager_attention_forward (sinks column, max subtraction) with HF's own masks.

    Row 1 of the batch is left-padded by 5 slots (our negative positions; HF's 2-D padding mask).
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    cfg = tiny_cfg
    mod = hf.model.layers[layer].self_attn
    window = mod.sliding_window or 0
    B, S, K, G, H, pad = 2, SEQ, cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, 5
    rng = np.random.default_rng(layer * 10 + q_len)
    q = rng.standard_normal((B, q_len, K, G, H), dtype=np.float32) * 2
    k = rng.standard_normal((B, S, K, H), dtype=np.float32) * 2
    v = rng.standard_normal((B, S, K, H), dtype=np.float32)
    sinks = mod.sinks.detach().numpy().reshape(K, G)  # query head n = k*G + g in both
    k_pos = np.stack([np.arange(S), np.arange(S) - pad])
    q_pos = k_pos[:, S - q_len :]
    got = attention_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(sinks), jnp.asarray(q_pos),
                        jnp.asarray(k_pos), window=window, sm_scale=cfg.sm_scale)  # fmt: skip
    got = np.asarray(got).reshape(B, q_len, K * G, H)

    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, :pad] = False
    from transformers import masking_utils as mu

    fn = mu.sliding_window_causal_mask_function(window) if window else mu.causal_mask_function
    mask = mu.eager_mask(batch_size=B, q_length=q_len, kv_length=S, q_offset=S - q_len, mask_function=fn,
                         attention_mask=padding)  # fmt: skip
    with torch.no_grad():
        want, _ = eager_attention_forward(mod, torch_f32(q.reshape(B, q_len, K * G, H)).transpose(1, 2),
                                          torch_f32(k).transpose(1, 2), torch_f32(v).transpose(1, 2), mask,
                                          scaling=mod.scaling)  # fmt: skip
    want = want.numpy()
    real = q_pos >= 0  # padding queries see nothing; their output is undefined in HF
    assert rel_err(got[real], want[real]) <= F32_TOL
    # the window must actually cut keys here, or this test could not tell a sliding layer from a full one
    if window:
        assert q_pos.max() - window >= 0


def test_hf_mask_helper_window_includes_current_token():
    # HF's rule (and ours): the window of 8 holds keys q-7 .. q.
    m = hf_mask(1, 10, 10, window=8)[0, 0] == 0
    assert m[9].tolist() == [False, False] + [True] * 8


# -------------------------------------------------------------------------------------------- router
@pytest.mark.parametrize("layer", [0, 1])
def test_router_matches_hf(layer, ours, hf, tiny_cfg):
    x = np.random.default_rng(layer).standard_normal((64, tiny_cfg.hidden_size), dtype=np.float32)
    p = layer_params(ours, layer)["mlp"]
    idx, w = route(jnp.asarray(x), p["gate_weight"], p["gate_bias"], tiny_cfg.experts_per_token)
    with torch.no_grad():
        _, h_w, h_idx = hf.model.layers[layer].mlp.router(torch_f32(x))
    np.testing.assert_array_equal(np.asarray(idx), h_idx.numpy())  # same experts, same (descending) order
    np.testing.assert_allclose(np.asarray(w), h_w.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)  # softmax over the k only


# -------------------------------------------------------------------------------------------- swiglu
def test_swiglu_matches_hf_beyond_clamp(hf, tiny_cfg):
    experts = hf.model.layers[0].mlp.experts
    assert (experts.alpha, experts.limit) == (tiny_cfg.swiglu_alpha, tiny_cfg.swiglu_limit)
    lim = tiny_cfg.swiglu_limit
    # every (gate, linear) pair on a grid reaching 3x the limit on both sides
    g, lin = np.meshgrid(np.linspace(-3 * lim, 3 * lim, 61), np.linspace(-3 * lim, 3 * lim, 63))
    h = np.stack([g.ravel(), lin.ravel()], -1).astype(np.float32).reshape(63, 2 * 61)  # interleaved pairs
    assert (h[:, 0::2] > lim).any() and (h[:, 0::2] < -lim).any()
    assert (h[:, 1::2] > lim).any() and (h[:, 1::2] < -lim).any()
    got = np.asarray(swiglu(jnp.asarray(h[:, 0::2]), jnp.asarray(h[:, 1::2]), tiny_cfg.swiglu_alpha, lim))
    with torch.no_grad():
        want = experts._apply_gate(torch_f32(h)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- moe
@pytest.mark.parametrize("expert_format", ["mxfp4", "dequantized"])
@pytest.mark.parametrize("path", ["gather", "grouped", "moe"])
def test_moe_matches_hf_mlp(path, expert_format, hf_ckpt, hf, tiny_cfg):
    model = our_model(hf_ckpt, "float32", expert_format=expert_format)
    cfg = model.cfg
    layer = 1
    p = layer_params(model, layer)["mlp"]
    assert ("mlp1_blocks" in p) == (expert_format == "mxfp4")
    x = np.random.default_rng(3).standard_normal((SEQ, cfg.hidden_size), dtype=np.float32)
    kw = dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)

    def experts(fn, x, p):
        idx, w = route(x, p["gate_weight"], p["gate_bias"], cfg.experts_per_token)
        return fn(x, idx, w, p)

    fn = {"gather": partial(experts, partial(moe_experts_gather, **kw)),
          "grouped": partial(experts, partial(moe_experts_grouped, **kw)),
          "moe": partial(experts, partial(moe_experts, cfg=cfg))}[path]  # fmt: skip
    got = np.asarray(jax.jit(fn)(jnp.asarray(x), p))
    with torch.no_grad():
        want, _ = hf.model.layers[layer].mlp(torch_f32(x)[None])
    assert rel_err(got, want[0].numpy()) <= F32_TOL


@pytest.mark.parametrize("expert_format", ["mxfp4", "dequantized"])
def test_grouped_experts_uneven_routing(expert_format, hf_ckpt):
    """The grouped path (sorted rows, tiles, the next expert's packed bytes carried through the loop) against
    the gather path on a routing that stresses it: experts 0 and 1 get no rows, expert 2 gets every token (more
    rows than a tile), the last expert gets rows, and some selections are out of range (remote experts)."""
    model = our_model(hf_ckpt, "float32", expert_format=expert_format)
    cfg = model.cfg
    E, X = cfg.num_experts, cfg.experts_per_token
    assert E >= X + 2  # room for two unused experts
    p = layer_params(model, 0)["mlp"]
    kw = dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    T = SEQ
    rng = np.random.default_rng(5)
    others = [3 + (t + j) % (E - 4) for t in range(T) for j in range(X - 2)]
    idx = np.column_stack([np.full(T, 2), np.full(T, E - 1), np.reshape(others, (T, X - 2))]).astype(np.int32)
    idx[::7, 1] = E + 3  # remote: contributes nothing
    idx[::5, -1] = -1
    w = rng.random((T, X)).astype(np.float32)
    x = rng.standard_normal((T, cfg.hidden_size), dtype=np.float32)
    assert T > _tile_rows(T * X, E)  # expert 2 spans more than one tile
    local = (idx >= 0) & (idx < E)
    got = jax.jit(lambda x, i, w, p: moe_experts_grouped(x, i, w, p, **kw))(x, idx, w, p)
    want = jax.jit(lambda x, i, w, p: moe_experts_gather(x, i, w, p, **kw))(x, np.where(local, idx, 0),
                                                                          np.where(local, w, 0), p)  # fmt: skip
    assert rel_err(got, want) <= 1e-6


# ---------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_decoder_layer_matches_hf(layer, ours, hf, tiny_cfg):
    """The same hidden state into HF layer i and our layer i: attention half, MoE half, whole block."""
    cfg = tiny_cfg
    x = np.random.default_rng(11 + layer).standard_normal((2, SEQ, cfg.hidden_size), dtype=np.float32)
    pos = np.tile(np.arange(SEQ), (2, 1))
    cos, sin = rope_cos_sin(jnp.asarray(pos), cfg, jnp.float32)
    block = layer_params(ours, layer)
    window = cfg.sliding_window if cfg.sliding_layers[layer] else 0
    attn_fn = jax.jit(lambda b, x: attention_layer(x, b["attn"], cos, sin, jnp.asarray(pos), window=window,
                                                   cfg=cfg)[0])  # fmt: skip
    mlp_fn = jax.jit(lambda b, x: moe_layer(x, b["mlp"], cfg))
    block_fn = jax.jit(lambda b, x: mlp_fn(b, attn_fn(b, x)))

    hl = hf.model.layers[layer]
    xt, pt = torch_f32(x), torch.as_tensor(pos)
    mask = hf_layer_mask(hf.config, xt, pt, sliding=layer == 0)
    with torch.no_grad():
        pe = hf.model.rotary_emb(xt, pt)
        h_attn = xt + hl.self_attn(hl.input_layernorm(xt), pe, mask)[0]
        h_mlp = h_attn + hl.mlp(hl.post_attention_layernorm(h_attn))[0]
        h_block = hl(xt, attention_mask=mask, position_embeddings=pe, position_ids=pt)
    np.testing.assert_array_equal(h_block.numpy(), h_mlp.numpy())  # the two HF paths agree
    assert rel_err(attn_fn(block, jnp.asarray(x)), h_attn.numpy()) <= F32_TOL
    assert rel_err(mlp_fn(block, jnp.asarray(h_attn.numpy())), h_mlp.numpy()) <= F32_TOL
    assert rel_err(block_fn(block, jnp.asarray(x)), h_block.numpy()) <= F32_TOL


# ------------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_float32_match_hf(layout, hf_ckpt, original_ckpt, hf, tokens, tiny_cfg):
    assert tokens.shape[1] >= 3 * tiny_cfg.sliding_window
    model = our_model(hf_ckpt if layout == "hf" else original_ckpt)
    err = rel_err(model(tokens), hf_logits(hf, tokens))
    print(f"\n[{layout}] float32 logits rel err vs HF: {err:.3g}")
    assert err <= LOGITS_TOL


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_bf16_within_twice_hf_bf16_error(layout, hf_ckpt, original_ckpt, hf, tokens):
    """Our bf16 logits may be no further from HF float32 than twice HF's own bf16 logits are."""
    ref = hf_logits(hf, tokens)
    hf_err = rel_err(hf_logits(hf_model(hf_ckpt, "bfloat16"), tokens), ref)
    ours16 = our_model(hf_ckpt if layout == "hf" else original_ckpt, "bfloat16")
    assert ours16.embedding[...].dtype == jnp.bfloat16
    our_err = rel_err(ours16(tokens), ref)
    print(f"\n[{layout}] bf16 logits rel err vs HF float32: ours {our_err:.3g}, HF's own bf16 {hf_err:.3g}")
    assert 0 < hf_err < 0.1  # HF really ran in bf16, and bf16 is still a meaningful reference
    assert our_err <= 2 * hf_err


@pytest.fixture(scope="module")
def window128_ckpt(tmp_path_factory):
    """2 layers (sliding, full) with the real window of 128, both layouts (HF top level + original/)."""
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    cfg = make_tiny_cfg(num_hidden_layers=2, sliding_window=128)
    return write_checkpoint(tmp_path_factory.mktemp("w128") / "repo", cfg, layout="both", seed=5, shards=2)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_float32_match_hf_window_128(layout, window128_ckpt):
    model = our_model(window128_ckpt if layout == "hf" else window128_ckpt / "original")
    assert model.cfg.sliding_window == 128 and model.cfg.sliding_layers == (True, False)
    toks = np.random.default_rng(9).integers(0, model.cfg.vocab_size, (1, 400))  # > 3 windows
    err = rel_err(model(toks), hf_logits(hf_model(window128_ckpt), toks))
    print(f"\n[{layout}] window-128 float32 logits rel err vs HF: {err:.3g}")
    assert err <= LOGITS_TOL


def test_logits_in_query_blocks_match_hf(window128_ckpt):
    """`model(tokens)` longer than `prefill_chunk` runs attention over blocks of that many queries (bounded
    memory): blocks shorter than the window, a ragged last block, the same logits as transformers."""
    model = our_model(window128_ckpt, prefill_chunk=96)
    toks = np.random.default_rng(9).integers(0, model.cfg.vocab_size, (2, 400))  # 5 blocks, the last one short
    err = rel_err(model(toks), hf_logits(hf_model(window128_ckpt), toks))
    print(f"\nquery blocks of 96: float32 logits rel err vs HF: {err:.3g}")
    assert err <= LOGITS_TOL


@pytest.mark.parametrize("window", [0, 8])
def test_attention_blocks_bounded_by_score_budget(window):
    """Against a long cache the XLA path takes fewer queries per block (at most `budget` score elements, at
    least 8 queries): 40 queries over 100 keys (the last 5 empty slots) in 5 blocks of 8, same result."""
    B, T, S, K, G, H = 2, 40, 100, 2, 3, 16
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, H))
    k, v = jax.random.normal(ks[1], (B, S, K, H)), jax.random.normal(ks[2], (B, S, K, H))
    sinks = jax.random.normal(ks[3], (K, G))
    q_pos = jnp.tile(jnp.arange(T) + 55, (B, 1))
    k_pos = jnp.tile(jnp.arange(S), (B, 1)).at[:, 95:].set(-1)
    kw = {"window": window, "sm_scale": 0.25}
    want = attention_reference(q, k, v, sinks, q_pos, k_pos, **kw)

    def blocks(q):
        return attention_xla(q, k, v, sinks, q_pos, k_pos, block=512, budget=B * K * G * S, **kw)

    assert "length=5" in str(jax.make_jaxpr(blocks)(q))  # one query per block by budget, raised to 8
    assert rel_err(blocks(q), want) <= 1e-6


@pytest.mark.parametrize("window", [0, 8])
def test_attention_over_many_keys_visits_only_the_blocks_it_sees(window, monkeypatch):
    """Over many keys the XLA path runs an online softmax over blocks of `KV_BLOCK` keys (16 here), each block
    of queries visiting only the blocks its positions can see: a prefill chunk of 40 tokens against a cache of
    100 slots filled to 64 (row 1 to 50) gives the reference's result, and the slots past the filled blocks
    are never read (they hold NaN, which any product with them would spread)."""
    monkeypatch.setattr(sys.modules["gptoss_jax.kernels.attention"], "KV_BLOCK", 16)
    B, T, S, K, G, H = 2, 40, 100, 2, 3, 16
    ks = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, H))
    k, v = jax.random.normal(ks[1], (B, S, K, H)), jax.random.normal(ks[2], (B, S, K, H))
    sinks = jax.random.normal(ks[3], (K, G))
    filled = jnp.asarray([64, 50])
    q_pos = filled[:, None] - T + jnp.arange(T)
    k_pos = jnp.where(jnp.arange(S) < filled[:, None], jnp.arange(S), -1)
    kw = {"window": window, "sm_scale": 0.25}
    want = attention_reference(q, k, v, sinks, q_pos, k_pos, **kw)
    nan = jnp.arange(S)[None, :, None, None] >= 64
    got = attention_xla(q, jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v), sinks, q_pos, k_pos, **kw)
    assert "cond" in str(jax.make_jaxpr(lambda q: attention_xla(q, k, v, sinks, q_pos, k_pos, **kw))(q))
    assert rel_err(got, want) <= 1e-6
    # and it has a gradient (fine-tuning takes this path from 1024 tokens): the reference's
    real = (q_pos >= 0)[:, :, None, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v, sinks, q_pos, k_pos, **kw), 0.0) ** 2)

    g_want = jax.grad(functools.partial(loss, attention_reference), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(functools.partial(loss, attention_xla), argnums=(0, 1, 2)))(q, k, v)
    for got_, want_ in zip(g_got, g_want):
        assert rel_err(got_, want_) <= 1e-5


@pytest.mark.parametrize("ctx", [0, 8], ids=["no-cache", "ring"])
def test_sliding_attention_computes_only_the_window(ctx):
    """On a sliding layer with the chunk's own keys last (`aligned`), the XLA path gives each block of queries
    only the keys it can see: the ring before the chunk (unordered) plus block + window - 1 chunk keys, so the
    work is O(T * window). Same result as the dense reference over all keys; rows padded at the end."""
    B, T, K, G, H, W = 2, 150, 2, 3, 16, 8
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, H))
    k, v = jax.random.normal(ks[1], (B, ctx + T, K, H)), jax.random.normal(ks[2], (B, ctx + T, K, H))
    sinks = jax.random.normal(ks[3], (K, G))
    start = 37  # ring slots hold positions 29..36 in rotated order (slot = position % W)
    ring = jnp.asarray([(start - W + ((s - start) % W)) for s in range(ctx)], jnp.int32)
    q_pos = jnp.stack([jnp.arange(T) + start, jnp.where(jnp.arange(T) < T - 11, jnp.arange(T) + start, -1)])
    k_pos = jnp.concatenate([jnp.tile(ring, (B, 1)), q_pos], axis=1)
    kw = {"window": W, "sm_scale": 0.25}
    want = attention_reference(q, k, v, sinks, q_pos, k_pos, **kw)
    got = jax.jit(lambda q: attention_xla(q, k, v, sinks, q_pos, k_pos, block=64, aligned=T, **kw))
    real = np.asarray(q_pos >= 0)
    assert rel_err(np.asarray(got(q))[real], np.asarray(want)[real]) <= 1e-6
    jaxpr = str(jax.make_jaxpr(lambda q: attention_xla(q, k, v, sinks, q_pos, k_pos, block=64, aligned=T, **kw))(q))
    bq = 2 * W  # queries per block on a sliding layer: at most twice the window
    assert f"{ctx + bq + W - 1}" in jaxpr and f"{ctx + T}]" not in jaxpr.split("scan")[1]
