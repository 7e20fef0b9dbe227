"""Constrained decoding with llguidance: grammars over harmony tokens, and a per-step allowed-token mask.

A request is constrained when it asks for `response_format` json_object / json_schema, `tool_choice`
"required" or a named function, or offers a `strict` tool or a custom tool with a grammar. Its whole assistant turn then follows a grammar
written over harmony's own tokens (llguidance's lark names special tokens by id, `<[200005]>` is
<|channel|>, and embeds JSON Schemas with `%json`):

    start: pre* last                      pre: an analysis message or a commentary preamble, then
                                               <|end|><|start|>assistant
    last:  final | call                   final: <|channel|>final<|message|> TEXT or %json{schema} <|return|>
    call:  <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGS <|call|>

ARGS is the tool's JSON Schema for a strict tool, free text otherwise. The calls of other namespaces'
functions (`to=NS.NAME`) and of custom tools (no `<|constrain|>json`; the input follows the tool's lark or
regex grammar, when it has one, embedded as `%lark { ... }` or `/regex/`) are further alternatives of `call`. With tool_choice "required" `last` is
a call, with a named function a call to that one (so the model writes the call header itself, token by
token, under the mask); with response_format the final message is JSON valid for the schema.

Reasoning is free, but it must leave room for what the grammar requires: once fewer than `reserve` tokens
of max_tokens are left, an open analysis or preamble message is closed (<|end|> is the only token allowed)
and no new one may start (`reserve` = max_tokens // 2, at least 64 and at most 256 tokens: below 64
max_tokens there is no reasoning at all).

JSON whitespace is bounded (one optional space where JSON allows whitespace: compact JSON), so that a model
cannot fill max_tokens with blanks inside a structure the grammar requires.

`TokenMask(tokens) -> bool[V] | None` is the hook the engine applies each step: the tokens allowed next given
the tokens generated so far (None: anything). `ForcedTokens` makes generation emit a given sequence (the
server's test hook uses it to script the model's output through the real engine).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

import numpy as np

from ..tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, N_VOCAB, RETURN, START, get_encoding
from .protocol import APIError

log = logging.getLogger("gptoss_jax.api")

WHITESPACE = "[ ]?"  # one optional space where JSON allows whitespace: compact, and bounded
RESERVE_MIN, RESERVE_MAX = 64, 256  # tokens kept for what the grammar requires after the reasoning


@functools.lru_cache(maxsize=1)
def ll_tokenizer():
    """llguidance's tokenizer over our o200k_harmony encoding (built once, ~2 s)."""
    import llguidance

    enc = get_encoding()
    # tiktoken names id 200018 twice (<|endofprompt|>, <|reserved_200018|>): llguidance wants one name per id
    specials = {k: v for k, v in enc._special_tokens.items() if k != "<|reserved_200018|>"}
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=enc._mergeable_ranks,
        special_tokens=specials,
        pattern=enc._pat_str,
        eos_token=RETURN,
        n_vocab=N_VOCAB,
    )


def _tok(t: int) -> str:
    return f"<[{t}]>"


def _lit(s: str) -> str:
    return json.dumps(s)


def _json(schema: dict) -> str:
    schema = dict(schema)
    schema.setdefault("x-guidance", {"whitespace_pattern": WHITESPACE})
    return "%json " + json.dumps(schema)


def _custom_body(fmt: tuple[str, str]) -> str:
    """A custom tool's grammar as a lark rule body: a nested lark grammar, or a regex."""
    syntax, definition = fmt
    if syntax == "regex":
        return "/" + re.sub(r"(?<!\\)/", r"\\/", definition) + "/"
    return "%lark {\n" + definition + "\n}"


def grammar(
    *,
    final: dict | None | bool,
    calls: dict[str, dict | None],
    reasoning: bool = True,
    after_end: bool = False,
    other: list | tuple = (),
) -> str:
    """The lark grammar of an assistant turn.

    final: False = no final answer allowed (a call is required); None = free text; a dict = its JSON Schema.
    calls: function name -> JSON Schema of its arguments (None: free text). reasoning: analysis/preamble
    messages may come first. after_end: the turn resumes right after a forced <|end|> (budget exhausted).
    other: further calls, (recipient, "json", JSON Schema or None) or (recipient, "text", (syntax,
    definition) or None): functions of other namespaces and custom tools.
    """
    rules = []
    lasts = []
    if final is not False:
        body = "TEXT" if final is None else "final_json"
        rules.append(f'final: {_tok(CHANNEL)} "final" {_tok(MESSAGE)} {body} {_tok(RETURN)}')
        if final is not None:
            rules.append(f"final_json: {_json(final)}")
        lasts.append("final")
    if calls or other:
        names = []
        for i, (name, schema) in enumerate(calls.items()):
            args = "TEXT" if schema is None else f"args_{i}"
            rules.append(
                f'call_{i}: "functions." {_lit(name)} " " {_tok(CONSTRAIN)} "json" {_tok(MESSAGE)} {args} '
                f"{_tok(CALL)}"
            )
            if schema is not None:
                rules.append(f"args_{i}: {_json(schema)}")
            names.append(f"call_{i}")
        for i, (to, kind, body) in enumerate(other):
            if kind == "json":
                args = "TEXT" if body is None else f"oargs_{i}"
                head = f'{_lit(to)} " " {_tok(CONSTRAIN)} "json" {_tok(MESSAGE)}'
                if body is not None:
                    rules.append(f"oargs_{i}: {_json(body)}")
            else:
                args = "TEXT" if body is None else f"oargs_{i}"
                head = f"{_lit(to)} {_tok(MESSAGE)}"
                if body is not None:
                    rules.append(f"oargs_{i}: {_custom_body(body)}")
            rules.append(f"ocall_{i}: {head} {args} {_tok(CALL)}")
            names.append(f"ocall_{i}")
        rules.append(f'call: {_tok(CHANNEL)} "commentary to=" ({" | ".join(names)})')
        lasts.append("call")
    if not lasts:
        raise ValueError("grammar: nothing may end the turn")
    head = f'{_tok(END)} {_tok(START)} "assistant" ' if after_end else ""
    pre = "pre* " if reasoning else ""
    channels = '"analysis" | "commentary"' if calls or other else '"analysis"'
    return "\n".join(
        [
            f"start: {head}{pre}last",
            f'pre: {_tok(CHANNEL)} ({channels}) {_tok(MESSAGE)} TEXT {_tok(END)} {_tok(START)} "assistant"',
            f"last: {' | '.join(lasts)}",
            *rules,
            r"TEXT: /(.|\n)*/",
        ]
    )


class TokenMask:
    """The allowed next tokens of one constrained request, as a function of the tokens generated so far.

    It consumes the tokens it has not seen yet, then asks llguidance for the mask. `max_tokens` sets the
    reasoning budget (see the module docstring)."""

    def __init__(self, spec: dict, max_tokens: int):
        self.spec = spec
        self.max_tokens = max_tokens
        self.reserve = min(RESERVE_MAX, max(max_tokens // 2, RESERVE_MIN))
        self._m = _matcher(grammar(**spec, reasoning=max_tokens > self.reserve))
        self._seen = 0
        self._tail = max_tokens <= self.reserve  # no reasoning allowed any more
        self.failed = False

    def __call__(self, tokens: list[int]) -> np.ndarray | None:
        if self.failed:
            return None
        for t in tokens[self._seen :]:
            if not self._m.consume_token(int(t)):
                log.warning(
                    "constrained decoding: token %d is not allowed by the grammar (%s); the rest of "
                    "the request is unconstrained",
                    t,
                    self._m.get_error(),
                )
                self.failed = True
                return None
        self._seen = len(tokens)
        mask = unpack(self._m.compute_bitmask())
        if not self._tail and self.max_tokens - len(tokens) <= self.reserve and mask[END]:
            # inside an analysis or preamble message with the budget spent: close it, start no other
            self._m = _matcher(grammar(**self.spec, reasoning=False, after_end=True))
            self._tail = True
            mask = unpack(self._m.compute_bitmask())
        return mask


def unpack(bits: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")[:N_VOCAB].astype(bool)


def _matcher(g: str):
    import llguidance

    m = llguidance.LLMatcher(ll_tokenizer(), g, log_level=0)
    if m.is_error():
        raise ValueError(m.get_error())
    return m


def check_schema(schema: dict, where: str) -> None:
    """A 400 naming `where` when llguidance cannot compile a schema we must enforce."""
    import llguidance

    g = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({"x-guidance": {"whitespace_pattern": WHITESPACE}, **schema})
    )
    is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(g, ll_tokenizer())
    if is_error:
        raise APIError(
            f"{where}: this JSON Schema cannot be enforced: {msgs[0].splitlines()[0]}", param=where
        )


def _grammar_of(fn: Any) -> tuple[str, str] | None:
    fmt = getattr(fn, "format", None)
    if fmt is None or fmt.type != "grammar":
        return None
    return (fmt.syntax or "lark", fmt.definition or "")


def constraint_spec(
    *, tools: dict[str, Any], tool_choice: str, json_schema: dict | None, namespaces: dict | None = None
) -> dict | None:
    """The grammar settings of a request, or None when it needs no constraint.

    tools: name -> FunctionDef or custom tool (those rendered in `functions`); namespaces: name ->
    `harmony.Namespace` (the Responses API's namespace tools); json_schema: the schema the final answer must
    follow (response_format json_object: {"type": "object"}), None for free text."""
    namespaces = namespaces or {}
    every = list(tools.values()) + [f for ns in namespaces.values() for f in ns.tools.values()]
    strict = [f for f in every if getattr(f, "type", "function") != "custom" and f.strict]
    grammars = [f for f in every if _grammar_of(f) is not None]
    if json_schema is None and tool_choice in ("auto", "none") and not strict and not grammars:
        return None
    final = False if tool_choice not in ("auto", "none") else json_schema
    names = (
        list(tools) if tool_choice in ("auto", "required") else [tool_choice] if tool_choice != "none" else []
    )
    calls, other = {}, []
    for n in names:
        f = tools[n]
        if getattr(f, "type", "function") == "custom":
            other.append((f"functions.{n}", "text", _grammar_of(f)))
        else:
            calls[n] = (f.parameters or {"type": "object"}) if f.strict else None
    if tool_choice in ("auto", "required"):
        for ns_name, ns in namespaces.items():
            for n, f in ns.tools.items():
                if getattr(f, "type", "function") == "custom":
                    other.append((f"{ns_name}.{n}", "text", _grammar_of(f)))
                else:
                    other.append(
                        (f"{ns_name}.{n}", "json", (f.parameters or {"type": "object"}) if f.strict else None)
                    )
    spec = {"final": final, "calls": calls}
    if other:
        spec["other"] = other
    return spec


def check_schemas(spec: dict | None, where: dict[str, str]) -> None:
    """400 naming the field when a schema or grammar the request must follow cannot be compiled (where:
    name -> field, "" for the final answer's schema; for other namespaces and custom tools, recipient ->
    the tool's field)."""
    if spec is None:
        return
    if isinstance(spec["final"], dict):
        check_schema(spec["final"], where[""])
    for name, schema in spec["calls"].items():
        if schema is not None:
            check_schema(schema, where[name])
    for to, kind, body in spec.get("other", ()):
        field = where.get(to, "tools")
        if kind == "json" and body is not None:
            check_schema(body, f"{field}.parameters")
        elif kind == "text" and body is not None:
            try:
                _matcher(f"start: g\ng: {_custom_body(body)}")
            except ValueError as e:
                raise APIError(
                    f"{field}.format.definition: this {body[0]} grammar cannot be enforced: "
                    f"{str(e).splitlines()[0]}",
                    param=f"{field}.format.definition",
                ) from None


class ForcedTokens:
    """A mask allowing exactly the next token of `script` (then anything, once the script is used up)."""

    def __init__(self, script: list[int]):
        self.script = list(script)

    def __call__(self, tokens: list[int]) -> np.ndarray | None:
        if len(tokens) >= len(self.script):
            return None
        mask = np.zeros(N_VOCAB, bool)
        mask[self.script[len(tokens)]] = True
        return mask


def new_mask(spec: dict | None, max_tokens: int):
    """The TokenMask of a request (None when it is unconstrained)."""
    if spec is None:
        return None
    try:
        return TokenMask(spec, max_tokens)
    except ValueError as e:
        raise APIError(f"the request's constraints cannot be compiled: {str(e).splitlines()[0]}") from None
