"""What a request asks for and what it gets back: options, the streaming handle, its events and its result.

`RequestOptions` is checked when the request is submitted (one-line `ValueError` naming the option).
`RequestHandle` is what `Engine.submit` returns: it streams `TokenEvent`s as they are produced (iterate it
in a thread, or `async for` it in an event loop), `result()` waits for the `Result`, `cancel()` stops it
at the next step and frees its memory. The engine thread writes; any number of threads and event loops read.

Text: each token's bytes go through an incremental UTF-8 decoder, so a character split over tokens comes
out whole. Stop strings are matched on the text; text that could still be the start of a stop string is
held back until the next token decides, so a stop string never reaches the stream. The result's text ends
before the stop string (as OpenAI's API does); its tokens include the one that completed it.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from .. import tokenizer
from ..harmony.stops import StopStrings
from ..sampling import check

# allowed_tokens(generated so far) -> None (any token), or the allowed ids, or a (V,) bool mask
AllowedTokens = Callable[[list[int]], "Sequence[int] | np.ndarray | None"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestOptions:
    """Per-request generation settings.

    max_tokens: tokens to generate at most (the engine's context limit also ends a request, "length").
    temperature, top_p, top_k, min_p, repetition_penalty: as `gptoss_jax.sampling` (temperature 0 = greedy;
      the penalty applies to every token of the sequence so far, prompt and output, as transformers').
    seed: the request's random stream: token i is drawn with fold_in(fold_in(key(seed), 0), i), the key
      `generate(..., seed=[seed])` uses, so a request samples the same tokens whatever is batched beside
      it. None: the engine picks one (reported in the result).
    stop_token_ids: ids that end the request (included in its tokens); None = the config's eos ids.
    stop: strings that end the request; the result's text stops before the string.
    logprobs: attach the chosen token's log-probability to each event; top_logprobs: and the n most
      likely tokens' (at most the engine's `max_top_logprobs`).
    allowed_tokens: a hook called before each token with the tokens generated so far; it returns None (any
      token), the allowed ids, or a (V,) bool mask (constrained decoding).
    reuse: allow this prompt to hit the prefix cache (the KV of the longest prefix it shares with an earlier
      or running sequence); its own pages are cached for others either way.
    adapter: the name of a LoRA adapter loaded in the engine (`Engine(adapters=...)`), None for the base.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    allowed_tokens: AllowedTokens | None = None
    reuse: bool = True
    adapter: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def validate(self, vocab_size: int, max_top_logprobs: int) -> None:
        """ValueError naming the first bad option."""
        check(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
              repetition_penalty=self.repetition_penalty)  # fmt: skip
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        for t in self.stop_token_ids or ():
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids: {t!r} is not a token id in [0, {vocab_size})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: each stop string must be a non-empty str, got {s!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= max_top_logprobs:
            raise ValueError(f"top_logprobs must be an integer in [0, {max_top_logprobs}] (the engine's "
                             f"max_top_logprobs), got {self.top_logprobs!r}")  # fmt: skip
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(f"adapter must be an adapter's name (str) or None, got {self.adapter!r}")
        if self.allowed_tokens is not None and not callable(self.allowed_tokens):
            raise ValueError("allowed_tokens must be a callable(generated tokens) -> ids, mask or None")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def allowed_mask(allowed, vocab_size: int) -> np.ndarray | None:
    """What an `allowed_tokens` hook returned -> a (V,) bool mask, or None for "any token"; ValueError when it
    allows nothing or names ids outside the vocabulary."""
    if allowed is None:
        return None
    a = np.asarray(allowed)
    if a.size == 0:
        raise ValueError("allowed_tokens allowed no token")
    if a.dtype == bool:
        if a.shape != (vocab_size,):
            raise ValueError(f"allowed_tokens returned a bool mask of shape {a.shape}, not ({vocab_size},)")
        mask = a
    else:
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= vocab_size:
            raise ValueError(f"allowed_tokens must return ids in [0, {vocab_size}), a bool mask or None")
        mask = np.zeros(vocab_size, bool)
        mask[a] = True
    if not mask.any():
        raise ValueError("allowed_tokens allowed no token")
    return mask


# ------------------------------------------------------------------------------------------------ events
@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the text this token releases (may be empty while a character is
    incomplete or a stop string might be starting). logprob / top_logprobs when the request asked."""

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished request. finish_reason: "stop" (stop token or string), "length" (max_tokens or the
    context limit or the KV pool), "cancelled", or "error" (then `error` says why). cached_tokens: prompt
    tokens whose KV came from the prefix cache (not prefilled again). ttft: seconds from submit to the first
    token; tpot: mean seconds per output token after the first."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    seed: int
    ttft: float | None
    tpot: float | None
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    stop: int | str | None = None
    error: str | None = None


class EngineError(RuntimeError):
    """The engine failed while running a request (the message says how)."""


class RequestHandle:
    """A submitted request: stream its events, wait for its result, or cancel it (thread- and asyncio-safe).

    `for ev in handle` (blocking) or `async for ev in handle` yields each `TokenEvent` once per iterator;
    `result(timeout)` blocks until the request finishes; `await handle.wait()` is its async form.
    """

    def __init__(self, request_id: int, prompt: list[int], options: RequestOptions, seed: int, cancel_fn):
        self.id = request_id
        self.prompt = prompt
        self.options = options
        self.seed = seed
        self.submitted = time.perf_counter()
        self._cancel_fn = cancel_fn
        self._events: list[TokenEvent] = []
        self._result: Result | None = None
        self._cond = threading.Condition()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ----------------------------------------------------------------------------- engine side
    def _push(self, event: TokenEvent | None = None, result: Result | None = None) -> None:
        with self._cond:
            if self._result is not None:
                return
            if event is not None:
                self._events.append(event)
            if result is not None:
                self._result = result
            self._cond.notify_all()
            watchers = list(self._watchers)
        for loop, ev in watchers:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass

    # ------------------------------------------------------------------------------- user side
    @property
    def done(self) -> bool:
        return self._result is not None

    def cancel(self) -> None:
        """Stops the request: its result is "cancelled" at once, and its slot and pages are freed before the
        engine's next step (at once when the engine is idle)."""
        self._cancel_fn(self)

    def result(self, timeout: float | None = None) -> Result:
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            return self._result

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda n=i: len(self._events) > n or self._result is not None)
                new, done = self._events[i:], self._result is not None
            yield from new
            i += len(new)
            if done and not new:
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._cond:
            self._watchers.append((loop, wake))
        try:
            i = 0
            while True:
                wake.clear()
                with self._cond:
                    new, done = self._events[i:], self._result is not None
                for ev in new:
                    yield ev
                i += len(new)
                if done and not new:
                    return
                if not new:
                    await wake.wait()
        finally:
            with self._cond:
                self._watchers.remove((loop, wake))

    async def wait(self) -> Result:
        async for _ in self:
            pass
        return self._result


# ---------------------------------------------------------------------------------------------- text
class TextStream:
    """Token bytes -> released text, with stop strings matched and held back (see the module docstring).

    `text`: the request's text so far (up to a stop string), the part still held back included."""

    def __init__(self, stops: Sequence[str]):
        self._stops = StopStrings(stops)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._released = ""

    @property
    def text(self) -> str:
        return self._released + self._stops.held

    def add(self, token: int) -> tuple[str, str | None]:
        """-> (text released now, the stop string that matched or None)."""
        try:
            raw = tokenizer.get_encoding().decode_single_token_bytes(int(token))
        except KeyError:  # an id o200k_harmony does not define (a checkpoint with another vocabulary)
            raw = b""
        out = self._stops.push(self._utf8.decode(raw))
        self._released += out
        return out, self._stops.matched

    def finish(self) -> str:
        """The rest of the text (an incomplete final character becomes U+FFFD)."""
        out = self._stops.push(self._utf8.decode(b"", final=True)) + self._stops.flush()
        self._released += out
        return out
