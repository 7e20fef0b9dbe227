"""Request bodies of the OpenAI API, validated at the edge, and the API's error.

Every request is checked here before anything else runs: a bad field becomes an `APIError` (HTTP 400) whose
one-line message names the field (`messages[2].role: ...`).

Field policy of the three request bodies (`check_unsupported`): a field the request model declares is
honoured; a field of `IGNORED` (with its reason) is accepted and has no effect; a field of `REFUSED` is
accepted only at its default value (what clients send when they mean "off"), a 400 otherwise; every other
top-level field is a 400 `<field>: not supported`. docs/serving.md lists every field of every endpoint with
its status, and tests/api/test_api_fields.py checks that table against these sets.

Size limits (a 400 naming the field): `MAX_MESSAGES` messages (chat) or input items (Responses),
`MAX_TOOLS` tools, `MAX_SCHEMA_BYTES` bytes of one tool's (or the answer's) JSON Schema, serialized.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # choices per request (each is a sequence in the engine)
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 2048  # chat messages / Responses input items per request
MAX_TOOLS = 128  # tools per request, as OpenAI
MAX_SCHEMA_BYTES = 64 * 1024  # one JSON Schema (tool parameters, response format), as compact JSON


class APIError(ValueError):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
        504: "timeout_error",
    }

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def _loc(loc: tuple) -> str:
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif not str(x).startswith(("function-", "literal[", "list[", "str", "int", "dict[", "union")):
            out += f".{x}" if out else str(x)
    return out


def parse(model: type[BaseModel], data: Any, where: str = ""):
    """`model` validated from JSON data, or an APIError naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(
            f"{where or 'the request body'} must be a JSON object, got {type(data).__name__}",
            param=where or None,
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # of a union's branches, the one that got furthest
        param = _loc(((where,) if where else ()) + tuple(err["loc"]))
        got = f" (got {err['input']!r:.80})" if err["type"] not in ("missing",) and "input" in err else ""
        msg = "field required" if err["type"] == "missing" else err["msg"]
        raise APIError(f"{param}: {msg}{got}", param=param) from None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ----------------------------------------------------------------------------------------------- shared
def _schema_size(v):
    """A JSON Schema's checks before any library reads it: its size, and `$schema` (the dialect's URI, which
    jsonschema looks up in a dict) a string."""
    if v is not None and not isinstance(v.get("$schema", ""), str):
        raise ValueError("$schema must be a string (the URI of a JSON Schema dialect)")
    if v is not None and len(json.dumps(v, separators=(",", ":"))) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON Schema is larger than {MAX_SCHEMA_BYTES} bytes")
    return v


class FunctionDef(_Base):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _size = field_validator("parameters")(lambda v: _schema_size(v))


class JsonSchemaFormat(_Base):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    _size = field_validator("schema_")(lambda v: _schema_size(v))


class StreamOptions(_Base):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # Responses: no obfuscation padding is sent either way


def _stop_list(v):
    if v is None or isinstance(v, str):
        return [v] if v else []
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    return list(v)


class _Sampling(_Base):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's sampling extensions (gptoss_jax.sampling): top_k 0 or -1 = off, min_p 0 = off, penalty 1 = off
    top_k: int | None = Field(None, ge=-1, lt=2**31)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)

    def sampling(self) -> dict:
        """The request's vLLM sampling extensions as `Server.params` keywords."""
        return {"top_k": max(self.top_k or 0, 0), "min_p": self.min_p or 0.0,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty}  # fmt: skip


def _map_effort(v):
    return "low" if v == "minimal" else v  # gpt-oss has three efforts; OpenAI's "minimal" is its lowest


# -------------------------------------------------------------------------------------- chat completions
class ContentPart(_Base):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ToolCallFunction(_Base):
    name: str
    arguments: str = ""


class ToolCall(_Base):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatTool(_Base):
    type: Literal["function"]
    function: FunctionDef


class _Named(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: _Named


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    _stop = field_validator("stop", mode="before")(lambda v: _stop_list(v))
    _effort = field_validator("reasoning_effort")(lambda v: _map_effort(v))


# ------------------------------------------------------------------------------------------- responses
class ReasoningConfig(_Base):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: str | None = None
    generate_summary: str | None = None  # the older name of summary

    _effort = field_validator("effort")(lambda v: _map_effort(v))


class TextFormat(_Base):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    _size = field_validator("schema_")(lambda v: _schema_size(v))


class TextConfig(_Base):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, no effect: gpt-oss has no such knob


class ResponseFunctionTool(FunctionDef):
    type: Literal["function"]


class CustomToolFormat(_Base):
    type: Literal["text", "grammar"] = "text"
    syntax: Literal["lark", "regex"] | None = None
    definition: str | None = None


class CustomTool(_Base):
    """A tool whose input is free-form text (`format`: a grammar the text must follow)."""

    type: Literal["custom"]
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")
    description: str | None = None
    format: CustomToolFormat | None = None
    strict: ClassVar[None] = None  # never JSON-strict: a grammar, when given, is enforced instead
    parameters: ClassVar[None] = None


class NamespaceTool(_Base):
    """Function and custom tools under a namespace of their own (harmony renders it beside `functions`)."""

    type: Literal["namespace"]
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    tools: list[dict[str, Any]] = Field(min_length=1)


class ResponseNamedToolChoice(_Base):
    type: Literal["function", "custom"]
    name: str


class ResponsesRequest(_Sampling):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    text: TextConfig | None = None
    metadata: dict[str, Any] | None = None
    include: list[str] | None = None  # "message.output_text.logprobs": log-probs on output_text parts
    max_tool_calls: int | None = Field(
        None, ge=0
    )  # calls of the tools the server runs (at most the server's)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("input")
    @classmethod
    def _items(cls, v):
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} input items, got {len(v)}")
        return v


class InputText(_Base):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Base):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Base):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class CustomToolCallItem(_Base):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None


class FunctionCallOutputItem(_Base):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningText(_Base):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Base):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


class CodeInterpreterCallItem(_Base):
    """A python call the server ran (code_interpreter_call), sent back: the code and its logs."""

    type: Literal["code_interpreter_call"]
    code: str | None = None
    outputs: list[dict[str, Any]] | None = None


class WebSearchCallItem(_Base):
    type: Literal["web_search_call"]
    action: dict[str, Any] | None = None


class McpCallItem(_Base):
    type: Literal["mcp_call"]
    server_label: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str = ""
    output: str | None = None
    error: str | dict[str, Any] | None = None


class McpListToolsItem(_Base):
    type: Literal["mcp_list_tools"]


INPUT_ITEMS = {
    "code_interpreter_call": CodeInterpreterCallItem,
    "web_search_call": WebSearchCallItem,
    "mcp_call": McpCallItem,
    "mcp_list_tools": McpListToolsItem,
    "message": InputMessage,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


def parse_input_item(i: int, item: Any):
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind not in INPUT_ITEMS:
        raise APIError(
            f"input[{i}].type: unsupported input item type {kind!r} (supported: {', '.join(INPUT_ITEMS)})",
            param=f"input[{i}].type",
        )
    return parse(INPUT_ITEMS[kind], item, f"input[{i}]")


RESPONSE_TOOLS = {"function": ResponseFunctionTool, "custom": CustomTool, "namespace": NamespaceTool}


def parse_response_tool(i: int, tool: Any, where: str = "tools"):
    """A function, custom or namespace tool (inside a namespace: function or custom); None for another type,
    which the caller decides about (a hosted tool, `api/hosted.py`)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if not isinstance(kind, str):
        raise APIError(f"{where}[{i}].type: field required", param=f"{where}[{i}].type")
    if kind not in RESPONSE_TOOLS:
        return None
    if where != "tools" and kind == "namespace":
        raise APIError(f"{where}[{i}].type: namespaces do not nest", param=f"{where}[{i}].type")
    return parse(RESPONSE_TOOLS[kind], tool, f"{where}[{i}]")


# ----------------------------------------------------------------------------------------- completions
class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: list[str] = Field(default_factory=list)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    _stop = field_validator("stop", mode="before")(lambda v: _stop_list(v))


# ------------------------------------------------------------------------------------------ field policy
# Accepted and ignored, on every endpoint that does not declare the field itself (docs/serving.md: why).
IGNORED: dict[str, str] = {
    "user": "an end-user id for abuse monitoring, which this server does not do",
    "safety_identifier": "an end-user id for abuse monitoring, which this server does not do",
    "service_tier": "there is one tier",
    "prompt_cache_key": "the prefix cache is automatic and exact: every request may reuse any prefix",
    "prompt_cache_retention": "the prefix cache is automatic (least recently used pages go first)",
    "prompt_cache_options": "the prefix cache is automatic",
    "client_metadata": "Codex CLI's client information, for the provider's logs",
    "metadata": "chat and completions store nothing to attach it to (Responses echoes it)",
    "store": "chat completions are not stored (Responses stores)",
    "verbosity": "gpt-oss has no verbosity control",
}

# Accepted only at these values (their defaults, what clients send to mean "off"); a 400 otherwise.
_NONE = (None,)
REFUSED: dict[str, dict[str, tuple]] = {
    "chat": {
        "frequency_penalty": (None, 0, 0.0),
        "presence_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
        "audio": _NONE,
        "prediction": _NONE,
        "modalities": (None, ["text"]),
        "functions": _NONE,
        "function_call": _NONE,
        "web_search_options": _NONE,
        "moderation": _NONE,
    },
    "responses": {
        "background": (None, False),
        "truncation": (None, "disabled"),
        "conversation": _NONE,
        "prompt": _NONE,
        "context_management": _NONE,
        "background_options": _NONE,
        "image": _NONE,
        "access_programs": _NONE,
        "moderation": _NONE,
    },
    "completions": {
        "frequency_penalty": (None, 0, 0.0),
        "presence_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
        "best_of": (None, 1),
        "suffix": (None, ""),
    },
}
UNSUPPORTED = REFUSED  # the former name


def endpoint_of(req: BaseModel) -> str:
    return {ChatRequest: "chat", ResponsesRequest: "responses", CompletionRequest: "completions"}[type(req)]


def honoured(endpoint: str) -> set[str]:
    """The top-level fields a request of `endpoint` honours (its model's fields, by their JSON names)."""
    model = {"chat": ChatRequest, "responses": ResponsesRequest, "completions": CompletionRequest}[endpoint]
    return {f.alias or name for name, f in model.model_fields.items()}


def ignored(endpoint: str) -> set[str]:
    return set(IGNORED) - honoured(endpoint)


def check_unsupported(req: BaseModel) -> None:
    """The field policy (module docstring): a 400 naming the first field this server neither honours nor
    may ignore."""
    endpoint = endpoint_of(req)
    refused, skip = REFUSED[endpoint], ignored(endpoint)
    for name, value in (req.model_extra or {}).items():
        if name in skip:
            continue
        if name in refused:
            if any(value == ok and type(value) is type(ok) or value is ok for ok in refused[name]):
                continue
            raise APIError(f"{name}: not supported by this server (got {value!r:.60})", param=name)
        raise APIError(f"{name}: not supported by this server", param=name)
