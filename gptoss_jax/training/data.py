"""Chat data for fine-tuning: OpenAI's fine-tuning JSONL rendered as the server renders it, packed into rows.

One JSON object per line, as for OpenAI's chat fine-tuning:
  {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                {"role": "assistant", "thinking": "...", "tool_calls": [{"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 18}"},
                {"role": "assistant", "content": "18 C and sunny.", "weight": 1}],
   "tools": [{"type": "function", "function": {"name": "get_weather", "description": "...",
              "parameters": {...JSON schema...}}}]}
- system / developer messages (first) become the harmony developer message's instructions, `tools` its
  function tools; the system message carries the reasoning effort and the conversation start date (none by
  default), the settings `finetune` records beside the adapters (`harmony.PromptSettings`).
- assistant: `thinking` (or `reasoning`, `reasoning_content`) -> the analysis channel; `tool_calls` -> one
  commentary message per call to `functions.NAME` (JSON arguments); `content` -> the final channel (or a
  commentary preamble beside tool calls); `weight` 0 keeps a message as context only.
- tool: answered by `functions.NAME`, the function of the call its `tool_call_id` names (or its `name`).

gpt-oss's built-in tools (what `gptoss-jax serve --builtin-tools python,browser` runs itself):
  {"builtin_tools": ["python", "browser"],
   "messages": [{"role": "user", "content": "What is 37 * 91?"},
                {"role": "assistant", "tool_calls": [{"id": "p1", "type": "python", "code": "print(37 * 91)"}]},
                {"role": "tool", "tool_call_id": "p1", "content": "3367\n"},
                {"role": "assistant", "content": "3367."}]}
- `builtin_tools` declares them in harmony's system message, exactly as the server declares them
  (`python_tool_config()`, python's timeout that of `serve`'s default `--python-timeout`;
  `ToolNamespaceConfig.browser()`); harmony orders the sections, so the order given does not matter.
- a built-in call is a `tool_calls` entry whose `type` is its recipient: `python` with its `code`,
  `browser.search` / `browser.open` / `browser.find` with `arguments` (a JSON object, or its text). It is
  rendered as gpt-oss writes these calls and as the server's tool loop keeps them (`harmony.builtin_call`):
  `<|start|>assistant to=python<|channel|>analysis code<|message|>...<|call|>`; `channel` may be
  "commentary" instead of "analysis".
- its answer is a tool message with that call's `tool_call_id` (or, without one, `name` "python",
  "browser.search", ...), rendered as the server renders the tool's answer (`harmony.builtin_result`: from
  the recipient to the assistant, on the call's channel). Like all analysis, built-in calls and answers on
  the analysis channel are dropped from the prompts after the turn's final answer.

The line's shape is checked here (`check_line`); the mapping to harmony messages is `gptoss_jax.harmony`'s
(`Chat.from_messages`), the one the server and the chat CLI use.

Rendering: every assistant turn is trained on exactly the prompt `gptoss-jax serve` renders for the same
history (the conversation before it, with the same system and developer messages and the same rule for
dropping chain of thought: analysis before the last final answer is dropped, later analysis kept),
followed by what the model must produce: its messages up to a tool call (ends with <|call|>) or a final
answer (ends with <|return|>). Each such target must parse back, with the server's parser, to the messages
it was rendered from (a tool name that breaks the header would not). A turn whose prompt continues the
previous sequence (a tool result after a call) extends that sequence, so a tool-calling exchange is one
sequence; otherwise a new one starts. Only the assistant's tokens carry loss by default (`assistant_only`).

Packing: sequences are placed whole into rows of `seq_len` tokens (best fit, longest first), positions
running on along the row. Attention does not mask between the sequences of a row (the attention layer has
no segment ids), so a sequence may attend to the unrelated ones packed before it; `pack=False` gives one
sequence per row.

Every problem with a line is one `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from openai_harmony import ToolNamespaceConfig

from ..harmony import (
    FUNCTIONS,
    Chat,
    OutputParser,
    assistant_message,
    builtin_call,
    builtin_result,
    parts_to_messages,
    resolve_date,
    run_call_message,
    tool_call_message,
    tool_result_message,
)
from ..harmony.conversation import arguments_text
from ..tokenizer import END, RETURN, get_harmony_encoding
from ..tools.python import python_tool_config

ROLES = ("system", "developer", "user", "assistant", "tool")
THINKING = ("thinking", "reasoning", "reasoning_content")
BUILTIN_TOOLS = ("python", "browser")  # what a line's `builtin_tools` may declare (serve --builtin-tools)
BUILTIN_CALLS = ("python", "browser.search", "browser.open", "browser.find")  # their recipients
BUILTIN_CONTENT_TYPE = "code"  # gpt-oss writes `to=python code`, `to=browser.search code`


class DataError(ValueError):
    """A bad training file or line (one line naming the file, the line and the field)."""


@dataclasses.dataclass
class Sequence:
    tokens: list[int]
    weights: list[int]  # 1 where the token carries loss
    line: int


def _text(v, where: str) -> str:
    """A message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v
    ):
        return "".join(p["text"] for p in v)
    raise ValueError(f"{where} must be a string or a list of text parts, got {type(v).__name__}")


def _check_tools(obj, where="tools") -> None:
    if not isinstance(obj, list):
        raise ValueError(f"{where} must be a list")  # noqa: TRY004 - DataError is one kind
    for i, t in enumerate(obj):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f'{where}[{i}] must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}[{i}].function.name must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where}[{i}].function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ValueError(f"{where}[{i}].function.description must be a string")


def _check_arguments(v, where: str) -> None:
    if isinstance(v, dict):
        return
    if not isinstance(v, str):
        raise ValueError(f"{where} must be a JSON string")  # noqa: TRY004 - DataError is one kind
    try:
        json.loads(v)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None


def _builtin_tools(example: dict) -> list[str]:
    """The line's `builtin_tools`: a list of distinct names of BUILTIN_TOOLS (none when absent)."""
    names = example.get("builtin_tools")
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("builtin_tools must be a list of tool names")
    for i, n in enumerate(names):
        if n not in BUILTIN_TOOLS:
            raise ValueError(
                f"builtin_tools[{i}]: unknown tool {n!r} (available: {', '.join(BUILTIN_TOOLS)})"
            )
        if n in names[:i]:
            raise ValueError(f"builtin_tools[{i}]: {n!r} is given twice")
    return names


def builtin_tool_configs(names) -> list[ToolNamespaceConfig]:
    """harmony's declarations of built-in tools, as `serve --builtin-tools NAMES` renders them in the system
    message (python with the default `--python-timeout`)."""
    make = {"python": python_tool_config, "browser": ToolNamespaceConfig.browser}
    return [make[n]() for n in names]


def _check_builtin_call(call: dict, declared: list[str], where: str) -> None:
    kind = call["type"]
    if kind.partition(".")[0] not in declared:
        raise ValueError(
            f"{where}.type: a {kind} call needs {kind.partition('.')[0]!r} in the line's builtin_tools"
        )
    if call.get("channel", "analysis") not in ("analysis", "commentary"):
        raise ValueError(f"{where}.channel must be analysis or commentary, got {call['channel']!r}")
    if kind == "python":
        if not isinstance(call.get("code"), str) or not call["code"]:
            raise ValueError(f"{where}.code must be a non-empty string")
        return
    args = call.get("arguments")
    if args is None:
        raise ValueError(f"{where}.arguments: field required (a JSON object)")
    _check_arguments(args, f"{where}.arguments")
    if not isinstance(json.loads(args) if isinstance(args, str) else args, dict):
        raise ValueError(f"{where}.arguments must be a JSON object")  # noqa: TRY004 - DataError is one kind


def check_line(example) -> None:
    """The shape of one line (the fields, their types, the roles and their order); ValueError naming the
    field. What the server's request models check at its edge, for the fine-tuning format."""
    if not isinstance(example, dict):
        raise ValueError("the line must be a JSON object with a 'messages' list")  # noqa: TRY004 - DataError is one kind
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if example.get("tools") is not None:
        _check_tools(example["tools"])
    declared = _builtin_tools(example)
    started = trained = False
    for k, m in enumerate(messages):
        at = f"messages[{k}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ValueError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if role in ("system", "developer") and started:
            raise ValueError(f"{at}: a {role} message must come before the conversation")
        started |= role not in ("system", "developer")
        if role != "assistant":
            _text(m.get("content"), f"{at}.content")
            if role == "tool" and m.get("name") is not None and not isinstance(m["name"], str):
                raise ValueError(f"{at}.name must be a string")
            continue
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"{at}.weight must be 0 or 1, got {weight!r}")
        trained |= weight == 1
        for f in THINKING:
            if m.get(f) is not None:
                _text(m[f], f"{at}.{f}")
        content = None if m.get("content") is None else _text(m["content"], f"{at}.content")
        tool_calls = m.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise ValueError(f"{at}.tool_calls must be a list")  # noqa: TRY004 - DataError is one kind
        if not content and not tool_calls:
            raise ValueError(f"{at}: an assistant message needs 'content' or 'tool_calls'")
        for c, call in enumerate(tool_calls):
            cat = f"{at}.tool_calls[{c}]"
            if isinstance(call, dict) and call.get("type") in BUILTIN_CALLS:
                _check_builtin_call(call, declared, cat)
                continue
            if isinstance(call, dict) and call.get("type", "function") != "function":
                raise ValueError(
                    f"{cat}.type must be function or a built-in call ({', '.join(BUILTIN_CALLS)}), "
                    f"got {call['type']!r}"
                )
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError(f"{cat}.function.name must be a non-empty string")
            _check_arguments(fn.get("arguments", "{}"), f"{cat}.function.arguments")
    if not trained:
        raise ValueError("no assistant message to train on")


def _with_builtin_calls(messages: list, tools) -> tuple[list, list[int]]:
    """The messages with built-in calls and their answers as harmony messages (which `Chat.from_messages`
    takes as they are), and for each item the index of the message it came from.

    An assistant message that makes a built-in call becomes all harmony messages: its reasoning, its text
    (a commentary preamble), then its calls in order, a function call as the mapping renders it
    (`tool_call_message`). A tool message answering one of that message's calls becomes harmony's too
    (the mapping no longer knows those call ids); every other message is left to the mapping."""
    functions = {c.get("function", {}).get("name") for c in tools or []} if tools else set()
    items, origin = [], []
    calls: dict = {}  # call id -> ("builtin", recipient, channel) | ("function", name, None), converted ones
    last_channel: dict[str, str] = {}  # recipient -> the channel of its latest call
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and any(
            c.get("type") in BUILTIN_CALLS for c in m.get("tool_calls") or []
        ):
            out = []
            thinking = next((m[f] for f in THINKING if m.get(f) is not None), None)
            if thinking:
                out.append(assistant_message(_text(thinking, ""), "analysis"))
            if m.get("content"):
                out.append(assistant_message(_text(m["content"], ""), "commentary"))
            for c in m["tool_calls"]:
                if c.get("type") in BUILTIN_CALLS:
                    to, channel = c["type"], c.get("channel", "analysis")
                    text = c["code"] if to == "python" else arguments_text(c["arguments"])
                    out.append(builtin_call(to, text, channel, BUILTIN_CONTENT_TYPE))
                    calls[c.get("id")] = ("builtin", to, channel)
                    last_channel[to] = channel
                else:
                    fn = c["function"]
                    out.append(tool_call_message(fn["name"], arguments_text(fn.get("arguments"))))
                    calls[c.get("id")] = ("function", fn["name"], None)
            calls.pop(None, None)
            items += out
            origin += [k] * len(out)
            continue
        if m["role"] == "tool":
            call_id, name = m.get("tool_call_id"), m.get("name")
            text = _text(m["content"], "")
            if call_id is None and name in BUILTIN_CALLS and name in last_channel:
                if name in functions:
                    raise ValueError(
                        f"messages[{k}]: name {name!r} is both a built-in call and a function; give tool_call_id"
                    )
                items.append(builtin_result(name, text, last_channel[name]))
                origin.append(k)
                continue
            if call_id in calls:
                kind, to, channel = calls[call_id]
                items.append(
                    builtin_result(to, text, channel) if kind == "builtin" else tool_result_message(to, text)
                )
                origin.append(k)
                continue
            if call_id is None and name in BUILTIN_CALLS and name not in functions:
                raise ValueError(f"messages[{k}]: a {name} answer before any {name} call")
        items.append(m)
        origin.append(k)
    return items, origin


def to_chat(example: dict, *, reasoning_effort: str = "medium") -> tuple[Chat, list[int]]:
    """One line -> (the conversation as the harmony mapping gives it, per message of it: 1 for a trained
    assistant message, 0 for context). ValueError naming the field for anything malformed."""
    check_line(example)
    messages = example["messages"]
    items, origin = _with_builtin_calls(messages, example.get("tools"))
    chat = Chat.from_messages(items, example.get("tools"), reasoning_effort=reasoning_effort)
    chat.system_tools = builtin_tool_configs(_builtin_tools(example))
    sources = [origin[k] for k in chat.sources]
    trained = [int(messages[k]["role"] == "assistant" and messages[k].get("weight", 1) == 1) for k in sources]
    chat.sources = sources
    return chat, trained


def _ends_turn(msg) -> bool:
    # the model stops after a tool call (<|call|>) or a final answer (<|return|>)
    return msg.recipient is not None or msg.channel == "final"


def parse_back(tokens: list[int]) -> list:
    """A generated turn as the server takes it back: the parser's parts as harmony messages, a call of a
    built-in tool as the tool loop keeps it (its channel and content type, `harmony.run_call_message`)."""
    parser = OutputParser(log_problems=False)
    for t in tokens:
        parser.feed(t)
    parser.finish()
    out = []
    for p in parser.parts:
        if p.type == "tool_call" and p.namespace != FUNCTIONS:
            out.append(run_call_message(p))
        else:
            out += parts_to_messages([p])
    return out


def render(
    example: dict,
    *,
    reasoning_effort: str = "medium",
    date: str | None = None,
    assistant_only: bool = True,
    line: int = 0,
) -> list[Sequence]:
    """One example -> token sequences with loss weights (see the module docstring). date: the conversation
    start date setting (None: no date; "today" renders today's)."""
    enc = get_harmony_encoding()
    chat, trained = to_chat(example, reasoning_effort=reasoning_effort)
    day = resolve_date(date)
    body = chat.messages
    is_asst = [m.author.role.value == "assistant" for m in body]
    seqs: list[Sequence] = []
    cur: Sequence | None = None
    i = 0
    while i < len(body):
        if not is_asst[i]:
            i += 1
            continue
        j = i + 1
        while j < len(body) and is_asst[j] and not _ends_turn(body[j - 1]):
            j += 1
        # the history before this turn, as the server renders it for a request that ends there
        history = Chat(
            messages=body[:i], instructions=chat.instructions, tools=chat.tools,
            reasoning_effort=chat.reasoning_effort, system_tools=chat.system_tools,
        )  # fmt: skip
        prompt = history.prompt_tokens(day)
        toks, wts = [], []
        for k in range(i, j):
            t = list(enc.render(body[k]))
            if k == i:  # the prompt already ends with this message's "<|start|>assistant"
                assert t[:2] == prompt[-2:], "harmony rendered the assistant header differently"
                t = t[2:]
            if k == j - 1 and body[k].channel == "final" and body[k].recipient is None and t[-1] == END:
                t[-1] = RETURN  # the end of a final answer, as render_conversation_for_training ends it
            toks += t
            wts += [trained[k]] * len(t)
        if any(wts):
            if parse_back(toks) != body[i:j]:
                raise ValueError(
                    f"messages[{chat.sources[i]}]: its rendering does not parse back to it (a tool name "
                    "or text that breaks harmony's message header?)"
                )
            if cur is not None and prompt[: len(cur.tokens)] == cur.tokens:
                cur.weights += [0] * (len(prompt) - len(cur.tokens)) + wts
                cur.tokens = prompt + toks
            else:
                cur = Sequence(prompt + toks, [0] * len(prompt) + wts, line)
                seqs.append(cur)
        i = j
    if not assistant_only:
        for s in seqs:
            s.weights = [1] * len(s.tokens)
    return seqs


def read_jsonl(
    path: str | os.PathLike,
    *,
    seq_len: int,
    reasoning_effort: str = "medium",
    date: str | None = None,
    assistant_only: bool = True,
) -> list[Sequence]:
    """Every line of a chat JSONL file -> sequences; DataError "FILE line N: what is wrong" on the first bad
    line (blank lines are skipped). date: as for `render` ("today" is the day the file is read)."""
    path = Path(path)
    date = resolve_date(date)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    seqs: list[Sequence] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            got = render(
                obj, reasoning_effort=reasoning_effort, date=date, assistant_only=assistant_only, line=n
            )
        except ValueError as e:
            raise DataError(f"{path} line {n}: {e}") from None
        for s in got:
            if len(s.tokens) > seq_len:
                raise DataError(
                    f"{path} line {n}: the conversation renders to {len(s.tokens)} tokens, more than "
                    f"the sequence length {seq_len}"
                )
        seqs += got
    if not seqs:
        raise DataError(f"{path}: no examples")
    return seqs


# ------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class Rows:
    """Packed rows: tokens (N, L) int32, weights (N, L) uint8 (1 = the token carries loss), lengths (N,), and
    `slots`: the most positions of any row whose next token carries loss (the loss is computed at those
    positions only, padded to `slots`: with assistant-only loss most of a row is prompt)."""

    tokens: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray
    slots: int = 0

    def __post_init__(self):
        if not self.slots:
            most = int(self.weights[:, 1:].sum(1).max(initial=0))
            self.slots = int(min(self.tokens.shape[1], max(16, -(-most // 16) * 16)))

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, idx) -> dict[str, np.ndarray]:
        """Rows `idx` (any shape) -> model inputs: tokens, positions (-1 = padding); and the loss terms:
        `loss_pos` (…, slots) the positions whose next token carries loss (0-padded), `targets` those next
        tokens, `weights` 1 for real entries."""
        tok = self.tokens[idx]
        L = tok.shape[-1]
        ar = np.arange(L, dtype=np.int32)
        nxt = np.concatenate([self.weights[idx][..., 1:], np.zeros_like(tok[..., :1], np.uint8)], -1) > 0
        # stable sort puts each row's loss positions first, in order
        pos = np.argsort(~nxt, axis=-1, kind="stable")[..., : self.slots].astype(np.int32)
        w = np.take_along_axis(nxt, pos, -1)
        pos = np.where(w, pos, 0)
        nxt_tok = np.concatenate([tok[..., 1:], np.zeros_like(tok[..., :1])], -1)
        return {
            "tokens": tok,
            "positions": np.where(ar < self.lengths[idx][..., None], ar, -1).astype(np.int32),
            "loss_pos": pos,
            "targets": np.take_along_axis(nxt_tok, pos, -1),
            "weights": w.astype(np.float32),
        }


def pack(seqs: list[Sequence], seq_len: int, *, pack: bool = True, pad_id: int = 0) -> Rows:
    """Sequences -> rows of `seq_len` tokens. pack: best fit, longest first (deterministic), each row's
    sequences in file order; else one sequence per row."""
    if pack:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
        free: list[tuple[int, int]] = []  # (room left, row), sorted
        rows: list[list[int]] = []
        for i in order:
            n = len(seqs[i].tokens)
            k = bisect.bisect_left(free, (n, -1))
            if k == len(free):
                rows.append([i])
                room, r = seq_len - n, len(rows) - 1
            else:
                room, r = free.pop(k)
                rows[r].append(i)
                room -= n
            bisect.insort(free, (room, r))
        groups = [sorted(r) for r in rows]
    else:
        groups = [[i] for i in range(len(seqs))]
    tokens = np.full((len(groups), seq_len), pad_id, np.int32)
    weights = np.zeros((len(groups), seq_len), np.uint8)
    lengths = np.zeros(len(groups), np.int32)
    for r, g in enumerate(groups):
        t = [x for i in g for x in seqs[i].tokens]
        w = [x for i in g for x in seqs[i].weights]
        tokens[r, : len(t)], weights[r, : len(w)], lengths[r] = t, w, len(t)
    return Rows(tokens, weights, lengths)


class Loader:
    """The rows of every step, a pure function of (seed, step): an epoch is a permutation of the rows drawn
    from (seed, epoch), and step s takes rows s*n .. s*n + n - 1 of the concatenated epochs. So a resumed
    run sees exactly the batches the uninterrupted run would have."""

    def __init__(self, rows: Rows, rows_per_step: int, seed: int = 0, shuffle: bool = True):
        self.rows, self.n, self.seed, self.shuffle = rows, rows_per_step, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            N = len(self.rows)
            self._perms = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(N)
                if self.shuffle
                else np.arange(N)
            }
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        N = len(self.rows)
        g = np.arange(step * self.n, (step + 1) * self.n)
        return np.array([self._perm(int(e))[int(p)] for e, p in zip(g // N, g % N, strict=True)])
