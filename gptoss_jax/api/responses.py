"""`POST /v1/responses` (and `GET /v1/responses/{id}` for stored ones).

Output items, one per harmony message: `reasoning` (its text as `reasoning_text` content; with `include:
["reasoning.encrypted_content"]` also sealed in `encrypted_content`, see `sealed.py`), `message` (`phase`
"final_answer" for the final channel, "commentary" for a preamble), `function_call` (with `namespace` for a
function of a namespace tool, or of a built-in tool the model called unoffered: browser, python, container),
`custom_tool_call` (`input`: the text the model wrote, for a custom tool). Streaming
sends OpenAI's events: response.created, response.in_progress, then for each item
response.output_item.added, response.content_part.added, the text deltas (response.reasoning_text.delta,
response.output_text.delta, response.function_call_arguments.delta, response.custom_tool_call_input.delta)
and their .done events,
response.content_part.done, response.output_item.done, and last response.completed (response.incomplete
when max_output_tokens cut the answer), with usage. The non-streamed object is folded from the same events.

`store` (default true) keeps the conversation (as harmony messages, so a later `previous_response_id`
renders it exactly as the model wrote it) and the response object, in memory, for the last
`ResponseStore.capacity` responses.
"""

from __future__ import annotations

import collections
import copy
import time
from collections.abc import AsyncIterator

from ..harmony import FUNCTIONS, Chat, Event, OutputParser, Part, is_custom, new_id, parts_to_messages
from .chat import logprob_json, sse
from .constraints import check_schemas, constraint_spec
from .harmony_io import responses_turn
from .protocol import APIError, ResponsesRequest, check_unsupported, parse
from .run import Choice, Server, run_choice


class ResponseStore:
    """The last `capacity` stored responses: id -> (conversation after it, response object)."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, tuple[Chat, dict]] = collections.OrderedDict()

    def put(self, rid: str, chat: Chat, obj: dict) -> None:
        self._items[rid] = (chat, obj)
        self._items.move_to_end(rid)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str, param: str = "previous_response_id") -> tuple[Chat, dict]:
        if rid not in self._items:
            raise APIError(
                f"{param}: no stored response {rid!r} (responses are stored with store=true, in "
                f"memory, the last {self.capacity})",
                404,
                param=param,
                code="response_not_found",
            )
        return self._items[rid]


class ResponseJob:
    def __init__(self, server: Server, store: ResponseStore, body: dict):
        req = parse(ResponsesRequest, body)
        check_unsupported(req)
        self.model = server.check_model(req.model) or server.model_name  # an adapter answers as itself
        self.req, self.server, self.store = req, server, store
        previous = store.get(req.previous_response_id)[0] if req.previous_response_id else None
        self.turn = turn = responses_turn(
            req,
            previous,
            server.reasoning_effort,
            strict_tools=server.strict_tools,
            sealer=server.sealer,
        )
        self.seal = "reasoning.encrypted_content" in (req.include or [])
        self.prompt = turn.prompt_tokens(server.start_date)
        max_tokens = server.budget(len(self.prompt), req.max_output_tokens, "max_output_tokens", "input")
        fmt = req.text.format if req.text else None
        schema = None
        if fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.schema_ or {}
        spec = constraint_spec(
            tools=turn.tools, tool_choice=turn.tool_choice, json_schema=schema, namespaces=turn.namespaces
        )
        where = {to.removeprefix(f"{FUNCTIONS}."): f"{w}.parameters" for to, w in turn.where.items()}
        check_schemas(spec, where | turn.where | {"": "text.format.schema"})
        # log-probs of the answer's tokens: include "message.output_text.logprobs" (or top_logprobs set)
        want_lp = "message.output_text.logprobs" in (req.include or []) or req.top_logprobs is not None
        self.top = (req.top_logprobs or 0) if want_lp else None
        self._lp_seen: dict[int, int] = {}  # id(part) -> log-prob entries already sent
        self.choice = Choice(
            0,
            server.params(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                index=0,
                spec=spec,
                logprobs=self.top,
                **req.sampling(),
            ),
            OutputParser(single_tool_call=not req.parallel_tool_calls, namespaces=list(turn.namespaces)),
        )
        self.choices = [self.choice]
        self.id, self.created = new_id("resp"), int(time.time())
        self.items: list[dict] = []
        self._index: dict[int, int] = {}  # id(part) -> output index
        self._seq = 0

    def obj(self, status: str, usage: dict | None = None) -> dict:
        req = self.req
        choice = req.tool_choice
        effort = self.turn.reasoning_effort
        fmt = (
            req.text.format.model_dump(by_alias=True, exclude_none=True)
            if req.text and req.text.format
            else {"type": "text"}
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": copy.deepcopy(self.items),
            "usage": usage,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": None},
            "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": fmt},
            "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
            "tools": [{"strict": None, "description": None, **t} for t in req.tools or []],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "background": False,
        }

    def usage(self) -> dict:
        n, cached = len(self.choice.tokens), self.choice.info.get("cached_tokens", 0)
        return {
            "input_tokens": len(self.prompt),
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": self.choice.parser.reasoning_tokens},
            "total_tokens": len(self.prompt) + n,
        }

    # ------------------------------------------------------------------------------------ events -> items
    def _ev(self, type_: str, **kw) -> tuple[str, dict]:
        """An event (numbered in order) as (name, body)."""
        self._seq += 1
        return type_, {"type": type_, "sequence_number": self._seq - 1, **kw}

    def _sse(self, type_: str, **kw) -> str:
        name, body = self._ev(type_, **kw)
        return sse(body, name)

    def events(self, events: list[Event]) -> list[tuple[str, dict]]:
        out = []
        for kind, part, text in events:
            if kind == "start":
                self._index[id(part)] = len(self.items)
                custom = part.type == "tool_call" and is_custom(self.turn.tool(part.namespace, part.name))
                self.items.append(new_item(part, custom))
            idx = self._index[id(part)]
            item = self.items[idx]
            ref = {"item_id": item["id"], "output_index": idx}
            if kind == "start":
                out.append(self._ev("response.output_item.added", output_index=idx, item=copy.deepcopy(item)))
                if part.type != "tool_call":
                    out.append(
                        self._ev("response.content_part.added", **ref, content_index=0, part=empty_part(part))
                    )
            elif kind == "delta" and text:
                if item["type"] == "custom_tool_call":
                    item["input"] += text
                    out.append(self._ev("response.custom_tool_call_input.delta", **ref, delta=text))
                elif part.type == "tool_call":
                    item["arguments"] += text
                    out.append(self._ev("response.function_call_arguments.delta", **ref, delta=text))
                elif part.type == "reasoning":
                    item["content"][0]["text"] += text
                    out.append(self._ev("response.reasoning_text.delta", **ref, content_index=0, delta=text))
                else:
                    content = item["content"][0]
                    content["text"] += text
                    lps = self._new_logprobs(part)
                    content["logprobs"] += lps
                    ev = self._ev(
                        "response.output_text.delta", **ref, content_index=0, delta=text, logprobs=lps
                    )
                    out.append(ev)
            elif kind == "end":
                cut = self.choice.hit_length and part is self.choice.parser.parts[-1]
                item["status"] = "incomplete" if cut else "completed"
                if item["type"] == "custom_tool_call":
                    item.pop("status")  # a custom tool call has none in OpenAI's shape
                    out.append(self._ev("response.custom_tool_call_input.done", **ref, input=item["input"]))
                elif part.type == "tool_call":
                    out.append(
                        self._ev(
                            "response.function_call_arguments.done",
                            **ref,
                            name=part.name,
                            arguments=item["arguments"],
                        )
                    )
                else:
                    content = item["content"][0]
                    done = (
                        "response.reasoning_text.done"
                        if part.type == "reasoning"
                        else "response.output_text.done"
                    )
                    if part.type != "reasoning":  # log-probs of tokens that released no text yet
                        content["logprobs"] += self._new_logprobs(part)
                    lps = copy.deepcopy(content.get("logprobs", []))
                    extra = {} if part.type == "reasoning" else {"logprobs": lps}
                    out.append(self._ev(done, **ref, content_index=0, text=content["text"], **extra))
                    if part.type == "reasoning" and self.seal:
                        item["encrypted_content"] = self.server.sealer.seal(content["text"])
                    out.append(
                        self._ev(
                            "response.content_part.done", **ref, content_index=0, part=copy.deepcopy(content)
                        )
                    )
                out.append(self._ev("response.output_item.done", output_index=idx, item=copy.deepcopy(item)))
        return out

    def _new_logprobs(self, part: Part) -> list[dict]:
        if self.top is None:
            return []
        seen = self._lp_seen.get(id(part), 0)
        self._lp_seen[id(part)] = len(part.logprobs)
        return [logprob_json(g, self.top) for g in part.logprobs[seen:]]

    def failed(self, e: APIError) -> list[str]:
        """The end of a stream that failed after its 200 went out: an `error` event, then
        `response.failed` with the response so far (status "failed", `error` {code, message})."""
        code = e.code or "server_error"
        obj = self.obj("failed", self.usage()) | {"error": {"code": "server_error", "message": str(e)}}
        return [
            self._sse("error", code=code, message=str(e), param=e.param),
            self._sse("response.failed", response=obj),
        ]

    def _finish(self) -> dict:
        status = "incomplete" if self.choice.finish_reason == "length" else "completed"
        obj = self.obj(status, self.usage())
        if self.req.store:
            stored = Chat(
                messages=self.turn.messages + parts_to_messages(self.choice.parser.parts),
                reasoning_effort=self.turn.reasoning_effort,
                call_names=dict(self.turn.call_names),
            )
            stored.call_namespaces = dict(self.turn.call_namespaces)
            for p in self.choice.parser.tool_calls:
                stored.call_names[p.call_id] = p.name
                if p.namespace != FUNCTIONS:
                    stored.call_namespaces[p.call_id] = p.namespace
            self.store.put(self.id, stored, obj)
        return obj

    async def response(self) -> dict:
        async for events in run_choice(self.server.backend, self.prompt, self.choice):
            self.events(events)
        return self._finish()

    async def stream(self) -> AsyncIterator[str]:
        yield self._sse("response.created", response=self.obj("in_progress"))
        yield self._sse("response.in_progress", response=self.obj("in_progress"))
        async for events in run_choice(self.server.backend, self.prompt, self.choice):
            for name, ev in self.events(events):
                yield sse(ev, name)
        obj = self._finish()
        yield self._sse(
            "response.incomplete" if obj["status"] == "incomplete" else "response.completed", response=obj
        )

    def summary(self) -> str:
        return (
            f"prompt={len(self.prompt)} completion={len(self.choice.tokens)} "
            f"finish={self.choice.finish_reason}"
        )


def new_item(part: Part, custom: bool = False) -> dict:
    """The output item a part starts (custom: a call of a custom tool)."""
    if part.type == "tool_call":
        ns = {} if part.namespace in (FUNCTIONS, "", None) else {"namespace": part.namespace}
        if custom:
            return {
                "id": new_id("ctc"),
                "type": "custom_tool_call",
                "call_id": part.call_id,
                "name": part.name,
                "input": "",
                **ns,
            }
        return {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": part.call_id,
            "name": part.name,
            "arguments": "",
            **ns,
        }
    if part.type == "reasoning":
        return {
            "id": new_id("rs"),
            "type": "reasoning",
            "status": "in_progress",
            "summary": [],
            "content": [empty_part(part)],
        }
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "phase": "commentary" if part.type == "preamble" else "final_answer",
        "content": [empty_part(part)],
    }


def empty_part(part: Part) -> dict:
    if part.type == "reasoning":
        return {"type": "reasoning_text", "text": ""}
    return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
