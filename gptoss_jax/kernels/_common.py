"""Small helpers shared by the kernels: platform choice, padding, integer arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# `pl.squeezed` replaced `None` as the marker of a squeezed block dimension; older versions only know None.
SQUEEZED = getattr(pl, "squeezed", None)


class KernelNotApplicable(ValueError):
    """Raised at trace time for shapes a kernel cannot tile; the dispatchers fall back to the reference."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# Backends (jax.default_backend() names) on which impl="auto" picks the Pallas kernels. A backend goes in
# only after tests/kernels passes there compiled (not interpreted) and benchmarks/gpu_bench.py (or a TPU run)
# shows the kernels beating XLA; until then "auto" means XLA everywhere. See docs/kernels.md.
VALIDATED_PLATFORMS: frozenset[str] = frozenset()


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """"auto" -> "pallas" on a validated backend (VALIDATED_PLATFORMS), else "xla"; "xla"/"pallas" pass."""
    if impl == "auto":
        return "pallas" if (backend or jax.default_backend()) in VALIDATED_PLATFORMS else "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown impl {impl!r}; expected 'xla', 'pallas' or 'auto'")
    return impl


def kernel_platform(interpret: bool | None) -> tuple[str, bool]:
    """Which kernel variant to build ("tpu": Mosaic, "gpu": Triton) and whether to interpret it.

    interpret=None means "interpret only where nothing can be compiled", i.e. on CPU, where we interpret the
    TPU variant (tests interpret both). An explicit False is honoured even on CPU: that is how the tests
    export the real Mosaic / Triton lowerings from this machine.
    """
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu", bool(interpret)
    if backend == "tpu":
        return "tpu", bool(interpret)
    return "tpu", True if interpret is None else bool(interpret)


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` at the end of `axis` up to `size` with `value` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
