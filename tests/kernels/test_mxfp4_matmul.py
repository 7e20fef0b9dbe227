"""MXFP4 MoE kernels vs `moe_experts_reference` on random packed weights, in Pallas interpret mode on CPU.

Both lowerings are interpreted ("tpu": Mosaic grouped matmul with VMEM-resident dequantized weights; "gpu":
Triton per-group dequantization). Tiles are shrunk so a handful of tokens spans several row tiles per expert
and several column tiles, some partial (2F = 192 with 128-row mlp1 tiles, D = 96 with 64-column mlp2
tiles); E = 5 > T*X on the decode case leaves experts without tokens. Hidden and expert sizes differ
(D = 64 or 96, F = 96) so a swapped axis cannot pass.

Tolerances (relative Frobenius norm): the kernel rounds exactly where the reference does (each matmul, each
bias add, the SwiGLU output, the combine), so the only difference is the f32 summation order of the dots
(the kernel sums the low- and high-nibble halves separately): ~1e-7 relative per dot in float32 -> 1e-5.
In bfloat16 that order can flip a rounding of an intermediate by one bf16 ulp (2**-8 relative), which then
propagates through mlp2 -> 1e-2; a wrong nibble, scale, bias or SwiGLU detail moves outputs by O(1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import rel_err

from gptoss_jax.kernels.mxfp4_matmul import (
    BlockSizes,
    moe_experts_pallas,
    moe_experts_reference,
    route,
)
from gptoss_jax.moe import local_experts, moe_experts_xla
from gptoss_jax.mxfp4 import FP4_LUT, e8m0_to_f32, fp4_to_f32

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}
ALPHA, LIMIT = 1.702, 7.0


def moe_inputs(T, D, F, E, X, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    # Scales 2**-5 .. 2**-3: with |fp4| <= 6 the pre-activations are O(1..10), so some gates pass the clamp
    # at LIMIT and most do not (all-clamped activations would hide errors in mlp1).
    params = dict(
        mlp1_blocks=jax.random.randint(ks[0], (E, 2 * F, D // 32, 16), 0, 256).astype(jnp.uint8),
        mlp1_scales=jax.random.randint(ks[1], (E, 2 * F, D // 32), 122, 125).astype(jnp.uint8),
        mlp1_bias=jax.random.normal(ks[2], (E, 2 * F)).astype(dtype),
        mlp2_blocks=jax.random.randint(ks[3], (E, D, F // 32, 16), 0, 256).astype(jnp.uint8),
        mlp2_scales=jax.random.randint(ks[4], (E, D, F // 32), 122, 125).astype(jnp.uint8),
        mlp2_bias=jax.random.normal(ks[5], (E, D)).astype(dtype),
    )
    x = jax.random.normal(ks[6], (T, D)).astype(dtype)
    vals, idx = jax.lax.top_k(jax.random.normal(ks[7], (T, E)), X)
    return x, idx.astype(jnp.int32), jax.nn.softmax(vals).astype(dtype), params


def jit(fn, **static):
    return jax.jit(functools.partial(fn, **static))


CASES = [
    # backend, T, D, dtype, block sizes
    ("tpu", 1, 64, F32, BlockSizes(tm=16, tn1=64, tn2=32, decode_tm=8, decode_max_tokens=4)),  # decode tiles
    ("tpu", 13, 96, F32, BlockSizes(tm=8, tn1=128, tn2=64, decode_max_tokens=4)),  # partial; 2+ tiles/expert
    ("tpu", 6, 64, BF16, BlockSizes(tm=8, tn1=192, tn2=64, decode_tm=8, decode_max_tokens=8)),
    ("gpu", 2, 64, F32, BlockSizes(tq=16, tn2=32, decode_tm=16, decode_max_tokens=4)),  # decode tiles
    ("gpu", 13, 96, BF16, BlockSizes(tm=16, tq=32, tn2=64, decode_max_tokens=4)),  # partial tiles
]


@pytest.mark.parametrize("backend,T,D,dtype,bs", CASES,
                         ids=[f"{c[0]}-T{c[1]}-D{c[2]}-{jnp.dtype(c[3]).name}" for c in CASES])  # fmt: skip
def test_moe_kernel_matches_reference(backend, T, D, dtype, bs):
    F, E, X = 96, 5, 3
    x, idx, w, p = moe_inputs(T, D, F, E, X, dtype)
    kw = dict(alpha=ALPHA, limit=LIMIT)
    got = jit(moe_experts_pallas, block_sizes=bs, backend=backend, interpret=True, **kw)(x, idx, w, p)
    want = jit(moe_experts_reference, **kw)(x, idx, w, p)
    assert got.shape == (T, D) and got.dtype == dtype
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_moe_kernel_ignores_other_devices_experts(backend):
    """Under expert parallelism each device sees global ids shifted into its range: ids outside [0, E) must
    add nothing (and cost no tile), equal to the reference with those selections' weights set to zero."""
    T, D, F, E, X = 7, 64, 96, 5, 3
    x, idx, w, p = moe_inputs(T, D, F, E, X, F32, seed=3)
    shifted = idx - 2  # local experts 0..2 of a device holding global experts 2..6; ids < 0 are not ours
    shifted = shifted.at[0, 0].set(E + 1)  # and one beyond the local range
    mine = (shifted >= 0) & (shifted < E)
    assert bool(mine.any()) and not bool(mine.all())
    kw = dict(alpha=ALPHA, limit=LIMIT)
    bs = BlockSizes(tm=16, tn1=64, tn2=32, tq=16, decode_max_tokens=4)
    got = jit(moe_experts_pallas, block_sizes=bs, backend=backend, interpret=True, **kw)(x, shifted, w, p)
    want = jit(moe_experts_reference, **kw)(x, jnp.where(mine, shifted, 0), jnp.where(mine, w, 0), p)
    assert rel_err(got, want) < TOL[F32]
    assert int(route(shifted, E, 16).num_tiles[0]) <= -(-int(mine.sum()) // 16) + E


def test_reference_matches_numpy():
    """The oracle itself against a float64 numpy model of one token (LUT decoding, clamped SwiGLU with +1)."""
    T, D, F, E, X = 2, 64, 64, 4, 2
    x, idx, w, p = moe_inputs(T, D, F, E, X, F32, seed=5)
    got = np.asarray(jit(moe_experts_reference, alpha=ALPHA, limit=LIMIT)(x, idx, w, p))

    def deq(blocks, scales):
        codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
        vals = FP4_LUT[codes].astype(np.float64) * np.exp2(scales.astype(np.float64) - 127)[..., None]
        return vals.reshape(blocks.shape[0], -1)

    pn = {k: np.asarray(v) for k, v in p.items()}
    xn, idx, w = np.asarray(x, np.float64), np.asarray(idx), np.asarray(w, np.float64)  # numpy from here on
    for t in range(T):
        out = np.zeros(D)
        for j in range(X):
            e = int(idx[t, j])
            h = deq(pn["mlp1_blocks"][e], pn["mlp1_scales"][e]) @ xn[t] + pn["mlp1_bias"][e]
            gate, lin = np.minimum(h[0::2], LIMIT), np.clip(h[1::2], -LIMIT, LIMIT)
            a = gate / (1 + np.exp(-ALPHA * gate)) * (lin + 1)
            o = deq(pn["mlp2_blocks"][e], pn["mlp2_scales"][e]) @ a + pn["mlp2_bias"][e]
            out += float(w[t, j]) * o
        np.testing.assert_allclose(got[t], out, rtol=1e-4, atol=1e-4 * np.abs(out).max())


def test_in_kernel_decoding_is_exact():
    """The one codec (mxfp4.fp4_to_f32: compares and selects, no table; e8m0_to_f32: exponent bits), which the
    kernels decode with, is exact for every code."""
    np.testing.assert_array_equal(np.asarray(fp4_to_f32(jnp.arange(16, dtype=jnp.int32))), FP4_LUT)
    s = np.arange(255, dtype=np.int32)  # 255 is NaN in E8M0 (and 2**128 overflows f32): never a real scale
    np.testing.assert_array_equal(np.asarray(e8m0_to_f32(jnp.asarray(s))), np.ldexp(np.float32(1), s - 127))


def test_route_groups_pairs_by_expert_in_whole_tiles():
    T, X, E, tm = 7, 3, 5, 4
    idx = jax.random.randint(jax.random.key(2), (T, X), 0, E).astype(jnp.int32)
    rt = route(idx, E, tm)
    rows = np.asarray(rt.pair_row)
    assert len(set(rows.ravel().tolist())) == T * X  # every pair its own row
    te, nt = np.asarray(rt.tile_expert), int(rt.num_tiles[0])
    sizes = np.bincount(np.asarray(idx).ravel(), minlength=E)
    assert nt == sum(-(-n // tm) for n in sizes) <= rt.num_tiles_max  # only tiles that hold tokens
    for t in range(T):
        for j in range(X):
            assert te[rows[t, j] // tm] == idx[t, j]  # the pair's tile belongs to its expert
            assert np.asarray(rt.row_token)[rows[t, j]] == t


def test_dispatcher_auto_is_the_xla_path_on_cpu():
    T, D, F, E, X = 3, 64, 96, 5, 3
    x, idx, w, p = moe_inputs(T, D, F, E, X, F32, seed=3)
    kw = dict(alpha=ALPHA, limit=LIMIT)
    want = jit(moe_experts_xla, **kw)(x, idx, w, p)
    np.testing.assert_array_equal(jit(local_experts, impl="auto", **kw)(x, idx, w, p), want)


@pytest.mark.parametrize("T", [1, 13], ids=["gather", "grouped"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_reference_matches_the_models_xla_path(T, dtype):
    """The oracle and the model's XLA expert path (`gptoss_jax.moe`: the gather path for fewer pairs than
    experts, else the grouped path) compute the same math; they differ only in summation order (the combine)."""
    D, F, E, X = 64, 96, 5, 3
    x, idx, w, p = moe_inputs(T, D, F, E, X, dtype, seed=7)
    kw = dict(alpha=ALPHA, limit=LIMIT)
    got = jit(moe_experts_xla, **kw)(x, idx, w, p)
    assert rel_err(got, jit(moe_experts_reference, **kw)(x, idx, w, p)) < TOL[dtype]
