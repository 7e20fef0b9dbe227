"""MXFP4 (OCP microscaling, E2M1 values with one E8M0 scale per 32) as stored by gpt-oss.

Layout (spec §4): `blocks` uint8 (..., rows, G, 16) holds 32 FP4 codes per group, two per byte, the LOW
nibble first; `scales` uint8 (..., rows, G) is a biased power of two, 2**(s - 127). Groups run along the
last (contraction) axis, so a row of a weight `(out, in)` is `in / 32` groups.

Dequantization is exact in bf16 (every fp4 value times a power of two fits bf16's 8-bit exponent), so we
build the result in float32 and cast once. Decoding uses integer ops and float multiplies only (no fp4
dtype), which is what TPUs without fp4 support need too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import MXFP4_BLOCK

BLOCK = MXFP4_BLOCK  # elements per E8M0 scale
GROUP_BYTES = BLOCK // 2  # two E2M1 codes per byte
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_LUT = np.array(FP4_VALUES, dtype=np.float32)


# The one codec of the package: the XLA path, the Pallas kernels (inside the kernel body: compares, selects,
# shifts and a bitcast only, which Mosaic and Triton lower) and --verify all decode with these two.
def fp4_to_f32(codes: jax.Array) -> jax.Array:
    """E2M1 codes (0..15, any int dtype) -> float32 without a gather or an fp4 dtype.

    Bit 3 is the sign, bits 2..1 the exponent e, bit 0 the mantissa m: e == 0 -> 0.5*m, else (1+m/2)*2**(e-1).
    """
    codes = codes.astype(jnp.int32)
    e = (codes >> 1) & 3
    m = (codes & 1).astype(jnp.float32)
    pow2 = jnp.where(e == 3, 4.0, jnp.where(e == 2, 2.0, 1.0))
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * pow2)
    return jnp.where((codes & 8) != 0, -mag, mag)


def e8m0_to_f32(scales: jax.Array) -> jax.Array:
    """E8M0 byte -> 2**(s-127) as float32, by writing the exponent field directly (exact, no exp2).

    s == 0 gives 2**-127, a float32 subnormal; the bit pattern of 2**-126 would be wrong, so it is a constant.
    """
    s = scales.astype(jnp.int32)
    f = jax.lax.bitcast_convert_type(jnp.maximum(s, 1) << 23, jnp.float32)
    return jnp.where(s == 0, jnp.float32(2.0**-127), f)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """(..., rows, G, 16) uint8 + (..., rows, G) uint8 -> (..., rows, G*32) `dtype`."""
    lo = fp4_to_f32(blocks & 0x0F)
    hi = fp4_to_f32(blocks >> 4)
    vals = jnp.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)  # low nibble is the even element
    vals = vals * e8m0_to_f32(scales)[..., None]
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK).astype(dtype)


# ------------------------------------------------------------------------------------------- numpy side
def dequantize_np(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """numpy twin of `dequantize`, used by loaders and tests (same LUT + ldexp as the reference)."""
    lo = FP4_LUT[blocks & 0x0F]
    hi = FP4_LUT[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK).astype(dtype)


def quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (..., rows, cols) -> (blocks, scales) in the checkpoint layout (round to nearest FP4 value).

    Used to write synthetic checkpoints; the scale of each group is chosen so its max |w| maps to <= 6.
    """
    w = np.asarray(w, dtype=np.float32)
    *pre, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"last dimension {cols} is not a multiple of {BLOCK}")
    g = w.reshape(*pre, cols // BLOCK, BLOCK)
    amax = np.abs(g).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    scaled = g / np.ldexp(np.float32(1.0), exp)[..., None]
    codes = np.abs(scaled[..., None] - FP4_LUT).argmin(axis=-1).astype(np.uint8)  # ties: first (+0 over -0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, (exp + 127).astype(np.uint8)
