"""Constrained decoding (api/constraints.py): llguidance masks over harmony tokens.

A "random model" here picks uniformly among the tokens the mask allows, which explores the grammar far
more adversarially than a trained model would: every output it writes must still parse (with our harmony
parser) into what the request demands, within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from gptoss_jax.api.constraints import ForcedTokens, TokenMask, check_schema, constraint_spec, grammar
from gptoss_jax.api.protocol import APIError, FunctionDef
from gptoss_jax.harmony import OutputParser
from gptoss_jax.tokenizer import CALL, END, N_VOCAB, RETURN, encode

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


def walk(mask: TokenMask, max_tokens: int, rng) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        allowed = np.flatnonzero(mask(out))
        out.append(int(rng.choice(allowed)))
        if out[-1] in (RETURN, CALL):
            break
    return out


def parsed(tokens):
    p = OutputParser(namespaces=["crm"])
    for t in tokens:
        p.feed(t)
    p.finish()
    return p


@pytest.mark.parametrize("max_tokens", [40, 96])
def test_required_strict_tool_call_is_valid(max_tokens):
    rng = np.random.default_rng(max_tokens)
    empty = {"type": "object", "properties": {}, "additionalProperties": False}
    spec = {"final": False, "calls": {"get_weather": SCHEMA, "other": empty}}
    for _ in range(6):
        toks = walk(TokenMask(spec, max_tokens), max_tokens, rng)
        p = parsed(toks)
        assert toks[-1] == CALL and len(toks) <= max_tokens, p.parts
        (c,) = p.tool_calls
        jsonschema.validate(json.loads(c.text), SCHEMA if c.name == "get_weather" else empty)
        assert not p.warned and p.finish_reason(False) == "tool_calls"


def test_named_tool_and_json_final_answer():
    rng = np.random.default_rng(1)
    named = {
        "final": False,
        "calls": {
            "b": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
        },
    }
    for _ in range(4):
        p = parsed(walk(TokenMask(named, 64), 64, rng))
        assert [c.name for c in p.tool_calls] == ["b"] and json.loads(p.tool_calls[0].text)["ok"] in (
            True,
            False,
        )
    for _ in range(4):
        toks = walk(TokenMask({"final": SCHEMA, "calls": {}}, 64), 64, rng)
        p = parsed(toks)
        assert toks[-1] == RETURN
        content = "".join(q.text for q in p.parts if q.type == "content")
        jsonschema.validate(json.loads(content), SCHEMA)


def test_reasoning_budget_closes_the_analysis():
    """Once max_tokens - reserve is reached inside an analysis message, <|end|> is the only token allowed
    and no new analysis may start; the reserve is what the call needs."""
    m = TokenMask({"final": False, "calls": {"f": SCHEMA}}, 80)
    head = encode("<|channel|>analysis<|message|>", allowed_special="all")
    toks = list(head)
    while 80 - len(toks) > m.reserve:
        assert m(toks)[END] and m(toks).sum() > 1000  # free text (and <|end|>) while the budget lasts
        toks.append(encode(" word")[0])
    mask = m(toks)
    assert np.flatnonzero(mask).tolist() == [END]
    rng = np.random.default_rng(2)
    rest = []
    while not rest or rest[-1] != CALL:
        rest.append(int(rng.choice(np.flatnonzero(m(toks + rest)))))
    p = parsed(toks + rest)
    assert [q.type for q in p.parts] == ["reasoning", "tool_call"]
    jsonschema.validate(json.loads(p.tool_calls[0].text), SCHEMA)


def test_the_model_may_follow_its_own_path_through_the_grammar():
    """A natural turn (reasoning, preamble, call) is accepted token for token."""
    text = (
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary<|message|>"
        "Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris", "unit": "c", "days": 3}<|call|>'
    )
    ids = encode(text, allowed_special="all")
    m = TokenMask({"final": None, "calls": {"get_weather": SCHEMA}}, 200)
    for i, t in enumerate(ids):
        assert m(ids[:i])[t], (i, t)
    bad = encode('{"city": "Paris", "unit": "k"', allowed_special="all")
    pre = ids[: ids.index(encode("<|message|>", allowed_special="all")[0], len(ids) - 25) + 1]
    m = TokenMask({"final": None, "calls": {"get_weather": SCHEMA}}, 200)  # a mask follows one growing list
    k = bad.index(encode("k")[0])
    assert all(m(pre + bad[:i])[bad[i]] for i in range(k)) and not m(pre + bad[:k])[bad[k]]  # "k" is no unit


def test_constraint_spec_cases():
    f = FunctionDef(name="f", parameters=SCHEMA, strict=True)
    g = FunctionDef(name="g")
    assert constraint_spec(tools={"g": g}, tool_choice="auto", json_schema=None) is None
    assert constraint_spec(tools={"f": f, "g": g}, tool_choice="auto", json_schema=None) == {
        "final": None,
        "calls": {"f": SCHEMA, "g": None},
    }
    assert constraint_spec(tools={"f": f, "g": g}, tool_choice="g", json_schema=None) == {
        "final": False,
        "calls": {"g": None},
    }
    assert constraint_spec(tools={}, tool_choice="none", json_schema={"type": "object"}) == {
        "final": {"type": "object"},
        "calls": {},
    }
    with pytest.raises(ValueError):
        grammar(final=False, calls={})


def test_unenforceable_schema_is_a_400():
    with pytest.raises(APIError) as e:
        check_schema(
            {"type": "object", "properties": {"a": {"type": "string", "format": "nonsense"}}},
            "tools[0].function.parameters",
        )
    assert e.value.param == "tools[0].function.parameters" and "cannot be enforced" in str(e.value)


def test_forced_tokens():
    f = ForcedTokens([5, 7])
    assert np.flatnonzero(f([])).tolist() == [5] and np.flatnonzero(f([5])).tolist() == [7]
    assert f([5, 7]) is None and f([]).shape == (N_VOCAB,)


@pytest.mark.parametrize(
    "fmt, pattern",
    [
        (("regex", "[a-c]{3}/[0-9]{2}"), r"[a-c]{3}/[0-9]{2}"),
        (("lark", 'start: "*** Begin" NL line line? "*** End"\nline: /[+-][a-z]{1,8}/ NL\nNL: "\\n"'),
         r"\*\*\* Begin\n([+-][a-z]{1,8}\n){1,2}\*\*\* End"),
    ],
)  # fmt: skip
def test_custom_tool_grammar_is_enforced(fmt, pattern):
    """A custom tool's input follows its regex or lark grammar; its call has no <|constrain|>json."""
    rng = np.random.default_rng(7)
    spec = {"final": False, "calls": {}, "other": [("functions.edit", "text", fmt)]}
    for _ in range(4):
        toks = walk(TokenMask(spec, 60), 60, rng)
        p = parsed(toks)
        (c,) = p.tool_calls
        assert c.name == "edit" and c.content_type is None and toks[-1] == CALL
        assert re.fullmatch(pattern, c.text), c.text


def test_constraint_spec_with_namespaces_and_custom_tools():
    from gptoss_jax.api.protocol import CustomTool
    from gptoss_jax.harmony import Namespace

    grammar_tool = CustomTool(type="custom", name="pick", format={"type": "grammar", "syntax": "regex",
                                                                  "definition": "[ab]+"})  # fmt: skip
    plain = CustomTool(type="custom", name="note")
    f = FunctionDef(name="f", parameters=SCHEMA, strict=True)
    ns = {"crm": Namespace("d", {"lookup": f, "note": plain})}
    g = FunctionDef(name="g")
    assert (
        constraint_spec(tools={"g": g, "note": plain}, tool_choice="auto", json_schema=None, namespaces={})
        is None
    )
    spec = constraint_spec(
        tools={"g": g, "pick": grammar_tool}, tool_choice="auto", json_schema=None, namespaces=ns
    )
    assert spec == {
        "final": None,
        "calls": {"g": None},
        "other": [
            ("functions.pick", "text", ("regex", "[ab]+")),
            ("crm.lookup", "json", SCHEMA),
            ("crm.note", "text", None),
        ],
    }
    rng = np.random.default_rng(3)
    spec["final"] = False  # a call is required: each one the grammar allows parses as a call of its tool
    seen = set()
    for _ in range(12):
        p = parsed(walk(TokenMask(spec, 80), 80, rng))
        (c,) = p.tool_calls
        seen.add((c.namespace, c.name))
        if c.name == "pick":
            assert re.fullmatch("[ab]+", c.text)
        if c.name == "lookup":
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert (
        seen <= {("functions", "g"), ("functions", "pick"), ("crm", "lookup"), ("crm", "note")}
        and len(seen) > 1
    )
