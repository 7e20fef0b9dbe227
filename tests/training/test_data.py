"""Training data: OpenAI chat JSONL -> harmony tokens with loss weights, packing, the step -> rows order.

The prompts are checked against `harmony.render_chat_prompt` (what `gptoss-jax serve` and `chat` send the
model; tests/harmony/test_harmony_skew.py checks a whole corpus against the server) and the trained tokens
against the exact harmony strings the model must produce, stop tokens included.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from conftest import assert_one_line

from gptoss_jax.harmony import render_chat_prompt
from gptoss_jax.tokenizer import decode
from gptoss_jax.training.data import DataError, Loader, Rows, Sequence, pack, read_jsonl, render

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
EXAMPLE = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "thinking": "Look it up.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
        {"role": "assistant", "thinking": "Got it.", "content": "18 C."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "tools": TOOLS,
}


def spans(seq: Sequence) -> list[str]:
    """The trained stretches of a sequence, decoded."""
    out, cur = [], []
    for t, w in zip(seq.tokens, seq.weights, strict=True):
        if w:
            cur.append(t)
        elif cur:
            out.append(decode(cur))
            cur = []
    return out + ([decode(cur)] if cur else [])


def test_every_assistant_turn_is_trained_in_its_inference_context():
    first, second = render(EXAMPLE)
    # The tool exchange is one sequence: the call, then (after the untrained tool result) the answer.
    assert spans(first) == [
        "<|channel|>analysis<|message|>Look it up.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>',
        "<|channel|>analysis<|message|>Got it.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>18 C.<|return|>",
    ]
    prompt = decode(first.tokens[: first.weights.index(1)])
    assert prompt.endswith("<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant")
    assert "Be brief." in prompt and "type get_weather" in prompt
    # The next turn starts again from the prompt the model sees then: earlier analysis dropped by harmony.
    assert spans(second) == ["<|channel|>final<|message|>You're welcome.<|return|>"]
    ctx = decode(second.tokens)
    assert "Got it." not in ctx and "<|channel|>final<|message|>18 C.<|end|>" in ctx


def test_the_prompt_is_the_chat_prompt():
    (seq,) = render(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    n = seq.weights.index(1)
    assert seq.tokens[:n] == render_chat_prompt([("user", "hi")])
    assert decode(seq.tokens[n:]) == "<|channel|>final<|message|>hello<|return|>"


def test_the_prompt_settings_reach_the_system_message(tmp_path):
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (seq,) = render(ex, reasoning_effort="low", date="2025-08-05")
    want = render_chat_prompt([("user", "hi")], reasoning_effort="low", conversation_start_date="2025-08-05")
    assert seq.tokens[: seq.weights.index(1)] == want
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ex) + "\n")
    (seq,) = read_jsonl(f, seq_len=512, date="today")
    assert f"Current date: {dt.date.today().isoformat()}" in decode(seq.tokens)


def test_weight_zero_is_context_and_assistant_only_can_be_off():
    ex = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    (seq,) = render(ex)
    assert spans(seq) == ["<|channel|>final<|message|>d<|return|>"]
    assert "<|channel|>final<|message|>b<|end|>" in decode(seq.tokens)
    (seq,) = render(ex, assistant_only=False)
    assert all(seq.weights)


U, A = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}


def line(*messages, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


BAD_CALL = {"type": "function", "function": {"name": "f", "arguments": "{city: 1}"}}
BAD = [
    ("{not json", "not valid JSON"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    (line({"role": "robot", "content": "x"}), "messages[0].role"),
    (
        line(U, {"role": "assistant", "tool_calls": [BAD_CALL]}),
        "messages[1].tool_calls[0].function.arguments",
    ),
    (line(U, {"role": "tool", "tool_call_id": "zz", "content": "1"}, A), "messages[1]"),
    (line(U), "no assistant message"),
    (line(U, {"role": "assistant", "content": 5}), "messages[1].content"),
    (line(U, A | {"weight": 2}), "messages[1].weight"),
    (
        line(U, A, tools=[{"type": "function", "function": {"description": "no name"}}]),
        "tools[0].function.name",
    ),
    (  # a name that breaks harmony's header: the target would not parse back to the call it came from
        line(
            U,
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get weather"}}]},
        ),
        "messages[1]: its rendering does not parse back to it",
    ),
    (line(U, A, {"role": "system", "content": "late"}), "messages[2]: a system message must come before"),
]


@pytest.mark.parametrize("line,needle", BAD)
def test_a_bad_line_is_one_error_with_its_line_number(tmp_path, line, needle):
    good = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    f = tmp_path / "data.jsonl"
    f.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f, seq_len=512)
    assert_one_line(e, "data.jsonl line 4", needle)


def test_too_long_and_missing_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(EXAMPLE) + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f, seq_len=64)
    assert_one_line(e, "d.jsonl line 1", "sequence length 64")
    with pytest.raises(DataError) as e:
        read_jsonl(tmp_path / "none.jsonl", seq_len=64)
    assert_one_line(e, "none.jsonl")


def test_packing_places_whole_sequences_best_fit():
    seqs = [
        Sequence(list(range(100 * i, 100 * i + n)), [0] + [1] * (n - 1), i)
        for i, n in enumerate([4, 6, 5, 3])
    ]
    rows = pack(seqs, 10)
    # longest first, each into the fullest row it fits: 6+4, then 5+3
    assert sorted(
        map(tuple, (r[:n] for r, n in zip(rows.tokens.tolist(), rows.lengths, strict=True)))
    ) == sorted([(*range(0, 4), *range(100, 106)), (*range(200, 205), *range(300, 303))])
    assert pack(seqs, 10, pack=False).tokens.shape == (4, 10)
    b = Rows(rows.tokens[:1], rows.weights[:1], rows.lengths[:1]).batch(np.array([0]))
    assert b["positions"][0].tolist() == list(range(10))
    # targets are the next tokens whose weight is 1 (not the first token of each sequence)
    assert b["targets"][0][b["weights"][0] > 0].tolist() == [1, 2, 3, 101, 102, 103, 104, 105]
    assert (
        b["tokens"][0][b["loss_pos"][0][b["weights"][0] > 0] + 1] == b["targets"][0][b["weights"][0] > 0]
    ).all()


def test_padding_and_the_last_position_carry_no_loss():
    rows = Rows(
        np.array([[5, 6, 7, 0, 0]], np.int32), np.array([[0, 1, 1, 0, 0]], np.uint8), np.array([3], np.int32)
    )
    b = rows.batch(np.array([0]))
    assert b["positions"].tolist() == [[0, 1, 2, -1, -1]]
    assert b["targets"][0][b["weights"][0] > 0].tolist() == [6, 7]


def test_the_rows_of_a_step_depend_only_on_seed_and_step():
    rows = Rows(np.zeros((7, 4), np.int32), np.ones((7, 4), np.uint8), np.full(7, 4, np.int32))
    a, b = Loader(rows, 3, seed=1), Loader(rows, 3, seed=1)
    seq = [a.indices(s) for s in range(7)]
    assert all(np.array_equal(b.indices(s), seq[s]) for s in reversed(range(7)))  # any order of asking
    flat = np.concatenate(seq)
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(
        range(7)
    )  # epochs cover every row
    assert not np.array_equal(flat[:7], flat[7:14])
    assert not np.array_equal(Loader(rows, 3, seed=2).indices(0), seq[0])
