"""Choosing the next token: greedy, or sampled with per-row settings and per-row random keys.

Every setting is per row, so rows of one batch (or the serving engine's requests) each sample as they
would alone: a row's draw depends only on its own key, logits and settings. The order follows Hugging Face
transformers' `generate` (its logits processors, then its warpers): repetition penalty, then temperature,
top-k, top-p, min-p.

- repetition penalty (CTRL, as transformers' `RepetitionPenaltyLogitsProcessor`): the logit of every token
  already seen in the row (prompt or output) is divided by `penalty` if positive, multiplied if negative;
  1.0 is off.
- temperature: logits / t; t == 0 means greedy (argmax of the penalized logits).
- top-k: keep the k largest logits (0 = off). top-p: keep the smallest set of most likely tokens whose mass
  reaches p (1.0 = off; the most likely token always stays). min-p: keep tokens whose probability is at
  least min_p times the most likely one's (0 = off).
- allowed-token mask (constrained decoding): disallowed tokens get -inf before everything above but the
  penalty; `pack_mask` / `unpack_mask` carry it as bits.
- log-probabilities (`token_logprobs`): of the model's own distribution, before any of the above.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row settings, each a (B,) array (see the module docstring for their meaning)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def create(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
        """Scalars or per-row sequences -> (B,) arrays; ValueError naming a setting out of range."""
        check(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              repetition_penalty=repetition_penalty)  # fmt: skip

        def rows(v, dt):
            a = np.asarray(v, dt)
            return jnp.asarray(np.broadcast_to(a, (batch,)) if a.ndim == 0 else a)

        return cls(rows(temperature, np.float32), rows(top_k, np.int32), rows(top_p, np.float32),
                   rows(min_p, np.float32), rows(repetition_penalty, np.float32))  # fmt: skip


def check(**settings) -> None:
    """ValueError naming the first setting out of range (scalars or sequences)."""
    bounds = {"temperature": (0.0, None, "a number >= 0"), "top_k": (0, None, "an integer >= 0"),
              "top_p": (0.0, 1.0, "in (0, 1]"), "min_p": (0.0, 1.0, "in [0, 1]"),
              "repetition_penalty": (0.0, None, "a number > 0")}  # fmt: skip
    for name, value in settings.items():
        lo, hi, what = bounds[name]
        for v in np.atleast_1d(np.asarray(value, dtype=object)).tolist():
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            ok = ok and np.isfinite(float(v)) and (name != "top_k" or float(v).is_integer())
            if ok:
                v = float(v)
                ok = v >= lo and (hi is None or v <= hi)
                ok = ok and not (name in ("top_p", "repetition_penalty") and v == 0.0)
            if not ok:
                raise ValueError(f"{name} must be {what}, got {v!r}")


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Repetition penalty on (B,V) logits for the tokens `seen` (B,V) bool."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def filter_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature, top-k, top-p and min-p on (B,V) float32 logits: the kept ones scaled, others -inf."""
    logits = logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]  # one sort serves top-k and top-p
    V = logits.shape[-1]
    kth = jnp.take_along_axis(srt, (jnp.clip(sp.top_k, 1, V) - 1)[:, None], axis=-1)
    kth = jnp.where(sp.top_k[:, None] > 0, kth, -jnp.inf)
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    probs = jax.nn.softmax(srt, axis=-1)
    # the first token always survives; 1.0 is off (a float cumsum may reach 1 before the tail)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < sp.top_p[:, None]) | (sp.top_p[:, None] >= 1.0)
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    # min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p), whatever else was removed
    floor = srt[:, :1] + jnp.log(jnp.maximum(sp.min_p, 1e-30))[:, None]
    floor = jnp.where(sp.min_p[:, None] > 0, floor, -jnp.inf)
    return jnp.where((logits < jnp.maximum(jnp.maximum(kth, cutoff), floor)), -jnp.inf, logits)


def sample(logits: jax.Array, keys: jax.Array, sp: SamplingParams, *, greedy: bool = False,
           seen: jax.Array | None = None, allowed: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """(B,V) float32 logits, (B,) keys -> (B,) int32 tokens.

    greedy=True (static) skips the sampling math for a batch known to be all greedy; otherwise rows with
    temperature 0 still take the argmax, and the sort over the vocabulary runs only when some sampling row
    filters (top-k, top-p or min-p).
    `seen` (B,V) bool enables the repetition penalty; `allowed` (B,V) bool restricts each row to its allowed
    tokens (constrained decoding; every row must allow at least one).
    """
    if seen is not None:
        logits = penalize(logits, seen, sp.repetition_penalty)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best

    def draw(filtered: bool):
        scaled = filter_logits(logits, sp) if filtered else logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    # the sort over the vocabulary (201k entries) only when some sampling row uses top-k, top-p or min-p
    filters = jnp.any((sp.temperature > 0) & ((sp.top_k > 0) | (sp.top_p < 1.0) | (sp.min_p > 0)))
    drawn = jax.lax.cond(jnp.any(sp.temperature > 0),
                         lambda: jax.lax.cond(filters, lambda: draw(True), lambda: draw(False)),
                         lambda: best)  # fmt: skip
    return jnp.where(sp.temperature > 0, drawn, best)


def token_logprobs(logits: jax.Array, tokens: jax.Array, n_top: int):
    """Log-probabilities under the model's own distribution (log-softmax of the raw (B,V) logits, before any
    penalty, temperature, filter or mask): of `tokens` (B,) -> (B,), and the `n_top` (static) most likely
    tokens -> ids (B, n_top) int32, log-probs (B, n_top)."""
    lp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if n_top == 0:
        return chosen, jnp.zeros((lp.shape[0], 0), jnp.int32), jnp.zeros((lp.shape[0], 0), F32)
    top_lp, top_ids = jax.lax.top_k(lp, n_top)
    return chosen, top_ids.astype(jnp.int32), top_lp


def pack_mask(allowed: np.ndarray) -> np.ndarray:
    """(..., V) bool -> (..., ceil(V/8)) uint8 bits (a V-wide mask costs V/8 bytes to send each step)."""
    return np.packbits(np.asarray(allowed, bool), axis=-1)


def unpack_mask(bits: jax.Array, vocab: int) -> jax.Array:
    """The inverse of `pack_mask` on device: (B, ceil(V/8)) uint8 -> (B, V) bool."""
    return jnp.unpackbits(bits, axis=-1, count=vocab).astype(bool)


# The key rule, in one place: a request with seed s draws its token i with fold_in(request_key(s), i), whatever
# else is batched with it; `generate` and the serving engine both follow it, which is why a seeded request
# gets the same tokens from either.
def request_key(seed: int) -> jax.Array:
    """The key a request with this seed samples with: fold_in(key(seed), 0)."""
    return jax.random.fold_in(jax.random.key(int(seed)), 0)


def step_keys(keys: jax.Array, i) -> jax.Array:
    """(B,) keys -> the (B,) keys of step i (an int, or one per row): fold_in(key, i)."""
    i = jnp.broadcast_to(jnp.asarray(i, jnp.int32), keys.shape)
    return jax.vmap(jax.random.fold_in)(keys, i)


def row_keys(seed, batch: int) -> jax.Array:
    """(B,) random keys: an int seed gives row b the key fold_in(key(seed), b), so rows differ; a sequence
    gives row b the key of its own seed (`request_key`), so a row samples as it would alone."""
    seeds = np.atleast_1d(np.asarray(seed, dtype=object))
    if seeds.ndim != 1 or (len(seeds) != 1 and len(seeds) != batch):
        raise ValueError(f"seed must be an integer or one per prompt ({batch}), got {seed!r}")
    for s in seeds.tolist():
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {s!r}")
    if len(seeds) == 1 and np.ndim(seed) == 0:
        base = jax.random.key(int(seeds[0]))
        return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))
    return jnp.stack([request_key(s) for s in seeds.tolist()])
