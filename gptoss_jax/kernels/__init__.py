"""Pallas kernels for gpt-oss, one file per op, each beside its plain-jnp reference.

- `attention.py`: prefill flash attention and cache decode attention (sinks, sliding window, GQA).
- `mxfp4_matmul.py`: MoE experts as grouped matmuls over packed MXFP4 weights (decode and prefill tiles).
- `_common.py`: `resolve_impl` ("auto" -> the kernels only on validated backends), platform choice, padding.

`attention` is the dispatcher the model calls for attention (impl "xla" | "pallas" | "auto"): the kernels or
the XLA path beside them. The experts' dispatcher is `gptoss_jax.moe.local_experts`, beside the XLA expert
path it falls back to. On CPU "pallas" runs the kernels in interpret mode. Note `kernels.attention` is the
dispatcher function; import the module's other names with `from gptoss_jax.kernels.attention import ...`.
"""

from ._common import VALIDATED_PLATFORMS, KernelNotApplicable, resolve_impl
from .attention import (
    BlockSizes,
    attention,
    attention_reference,
    attention_xla,
    decode_attention,
    flash_attention,
)
from .mxfp4_matmul import BlockSizes as MoEBlockSizes
from .mxfp4_matmul import moe_experts_pallas, moe_experts_reference

__all__ = [
    "VALIDATED_PLATFORMS",
    "BlockSizes",
    "KernelNotApplicable",
    "MoEBlockSizes",
    "attention",
    "attention_reference",
    "attention_xla",
    "decode_attention",
    "flash_attention",
    "moe_experts_pallas",
    "moe_experts_reference",
    "resolve_impl",
]
