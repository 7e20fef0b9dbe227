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

Tools the server runs itself (`toolloop.py`): a call becomes its own item instead of a `function_call`, and
generation goes on in the same response. `code_interpreter_call` (python: `code`, `container_id`, `outputs`
[{"type": "logs", "logs"}]) streams response.code_interpreter_call.in_progress, the code's
response.code_interpreter_call_code.delta and .done, .interpreting while it runs, .completed;
`web_search_call` (browser: `action` search, open_page or find_in_page) streams
response.web_search_call.in_progress, .searching, .completed; `mcp_call` (an MCP server's tool: `server_label`,
`name`, `arguments`, `output` or `error`) streams response.mcp_call.in_progress, response.mcp_call_arguments
.delta and .done, then .completed or .failed. Each ends with response.output_item.done. The final answer's
text gets the tools' annotations (`url_citation`, from the browser's citations), each announced by
response.output_text.annotation.added. Usage counts every generation of the loop (input_tokens: each
prompt in full; cached_tokens: what the prefix cache spared of them).

The conversation of stateful tools (python's kernel): the first response's id of a `previous_response_id`
chain, so that state persists across turns; when the last stored response of a conversation is evicted from
the store, its tools' state is closed (else the tools' idle timeouts end it).

`store` (default true) keeps the conversation (as harmony messages, so a later `previous_response_id`
renders it exactly as the model wrote it) and the response object, in memory, for the last
`ResponseStore.capacity` responses.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import time
from collections.abc import AsyncIterator

from ..harmony import FUNCTIONS, Chat, Event, OutputParser, Part, is_custom, new_id
from .chat import logprob_json, sse
from .constraints import check_schemas, constraint_spec
from .harmony_io import responses_turn
from .protocol import APIError, ResponsesRequest, check_unsupported, parse
from .run import Choice, Server
from .toolloop import ToolLoop, ToolRun, item_type, tool_of


class ResponseStore:
    """The last `capacity` stored responses: id -> (conversation after it, response object), and the key
    of the tools' conversation each belongs to. `on_close(key)`: called when the last stored response of a
    conversation is evicted (the server closes the tools' state of that conversation)."""

    def __init__(self, capacity: int = 1024, on_close=None):
        self.capacity = capacity
        self.on_close = on_close
        self._items: collections.OrderedDict[str, tuple[Chat, dict]] = collections.OrderedDict()
        self._conversation: dict[str, str] = {}  # response id -> conversation key
        self._count: collections.Counter = collections.Counter()  # conversation key -> stored responses

    def put(self, rid: str, chat: Chat, obj: dict, conversation: str | None = None) -> None:
        if rid not in self._items and conversation is not None:
            self._conversation[rid] = conversation
            self._count[conversation] += 1
        self._items[rid] = (chat, obj)
        self._items.move_to_end(rid)
        while len(self._items) > self.capacity:
            old, _ = self._items.popitem(last=False)
            key = self._conversation.pop(old, None)
            if key is not None:
                self._count[key] -= 1
                if self._count[key] <= 0:
                    del self._count[key]
                    if self.on_close is not None:
                        self.on_close(key)

    def conversation(self, rid: str) -> str | None:
        """The tools' conversation key of a stored response (None: it had none)."""
        return self._conversation.get(rid)

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
        server.check_model(req.model)
        self.req, self.server, self.store = req, server, store
        self.id, self.created = new_id("resp"), int(time.time())
        previous = store.get(req.previous_response_id)[0] if req.previous_response_id else None
        self.turn = turn = responses_turn(
            req,
            previous,
            server.reasoning_effort,
            strict_tools=server.strict_tools,
            sealer=server.sealer,
            run_tools=server.tools,
            allow_mcp_urls=server.allow_mcp_urls,
        )
        # the tools' conversation: that of the chain this response continues, else its own
        self.conversation = (store.conversation(req.previous_response_id) if previous else None) or self.id
        self.seal = "reasoning.encrypted_content" in (req.include or [])
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
        self._spec = spec
        self.items: list[dict] = []
        self._index: dict[int, int] = {}  # id(part) -> output index
        self._seq = 0
        self.choices: list = [None]  # one sequence (what the server admits); the loop's first generation
        self.loop: ToolLoop | None = None
        self.prompt: list[int] = []
        if not turn.mcp:  # else once its MCP servers are connected (`_open`), which declares their tools
            self._setup()

    def _setup(self) -> None:
        """The prompt (the tools declared), the budget, the first generation and the tool loop."""
        req, server, turn = self.req, self.server, self.turn
        self.prompt = turn.prompt_tokens(server.start_date)
        max_tokens = server.budget(len(self.prompt), req.max_output_tokens, "max_output_tokens", "input")

        def make_choice(n: int) -> Choice:
            params = server.params(max_tokens=n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                   index=0, spec=self._spec, logprobs=self.top, **req.sampling())  # fmt: skip
            namespaces = [*turn.namespaces, *turn.run_tools]
            return Choice(0, params, OutputParser(single_tool_call=not req.parallel_tool_calls,
                                                  namespaces=namespaces))  # fmt: skip

        self.choices = [make_choice(max_tokens)]
        limit = server.max_tool_calls
        if req.max_tool_calls is not None:
            limit = min(req.max_tool_calls, limit)
        self.loop = ToolLoop(server.backend, self.prompt, self.choices[0], make_choice, tools=turn.run_tools,
                             conversation=self.conversation, budget=max_tokens,
                             context=server.backend.context_length, max_calls=limit)  # fmt: skip

    async def _open(self, stack: contextlib.AsyncExitStack) -> list[tuple[str, dict]]:
        """Connects the request's `mcp` tools (closed with `stack`), each an `mcp_list_tools` item with its
        events, declares their tools, then sets the loop up. A server that does not connect is an item with
        its `error` (response.mcp_list_tools.failed), and the response goes on without it."""
        from ..tools import MCPConnectError, list_tools_error_item, open_mcp

        out = []
        for m in self.turn.mcp:
            label = m["server_label"]
            item = {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": label, "tools": []}
            idx = len(self.items)
            self.items.append(item)
            ref = {"item_id": item["id"], "output_index": idx}
            out.append(self._ev("response.output_item.added", output_index=idx, item=copy.deepcopy(item)))
            out.append(self._ev("response.mcp_list_tools.in_progress", **ref))
            try:
                tool = await stack.enter_async_context(open_mcp(
                    m["server_url"], server_label=label, allowed_tools=m["allowed_tools"], headers=m["headers"],
                    authorization=m["authorization"], server_description=m["server_description"]))  # fmt: skip
            except MCPConnectError as e:
                item.update(list_tools_error_item(label, str(e)))
                out.append(self._ev("response.mcp_list_tools.failed", **ref))
            else:
                base, n = tool.name, 2
                while tool.name in self.turn.run_tools or tool.name in RESERVED:
                    tool.name, n = f"{base}_{n}", n + 1
                self.turn.run_tools[tool.name] = tool
                self.turn.system_tools.append(tool.config())
                item.update(tool.list_tools_item())
                out.append(self._ev("response.mcp_list_tools.completed", **ref))
            out.append(self._ev("response.output_item.done", output_index=idx, item=copy.deepcopy(item)))
        self._setup()
        return out

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
            "model": self.server.model_name,
            "output": copy.deepcopy(self.items),
            "usage": usage,
            "error": None,
            "incomplete_details": self._incomplete() if status == "incomplete" else None,
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
            **({} if req.max_tool_calls is None else {"max_tool_calls": req.max_tool_calls}),
        }

    def _incomplete(self) -> dict:
        return {"reason": "max_tool_calls" if self.loop.limited else "max_output_tokens"}

    @property
    def choice(self) -> Choice:
        """The generation of the loop under way (the last)."""
        return self.loop.choice

    def usage(self) -> dict:
        loop = self.loop
        if loop is None:  # failed before it started (an MCP server's prompt over the context)
            return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}  # fmt: skip
        n, prompt = loop.output_tokens, loop.input_tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": loop.cached_tokens},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": loop.reasoning_tokens},
            "total_tokens": prompt + n,
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
            tool = tool_of(part, self.turn.run_tools)
            if tool is not None:
                out += self._tool_events(kind, part, text, tool)
                continue
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
                    if part.type == "content":
                        out += self._annotations(ref, content)
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

    # --------------------------------------------------------------------- tools the server runs
    def _tool_events(self, kind: str, part: Part, text: str, tool) -> list[tuple[str, dict]]:
        """A call of a tool the server runs, as it streams: its item and the events of its type."""
        if kind == "start":
            self._index[id(part)] = len(self.items)
            self.items.append(tool_item(part, tool, self.conversation))
        idx = self._index[id(part)]
        item = self.items[idx]
        ref = {"item_id": item["id"], "output_index": idx}
        t = item["type"]
        out = []
        if kind == "start":
            out.append(self._ev("response.output_item.added", output_index=idx, item=copy.deepcopy(item)))
            out.append(self._ev(f"response.{t}.in_progress", **ref))
        elif kind == "delta" and text:
            if t == "code_interpreter_call":
                item["code"] += text
                out.append(self._ev("response.code_interpreter_call_code.delta", **ref, delta=text))
            elif t == "mcp_call":
                item["arguments"] += text
                out.append(self._ev("response.mcp_call_arguments.delta", **ref, delta=text))
        elif kind == "end":
            if t == "code_interpreter_call":
                out.append(self._ev("response.code_interpreter_call_code.done", **ref, code=item["code"]))
            elif t == "mcp_call":
                out.append(self._ev("response.mcp_call_arguments.done", **ref, arguments=item["arguments"]))
        return out

    def loop_events(self, what: str, value) -> list[tuple[str, dict]]:
        """The tool loop's own steps: a generation ended ("generated": the call to run, or None), a call
        starts ("call") or has its result ("result")."""
        out = []
        if what == "generated":  # calls of this generation that will not run: incomplete
            for part in self.choice.parser.parts:
                if id(part) in self._index and (value is None or part is not value.part):
                    item = self.items[self._index[id(part)]]
                    if item["type"] in TOOL_ITEMS and item["status"] == "in_progress":
                        item["status"] = "incomplete"
                        out.append(self._ev("response.output_item.done", output_index=self._index[id(part)],
                                            item=copy.deepcopy(item)))  # fmt: skip
            return out
        run: ToolRun = value
        idx = self._index[id(run.part)]
        item = self.items[idx]
        ref = {"item_id": item["id"], "output_index": idx}
        t = item["type"]
        if what == "call":
            if t == "code_interpreter_call":
                item["status"] = "interpreting"
                out.append(self._ev("response.code_interpreter_call.interpreting", **ref))
            elif t == "web_search_call":
                item["status"] = "searching"
                out.append(self._ev("response.web_search_call.searching", **ref))
            else:
                item["status"] = "calling"
            return out
        result = run.result
        item.update({k: v for k, v in result.item.items() if k not in ("id", "status", "type")})
        failed = result.error is not None
        item["status"] = "failed" if failed and t != "web_search_call" else "completed"
        if t == "mcp_call" and failed and item.get("error") is None:
            item["error"] = {"type": "mcp_tool_execution_error", "content": result.text}
        if t == "code_interpreter_call" and not item.get("outputs"):
            item["outputs"] = [{"type": "logs", "logs": result.text}]
        done = "failed" if item["status"] == "failed" and t == "mcp_call" else "completed"
        out.append(self._ev(f"response.{t}.{done}", **ref))
        out.append(self._ev("response.output_item.done", output_index=idx, item=copy.deepcopy(item)))
        return out

    def _annotations(self, ref: dict, content: dict) -> list[tuple[str, dict]]:
        """The tools' annotations of a final answer's text (the browser's citations as url_citation)."""
        out = []
        for tool in self.turn.run_tools.values():
            for a in tool.annotate(self.conversation, content["text"]):
                content["annotations"].append(a)
                out.append(self._ev("response.output_text.annotation.added", **ref, content_index=0,
                                    annotation_index=len(content["annotations"]) - 1, annotation=dict(a)))  # fmt: skip
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
        status = "incomplete" if self.loop.finish_reason == "length" else "completed"
        obj = self.obj(status, self.usage())
        if self.req.store:
            stored = Chat(
                messages=self.turn.messages + self.loop.messages,
                reasoning_effort=self.turn.reasoning_effort,
                call_names=dict(self.turn.call_names),
            )
            stored.call_namespaces = dict(self.turn.call_namespaces)
            for c in self.loop.choices:
                for p in c.parser.tool_calls:
                    if tool_of(p, self.turn.run_tools) is not None:
                        continue
                    stored.call_names[p.call_id] = p.name
                    if p.namespace != FUNCTIONS:
                        stored.call_namespaces[p.call_id] = p.namespace
            self.store.put(self.id, stored, obj, self.conversation if self.turn.run_tools else None)
        return obj

    def _step(self, what: str, value) -> list[tuple[str, dict]]:
        return self.events(value) if what == "events" else self.loop_events(what, value)

    async def response(self) -> dict:
        async with contextlib.AsyncExitStack() as stack:
            if self.loop is None:
                await self._open(stack)
            async for what, value in self.loop.run():
                self._step(what, value)
            return self._finish()

    async def stream(self) -> AsyncIterator[str]:
        yield self._sse("response.created", response=self.obj("in_progress"))
        yield self._sse("response.in_progress", response=self.obj("in_progress"))
        async with contextlib.AsyncExitStack() as stack:
            if self.loop is None:
                for name, ev in await self._open(stack):
                    yield sse(ev, name)
            async for what, value in self.loop.run():
                for name, ev in self._step(what, value):
                    yield sse(ev, name)
            obj = self._finish()
        yield self._sse(
            "response.incomplete" if obj["status"] == "incomplete" else "response.completed", response=obj
        )

    def summary(self) -> str:
        loop = self.loop
        if loop is None:
            return "prompt=0 completion=0"
        calls = f" tool_calls={len(loop.runs)}" if loop.runs else ""
        return (
            f"prompt={loop.input_tokens} completion={loop.output_tokens} finish={loop.finish_reason}{calls}"
        )


TOOL_ITEMS = ("code_interpreter_call", "web_search_call", "mcp_call")
RESERVED = ("functions", "browser", "python", "container", "multi_tool_use")  # namespaces an MCP tool avoids
_WEB_ACTIONS = {"search": "search", "open": "open_page", "find": "find_in_page"}


def tool_item(part: Part, tool, conversation: str) -> dict:
    """The output item a call of a tool the server runs starts as (its tool's result fills it in)."""
    t = item_type(tool)
    if t == "code_interpreter_call":
        return {"id": new_id("ci"), "type": t, "status": "in_progress", "code": "",
                "container_id": f"cntr_{conversation}", "outputs": None}  # fmt: skip
    if t == "web_search_call":
        return {"id": new_id("ws"), "type": t, "status": "in_progress",
                "action": {"type": _WEB_ACTIONS.get(part.name or "", "search")}}  # fmt: skip
    label = getattr(tool, "server_label", tool.name)
    return {"id": new_id("mcp"), "type": "mcp_call", "status": "in_progress", "server_label": label,
            "name": part.name, "arguments": "", "output": None, "error": None}  # fmt: skip


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
