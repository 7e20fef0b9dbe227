"""Small pure-jnp pieces of math shared by the XLA path (`model.py`, `moe.py`) and the Pallas kernels.

One copy each: the precision rule, the matmul that accumulates in float32 and rounds once, the bias add
rounded once, the clamped SwiGLU, and the grouping of (token, expert) pairs by expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def precision(dtype):
    """float32 mode means true float32 matmuls on every backend (XLA HIGHEST, Mosaic fp32 passes, Triton
    "ieee"; TPU and GPU default to bf16 / tf32 passes otherwise). bf16 takes the native MXU / tensor-core
    path, which accumulates in float32 anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def einsum(spec: str, a, b, dtype):
    """einsum with float32 accumulation, rounded once to `dtype` (what cuBLAS does in the reference)."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision(dtype)).astype(dtype)


def round_add(h: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """A separate bias add in `dtype`: computed in f32 and rounded once (as torch's bf16 add does)."""
    return (h.astype(F32) + b.astype(F32)).astype(dtype)


def swiglu(gate: jax.Array, lin: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU, in the inputs' dtype: the gate is clamped from above only, the linear half
    to [-limit, limit] and shifted by +1. The XLA path calls it in the model dtype (where the reference
    rounds); the kernels call it on float32 accumulators and round afterwards."""
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return (gate * jax.nn.sigmoid(alpha * gate) * (lin + 1)).astype(gate.dtype)


def group_by_expert(expert_idx: jax.Array, num_experts: int):
    """(token, expert) pairs (T, X) sorted by expert, stably.

    Returns (order, sizes, starts): `order` (T*X,) are flat pair indices sorted by expert (pair p is token
    p // X); `sizes` (E,) pairs per expert; `starts` (E,) the offset of each expert's first pair in `order`.
    Pairs whose expert is outside [0, E) (another device's experts under expert parallelism) sort last and
    belong to no expert.
    """
    flat = expert_idx.reshape(-1).astype(jnp.int32)
    key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order, sizes, jnp.cumsum(sizes) - sizes
