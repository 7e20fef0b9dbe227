"""Running a request's choices on the backend: prompt checks, sampling settings, constraint masks, the test
hook, and the generated tokens turned into parser events. Shared by the three APIs.

Test hook (tests only: `Server(test_hooks=True)`, or $GPTOSS_JAX_SERVE_TEST_HOOKS=1 for `gptoss-jax serve`):
`POST /v1/test/scripts {"scripts": ["<|channel|>final<|message|>Hi<|return|>", [200005, ...], ...]}` queues
token sequences (harmony text, special tokens included, or ids); each following generation takes the next
one and is forced to emit exactly it through the real engine (`constraints.ForcedTokens` as its mask), so
that every parsing path runs end to end on a random model. A generation without a queued script samples as
usual. The endpoint does not exist unless the hook is enabled.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from ..harmony import Event, OutputParser
from ..tokenizer import CALL, RETURN, encode
from .backend import Generated, GenParams
from .constraints import ForcedTokens, new_mask
from .protocol import APIError

HARMONY_STOP = (RETURN, CALL)  # an assistant turn ends with <|return|> (answer) or <|call|> (tool call)
# The LoRA adapter the request's `model` named (None: the base), set by `Server.check_model` and read by
# `Server.params` in the same request's context, so the three APIs need not pass it along.
_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("adapter", default=None)


@dataclasses.dataclass
class Server:
    """What the request handlers share."""

    backend: Any
    model_name: str
    test_hooks: bool = False
    max_pending: int = 256  # sequences admitted at once (generating or queued in the engine)
    start_date: str | None = "today"  # harmony's conversation start date: "today", a date, or None (no date)
    reasoning_effort: str = "medium"  # for requests that set none
    strict_tools: bool = False  # a hosted tool no backend runs is a 400, not left out (api/hosted.py)
    sealer: Any = None  # seals and opens reasoning's encrypted_content (api/sealed.py)
    tools: dict = dataclasses.field(default_factory=dict)  # name -> a tool the server runs (toolloop.py)
    max_tool_calls: int = 16  # calls of those tools per request
    allow_mcp_urls: list = dataclasses.field(default_factory=list)  # Responses `mcp` tools' allowed URLs
    pending: int = 0
    scripts: collections.deque = dataclasses.field(default_factory=collections.deque)

    def admit(self, n: int):
        """Counts `n` sequences in (a 429 when that would pass max_pending); returns the release function."""
        if self.pending + n > self.max_pending:
            raise APIError(
                f"the server is busy: {self.pending} sequences are running or queued (limit "
                f"{self.max_pending}); retry later",
                429,
                code="rate_limit_exceeded",
            )
        self.pending += n
        released = []

        def release():
            if not released:
                released.append(True)
                self.pending -= n

        return release

    def queue_scripts(self, scripts: list) -> int:
        vocab = self.backend.vocab_size
        for i, s in enumerate(scripts):
            ids = encode(s, allowed_special="all") if isinstance(s, str) else s
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise APIError(f"scripts[{i}]: token ids must be integers in [0, {vocab})", param="scripts")
            self.scripts.append(list(ids))
        return len(self.scripts)

    def adapters_info(self) -> dict:
        """The LoRA adapters served beside the base model by name (each a model of its own name)."""
        return dict(getattr(self.backend, "adapters", dict)())

    def adapters(self) -> list[str]:
        return sorted(self.adapters_info())

    def check_model(self, name: str | None) -> str | None:
        """The request's `model`: the base model's name (or none) runs the base, an adapter's name that
        adapter (returned, and used by this request's `params`); anything else is a 404."""
        adapter = None
        if name is not None and name != self.model_name:
            if name not in self.adapters():
                served = ", ".join(repr(n) for n in [self.model_name, *self.adapters()])
                raise APIError(
                    f"model: {name!r} does not exist; this server serves {served}",
                    404,
                    param="model",
                    code="model_not_found",
                )
            adapter = name
        _ADAPTER.set(adapter)
        return adapter

    def budget(self, prompt_len: int, max_tokens: int | None, field: str, prompt_field: str) -> int:
        """max_tokens checked against the context (a 400 naming the counts), or what is left of it."""
        ctx = self.backend.context_length
        if max_tokens is None:
            if prompt_len >= ctx:
                raise APIError(
                    f"the prompt has {prompt_len} tokens, and the context length is {ctx}: nothing is "
                    "left to generate",
                    param=prompt_field,
                    code="context_length_exceeded",
                )
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise APIError(
                f"the prompt ({prompt_len} tokens) plus {field} ({max_tokens}) exceed the context "
                f"length of {ctx} tokens",
                param=field,
                code="context_length_exceeded",
            )
        return max_tokens

    def params(
        self,
        *,
        max_tokens: int,
        temperature,
        top_p,
        seed,
        index: int,
        logprobs: int | None = None,
        spec: dict | None = None,
        stop_tokens=HARMONY_STOP,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> GenParams:
        """One choice's settings; its mask is a queued test script, else the request's constraint."""
        mask = (
            ForcedTokens(self.scripts.popleft())
            if self.test_hooks and self.scripts
            else new_mask(spec, max_tokens)
        )
        return GenParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=None if seed is None else seed + index,
            stop_tokens=tuple(stop_tokens),
            logprobs=logprobs,
            mask=mask,
            adapter=_ADAPTER.get(),
        )


@dataclasses.dataclass
class Choice:
    """One generation of a request and what came of it."""

    index: int
    params: GenParams
    parser: OutputParser
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Generated] = dataclasses.field(default_factory=list)
    hit_length: bool = False
    info: dict = dataclasses.field(default_factory=dict)  # the backend's report (cached_tokens)

    @property
    def finish_reason(self) -> str:
        return self.parser.finish_reason(self.hit_length)


async def run_choice(backend, prompt: list[int], choice: Choice) -> AsyncIterator[list[Event]]:
    """The parser events of one choice, as its tokens arrive; closing this cancels the generation."""
    gen = backend.generate(prompt, choice.params, choice.info)
    want_lp = choice.params.logprobs is not None
    try:
        async for g in gen:
            choice.tokens.append(g.token)
            if want_lp:
                choice.logprobs.append(g)
            events = choice.parser.feed(g.token, g if want_lp else None)
            if events:
                yield events
            if choice.parser.stopped:
                break
    finally:
        await gen.aclose()
    t = choice.tokens
    choice.hit_length = (
        not choice.parser.stopped
        and len(t) >= choice.params.max_tokens
        and (not t or t[-1] not in choice.params.stop_tokens)
    )
    events = choice.parser.finish()
    if events:
        yield events


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as they come; cancels them all when closed."""
    if len(streams) == 1:
        try:
            async for x in streams[0]:
                yield 0, x
        finally:
            await streams[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for x in it:
                await q.put((i, x))
        except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, x = await q.get()
            if x is done:
                left -= 1
            elif isinstance(x, BaseException):
                raise x
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
