"""`POST /v1/completions`: raw text completion, no harmony (the prompt is a string, token ids, or a list of
either), with `echo` and `logprobs`, so that harnesses that score log-likelihoods work: `echo: true,
max_tokens: 0, logprobs: k` returns each prompt token's log-probability given the ones before it (the
first token has none) and its k most likely alternatives.

Generation stops at the model's end tokens (<|return|>, <|endoftext|>, <|call|>), which are not part of the
text; special tokens met before are decoded by name.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator

from ..config import check_token_ids
from ..harmony import Part, StopStrings, new_id
from ..tokenizer import CALL, ENDOFTEXT, RETURN, encode, get_encoding
from .chat import sse
from .protocol import APIError, CompletionRequest, check_unsupported, parse
from .run import Choice, Server, merged, run_choice

STOP_TOKENS = (RETURN, ENDOFTEXT, CALL)


class TextParser:
    """The `OutputParser` interface for raw text: every token is content (stop strings apply)."""

    def __init__(self, stop: list[str]):
        self.part = Part("content")
        self.parts = [self.part]
        self.stop = StopStrings(stop)
        self.stopped = False
        self.tool_calls: list = []
        self.reasoning_tokens = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._tok = get_encoding()

    def _emit(self, text: str, lp) -> list:
        text = self.stop.push(text)
        self.stopped = self.stop.hit
        if lp is not None:
            self.part.logprobs.append(lp)
        self.part.text += text
        return [("delta", self.part, text)] if text or lp is not None else []

    def feed(self, token: int, lp=None) -> list:
        if token in STOP_TOKENS:
            return []
        return self._emit(self._utf8.decode(self._tok.decode_single_token_bytes(token)), lp)

    def finish(self) -> list:
        out = self._emit(self._utf8.decode(b"", final=True), None)
        held = self.stop.flush()  # the tail that could have started a stop string, which never came
        if held:
            self.part.text += held
            out.append(("delta", self.part, held))
        return out

    def finish_reason(self, hit_length: bool) -> str:
        return "length" if hit_length and not self.stopped else "stop"


def _prompts(prompt, vocab: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(f"prompt{f'[{i}]' if len(prompts) > 1 else ''}: empty prompt", param="prompt")
        try:
            check_token_ids(p, vocab)
        except ValueError as e:
            raise APIError(f"prompt: {e}", param="prompt") from None
    if not prompts:
        raise APIError("prompt: empty prompt list", param="prompt")
    return prompts


class CompletionJob:
    def __init__(self, server: Server, body: dict):
        req = parse(CompletionRequest, body)
        check_unsupported(req)
        self.model = server.check_model(req.model) or server.model_name  # an adapter answers as itself
        self.req, self.server = req, server
        self.prompts = _prompts(req.prompt, server.backend.vocab_size)
        self.top = req.logprobs
        self.choices: list[Choice] = []
        for p in self.prompts:
            max_tokens = server.budget(len(p), req.max_tokens, "max_tokens", "prompt")
            for j in range(req.n):
                params = server.params(
                    max_tokens=max_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    index=j,
                    logprobs=self.top,
                    stop_tokens=STOP_TOKENS,
                    **req.sampling(),
                )
                # max_tokens 0 (echo only): nothing is generated, "length" as OpenAI says
                self.choices.append(
                    Choice(len(self.choices), params, TextParser(req.stop), hit_length=not max_tokens)
                )
        self.id, self.created = new_id("cmpl", "-"), int(time.time())

    def _prompt_of(self, c: Choice) -> list[int]:
        return self.prompts[c.index // self.req.n]

    async def _echo(self, c: Choice) -> tuple[str, list]:
        """The prompt's text and, with logprobs, its scored tokens (echo)."""
        prompt = self._prompt_of(c)
        text = get_encoding().decode(prompt)
        scored = await self.server.backend.score(prompt, self.top) if self.top is not None else []
        return text, scored

    def _streams(self):
        return [
            run_choice(self.server.backend, self._prompt_of(c), c) if c.params.max_tokens else _nothing()
            for c in self.choices
        ]

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(len(c.tokens) for c in self.choices)
        cached = [0] * len(self.prompts)  # per prompt, the most any of its choices reused
        for c in self.choices:
            i = c.index // self.req.n
            cached[i] = max(cached[i], c.info.get("cached_tokens", 0))
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": sum(cached)}}  # fmt: skip

    def _head(self) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    async def response(self) -> dict:
        async for _ in merged(self._streams()):
            pass
        choices = []
        for c in self.choices:
            text, scored = await self._echo(c) if self.req.echo else ("", [])
            lp = logprobs_json(scored + c.parser.part.logprobs, self.top, 0) if self.top is not None else None
            choices.append(
                {
                    "index": c.index,
                    "text": text + c.parser.part.text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
            )
        return self._head() | {"choices": choices, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        extra = {"usage": None} if usage else {}
        offsets = [0] * len(self.choices)

        def chunk(i: int, text: str, lps: list | None, finish=None) -> str:
            lp = logprobs_json(lps, self.top, offsets[i]) if lps is not None else None
            offsets[i] += len(text)
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            return sse(self._head() | {"choices": [c]} | extra)

        if self.req.echo:
            for c in self.choices:
                text, scored = await self._echo(c)
                yield chunk(c.index, text, scored if self.top is not None else None)
        seen = [0] * len(self.choices)
        async for i, events in merged(self._streams()):
            for _, part, text in events:
                lps = None
                if self.top is not None:
                    lps, seen[i] = part.logprobs[seen[i] :], len(part.logprobs)
                yield chunk(i, text, lps)
        for c in self.choices:
            yield chunk(c.index, "", None, finish=c.finish_reason)
        if usage:
            yield sse(self._head() | {"choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    def failed(self, e) -> list[str]:
        """The end of a stream that failed after its 200 went out: an error chunk (OpenAI's error shape),
        and no [DONE]."""
        return [sse(e.body())]

    def summary(self) -> str:
        return (
            f"prompt={sum(len(p) for p in self.prompts)} "
            f"completion={sum(len(c.tokens) for c in self.choices)} "
            f"finish={','.join(c.finish_reason for c in self.choices)}"
        )


async def _nothing():
    return
    yield  # an async generator with nothing to yield (max_tokens 0: only the echo)


def logprobs_json(entries: list, top: int, offset: int) -> dict:
    """The completions log-prob object of `entries` (Generated), text offsets counted from `offset`."""
    enc = get_encoding()
    tokens, lps, tops, offs = [], [], [], []
    for g in entries:
        s = enc.decode_single_token_bytes(g.token).decode("utf-8", "replace")
        tokens.append(s)
        lps.append(g.logprob)
        tops.append(
            None
            if g.top is None
            else {enc.decode_single_token_bytes(t).decode("utf-8", "replace"): lp for t, lp in g.top[:top]}
        )
        offs.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
