"""The generation interface the server is written against, and its adapter to the model.

    backend.generate(prompt_ids, GenParams, info) -> async iterator of Generated(token, logprob, top)
    backend.score(token_ids, top) -> log-probabilities of each token given the ones before it
    await backend.metrics() -> {name: value} (a name may end in Prometheus labels: `x{adapter="a"}`),
      backend.context_length, backend.start() / stop()
    backend.failure -> None, or why the backend cannot generate any more (the engine thread died): the
      server then answers 503 to everything but /metrics (`getattr`: a backend without it never fails)

Closing the iterator (the client went away, a stop string matched) cancels the request and frees its memory.
`GenParams.mask(tokens_so_far) -> bool[V] | None` is applied before sampling at every step (constrained
decoding, `constraints.TokenMask`; None allows every token). Admission (the 429 of a full queue) is the
server's (`run.Server.admit`), so the engine's own queue never overflows.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..engine import AdapterBusy, AdapterError, AdapterPoolFull, RequestOptions, UnknownAdapter
from ..engine.requests import EngineError
from ..logprobs import chunked_log_probs
from ..model import forward
from ..sharding import with_model_mesh
from .protocol import APIError

Mask = Callable[[list[int]], "np.ndarray | None"]


@dataclasses.dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely
    mask: Mask | None = None
    adapter: str | None = None  # a LoRA adapter of the engine's pool (None: the base model)


@dataclasses.dataclass
class Generated:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, log-prob), most likely first


class EngineBackend:
    """The serving engine (`gptoss_jax.engine.Engine`: continuous batching over the paged cache) behind
    the interface. Prompt log-probabilities (`score`) come from the model's forward over the whole prompt,
    which the engine does not return."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model
        self.vocab_size = engine.cfg.vocab_size
        self.context_length = engine.scheduler.max_context

    def start(self) -> None:
        self.engine.start()

    def adapters(self) -> dict:
        """The engine's adapters by name (`Engine.adapters`: name, slot, config, source folder)."""
        return self.engine.adapters

    async def load_adapter(self, name: str, path: str):
        """Loads a PEFT folder into the engine's pool (off the event loop: it reads files and waits for the
        step in flight). 400 for a bad folder or name, 409 when the pool is full."""
        try:
            return await asyncio.to_thread(self.engine.load_adapter, name, path)
        except AdapterPoolFull as e:
            raise APIError(str(e), 409, param="lora_name", code="adapter_pool_full") from None
        except AdapterError as e:
            raise APIError(str(e), param="lora_path") from None

    async def unload_adapter(self, name: str):
        """Frees an adapter's slot: 404 for one not loaded, 409 while requests use it."""
        try:
            return await asyncio.to_thread(self.engine.unload_adapter, name)
        except UnknownAdapter as e:
            raise APIError(str(e), 404, param="lora_name", code="model_not_found") from None
        except AdapterBusy as e:
            raise APIError(str(e), 409, param="lora_name", code="adapter_in_use") from None
        except AdapterError as e:
            raise APIError(str(e), param="lora_name") from None

    @property
    def failure(self) -> str | None:
        e = self.engine.error
        return None if e is None else f"the engine stopped: {type(e).__name__}: {' '.join(str(e).split())}"

    def dead(self) -> APIError:
        return APIError(f"{self.failure}; restart the server", 503, code="engine_failed")

    def inject_fault(self, message: str) -> None:
        """Tests only (the server's test hook): the engine's next step raises, as a failing device call
        would, and its thread ends."""

        def fail():
            raise RuntimeError(message)

        self.engine.step = fail  # the loop calls self.step(): this instance attribute shadows the method
        self.engine._work.set()

    def stop(self) -> None:
        self.engine.close()

    async def metrics(self) -> dict[str, float]:
        """The engine's metrics (taken off the event loop: the engine snapshots them between steps)."""
        m = await asyncio.to_thread(self.engine.metrics)
        out = {
            k: v for k, v in m.as_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for what in ("requests", "tokens"):  # per adapter: one labelled sample each
            for name, n in getattr(m, f"adapter_{what}").items():
                out[f'adapter_{what}_total{{adapter="{label_value(name)}"}}'] = n
        return out

    async def generate(
        self, prompt: list[int], params: GenParams, info: dict | None = None
    ) -> AsyncIterator[Generated]:
        """The request's tokens as they come; `info` gets "cached_tokens" (prompt tokens whose KV the engine
        reused from an earlier request) at the end."""
        opts = RequestOptions(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            stop_token_ids=params.stop_tokens,
            logprobs=params.logprobs is not None,
            top_logprobs=params.logprobs or 0,
            allowed_tokens=params.mask,
            adapter=params.adapter,
        )
        if self.failure:
            raise self.dead()
        try:
            handle = self.engine.submit(prompt, opts)
        except UnknownAdapter as e:  # unloaded since the request was checked
            raise APIError(str(e), 404, param="model", code="model_not_found") from None
        except ValueError as e:  # what the engine cannot hold (pages): the request's fault, a 400
            raise APIError(str(e)) from None
        except EngineError:
            if self.failure:
                raise self.dead() from None
            raise
        try:
            async for ev in handle:
                top = (
                    [(int(t), float(lp)) for t, lp in ev.top_logprobs]
                    if params.logprobs is not None
                    else None
                )
                yield Generated(ev.token, ev.logprob, top)
            result = handle.result()
            if result.finish_reason == "error":
                if self.failure:  # the engine thread died: every request in it ends so
                    raise self.dead()
                raise RuntimeError(f"engine: {result.error}")
            if info is not None:
                info["cached_tokens"] = result.cached_tokens
        finally:
            if not handle.done:  # closed early: the client went away, or a stop string matched
                handle.cancel()

    async def score(self, tokens: list[int], top: int) -> list[Generated]:
        """Each token's log-probability given the ones before it (none for the first), and its `top`
        most likely alternatives."""
        if jax.process_count() > 1:  # the other processes only follow the engine's plans
            raise APIError("echo with logprobs (prompt scoring) needs a single-process server", param="echo")
        chosen, ids, lps = await asyncio.to_thread(prompt_logprobs, self.model, tokens, top)
        return [Generated(tokens[0])] + [
            Generated(tokens[i + 1], float(chosen[i]), [(int(t), float(v)) for t, v in zip(ids[i], lps[i])])
            for i in range(len(tokens) - 1)
        ]


def label_value(v: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


SCORE_CHUNK = 256  # positions whose (V,) logits exist at once while scoring a prompt


@with_model_mesh
def prompt_logprobs(model, tokens: list[int], top: int):
    """Log-probabilities of tokens[1:] under the model given the tokens before each, and the `top` most
    likely ids at each position -> (chosen (T-1,), top ids (T-1, top), top log-probs (T-1, top))."""
    T = len(tokens)
    P = max(SCORE_CHUNK, 1 << (T - 1).bit_length())  # few compiled lengths
    toks = np.zeros((1, P), np.int32)
    toks[0, :T] = tokens
    pos = np.where(np.arange(P) < T, np.arange(P), -1).astype(np.int32)[None]
    nxt = np.zeros((1, P), np.int32)
    nxt[0, : T - 1] = tokens[1:]
    graphdef, state = nnx.split(model)
    out = _score(graphdef, state, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(nxt), top)
    return tuple(np.asarray(x)[0, : T - 1] for x in out)


@partial(jax.jit, static_argnums=(0, 5))
def _score(graphdef, state, tokens, positions, nxt, top):
    m = nnx.merge(graphdef, state)
    h, _ = forward(m, tokens, positions)
    return chunked_log_probs(h, m.unembedding[...], nxt, chunk=SCORE_CHUNK, top=top)
