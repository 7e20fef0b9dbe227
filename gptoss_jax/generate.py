"""KV-cached generation: chunked prefill, then a jitted decode loop that runs on device.

Each prompt is a row of the cache (`cache.KVCache`) with its own length: prompts of different lengths are
RIGHT-padded into the prefill chunks (padding gets position -1, which no key ever shows to a query), each row
starts decoding right after its own last token, and the rows never see each other. So every prompt of a
batch gives exactly the tokens it gives alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache
from .config import Config, check_token_ids
from .model import forward, logits
from .sampling import SamplingParams, row_keys, sample, step_keys
from .sharding import to_host, with_model_mesh


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
    check_token_ids(rows, vocab_size)
    return rows


# ----------------------------------------------------------------------------------------- jitted steps
@partial(jax.jit, static_argnums=0, donate_argnums=(3, 4))
def _prefill(graphdef, state, tokens, cache: KVCache, last, n_new, is_last):
    """One chunk: tokens (B,T), n_new (B,) of them real per row. `last` (B,V) keeps each row's logits at its
    final prompt token, taken from the chunk holding it (`is_last`)."""
    model = nnx.merge(graphdef, state)
    positions = cache.chunk_positions(n_new, tokens.shape[1])
    h, cache = forward(model, tokens, positions, cache)
    at = jnp.take_along_axis(h, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where(is_last[:, None], logits(model, at), last), cache


def _decode_one(model, tok, cache, keys, i, sp, seen, greedy):
    h, cache = forward(model, tok[:, None], cache.lengths[:, None], cache)
    nxt = sample(logits(model, h[:, 0]), step_keys(keys, i), sp, greedy=greedy, seen=seen)
    if seen is not None:
        seen = seen.at[jnp.arange(tok.shape[0]), nxt].set(True)
    return nxt, cache, seen


@partial(jax.jit, static_argnums=(0, 8), donate_argnums=(3, 6))
def _decode_step(graphdef, state, tok, cache, keys, i, seen, sp, greedy):
    return _decode_one(nnx.merge(graphdef, state), tok, cache, keys, i, sp, seen, greedy)


@partial(jax.jit, static_argnums=(0, 10, 11), donate_argnums=3)
def _decode_loop(graphdef, state, first, cache, keys, sp, seen, stop, done0, max_steps, steps, greedy):
    """Runs up to `steps` decode steps on device (static bound, `max_steps` the live one); stops early once
    every row has produced a stop token."""
    model = nnx.merge(graphdef, state)
    B = first.shape[0]
    out = jnp.zeros((B, steps + 1), jnp.int32).at[:, 0].set(first)

    def cond(c):
        i, _, _, _, _, done = c
        return (i < max_steps) & ~jnp.all(done)

    def body(c):
        i, tok, cache, seen, out, done = c
        nxt, cache, seen = _decode_one(model, tok, cache, keys, i + 1, sp, seen, greedy)
        return i + 1, nxt, cache, seen, out.at[:, i + 1].set(nxt), done | jnp.isin(nxt, stop)

    c = (jnp.zeros((), jnp.int32), first, cache, seen, out, done0 | jnp.isin(first, stop))
    _, _, cache, _, out, _ = jax.lax.while_loop(cond, body, c)
    return out, cache


# ------------------------------------------------------------------------------------------- public API
def _bucket(n: int, chunk: int) -> int:
    """Prompt lengths round up to a few compiled shapes: powers of two from 16, then whole chunks."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(chunk, max(16, 1 << (n - 1).bit_length()))


def _steps_bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


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
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] | None = None,
    cache_length: int | None = None,
    callback: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a stop token, if produced, ends its row and is included).

    tokens: one prompt (list/1-D array), a batch of equal-length prompts ([B,T] array) or a list of prompts
    of different lengths. temperature 0 is greedy; top_p, top_k, min_p and repetition_penalty as in
    `gptoss_jax.sampling`. seed: an int (rows differ) or one per prompt (each row samples as it would
    alone). `stop_tokens` defaults to the config's (<|return|>, <|endoftext|>, <|call|>). With `callback`,
    each step's tokens (one per row) are passed to it as they are produced (the loop then runs from Python,
    one jitted step per token).
    """
    cfg: Config = model.cfg
    rows = _as_rows(tokens, cfg.vocab_size)
    B = len(rows)
    sp = SamplingParams.create(B, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty)  # fmt: skip
    keys = row_keys(seed, B)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    lengths = np.array([len(r) for r in rows], np.int32)
    need = int(lengths.max()) + max_new_tokens
    for limit, what in ((cfg.context_length, "the model's context length"), (cache_length, "the cache length")):
        if limit is not None and need > limit:
            raise ValueError(f"context of {need} tokens (prompt {int(lengths.max())} + max_new_tokens "
                             f"{max_new_tokens}) exceeds {what} {limit}")  # fmt: skip
    stop = tuple(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    chunk = cfg.prefill_chunk
    P = _bucket(int(lengths.max()), chunk)
    toks = np.zeros((B, P), np.int32)
    for b, r in enumerate(rows):
        toks[b, : len(r)] = r
    graphdef, state = nnx.split(model)
    cache = KVCache.create(cfg, B, cache_length or (P + _steps_bucket(max_new_tokens)))
    last = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    step = min(P, chunk)
    for c in range(0, P, step):
        n_new = np.clip(lengths - c, 0, step).astype(np.int32)
        is_last = (lengths > c) & (lengths <= c + step)
        last, cache = _prefill(graphdef, state, jnp.asarray(toks[:, c : c + step]), cache, last,
                               jnp.asarray(n_new), jnp.asarray(is_last))  # fmt: skip
    greedy = not np.any(np.asarray(sp.temperature) > 0)
    seen = None
    if np.any(np.asarray(sp.repetition_penalty) != 1.0):
        seen = np.zeros((B, cfg.vocab_size), bool)
        for b, r in enumerate(rows):
            seen[b, r] = True
        seen = jnp.asarray(seen)
    first = sample(last, step_keys(keys, 0), sp, greedy=greedy, seen=seen)
    if seen is not None:
        seen = seen.at[jnp.arange(B), first].set(True)
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    if callback is None:
        out, _ = _decode_loop(graphdef, state, first, cache, keys, sp, seen, stop_arr, jnp.zeros((B,), bool),
                              max_new_tokens - 1, _steps_bucket(max_new_tokens), greedy)  # fmt: skip
        return _trim(to_host(out)[:, :max_new_tokens], stop)
    outs = [to_host(first)]
    done = np.isin(outs[0], stop)
    callback(outs[0].tolist())
    tok = first
    for i in range(1, max_new_tokens):
        if done.all():
            break
        tok, cache, seen = _decode_step(graphdef, state, tok, cache, keys, i, seen, sp, greedy)
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
