"""The training loss: the model's own forward pass (`model.apply`) with the adapters as its per-layer transform
(`lora.Adapters`) and remat per layer, then the cross-entropy of the trained positions (`logprobs`), a chunk
of positions at a time so the (tokens x vocabulary) logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import Config
from ..logprobs import chunked_log_probs
from ..lora import Adapters, LoraConfig
from ..model import apply
from ..ops import F32

LOSS_CHUNK_LOGITS = 1 << 26  # float32 logits per cross-entropy chunk (256 MiB), and as many for their gradient


def loss_sums(
    params: dict, adapters: dict, batch: dict, cfg: Config, lcfg: LoraConfig | None, *, remat: bool = True
) -> tuple[jax.Array, jax.Array]:
    """(summed token loss, number of trained tokens) of a batch: tokens, positions (B,T); loss_pos (B,K) the
    positions whose next token carries loss, targets (B,K) those tokens, weights (B,K) 0 for padding
    entries (`data.Rows.batch`). Only those K positions go through the unembedding.

    params: the model's parameters by name (`model.model_params`); adapters: LoRA's arrays with lcfg, or {}
    with lcfg None (full fine-tuning: `params` holds the trained weights). remat: each layer keeps only its
    input for the backward pass. Attention and experts take the XLA path whatever the config says: the
    Pallas kernels have no backward pass.
    """
    cfg = cfg.replace(attention_impl="xla", moe_impl="xla")
    hooks = None if lcfg is None else Adapters(adapters, cfg, lcfg)
    h = apply(params, cfg, batch["tokens"], batch["positions"], hooks=hooks, remat=remat)[0]
    h = jnp.take_along_axis(h, batch["loss_pos"][..., None], axis=1)
    chunk = max(1, LOSS_CHUNK_LOGITS // max(1, h.shape[0] * params["unembedding"].shape[0]))
    logp = chunked_log_probs(h, params["unembedding"], batch["targets"], chunk=chunk)
    w = batch["weights"].astype(F32)
    return jnp.sum(-logp * w), jnp.sum(w)
