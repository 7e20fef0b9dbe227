"""The generation interface the server is written against, and its adapter to the model.

    backend.generate(prompt_ids, GenParams) -> async iterator of Generated(token, logprob, top)
    backend.score(token_ids, top) -> log-probabilities of each token given the ones before it
    backend.metrics() -> {name: value}, backend.context_length, backend.start() / stop()

Closing the iterator (the client went away, a stop string matched) cancels the request and frees its memory.
`GenParams.mask(tokens_so_far) -> bool[V] | None` is applied before sampling at every step (constrained
decoding, `constraints.TokenMask`; None allows every token). `BackendBusy` (the queue is full) becomes a 429.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

Mask = Callable[[list[int]], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely
    mask: Mask | None = None


@dataclasses.dataclass
class Generated:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, log-prob), most likely first


class BackendBusy(Exception):
    """The engine's queue is full."""


class ThreadBackend:
    """Generation on one thread, one request at a time, through the model's KV-cached forward: the fallback
    until the serving engine is wired in (max_seqs 1). The mask, temperature, top-p and log-probs are applied
    on the host to the step's log-softmax."""

    def __init__(self, model, *, max_queue: int = 64, max_context: int | None = None):
        import jax

        from ..cache import KVCache
        from ..model import forward, logits

        self.model = model
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.context_length = min(cfg.context_length, max_context or cfg.context_length)
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting = 0
        self._stats = {"requests_total": 0, "generated_tokens_total": 0, "prompt_tokens_total": 0}
        from flax import nnx

        self._graphdef, self._state = nnx.split(model)
        self._kv = lambda n: KVCache.create(cfg, 1, n)

        @jax.jit
        def step(state, tokens, cache, n_new):
            m = nnx.merge(self._graphdef, state)
            h, cache = forward(m, tokens, cache.chunk_positions(n_new, tokens.shape[1]), cache)
            last = jax.numpy.take_along_axis(h, (n_new - 1)[:, None, None], axis=1)[:, 0]
            return jax.nn.log_softmax(logits(m, last), axis=-1)[0], cache

        self._step = step

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {**self._stats, "waiting": self._waiting}

    async def generate(self, prompt: list[int], params: GenParams) -> AsyncIterator[Generated]:
        if self._waiting >= self.max_queue:
            raise BackendBusy(f"{self._waiting} requests are waiting (--max-queue {self.max_queue})")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self._waiting += 1

        def put(x):
            loop.call_soon_threadsafe(q.put_nowait, x)

        def run():
            try:
                with self._lock:
                    self._run(prompt, params, put, cancel)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(e)
            finally:
                put(None)

        threading.Thread(target=run, daemon=True).start()
        try:
            while (item := await q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            self._waiting -= 1

    def _run(self, prompt, params: GenParams, put, cancel: threading.Event) -> None:
        import jax.numpy as jnp

        self._stats["requests_total"] += 1
        self._stats["prompt_tokens_total"] += len(prompt)
        bucket = max(64, 1 << (len(prompt) + params.max_tokens - 1).bit_length())
        cache = self._kv(bucket)
        chunk = 1 << (len(prompt) - 1).bit_length()
        toks = np.zeros((1, chunk), np.int32)
        toks[0, : len(prompt)] = prompt
        lp, cache = self._step(self._state, jnp.asarray(toks), cache, jnp.asarray([len(prompt)], jnp.int32))
        rng = np.random.default_rng(params.seed if params.seed is not None else time.time_ns())
        out: list[int] = []
        while not cancel.is_set():
            logp = np.asarray(lp, np.float64)
            g = sample_host(logp, params, out, rng)
            out.append(g.token)
            self._stats["generated_tokens_total"] += 1
            put(g)
            if g.token in params.stop_tokens or len(out) >= params.max_tokens:
                return
            lp, cache = self._step(self._state, jnp.asarray([[g.token]], jnp.int32), cache,
                                   jnp.asarray([1], jnp.int32))  # fmt: skip

    async def score(self, tokens: list[int], top: int) -> list[Generated]:
        return await asyncio.to_thread(self._score, tokens, top)

    def _score(self, tokens: list[int], top: int) -> list[Generated]:
        import jax

        with self._lock:
            lp = np.asarray(jax.nn.log_softmax(self.model(np.asarray([tokens], np.int32))[0], axis=-1))
        return [Generated(tokens[0])] + [logprob_entry(lp[i - 1], tokens[i], top) for i in range(1, len(tokens))]


def logprob_entry(logp: np.ndarray, token: int, top: int | None) -> Generated:
    if top is None:
        return Generated(token)
    best = np.argpartition(-logp, top)[:top] if top else np.zeros(0, int)
    best = best[np.argsort(-logp[best])]
    return Generated(token, float(logp[token]), [(int(t), float(logp[t])) for t in best])


def sample_host(logp: np.ndarray, params: GenParams, out: list[int], rng: np.random.Generator) -> Generated:
    """One token from a (V,) log-softmax: mask, then greedy (temperature 0) or temperature and top-p."""
    masked = logp
    if params.mask is not None and (allowed := params.mask(out)) is not None:
        masked = np.where(allowed[: len(logp)], logp, -np.inf)
    if params.temperature == 0:
        tok = int(np.argmax(masked))
    else:
        z = masked / params.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if params.top_p < 1:
            order = np.argsort(-p)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        tok = int(rng.choice(len(p), p=p))
    return logprob_entry(logp, tok, params.logprobs)
