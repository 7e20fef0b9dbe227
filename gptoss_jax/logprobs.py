"""Log-probabilities of given tokens under the model, a chunk of positions at a time.

`chunked_log_probs` is the one place the model's output distribution is scored: inspection's `log_probs` /
`score`, the server's prompt log-probabilities (`echo` with `logprobs`) and the training loss all call it.
The logits are those of `model.logits` (rounded to the compute dtype, then float32), computed for `chunk`
positions at a time, so the (B, T, V) logits never exist at once; under differentiation each chunk's logits
are recomputed in the backward pass instead of kept (the same bound on memory for their gradient).
log p(t) = z_t - logsumexp(z).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .model import unembed


def chunked_log_probs(h, unembedding, targets, *, chunk: int, top: int | None = None):
    """h (B,T,D) final-normed hidden states, unembedding (V,D), targets (B,T) int -> float32 (B,T): log p of
    each target under the logits of its position. top (static, an int): also the `top` most likely tokens
    of each position, ids (B,T,top) int32 and log-probs (B,T,top) float32 -> (log p, ids, log-probs).

    Chunks run along T (a batch split over `data` stays split), `chunk` positions each; T is padded to whole
    chunks and the padding cut off again.
    """
    B, T, _ = h.shape
    c = max(1, min(int(chunk), T))
    n = -(-T // c)

    def one(xs):
        hc, tc = xs
        z = unembed(hc, unembedding)
        lse = jax.nn.logsumexp(z, axis=-1)
        out = (jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0] - lse,)
        if top is not None:
            top_z, ids = jax.lax.top_k(z, top)
            out += (ids.astype(jnp.int32), top_z - lse[..., None])
        return out

    if n == 1:  # one chunk: nothing to map, nothing to recompute
        out = one((h, targets))
    else:
        pad = n * c - T

        def chunks(a):
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0)

        out = jax.lax.map(jax.checkpoint(one), (chunks(h), chunks(targets)))
        out = tuple(jnp.moveaxis(a, 0, 1).reshape(B, n * c, *a.shape[3:])[:, :T] for a in out)
    return out[0] if top is None else out
