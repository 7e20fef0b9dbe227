"""`POST /v1/chat/completions`.

The answer's message: `content` carries only the final channel (and text that did not parse as harmony);
`reasoning` (alias `reasoning_content`) carries the analysis channel and commentary preambles, one message
after another, separated by a blank line; `tool_calls` carry the calls to functions, with ids and the
arguments as the model wrote them. A streamed answer is made of the same deltas the non-streamed message
is folded from, so the two are identical (a tool call's first delta has its id, name and empty arguments;
later ones carry argument pieces at the call's `index`).

Tools the server runs itself (`serve --builtin-tools`, `toolloop.py`) run in the same request: each call and
its result are shown in `reasoning`, in order among the reasoning, as blocks of their own:
`[call RECIPIENT]` and the call's text on the next line (python's code, the browser's JSON arguments), then
`[result RECIPIENT]` and the tool's answer as the model read it. `tool_calls` and finish_reason
"tool_calls" are left to the functions the client offered. The tools' conversation (python's kernel) is
the request's own (one per choice), closed when the request ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from ..harmony import FUNCTIONS, Event, OutputParser, new_id, recipient
from ..tokenizer import get_encoding
from .constraints import check_schemas, constraint_spec
from .harmony_io import chat_turn
from .protocol import ChatRequest, check_unsupported, parse
from .run import Choice, Server, merged
from .toolloop import ToolLoop, ToolRun, close_later, tool_of

REASONING_SEP = "\n\n"


class ChatJob:
    def __init__(self, server: Server, body: dict):
        req = parse(ChatRequest, body)
        check_unsupported(req)
        self.model = server.check_model(req.model) or server.model_name  # an adapter answers as itself
        self.req, self.server = req, server
        self.turn = turn = chat_turn(req, server.reasoning_effort, server.tools)
        self.prompt = turn.prompt_tokens(server.start_date)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = server.budget(
            len(self.prompt), req.max_completion_tokens or req.max_tokens, field, "messages"
        )
        fmt = req.response_format
        schema = None
        if fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            schema = (fmt.json_schema.schema_ if fmt.json_schema else None) or {}
        spec = constraint_spec(tools=turn.tools, tool_choice=turn.tool_choice, json_schema=schema)
        where = {t.function.name: f"tools[{i}].function.parameters" for i, t in enumerate(req.tools or [])}
        check_schemas(spec, where | {"": "response_format.json_schema.schema"})
        self.top = (req.top_logprobs or 0) if req.logprobs else None

        def maker(i: int):
            def make_choice(n: int) -> Choice:
                params = server.params(max_tokens=n, temperature=req.temperature, top_p=req.top_p,
                                       seed=req.seed, index=i, logprobs=self.top, spec=spec,
                                       **req.sampling())  # fmt: skip
                return Choice(i, params, OutputParser(stop=req.stop, single_tool_call=not req.parallel_tool_calls,
                                                      namespaces=list(turn.run_tools)))  # fmt: skip

            return make_choice

        self.choices = [maker(i)(max_tokens) for i in range(req.n)]
        self.id, self.created = new_id("chatcmpl", "-"), int(time.time())
        ctx = server.backend.context_length
        self.loops = [ToolLoop(server.backend, self.prompt, c, maker(c.index), tools=turn.run_tools,
                               conversation=f"{self.id}-{c.index}", budget=max_tokens, context=ctx,
                               max_calls=server.max_tool_calls) for c in self.choices]  # fmt: skip
        self.views = [ChatView(self.top, turn.run_tools) for _ in self.choices]

    async def _run(self, loop: ToolLoop):
        """One choice's tool loop; its tools' state (the request's own conversation) closed at the end."""
        try:
            async for step in loop.run():
                yield step
        finally:
            if loop.runs:
                close_later(self.turn.run_tools, loop.conversation)

    def _streams(self):
        return [self._run(loop) for loop in self.loops]

    def usage(self) -> dict:
        loops = self.loops
        done = sum(lp.output_tokens for lp in loops)
        prompt = len(self.prompt) + sum(lp.input_tokens - len(self.prompt) for lp in loops)
        cached = max(lp.choices[0].info.get("cached_tokens", 0) for lp in loops) + sum(
            c.info.get("cached_tokens", 0) for lp in loops for c in lp.choices[1:]
        )
        reasoning = sum(lp.reasoning_tokens for lp in loops)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }

    def _head(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    async def response(self) -> dict:
        async for i, (what, value) in merged(self._streams()):
            self.views[i].step(what, value)
        choices = [
            {
                "index": lp.choice.index,
                "message": v.message(),
                "logprobs": v.logprobs_json(),
                "finish_reason": lp.finish_reason,
            }
            for lp, v in zip(self.loops, self.views, strict=True)
        ]
        return self._head("chat.completion") | {"choices": choices, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        extra = {"usage": None} if usage else {}

        def chunk(i: int, delta: dict, lp=None, finish=None) -> str:
            c = {
                "index": i,
                "delta": delta,
                "logprobs": None if lp is None else {"content": lp},
                "finish_reason": finish,
            }
            return sse(self._head("chat.completion.chunk") | {"choices": [c]} | extra)

        for c in self.choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for i, (what, value) in merged(self._streams()):
            for delta, lp in self.views[i].step(what, value):
                yield chunk(i, delta, lp)
        for lp in self.loops:
            yield chunk(lp.choice.index, {}, finish=lp.finish_reason)
        if usage:
            yield sse(self._head("chat.completion.chunk") | {"choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    def failed(self, e) -> list[str]:
        """The end of a stream that failed after its 200 went out: an error chunk (OpenAI's error shape),
        and no [DONE]."""
        return [sse(e.body())]

    def summary(self) -> str:
        u = self.usage()
        calls = sum(len(lp.runs) for lp in self.loops)
        return (
            f"prompt={u['prompt_tokens']} completion={u['completion_tokens']} "
            f"finish={','.join(lp.finish_reason for lp in self.loops)}"
            + (f" tool_calls={calls}" if calls else "")
        )


class ChatView:
    """One choice's events -> chat-completions deltas, and the message folded from those same deltas."""

    def __init__(self, top: int | None, run_tools: dict | None = None):
        self.top = top
        self.run_tools = run_tools or {}
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.lp: list[dict] = []
        self._lp_seen: dict[int, int] = {}  # id(part) -> log-prob entries already sent
        self._open_reasoning = None

    def step(self, what: str, value) -> list[tuple[dict, list | None]]:
        """A step of the tool loop: parser events, or a tool's result (shown in reasoning)."""
        if what == "events":
            return self.deltas(value)
        if what == "result":
            run: ToolRun = value
            return [self._reason(run, f"[result {run.recipient}]\n{run.result.text}")]
        return []

    def _reason(self, part, text: str) -> tuple[dict, None]:
        """`text` added to reasoning, as a block of its own when `part` starts one."""
        if self._open_reasoning is not part:
            if self.reasoning:
                text = REASONING_SEP + text
            self._open_reasoning = part
        self.reasoning.append(text)
        return {"reasoning": text, "reasoning_content": text}, None

    def deltas(self, events: list[Event]) -> list[tuple[dict, list | None]]:
        out = []
        for kind, part, text in events:
            if tool_of(part, self.run_tools) is not None:  # a call the server runs: shown in reasoning
                if kind == "start":
                    out.append(self._reason(part, f"[call {recipient(part.namespace or None, part.name)}]\n"))
                elif kind == "delta" and text:
                    out.append(self._reason(part, text))
            elif part.type == "tool_call":
                if kind == "start":
                    # a built-in tool the model called unoffered keeps its address: browser.search, python
                    name = (
                        part.name
                        if part.namespace in (FUNCTIONS, None)
                        else recipient(part.namespace, part.name)
                    )
                    call = {
                        "index": part.index,
                        "id": part.call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                    self.calls.append(
                        {
                            "id": part.call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    )
                    out.append(({"tool_calls": [call]}, None))
                elif kind == "delta" and text:
                    self.calls[part.index]["function"]["arguments"] += text
                    out.append(
                        ({"tool_calls": [{"index": part.index, "function": {"arguments": text}}]}, None)
                    )
            elif part.type == "content" and kind == "delta":
                lp = None
                if self.top is not None:
                    seen = self._lp_seen.get(id(part), 0)
                    lp = [logprob_json(g, self.top) for g in part.logprobs[seen:]]
                    self._lp_seen[id(part)] = len(part.logprobs)
                    self.lp += lp
                if text or lp:
                    self.content.append(text)
                    out.append(({"content": text}, lp))
            elif part.type in ("reasoning", "preamble") and kind == "delta" and text:
                out.append(self._reason(part, text))
        return out

    def message(self) -> dict:
        reasoning = "".join(self.reasoning) or None
        msg = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.calls else None,
            "reasoning": reasoning,
            "reasoning_content": reasoning,
        }
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg

    def logprobs_json(self) -> dict | None:
        return None if self.top is None else {"content": self.lp}


def token_json(token: int) -> dict:
    b = get_encoding().decode_single_token_bytes(token)
    return {"token": b.decode("utf-8", "replace"), "bytes": list(b)}


def logprob_json(g, top: int) -> dict:
    return token_json(g.token) | {
        "logprob": g.logprob,
        "top_logprobs": [token_json(t) | {"logprob": lp} for t, lp in (g.top or [])[:top]],
    }


def sse(obj: dict, event: str | None = None) -> str:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"
