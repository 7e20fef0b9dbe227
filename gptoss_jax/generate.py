"""KV-cached generation: chunked prefill, then a jitted decode loop that runs on device.

Prompts of different lengths are LEFT-padded to one length so every row writes the cache at the same
global index; each row's logical positions start at 0 at its first real token (padding gets negative
positions, which the attention mask never lets a real token see). So a batch gives the same tokens as
each prompt alone.

Cache layout (a pytree, donated to every step): `index` (the next global slot) and per layer `k`, `v`
(B, S, K, H) with `pos` (B, S) logical positions (-1 = empty). Full-attention layers have S = the whole
context; sliding layers have a ring of exactly `sliding_window` slots, so their memory does not grow
with the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .sharding import CACHE_KV_AXES, CACHE_POS_AXES, cache_sharding, to_host, with_model_mesh

F32 = jnp.float32


# ------------------------------------------------------------------------------------------- validation
def check_tokens(tokens, vocab_size: int) -> jax.Array:
    """int [B,T] or [T] -> int32 [B,T]; ValueError naming the first id outside [0, vocab)."""
    try:
        arr = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:  # inside jit: no values to check
        return tokens if tokens.ndim == 2 else tokens[None]
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty int array [batch, seq], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"token id {int(arr[b, t])} at [{b}, {t}] is outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(arr, jnp.int32)


def _as_rows(tokens, vocab_size: int) -> list[list[int]]:
    if isinstance(tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(tokens)
        rows = [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    elif len(tokens) and isinstance(tokens[0], (int, np.integer)):
        rows = [list(tokens)]
    else:
        rows = [list(r) for r in tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("tokens: every prompt needs at least one token")
    for b, r in enumerate(rows):
        for t, tok in enumerate(r):
            if not isinstance(tok, (int, np.integer)) or not 0 <= tok < vocab_size:
                raise ValueError(f"token id {tok!r} at [{b}, {t}] is outside the vocabulary [0, {vocab_size})")
    return rows


# ------------------------------------------------------------------------------------------------ cache
def init_cache(cfg: Config, batch: int, length: int, dtype=None) -> dict:
    """Empty cache for `batch` rows and a context of `length` global slots."""
    dtype = dtype or cfg.jax_dtype
    K, H = cfg.num_key_value_heads, cfg.head_dim
    layers = []
    for sliding in cfg.sliding_layers:
        S = cfg.sliding_window if sliding and cfg.sliding_window else length
        layers.append({
            # under a mesh each array is created already split (batch over data, kv heads over model)
            "k": jnp.zeros((batch, S, K, H), dtype, device=cache_sharding(CACHE_KV_AXES, (batch, S, K, H))),
            "v": jnp.zeros((batch, S, K, H), dtype, device=cache_sharding(CACHE_KV_AXES, (batch, S, K, H))),
            "pos": jnp.full((batch, S), -1, jnp.int32, device=cache_sharding(CACHE_POS_AXES, (batch, S))),
        })  # fmt: skip
    return {"index": jnp.zeros((), jnp.int32, device=cache_sharding((), ())), "layers": layers}


def cache_bytes(cfg: Config, batch: int, length: int, dtype=None) -> int:
    dtype = jnp.dtype(dtype or cfg.jax_dtype)
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize + 4
    slots = sum(cfg.sliding_window if s and cfg.sliding_window else length for s in cfg.sliding_layers)
    return batch * slots * per_slot


# --------------------------------------------------------------------------------------------- sampling
def sample(logits: jax.Array, key, *, temperature, top_k: int, top_p, greedy: bool) -> jax.Array:
    """(B,V) float32 -> (B,) int32. Greedy is argmax; otherwise temperature, then top-k, then top-p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------- jitted steps
@partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    h, cache = model.hidden(tokens, positions, cache)
    return model.logits(h[:, -1]), cache


@partial(jax.jit, static_argnums=(0, 7, 8, 9), donate_argnums=4)
def _decode_step(graphdef, state, tok, pos, cache, key, sp, top_k, greedy, _unused=None):
    model = nnx.merge(graphdef, state)
    h, cache = model.hidden(tok[:, None], pos[:, None], cache)
    logits = model.logits(h[:, 0])
    nxt = sample(logits, key, temperature=sp[0], top_k=top_k, top_p=sp[1], greedy=greedy)
    return nxt, cache


@partial(jax.jit, static_argnums=(0, 9, 10, 11), donate_argnums=4)
def _decode_loop(graphdef, state, first, pos0, cache, key, sp, stop, done0, steps, top_k, greedy):
    """Runs up to `steps` decode steps on device; stops early once every row has produced a stop token."""
    model = nnx.merge(graphdef, state)
    B = first.shape[0]
    out = jnp.zeros((B, steps + 1), jnp.int32).at[:, 0].set(first)

    def cond(c):
        i, _, _, _, done = c
        return (i < steps) & ~jnp.all(done)

    def body(c):
        i, tok, cache, out, done = c
        h, cache = model.hidden(tok[:, None], (pos0 + i)[:, None], cache)
        logits = model.logits(h[:, 0])
        nxt = sample(logits, jax.random.fold_in(key, i + 1), temperature=sp[0], top_k=top_k, top_p=sp[1],
                     greedy=greedy)  # fmt: skip
        out = out.at[:, i + 1].set(nxt)
        return i + 1, nxt, cache, out, done | jnp.isin(nxt, stop)

    c = (jnp.zeros((), jnp.int32), first, cache, out, done0 | jnp.isin(first, stop))
    _, _, cache, out, _ = jax.lax.while_loop(cond, body, c)
    return out, cache


# ------------------------------------------------------------------------------------------- public API
def _bucket(n: int, chunk: int) -> int:
    if n > chunk:
        return -(-n // chunk) * chunk
    b = 16
    while b < n:
        b *= 2
    return min(b, chunk) if n <= chunk else b


def _prepare(model, tokens, max_new_tokens, cache_length):
    cfg: Config = model.cfg
    rows = _as_rows(tokens, cfg.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(r) for r in rows)
    need = longest + max_new_tokens
    if need > cfg.context_length:
        raise ValueError(f"context of {need} tokens (prompt {longest} + max_new_tokens {max_new_tokens}) "
                         f"exceeds the model's context length {cfg.context_length}")  # fmt: skip
    if cache_length is not None and need > cache_length:
        raise ValueError(f"context of {need} tokens (prompt {longest} + max_new_tokens {max_new_tokens}) "
                         f"exceeds the cache length {cache_length}")  # fmt: skip
    chunk = cfg.prefill_chunk
    P = _bucket(longest, chunk)
    B = len(rows)
    toks = np.zeros((B, P), np.int32)
    pos = np.zeros((B, P), np.int32)
    for b, r in enumerate(rows):
        toks[b, P - len(r) :] = r
        pos[b] = np.arange(P) - (P - len(r))
    lengths = np.array([len(r) for r in rows], np.int32)
    return rows, toks, pos, lengths, P, chunk


def _run_prefill(graphdef, state, cfg, toks, pos, P, chunk, length):
    cache = init_cache(cfg, toks.shape[0], length)
    step = min(P, chunk)
    for c in range(0, P, step):
        logits, cache = _prefill(graphdef, state, jnp.asarray(toks[:, c : c + step]),
                                 jnp.asarray(pos[:, c : c + step]), cache)  # fmt: skip
    return logits, cache


def _trim(out: np.ndarray, stop: Sequence[int]) -> list[list[int]]:
    res = []
    for row in out.tolist():
        for i, t in enumerate(row):
            if t in stop:
                row = row[: i + 1]
                break
        res.append(row)
    return res


@with_model_mesh
def generate(
    model,
    tokens,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    cache_length: int | None = None,
    callback: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a stop token, if produced, ends its row and is included).

    tokens: one prompt (list/1-D array), a batch of equal-length prompts ([B,T] array) or a list of prompts
    of different lengths. temperature 0 is greedy. `stop_tokens` defaults to the config's
    (<|return|>, <|endoftext|>, <|call|>). With `callback`, each step's tokens (one per row) are passed to it
    as they are produced (the loop then runs from Python, one jitted step per token).
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k}")
    cfg: Config = model.cfg
    stop = tuple(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    rows, toks, pos, lengths, P, chunk = _prepare(model, tokens, max_new_tokens, cache_length)
    graphdef, state = nnx.split(model)
    logits, cache = _run_prefill(graphdef, state, cfg, toks, pos, P, chunk, P + max_new_tokens)
    greedy = temperature == 0.0
    key = jax.random.key(seed)
    sp = jnp.asarray([max(temperature, 1e-6), top_p], F32)
    first = sample(logits, jax.random.fold_in(key, 0), temperature=sp[0], top_k=top_k, top_p=sp[1], greedy=greedy)
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    if callback is None:
        done0 = jnp.zeros((len(rows),), bool)
        out, _ = _decode_loop(graphdef, state, first, jnp.asarray(lengths), cache, key, sp, stop_arr, done0,
                              max_new_tokens - 1, top_k, greedy)  # fmt: skip
        return _trim(to_host(out), stop)
    outs = [to_host(first)]
    done = np.isin(outs[0], stop)
    callback(outs[0].tolist())
    tok, cur = first, jnp.asarray(lengths)
    for i in range(1, max_new_tokens):
        if done.all():
            break
        tok, cache = _decode_step(graphdef, state, tok, cur, cache, jax.random.fold_in(key, i), sp, top_k,
                                  greedy)  # fmt: skip
        cur = cur + 1
        outs.append(to_host(tok))
        callback(outs[-1].tolist())
        done |= np.isin(outs[-1], stop)
    return _trim(np.stack(outs, axis=1), stop)


def stream(model, tokens, **kw) -> Iterator[list[int]]:
    """Yields each step's new tokens (one per row) as they are produced. Same options as `generate`."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    err: list[BaseException] = []

    def run():
        try:
            generate(model, tokens, callback=q.put, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            err.append(e)
        finally:
            q.put(None)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not None:
        yield item
    if err:
        raise err[0]
