"""Generated token ids -> the parts of an assistant turn, as events: the one streaming parser (one harmony
`StreamableParser` per turn) of the server, the chat CLI and fine-tuning's checks.

A turn is a list of `Part`s, one per harmony message the model wrote:

- ``reasoning``: the analysis channel (and messages to a recipient that is no tool, and messages whose author
  is not the assistant: the model's guesses at a tool's answer never reach ``content``);
- ``preamble``: the commentary channel without a recipient (user-visible text said before a tool call);
- ``content``: the final channel, a message with no channel (a bare refusal), and any text that did not parse;
- ``tool_call``: a message to ``functions.NAME`` or to a function of another namespace the request offers
  (``namespaces``); its text is the arguments. A call to one of gpt-oss's built-in tools (``browser.*``,
  ``python``, ``container.*``), which no request offered, is a tool call too, in that namespace: the client
  sees the call (and its tool loop answers it, typically with an error), never an empty answer.

`OutputParser.feed(token)` returns events ``(kind, part, delta)`` with kind "start", "delta" or "end". Each
part's ``text`` is exactly the concatenation of its deltas, so a streamed answer and the object built from the
same parts are byte-identical. `conversation.parts_to_messages` turns the parts into the harmony messages the
next prompt renders.

Malformed output never raises: harmony's parser runs non-strict, and where it still fails (text where a header
belongs, a special token inside a message), the text that did not parse becomes ``content`` (special tokens
are never rendered, so content never holds a harmony marker), a warning is logged once (`warned` turns True),
and parsing resumes at the next ``<|start|>`` or ``<|channel|>``.

`parse_completion_messages` / `parse_completion` parse a whole turn at once with the same parser.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import re
import secrets
from collections.abc import Iterable
from typing import Any

from openai_harmony import HarmonyError, Message

from ..tokenizer import (
    CALL,
    CHANNEL,
    END,
    MESSAGE,
    RETURN,
    SPECIAL_TOKENS,
    START,
    get_encoding,
    get_harmony_encoding,
)
from .conversation import FUNCTIONS, parts_to_messages
from .stops import StopStrings

log = logging.getLogger("gptoss_jax.harmony")

FIRST_SPECIAL = 199998  # ids from here on are special tokens (o200k_harmony)
BUILTIN_NAMESPACES = (
    "browser",
    "python",
    "container",
)  # gpt-oss's trained tools: called even when not offered
END_TOKENS = (END, CALL, RETURN)


def new_id(prefix: str, sep: str = "_") -> str:
    """A random id such as call_3f9a... (tool calls here; responses and completions in the server)."""
    return f"{prefix}{sep}{secrets.token_hex(12)}"


@dataclasses.dataclass(eq=False)
class Part:
    """One message of the generated turn. For a tool call, `text` holds the JSON arguments."""

    type: str  # reasoning | preamble | content | tool_call
    text: str = ""
    name: str | None = None  # tool_call: the function name (recipient without "functions." or its namespace)
    namespace: str | None = None  # tool_call: "functions", another namespace, or "" (a bare `python`)
    call_id: str | None = None  # tool_call: the id the tool's answer refers to
    index: int = 0  # tool_call: position among this turn's tool calls
    channel: str | None = None  # harmony channel and content type, kept for rendering the turn again
    content_type: str | None = None
    tokens: int = 0  # generated tokens of this message (header included)
    done: bool = False
    logprobs: list = dataclasses.field(default_factory=list)  # content parts: one entry per token


Event = tuple[str, Part, str]  # ("start" | "delta" | "end", part, text delta)


def split_recipient(recipient: str, namespaces: Iterable[str] = (FUNCTIONS,)) -> tuple[str, str] | None:
    """(namespace, name) of a tool call's recipient: a function of `namespaces` or a built-in tool; None for
    any other recipient."""
    ns, dot, name = recipient.partition(".")
    if dot and name and (ns in namespaces or ns in BUILTIN_NAMESPACES):
        return ns, name
    if recipient in BUILTIN_NAMESPACES:  # `python`: a namespace that is its own function
        return "", recipient
    return None


def part_type(
    role: Any, channel: str | None, recipient: str | None, namespaces: Iterable[str] = (FUNCTIONS,)
) -> str:
    if recipient and recipient.startswith("functions."):
        return "tool_call"
    if (
        recipient
        and channel != "final"
        and (role is None or getattr(role, "value", role) == "assistant")
        and split_recipient(recipient.split(" ")[0], namespaces) is not None
    ):
        return "tool_call"
    if (role is not None and getattr(role, "value", role) != "assistant") or channel == "analysis":
        return "reasoning"
    if channel == "final":  # leftover header text lands in the recipient: it does not make this a tool call
        return "content"
    if recipient:  # no tool: a message to the user or junk
        return "reasoning"
    return "preamble" if channel == "commentary" else "content"


_MARKER = re.compile("|".join(re.escape(n) for n in SPECIAL_TOKENS) + r"|<\|reserved_\d+\|>")


def strip_markers(text: str) -> str:
    return _MARKER.sub("", text)


class OutputParser:
    """Feeds one turn's generated tokens through harmony's `StreamableParser` and yields `Event`s.

    stop: stop strings applied to ``content`` (the text before the first match is kept; `stopped` turns True).
    single_tool_call: `stopped` turns True once the first tool call is complete (parallel_tool_calls false).
    `warned` turns True when the output was not valid harmony, `problem` says why (the first problem), and
    the problem is logged once unless `log_problems` is False.
    """

    def __init__(
        self,
        *,
        stop: list[str] | None = None,
        single_tool_call: bool = False,
        log_problems: bool = True,
        namespaces: Iterable[str] = (),
    ):
        from openai_harmony import Role, StreamableParser

        enc = get_harmony_encoding()
        self._new_parser = lambda role: StreamableParser(enc, role, strict=False)
        self._assistant = Role.ASSISTANT
        self._tok = get_encoding()
        self._p = self._new_parser(
            Role.ASSISTANT
        )  # the prompt ends with <|start|>assistant: a header is next
        self._n_messages = 0  # messages the current harmony parser has completed
        self._header: list[int] = []  # tokens of the header being read
        self._part: Part | None = None  # the open message
        self._raw: Part | None = None  # the open content part holding text that did not parse
        self._broken = False  # after a parse failure, until the next <|start|> or <|channel|>
        self._at_start = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.parts: list[Part] = []
        self.stop = StopStrings(stop)
        self.single_tool_call = single_tool_call
        self.stopped = False  # a stop string matched, or the single tool call is complete
        self.warned = False
        self.problem = ""
        self.log_problems = log_problems
        self.n_tokens = 0
        self.namespaces = (FUNCTIONS, *namespaces)  # those whose functions are tool calls

    # ------------------------------------------------------------------------------------------ events
    def _start(self, type_: str, out: list[Event], **kw) -> Part:
        if type_ == "tool_call":
            kw.update(call_id=new_id("call"), index=len(self.tool_calls))
        part = Part(type_, **kw)
        self.parts.append(part)
        out.append(("start", part, ""))
        return part

    def _delta(self, part: Part, text: str, out: list[Event], lp: Any = None) -> None:
        if part.type == "content":
            text = self.stop.push(text)
            self.stopped |= self.stop.hit
            if lp is not None:
                part.logprobs.append(lp)
        elif lp is not None:
            lp = None
        if text or lp is not None:
            part.text += text
            out.append(("delta", part, text))

    def _end(self, part: Part, out: list[Event]) -> None:
        held = self.stop.flush() if part.type == "content" else ""
        if held:  # the tail that could have started a stop string, which never came
            part.text += held
            out.append(("delta", part, held))
        part.done = True
        out.append(("end", part, ""))
        if part.type == "tool_call" and self.single_tool_call:
            self.stopped = True

    def _warn(self, why: str) -> None:
        if not self.warned:
            self.problem = why
            if self.log_problems:
                log.warning(
                    "model output is not valid harmony (%s); the text that does not parse is returned as content",
                    why,
                )
            self.warned = True

    def _text(self, tokens: list[int], final: bool = False) -> str:
        data = b"".join(self._tok.decode_single_token_bytes(t) for t in tokens if 0 <= t < FIRST_SPECIAL)
        return self._utf8.decode(data, final=final)

    def _raw_text(self, tokens: list[int], out: list[Event], lp: Any = None) -> None:
        """Text of tokens that did not parse, as content (special tokens dropped)."""
        text = self._text(tokens)
        if text or (lp is not None and self._raw is not None and not self._raw.done):
            if self._raw is None or self._raw.done:
                self._raw = self._start("content", out)
            self._delta(self._raw, text, out, lp)

    def _close_raw(self, out: list[Event]) -> None:
        if self._raw is not None and not self._raw.done:
            self._delta(self._raw, self._text([], final=True), out)
            self._end(self._raw, out)
        self._broken = False

    # ------------------------------------------------------------------------------------------ feeding
    def feed(self, token: int, logprob: Any = None) -> list[Event]:
        """Events produced by one generated token (`logprob`: an entry kept with content tokens)."""
        out: list[Event] = []
        self.n_tokens += 1
        if self._part is not None:
            self._part.tokens += 1
        self._dispatch(int(token), logprob, out)
        return out

    def _dispatch(self, token: int, lp: Any, out: list[Event]) -> None:
        if token in (START, CHANNEL) and (self._part is not None or self._broken):
            if self._part is not None:  # a new message without <|end|>: close this one
                self._warn(f"special token {token} inside a message")
                self._end(self._part, out)
            self._restart(token, out)
        elif self._broken:
            self._raw_text([token], out, lp)
        elif self._part is not None:
            self._feed_content(token, lp, out)
        else:
            self._feed_header(token, lp, out)

    def _feed_content(self, token: int, lp: Any, out: list[Event]) -> None:
        part = self._part
        if token >= FIRST_SPECIAL and token not in END_TOKENS:  # never let a marker into a message's text
            self._warn(f"special token {token} inside a message")
            return
        try:
            self._p.process(token)
        except HarmonyError as e:  # harmony's non-strict parser still refuses some sequences
            self._warn(str(e))
            self._end(part, out)
            self._part, self._broken = None, True
            self._raw_text([token], out, lp)
            return
        if token in END_TOKENS:
            self._n_messages += 1
            self._end(part, out)
            self._part = None
        else:
            self._delta(part, self._p.last_content_delta or "", out, lp)

    def _feed_header(self, token: int, lp: Any, out: list[Event]) -> None:
        self._header.append(token)
        try:
            self._p.process(token)
        except HarmonyError as e:
            self._header_failed(str(e), out, lp)
            return
        if token == MESSAGE:  # the header is complete: a message starts
            p = self._p
            type_ = part_type(p.current_role, p.current_channel, p.current_recipient, self.namespaces)
            ns, name = (
                split_recipient(p.current_recipient.split(" ")[0], self.namespaces) or (FUNCTIONS, "")
                if type_ == "tool_call"
                else (None, None)
            )
            self._part = self._start(
                type_,
                out,
                name=name,
                namespace=ns,
                channel=p.current_channel,
                content_type=p.current_content_type,
                tokens=len(self._header),
            )
            self._header = []
        elif (
            token in END_TOKENS
        ):  # harmony (non-strict) makes a message of a header ended without <|message|>
            msgs = self._p.messages
            if len(msgs) > self._n_messages:
                self._n_messages = len(msgs)
                m = msgs[-1]
                type_ = part_type(m.author.role, m.channel, m.recipient, self.namespaces)
                split = split_recipient(m.recipient or "", self.namespaces) if type_ == "tool_call" else None
                part = self._start(
                    type_,
                    out,
                    name=split and split[1],
                    namespace=split and split[0],
                    channel=m.channel,
                    tokens=len(self._header),
                )
                self._delta(part, strip_markers("".join(getattr(c, "text", "") for c in m.content)), out)
                self._end(part, out)
            self._header = []

    def _header_failed(self, why: str, out: list[Event], lp: Any) -> None:
        """Text before the header's first marker is content. Parsing resumes at a <|start|> that opens the
        header (where the parser expected a header without one), else at the header's last marker."""
        self._warn(why)
        hdr, self._header = self._header, []
        marks = [i for i, t in enumerate(hdr) if t in (START, CHANNEL)]
        self._broken = True
        self._raw_text(hdr[: marks[0]] if marks else hdr, out, lp)
        at = (
            0
            if hdr and hdr[0] == START and not self._at_start
            else marks[-1]
            if marks and marks[-1]
            else None
        )
        if at is not None:
            self._close_raw(out)
            self._restart(hdr[at], out)
            for t in hdr[at + 1 :]:
                self._dispatch(t, None, out)

    def _restart(self, token: int, out: list[Event]) -> None:
        """A fresh harmony parser for a header starting at `token` (<|start|> or <|channel|>)."""
        self._close_raw(out)
        self._at_start = token == START  # a parser that expects <|start|>, not a header
        self._p = self._new_parser(None if self._at_start else self._assistant)
        self._n_messages = 0
        self._part = None
        self._header = []
        self._feed_header(token, None, out)

    def finish(self) -> list[Event]:
        """End of generation (stop token, max_tokens, stop string or cancellation): close what is open."""
        out: list[Event] = []
        if self._part is not None:
            self._end(self._part, out)
            self._part = None
        elif self._header and not self._broken:
            if any(t >= FIRST_SPECIAL for t in self._header):
                self._header = []  # a header cut off by max_tokens: nothing of it is content
            else:  # text where a header belongs, and no end token: harmony cannot make it a message
                self._header_failed("text without a message header", out, None)
        self._close_raw(out)
        return out

    # ---------------------------------------------------------------------------------------- summaries
    @property
    def tool_calls(self) -> list[Part]:
        return [p for p in self.parts if p.type == "tool_call"]

    @property
    def reasoning_tokens(self) -> int:
        return sum(p.tokens for p in self.parts if p.type == "reasoning")

    def finish_reason(self, hit_length: bool) -> str:
        """OpenAI's chat-completions name: length (cut off by max_tokens), tool_calls or stop."""
        if hit_length and not self.stopped:
            return "length"
        return "tool_calls" if self.tool_calls else "stop"


# ---------------------------------------------------------------------------------------- whole turns
def _as_int_list(tokens: Iterable[int] | Any) -> list[int]:
    if hasattr(tokens, "tolist"):  # numpy and jax arrays: one read, not one per element
        tokens = tokens.tolist()
    return [int(t) for t in tokens]


def parse_completion_messages(tokens: Iterable[int] | Any, *, strict: bool = False) -> list[Message]:
    """A sampled assistant turn (the tokens after `<|start|>assistant`, its stop token optional) as harmony
    messages. strict: ValueError when the tokens are not valid harmony (the parser had to recover); nothing
    is logged either way."""
    parser = OutputParser(log_problems=False)
    for t in _as_int_list(tokens):
        parser.feed(t)
    parser.finish()
    if strict and parser.warned:
        raise ValueError("the tokens are not valid harmony: " + parser.problem)
    return parts_to_messages(parser.parts)


def parse_completion(tokens: Iterable[int] | Any, *, strict: bool = False) -> list[tuple[str | None, str]]:
    """A sampled assistant turn as [(channel, text), ...], e.g. analysis then final."""
    return [(m.channel, message_text(m)) for m in parse_completion_messages(tokens, strict=strict)]


def message_text(message: Message) -> str:
    """The text parts of a harmony message, joined."""
    return "".join(getattr(c, "text", "") or "" for c in message.content)
