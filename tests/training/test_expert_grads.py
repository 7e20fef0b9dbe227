"""The expert computation's gradients: the grouped path's custom VJP against autodiff of the gather path.

Both paths compute the same math (`gptoss_jax/moe.py`); the gather path is plain jnp over a fixed-length
map, which JAX differentiates by itself, so its gradients are an independent reference for the custom VJP of
the grouped path (sorted rows, per-expert tiles, one expert dequantized at a time). Every input that can
carry a gradient is checked: the tokens, the routing weights, the biases, the dense weights (full
fine-tuning) and the per-expert adapters, with packed and with dequantized experts, in float32 (summation
order only: 1e-5) and bfloat16 (the roundings of the forward pass, where the two paths group their sums
differently: 3e-2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import rel_err

from gptoss_jax.moe import (
    LORA_LEAVES,
    STACKED_LEAVES,
    local_experts,
    moe_experts_gather,
    moe_experts_grouped,
    moe_experts_xla,
    own_layer,
)
from gptoss_jax.mxfp4 import dequantize

T, D, F, E, X, R = 24, 64, 96, 5, 3, 4
KW = dict(alpha=1.702, limit=7.0)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def inputs(dtype, dense: bool, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 12)
    p = {
        "mlp1_blocks": jax.random.randint(ks[0], (E, 2 * F, D // 32, 16), 0, 256).astype(jnp.uint8),
        "mlp1_scales": jax.random.randint(ks[1], (E, 2 * F, D // 32), 122, 125).astype(jnp.uint8),
        "mlp2_blocks": jax.random.randint(ks[2], (E, D, F // 32, 16), 0, 256).astype(jnp.uint8),
        "mlp2_scales": jax.random.randint(ks[3], (E, D, F // 32), 122, 125).astype(jnp.uint8),
        "mlp1_bias": jax.random.normal(ks[4], (E, 2 * F)).astype(dtype),
        "mlp2_bias": jax.random.normal(ks[5], (E, D)).astype(dtype),
    }
    if dense:
        for n in ("mlp1", "mlp2"):
            p[f"{n}_weight"] = dequantize(p.pop(f"{n}_blocks"), p.pop(f"{n}_scales"), dtype)
    shapes = [(E, R, D), (E, 2 * F, R), (E, R, F), (E, D, R)]
    for n, k, s in zip(LORA_LEAVES, ks[6:10], shapes, strict=True):
        p[n] = 0.1 * jax.random.normal(k, s, jnp.float32)
    x = jax.random.normal(ks[10], (T, D)).astype(dtype)
    vals, idx = jax.lax.top_k(jax.random.normal(ks[11], (T, E)), X)
    idx = idx.at[3, 0].set(-1)  # a remote expert (expert parallelism): contributes nothing, gets no gradient
    return x, idx.astype(jnp.int32), jax.nn.softmax(vals).astype(dtype), p


def loss(fn, x, idx, w, p):
    y = fn(x, idx, w, p, **KW).astype(jnp.float32)
    return jnp.sum(jnp.sin(y) * jnp.linspace(-1, 1, D))


@functools.partial(jax.jit, static_argnums=0)
def grads(fn, x, idx, w, p):
    floats = {n: a for n, a in p.items() if jnp.issubdtype(a.dtype, jnp.floating)}
    rest = {n: a for n, a in p.items() if n not in floats}
    return jax.grad(lambda x, w, fl: loss(fn, x, idx, w, fl | rest), argnums=(0, 1, 2))(x, w, floats)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dense", [False, True], ids=["packed", "dequantized"])
def test_grouped_custom_vjp_matches_autodiff_of_the_gather_path(dtype, dense):
    x, idx, w, p = inputs(dtype, dense)
    gx, gw, gp = grads(moe_experts_grouped, x, idx, w, p)
    rx, rw, rp = grads(moe_experts_gather, x, idx, w, p)
    tol = TOL[dtype]
    assert rel_err(gx.astype(jnp.float32), rx.astype(jnp.float32)) < tol
    assert rel_err(gw.astype(jnp.float32), rw.astype(jnp.float32)) < tol
    assert float(gw[3, 0]) == 0.0  # the remote selection
    assert set(gp) == set(rp) and ("mlp1_weight" in gp) == dense
    for n in gp:
        assert rel_err(gp[n].astype(jnp.float32), rp[n].astype(jnp.float32)) < tol, n


@pytest.mark.parametrize("fn", [moe_experts_gather, moe_experts_grouped], ids=["gather", "grouped"])
@pytest.mark.parametrize("dense", [False, True], ids=["packed", "dequantized"])
def test_a_layer_read_from_its_stack_equals_its_own_arrays(fn, dense):
    """Inside the layer scan the weight leaves are whole stacks with the layer in p["layer"] (`expert_leaf`):
    the output and every gradient equal those of the layer's own arrays, and a stacked dense weight's
    gradient is the layer's gradient at its index, zero at the other layers."""
    x, idx, w, p = inputs(jnp.float32, dense)
    L, r = 3, 1
    stacked = p | {n: jnp.stack([jnp.roll(p[n], s + 1, axis=0) if s != r else p[n] for s in range(L)])
                   for n in STACKED_LEAVES if n in p} | {"layer": jnp.int32(r)}  # fmt: skip
    assert all(np.array_equal(a, p[n]) for n, a in own_layer(stacked).items())
    assert np.array_equal(fn(x, idx, w, stacked, **KW), fn(x, idx, w, p, **KW))
    gx, gw, gp = grads(fn, x, idx, w, stacked)
    rx, rw, rp = grads(fn, x, idx, w, p)
    assert np.array_equal(gx, rx) and np.array_equal(gw, rw)
    assert set(gp) == set(rp)
    for n in gp:
        got = gp[n][r] if n in STACKED_LEAVES else gp[n]
        assert np.array_equal(got, rp[n]), n
        if n in STACKED_LEAVES:
            assert not np.any(np.delete(np.asarray(gp[n]), r, axis=0)), n


def test_adapters_only_do_not_differentiate_the_weights():
    """With symbolic zeros the backward pass computes only what is differentiated: adapters alone give
    adapter gradients equal to those of the full gradient."""
    x, idx, w, p = inputs(jnp.float32, True)
    full = grads(moe_experts_grouped, x, idx, w, p)[2]
    frozen = {n: a for n, a in p.items() if n not in LORA_LEAVES}

    @jax.jit
    def only(lora):
        return jax.grad(lambda lo: loss(moe_experts_grouped, x, idx, w, frozen | lo))(lora)

    got = only({n: p[n] for n in LORA_LEAVES})
    for n in LORA_LEAVES:
        assert rel_err(got[n], full[n]) < 1e-6, n


def test_zero_adapters_change_nothing_and_the_kernels_defer_to_the_xla_path():
    x, idx, w, p = inputs(jnp.float32, False)
    base = {n: a for n, a in p.items() if n not in LORA_LEAVES}
    zero = base | {n: jnp.zeros_like(p[n]) if n.endswith("_b") else p[n] for n in LORA_LEAVES}
    want = moe_experts_xla(x, idx, w, base, **KW)
    assert np.array_equal(moe_experts_xla(x, idx, w, zero, **KW), want)
    assert np.array_equal(
        moe_experts_gather(x, idx, w, zero, **KW), moe_experts_gather(x, idx, w, base, **KW)
    )
    # the Pallas kernels have no low-rank term: with adapters the dispatcher runs the XLA path
    got = local_experts(x, idx, w, p, impl="pallas", interpret=True, **KW)
    assert np.array_equal(got, moe_experts_xla(x, idx, w, p, **KW))
