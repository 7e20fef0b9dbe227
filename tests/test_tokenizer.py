"""Tests for gptoss_jax.tokenizer (offline o200k_harmony: vocabulary, encode/decode, special ids, token ids as
text). The chat format's tests are in tests/harmony/."""

from __future__ import annotations

import gzip
import hashlib
import re

import numpy as np
import pytest

from gptoss_jax import tokenizer as tk
from gptoss_jax.config import check_token_ids

MULTILINGUAL = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock!",
    "chinese": "我们今天去公园散步，天气很好。机器学习是人工智能的一个分支。",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟ التعلم الآلي مثير للاهتمام.",
    "hindi": "नमस्ते दुनिया, आज आप कैसे हैं? मशीन लर्निंग दिलचस्प है।",
    "emoji": "🚀🔥 hello 👋🏽 family: 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 ✨",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn {'a': [1, 2]}\r\n\n\n  \t\n",
    "japanese": "今日は良い天気ですね。カタカナとひらがなと漢字を混ぜます。",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "mixed": "Résumé naïve café — ½ ≠ 0.5; “quotes” and ‘apostrophes’ Ünïcödé ß ẞ",
    "specials_as_text": "literal <|start|> and <|endoftext|> stay text",
}


# ---------------------------------------------------------------------------------- vocabulary


def test_n_vocab_and_name():
    enc = tk.get_encoding()
    assert enc.name == "o200k_harmony"
    assert enc.n_vocab == tk.N_VOCAB == 201088
    assert tk.get_encoding() is enc  # cached


@pytest.mark.parametrize(
    "name,tid",
    [
        ("<|startoftext|>", 199998),
        ("<|endoftext|>", 199999),
        ("<|reserved_200000|>", 200000),
        ("<|reserved_200001|>", 200001),
        ("<|return|>", 200002),
        ("<|constrain|>", 200003),
        ("<|reserved_200004|>", 200004),
        ("<|channel|>", 200005),
        ("<|start|>", 200006),
        ("<|end|>", 200007),
        ("<|message|>", 200008),
        ("<|reserved_200009|>", 200009),
        ("<|reserved_200010|>", 200010),
        ("<|reserved_200011|>", 200011),
        ("<|call|>", 200012),
        ("<|reserved_200013|>", 200013),
        ("<|endofprompt|>", 200018),
        ("<|reserved_200018|>", 200018),
        ("<|reserved_201087|>", 201087),
    ],
)
def test_special_token_ids(name, tid):
    assert tk.encode(name, allowed_special="all") == [tid]
    assert tk.get_encoding().encode_single_token(name) == tid


def test_special_constants():
    assert (tk.STARTOFTEXT, tk.ENDOFTEXT) == (199998, 199999)
    assert (tk.RETURN, tk.CONSTRAIN, tk.CHANNEL) == (200002, 200003, 200005)
    assert (tk.START, tk.END, tk.MESSAGE, tk.CALL) == (200006, 200007, 200008, 200012)
    assert tk.ENDOFPROMPT == 200018
    for name, tid in tk.SPECIAL_TOKENS.items():
        assert tk.encode(name, allowed_special="all") == [tid]
    # 201088 is out of range: "<|reserved_201088|>" is not a special token (harmony's Rust table has it).
    assert 201088 not in tk.encode("<|reserved_201088|>", allowed_special="all")
    enc = tk.get_encoding()
    assert max(enc.encode_single_token(s) for s in enc.special_tokens_set) == 201087


def test_text_ranks_below_specials():
    ranks = tk.load_o200k_ranks()
    assert len(ranks) == 199998
    assert max(ranks.values()) == 199997 and min(ranks.values()) == 0


def test_encode_defaults_treat_specials_as_text():
    ids = tk.encode("<|start|>user<|message|>")
    assert not set(ids) & {tk.START, tk.MESSAGE}
    assert tk.decode(ids) == "<|start|>user<|message|>"
    assert tk.encode("<|start|>user", allowed_special={"<|start|>"})[0] == tk.START


@pytest.mark.parametrize("key", sorted(MULTILINGUAL))
def test_roundtrip(key):
    text = MULTILINGUAL[key]
    ids = tk.encode(text)
    assert all(0 <= i < 199998 for i in ids)
    assert tk.decode(ids) == text
    assert tk.decode(np.asarray(ids, dtype=np.int32)) == text  # array inputs


@pytest.mark.parametrize("key", sorted(MULTILINGUAL))
def test_matches_harmony_encoding(key):
    text = MULTILINGUAL[key]
    henc = tk.get_harmony_encoding()
    ours = tk.get_encoding().encode(text, allowed_special="all")
    assert ours == henc.encode(text, allowed_special="all")
    assert henc.decode(ours) == tk.decode(ours)


def test_stop_tokens():
    assert tk.stop_tokens_for_assistant_actions() == [200002, 200012]
    assert tk.stop_tokens() == [200002, 200007, 200012]


# ---------------------------------------------------------------------------------- sha check


def test_sha_mismatch_raises(tmp_path):
    good = tk._read_vocab_bytes()
    bad = bytearray(good)
    bad[100] ^= 0x01
    gz = tmp_path / "o200k_base.tiktoken.gz"
    gz.write_bytes(gzip.compress(bytes(bad), compresslevel=1))
    with pytest.raises(ValueError, match="SHA-256") as ei:
        tk.load_o200k_ranks(gz)
    assert "\n" not in str(ei.value)
    plain = tmp_path / "o200k_base.tiktoken"
    plain.write_bytes(bytes(bad[:1000]))
    with pytest.raises(ValueError, match="expected 446a9538"):
        tk.load_o200k_ranks(plain)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gz.read_bytes()[:5000])
    with pytest.raises(ValueError):
        tk.load_o200k_ranks(broken_gz)


def test_materialize_vocab_atomic(tmp_path):
    d = tk.materialize_vocab(tmp_path / "cache")
    f = d / "o200k_base.tiktoken"
    assert hashlib.sha256(f.read_bytes()).hexdigest() == tk.O200K_BASE_SHA256
    assert [p.name for p in d.iterdir()] == ["o200k_base.tiktoken"]  # no temp leftovers
    f.write_bytes(b"corrupt")  # a bad cached file is replaced
    tk.materialize_vocab(d)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == tk.O200K_BASE_SHA256


# ---------------------------------------------------------------------------------- token ids as text


def test_parse_token_ids_one_rule():
    """One parser for ids written as text (`generate --tokens`): ASCII integers, checked against the
    vocabulary unless the caller checks them itself (the CLI, naming the checkpoint)."""
    assert tk.parse_token_ids("1, 2 3") == [1, 2, 3]
    assert tk.parse_token_ids("5 -1 201088", vocab_size=None) == [5, -1, 201088]
    for bad, needle in [("²", "not an integer token id"), ("1_0", "not an integer token id"),
                        ("--5", "not an integer token id"), ("٣", "not an integer token id"),
                        ("", "no token ids"), ("7 1000", "token id 1000 is outside the vocabulary [0, 1000)"),
                        ("9" * 5000, "outside the vocabulary")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(needle)):
            tk.parse_token_ids(bad, vocab_size=1000)
    with pytest.raises(ValueError, match=re.escape("token id -1 at 1 is outside the vocabulary [0, 201088)")):
        check_token_ids([3, -1], tk.N_VOCAB)
