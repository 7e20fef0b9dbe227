"""Training data with gpt-oss's built-in tools (python, browser): a line's `builtin_tools` and its built-in
calls render exactly as `gptoss-jax serve --builtin-tools python,browser` declares the tools and runs its
tool loop: the first prompt is the server's own rendering of the request (`chat_turn`, `responses_turn`,
with the tools `serve` makes), and each later prompt is the previous one, the model's call and the tool's
answer as the loop appends them (`toolloop.continuation`), token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
from conftest import assert_one_line

from gptoss_jax.api.cli import make_tools
from gptoss_jax.api.harmony_io import chat_turn, responses_turn
from gptoss_jax.api.protocol import ChatRequest, ResponsesRequest
from gptoss_jax.api.toolloop import continuation
from gptoss_jax.harmony import builtin_result
from gptoss_jax.tokenizer import decode
from gptoss_jax.tools import BrowserTool, ToolCall
from gptoss_jax.training.data import DataError, read_jsonl, render

DAY = "2025-08-05"  # the conversation date setting (`serve --date`, or the adapters' settings)
QUESTION = "When was Aldmere founded? And what is 37 * 91?"


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """The tools as `serve --builtin-tools python,browser --python-sandbox none --browser-index DOCS` makes
    them (no kernel starts: the python tool's declaration is rendered, the browser searches and opens)."""
    docs = tmp_path_factory.mktemp("docs")
    (docs / "aldmere.md").write_text("# Aldmere\n\nAldmere is a river town. It was founded in 1642.\n")
    (docs / "corvale.md").write_text("# Corvale\n\nCorvale is a hill town, founded in 1710.\n")
    args = argparse.Namespace(builtin_tools="python,browser", python_sandbox="none", browser_index=str(docs))
    made = make_tools(args)
    assert isinstance(made["browser"], BrowserTool)
    yield made
    for t in made.values():
        t.shutdown()


def browse(tool: BrowserTool, function: str, args: dict) -> str:
    """What the browser answers (the text its tool message carries)."""
    return asyncio.run(tool.call(ToolCall(f"browser.{function}", json.dumps(args), "conv"))).text


def example(tools) -> dict:
    found = browse(tools["browser"], "search", {"query": "Aldmere founded"})
    page = browse(tools["browser"], "open", {"id": 0})
    return {
        "builtin_tools": ["browser", "python"],
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "thinking": "Look it up.", "tool_calls": [
                {"id": "s1", "type": "browser.search", "arguments": {"query": "Aldmere founded"}}]},
            {"role": "tool", "tool_call_id": "s1", "content": found},
            {"role": "assistant", "tool_calls": [{"id": "o1", "type": "browser.open", "arguments": '{"id": 0}'}]},
            {"role": "tool", "name": "browser.open", "content": page},
            {"role": "assistant", "tool_calls": [{"id": "p1", "type": "python", "code": "print(37 * 91)"}]},
            {"role": "tool", "tool_call_id": "p1", "content": "3367\n"},
            {"role": "assistant", "content": "Aldmere was founded in 1642 【1†L2】; 37 * 91 = 3367."},
        ],
    }  # fmt: skip


def runs(seq) -> list[tuple[bool, list[int]]]:
    """The sequence as alternating (trained?, tokens) runs."""
    out: list[tuple[bool, list[int]]] = []
    for t, w in zip(seq.tokens, seq.weights, strict=True):
        if out and out[-1][0] == bool(w):
            out[-1][1].append(t)
        else:
            out.append((bool(w), [t]))
    return out


def test_builtin_calls_train_on_what_the_server_renders_and_loops(tools):
    ex = example(tools)
    (seq,) = render(ex, date=DAY)  # one tool loop: one sequence
    parts = runs(seq)
    assert [trained for trained, _ in parts] == [False, True] * 4
    # the first prompt is the server's for the same request, on both APIs, with the tools it runs
    prompt = parts[0][1]
    chat = chat_turn(ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": QUESTION}]}),
                     run_tools=tools)  # fmt: skip
    assert prompt == chat.prompt_tokens(DAY)
    resp = responses_turn(
        ResponsesRequest.model_validate({"model": "m", "input": QUESTION}), None, run_tools=tools
    )
    assert prompt == resp.prompt_tokens(DAY)
    text = decode(prompt)
    assert (
        "## browser" in text
        and "## python" in text
        and "Internet access for this session is disabled" in text
    )
    # the model's turns: each call as gpt-oss writes it, the answer last
    targets = [decode(t) for trained, t in parts if trained]
    assert targets == [
        (
            "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=browser.search"
            '<|channel|>analysis code<|message|>{"query": "Aldmere founded"}<|call|>'
        ),
        ' to=browser.open<|channel|>analysis code<|message|>{"id": 0}<|call|>',
        " to=python<|channel|>analysis code<|message|>print(37 * 91)<|call|>",
        "<|channel|>final<|message|>Aldmere was founded in 1642 【1†L2】; 37 * 91 = 3367.<|return|>",
    ]
    # between them, exactly what the server's tool loop appends: the tool's answer, then <|start|>assistant
    answers = [("browser.search", ex["messages"][2]["content"]), ("browser.open", ex["messages"][4]["content"]),
               ("python", "3367\n")]  # fmt: skip
    for (_, between), (to, answer) in zip(parts[2::2], answers, strict=True):
        assert between == continuation(builtin_result(to, answer, "analysis"))
    assert "L2: Aldmere is a river town. It was founded in 1642." in ex["messages"][4]["content"]  # opened


def test_builtin_calls_on_commentary_and_beside_function_calls():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    ex = {
        "builtin_tools": ["python"],
        "tools": tools,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "Working on it.", "tool_calls": [
                {"id": "p", "type": "python", "code": "1 + 1", "channel": "commentary"},
                {"id": "f", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "p", "content": "2"},
            {"role": "tool", "tool_call_id": "f", "content": "found"},
            {"role": "assistant", "content": "2."},
        ],
    }  # fmt: skip
    text = decode(render(ex)[0].tokens)
    assert (
        "<|channel|>commentary<|message|>Working on it.<|end|><|start|>assistant to=python<|channel|>commentary"
        " code<|message|>1 + 1<|call|>" in text
    )
    assert "<|start|>python to=assistant<|channel|>commentary<|message|>2<|end|>" in text
    assert "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>found<|end|>" in text


U, A = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
PY = {"role": "assistant", "tool_calls": [{"type": "python", "code": "1"}]}


def line(*messages, **extra) -> str:
    return json.dumps({"messages": list(messages), **extra})


BAD = [
    (line(U, A, builtin_tools="python"), "builtin_tools must be a list"),
    (line(U, A, builtin_tools=["python", "shell"]), "builtin_tools[1]: unknown tool 'shell'"),
    (line(U, A, builtin_tools=["python", "python"]), "builtin_tools[1]: 'python' is given twice"),
    (line(U, PY, A), "messages[1].tool_calls[0].type: a python call needs 'python' in the line's builtin_tools"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "python", "code": ""}]}, A, builtin_tools=["python"]),
     "messages[1].tool_calls[0].code must be a non-empty string"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "browser.search"}]}, A, builtin_tools=["browser"]),
     "messages[1].tool_calls[0].arguments: field required"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "browser.open", "arguments": "[1]"}]}, A,
          builtin_tools=["browser"]), "messages[1].tool_calls[0].arguments must be a JSON object"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "browser.find", "arguments": "{x"}]}, A,
          builtin_tools=["browser"]), "messages[1].tool_calls[0].arguments is not valid JSON"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "python", "code": "1", "channel": "final"}]}, A,
          builtin_tools=["python"]), "messages[1].tool_calls[0].channel must be analysis or commentary"),
    (line(U, {"role": "assistant", "tool_calls": [{"type": "shell", "code": "ls"}]}, A),
     "messages[1].tool_calls[0].type must be function or a built-in call"),
    (line(U, {"role": "tool", "name": "python", "content": "2"}, A, builtin_tools=["python"]),
     "messages[1]: a python answer before any python call"),
]  # fmt: skip


@pytest.mark.parametrize("bad,needle", BAD)
def test_a_bad_builtin_line_is_one_error_naming_the_field(tmp_path, bad, needle):
    good = line(U, PY, {"role": "tool", "name": "python", "content": "1"}, A, builtin_tools=["python"])
    f = tmp_path / "data.jsonl"
    f.write_text(f"{good}\n{bad}\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f, seq_len=1024)
    assert_one_line(e, "data.jsonl line 2", needle)
