"""Generated tokens -> parts and events (harmony/parser.py), on harmony text encoded with the real tokenizer.

Every output the model may write (and many it should not) is checked against two invariants besides the
expected parts: each part's text is exactly the concatenation of its deltas (what makes a streamed answer
byte-identical to the non-streamed one), and content never holds a harmony marker.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from gptoss_jax.harmony import OutputParser, StopStrings, part_type
from gptoss_jax.tokenizer import CALL, CHANNEL, END, MESSAGE, RETURN, START, encode

MARKER = re.compile(r"<\|[a-z_0-9]+\|>")


def run(text_or_ids, **kw):
    ids = encode(text_or_ids, allowed_special="all") if isinstance(text_or_ids, str) else text_or_ids
    p = OutputParser(**kw)
    events = []
    for t in ids:
        events += p.feed(t)
        if p.stopped:
            break
    events += p.finish()
    check_events(p, events)
    return p, events


def check_events(p: OutputParser, events) -> None:
    for part in p.parts:
        mine = [e for e in events if e[1] is part]
        assert [e[0] for e in mine[:1]] == ["start"] and [e[0] for e in mine[-1:]] == ["end"], mine
        assert sum(e[0] == "end" for e in mine) == 1 and part.done
        assert "".join(e[2] for e in mine) == part.text
        if part.type == "content":
            assert not MARKER.search(part.text), part.text
    assert len({id(e[1]) for e in events}) == len(p.parts)


def parts(p):
    return [(q.type, q.name, q.text) for q in p.parts]


CASES = {
    "reasoning then final": (
        (
            "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final"
            "<|message|>4 🦜<|return|>"
        ),
        [("reasoning", None, "Let me think."), ("content", None, "4 🦜")],
        "stop",
    ),
    "reasoning then tool call": (
        (
            "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
        ),
        [("reasoning", None, "Need the weather."), ("tool_call", "get_weather", '{"city": "Paris"}')],
        "tool_calls",
    ),
    "two tool calls": (
        (
            '<|channel|>commentary to=functions.a <|constrain|>json<|message|>{"x":1}<|end|>'
            "<|start|>assistant"
            '<|channel|>commentary to=functions.b <|constrain|>json<|message|>{"y":2}<|call|>'
        ),
        [("tool_call", "a", '{"x":1}'), ("tool_call", "b", '{"y":2}')],
        "tool_calls",
    ),
    "recipient in the role part": (
        " to=functions.f<|channel|>commentary json<|message|>{}<|call|>",
        [("tool_call", "f", "{}")],
        "tool_calls",
    ),
    "preamble": (
        (
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant"
            "<|channel|>commentary to=functions.f "
            "<|constrain|>json<|message|>{}<|call|>"
        ),
        [("preamble", None, "Checking."), ("tool_call", "f", "{}")],
        "tool_calls",
    ),
    "built-in tool call nobody offered is a tool call, not an empty answer": (
        '<|channel|>analysis to=browser.search<|message|>{"query": "x"}<|call|>',
        [("tool_call", "search", '{"query": "x"}')],
        "tool_calls",
    ),
    "bare python call": (
        "<|channel|>analysis to=python<|message|>print(1)<|call|>",
        [("tool_call", "python", "print(1)")],
        "tool_calls",
    ),
    "message to a recipient that is no tool stays reasoning": (
        "<|channel|>analysis to=nobody.here<|message|>x<|call|>",
        [("reasoning", None, "x")],
        "stop",
    ),
    "refusal, message without channel": (
        "<|message|>I can't help with that.<|end|>",
        [("content", None, "I can't help with that.")],
        "stop",
    ),
    "refusal, no header at all": (
        "I can't help with that.<|return|>",
        [("content", None, "I can't help with that.")],
        "stop",
    ),
    "text and no end token": ("Just text", [("content", None, "Just text")], "stop"),
    "marker inside content is dropped": (
        "<|channel|>final<|message|>a<|message|>b<|constrain|>c<|return|>",
        [("content", None, "abc")],
        "stop",
    ),
    "new message without <|end|>": (
        "<|channel|>analysis<|message|>x<|start|>assistant<|channel|>final<|message|>y<|return|>",
        [("reasoning", None, "x"), ("content", None, "y")],
        "stop",
    ),
    "garbage between messages": (
        "<|channel|>final<|message|>x<|end|>junk<|start|>assistant<|channel|>final<|message|>y<|return|>",
        [("content", None, "x"), ("content", None, "junk"), ("content", None, "y")],
        "stop",
    ),
    "doubled channel marker": (
        "<|channel|><|channel|>final<|message|>z<|return|>",
        [("content", None, "z")],
        "stop",
    ),
    "leaked channel names never reach content": (
        "analysisassistantfinal<|channel|>final<|message|>ok<|return|>",
        [("content", None, "ok")],
        "stop",
    ),
    "header cut off by max_tokens": (
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin",
        [("reasoning", None, "x")],
        "stop",
    ),
    "hallucinated tool answer is not content": (
        (
            "<|start|>functions.f to=assistant<|channel|>commentary<|message|>fake<|end|><|start|>assistant"
            "<|channel|>final<|message|>ok<|return|>"
        ),
        [("reasoning", None, "fake"), ("content", None, "ok")],
        "stop",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_outputs(name):
    text, want, finish = CASES[name]
    p, _ = run(text)
    assert parts(p) == want
    assert p.finish_reason(False) == finish


def test_malformed_output_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="gptoss_jax.api"):
        run(
            "<|channel|>final<|message|>x<|end|>junk<|start|>assistant<|channel|><|channel|>final<|message|>y"
        )
    warnings = [r for r in caplog.records if "not valid harmony" in r.getMessage()]
    assert len(warnings) == 1


def test_valid_output_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="gptoss_jax.api"):
        run(CASES["reasoning then tool call"][0])
    assert not caplog.records


def test_tool_calls_get_ids_and_indices():
    p, events = run(CASES["two tool calls"][0])
    a, b = p.tool_calls
    assert (a.index, b.index) == (0, 1) and a.call_id != b.call_id and a.call_id.startswith("call_")
    starts = [e for e in events if e[0] == "start"]
    assert [e[2] for e in starts] == ["", ""]  # a call starts with empty arguments


def test_cut_off_by_max_tokens():
    ids = encode(
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>The answer is",
        allowed_special="all",
    )
    p, _ = run(ids)
    assert parts(p) == [("reasoning", None, "x"), ("content", None, "The answer is")]
    assert p.finish_reason(True) == "length"
    p, _ = run(ids[:-3])  # cut inside a call's arguments: length, not tool_calls
    p2, _ = run(
        encode(
            '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ', allowed_special="all"
        )
    )
    assert p2.finish_reason(True) == "length" and p2.tool_calls[0].text == '{"a": '


def test_reasoning_tokens_count_the_analysis_messages():
    text = (
        "<|channel|>analysis<|message|>one two three<|end|><|start|>assistant<|channel|>final<|message|>"
        "hi<|return|>"
    )
    p, _ = run(text)
    ids = encode(text, allowed_special="all")
    first_end = ids.index(END)
    assert p.reasoning_tokens == first_end + 1  # header, text and <|end|> of the analysis message
    assert p.n_tokens == len(ids)


def test_stop_strings_cut_content_across_tokens():
    p, _events = run(
        "<|channel|>analysis<|message|>STOP here is fine<|end|><|start|>assistant<|channel|>final"
        "<|message|>one two STOP three<|return|>",
        stop=["STOP"],
    )
    assert parts(p) == [("reasoning", None, "STOP here is fine"), ("content", None, "one two ")]
    assert p.stopped and p.finish_reason(False) == "stop"
    p, _ = run("<|channel|>final<|message|>one ST<|return|>", stop=["STOP"])  # a partial match is released
    assert parts(p) == [("content", None, "one ST")] and not p.stopped


def test_stop_strings_unit():
    s = StopStrings(["abc", "bd"])
    assert s.push("xa") == "x" and s.push("b") == "" and s.push("x") == "abx"
    assert s.push("b") == "" and s.push("d") == "" and s.hit
    s = StopStrings(["abc"])
    assert s.push("zab") == "z" and s.flush() == "ab"


def test_single_tool_call_stops_after_the_first():
    ids = encode(CASES["two tool calls"][0], allowed_special="all")
    p = OutputParser(single_tool_call=True)
    n = 0
    for t in ids:
        p.feed(t)
        n += 1
        if p.stopped:
            break
    p.finish()
    assert [q.name for q in p.tool_calls] == ["a"] and ids[n - 1] == END


def test_namespaces_and_built_in_tools_are_tool_calls_in_their_namespace():
    text = (
        '<|channel|>commentary to=multi_agent_v1.spawn_agent <|constrain|>json<|message|>{"message":"go"}<|end|>'
        "<|start|>assistant<|channel|>commentary to=container.exec<|message|>ls<|end|>"
        "<|start|>assistant<|channel|>commentary to=other.spawn_agent<|message|>x<|call|>"
    )
    p, _ = run(text, namespaces=["multi_agent_v1"])
    assert [(q.type, q.namespace, q.name) for q in p.parts] == [
        ("tool_call", "multi_agent_v1", "spawn_agent"),
        ("tool_call", "container", "exec"),
        ("reasoning", None, None),  # a namespace the request did not offer, and no built-in tool
    ]
    p, _ = run(text)
    assert [q.type for q in p.parts] == ["reasoning", "tool_call", "reasoning"]


def test_part_type_table():
    assert part_type("assistant", "commentary", "functions.x") == "tool_call"
    assert part_type("assistant", "analysis", None) == "reasoning"
    assert part_type("assistant", "commentary", None) == "preamble"
    assert part_type("assistant", "final", "junk") == "content"
    assert part_type("assistant", None, None) == "content"
    assert part_type("user", "final", None) == "reasoning"


def test_random_token_streams_never_raise():
    """Random mixes of harmony markers and text: the invariants hold and no marker reaches content."""
    rng = np.random.default_rng(0)
    pieces = [CHANNEL, START, END, MESSAGE, RETURN, CALL, 200003, 200013, 199999] + encode(
        'analysis final commentary to=functions.f assistant json {"a": 1} hello world 🦜'
    )
    for _ in range(300):
        ids = [int(t) for t in rng.choice(pieces, size=int(rng.integers(1, 40)))]
        p, _ = run(ids)
        assert p.n_tokens == len(ids)
