"""Tools the server runs itself (gptoss_jax/api/toolloop.py), end to end over real HTTP on 127.0.0.1 with the
official `openai` client: `serve --builtin-tools python` runs the model's python calls in the real sandbox
(bubblewrap) within the request, and generation goes on with the tool's answer.

One server per module; each generation of the loop takes the next script of the test hook (tests/apitools.py).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import openai
import pytest
from apitools import (
    KEY,
    MODEL,
    metric,
    script,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
    start_server,
    stop_server,
)
from clitools import cli_env

from gptoss_jax.api.toolloop import continuation
from gptoss_jax.harmony import Chat, builtin_result
from gptoss_jax.tools import PythonTool, SandboxUnavailable


def _sandbox_or_skip():
    try:
        PythonTool(timeout_s=20).shutdown()
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")


def call(code: str, think: str = "Compute.") -> str:
    """A python call as gpt-oss writes it: on the analysis channel, ended by <|call|>."""
    return (f"<|channel|>analysis<|message|>{think}<|end|><|start|>assistant<|channel|>analysis to=python code"
            f"<|message|>{code}<|call|>")  # fmt: skip


def final(text: str) -> str:
    return f"<|channel|>final<|message|>{text}<|return|>"


NO_OUTPUT = "[no output: print() what you want to see]"


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    _sandbox_or_skip()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc, url = start_server(serve_ckpt, log, "--builtin-tools", "python", "--python-timeout", "30")
    yield url, log
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


def tool_tokens(text: str) -> int:
    """What a python answer adds to the next prompt: its message and <|start|>assistant."""
    return len(continuation(builtin_result("python", text, "analysis")))


# ------------------------------------------------------------------------------------------- Responses
def test_python_twice_in_one_request_then_across_turns(server, client):
    url, _ = server
    script(url, final("plain"))
    plain = client.responses.create(model=MODEL, input="What is 6 * 7?")
    p1 = plain.usage.input_tokens  # the loop's first prompt is this one
    hits = metric(url, "gptoss_engine_prefix_hits")
    script(url, call("x = 6 * 7"), call("print(x)", "Print it."), final("It is 42."))
    r = client.responses.create(model=MODEL, input="What is 6 * 7?")
    assert r.status == "completed" and r.output_text == "It is 42."
    types = [i.type for i in r.output]
    assert types == ["reasoning", "code_interpreter_call", "reasoning", "code_interpreter_call", "message"]
    first, second = r.output[1], r.output[3]
    assert (first.code, first.status, first.outputs[0].type, first.outputs[0].logs) == (
        "x = 6 * 7", "completed", "logs", NO_OUTPUT)  # fmt: skip
    assert (second.code, second.outputs[0].logs) == ("print(x)", "42\n")  # the state of the first call
    assert first.container_id == second.container_id == f"cntr_{r.id}"
    # usage counts the three generations; the second and third prompts extend the one before token for
    # token, so the prefix cache spares all but the last partial page (16 tokens) of each
    u = r.usage
    assert u.input_tokens > 3 * p1 and u.output_tokens > 0
    later = u.input_tokens - p1  # p2 + p3
    assert (
        u.input_tokens_details.cached_tokens >= later - tool_tokens(NO_OUTPUT) - tool_tokens("42\n") - 2 * 17
    )
    assert metric(url, "gptoss_engine_prefix_hits") >= hits + 3

    # the next turn: the same kernel (the chain's conversation), and the stored conversation holds the calls
    script(url, call("print(x + 1)"), final("43."))
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input="And plus one?")
    ci = [i for i in r2.output if i.type == "code_interpreter_call"]
    assert [c.outputs[0].logs for c in ci] == ["43\n"] and ci[0].container_id == f"cntr_{r.id}"
    assert r2.output_text == "43."


def test_stateless_items_render_as_the_model_saw_them(server, client):
    """The items of a loop, sent back by a client, render as the conversation the server stored."""
    url, _ = server
    script(url, call("z = 5"), final("Done."))
    r = client.responses.create(model=MODEL, input="Set z.", max_output_tokens=200)
    items = [{"role": "user", "content": "Set z."}] + [i.model_dump(exclude_none=True) for i in r.output]
    chat = Chat.from_responses_input(items + [{"role": "user", "content": "Next?"}])
    msgs = chat.messages
    assert [(m.author.role.value, m.author.name, m.channel, m.recipient) for m in msgs[1:4]] == [
        ("assistant", None, "analysis", None),
        ("assistant", None, "analysis", "python"),
        ("tool", "python", "analysis", "assistant"),
    ]
    assert msgs[3].content[0].text == NO_OUTPUT
    script(url, final("Next."), final("Next."))
    chained = client.responses.create(model=MODEL, previous_response_id=r.id, input="Next?")
    sent = client.responses.create(
        model=MODEL, input=items + [{"role": "user", "content": "Next?"}], store=False
    )
    # both drop the finished turn's analysis (the call and its answer are on that channel) and keep the rest
    assert chained.usage.input_tokens == sent.usage.input_tokens


def test_stream_events_in_order(server, client):
    url, _ = server
    script(url, call("print(sum(range(10)))"), final("45."))
    events = list(client.responses.create(model=MODEL, input="Sum 0..9", stream=True))
    kinds = [e.type for e in events]
    ci = next(e.item for e in events if e.type == "response.output_item.added"
              and e.item.type == "code_interpreter_call")  # fmt: skip
    mine = [e.type for e in events if getattr(e, "item_id", None) == ci.id or (
        e.type.startswith("response.output_item") and e.item.id == ci.id)]  # fmt: skip
    deltas = mine.count("response.code_interpreter_call_code.delta")
    assert deltas >= 1
    assert mine == [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        *["response.code_interpreter_call_code.delta"] * deltas,
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    done = next(e.item for e in events if e.type == "response.output_item.done" and e.item.id == ci.id)
    assert done.code == "print(sum(range(10)))" and done.outputs[0].logs == "45\n"
    code = "".join(e.delta for e in events if e.type == "response.code_interpreter_call_code.delta")
    assert code == done.code
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.index("response.code_interpreter_call.completed") < kinds.index("response.output_text.done")
    final_obj = events[-1].response
    assert [i.type for i in final_obj.output] == ["reasoning", "code_interpreter_call", "message"]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_python_error_comes_back_to_the_model_as_text(server, client):
    url, _ = server
    script(url, call("1 / 0"), final("Cannot divide by zero."))
    r = client.responses.create(model=MODEL, input="1/0?")
    ci = next(i for i in r.output if i.type == "code_interpreter_call")
    logs = ci.outputs[0].logs
    assert ci.status == "completed" and "ZeroDivisionError" in logs and "division by zero" in logs
    assert r.output_text == "Cannot divide by zero."


def test_the_output_budget_covers_the_loop(server, client):
    url, _ = server
    first = call("w = 1")
    from gptoss_jax.tokenizer import encode

    n1 = len(encode(first, allowed_special="all"))
    script(url, first, final("A long answer that does not fit in what is left of the budget."))
    r = client.responses.create(model=MODEL, input="Go", max_output_tokens=n1 + 4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == n1 + 4  # both generations together
    assert [i.type for i in r.output][:2] == ["reasoning", "code_interpreter_call"]
    # a call with no budget left to go on with is not run
    script(url, first)
    r = client.responses.create(model=MODEL, input="Go", max_output_tokens=n1)
    ci = next(i for i in r.output if i.type == "code_interpreter_call")
    assert r.status == "incomplete" and ci.status == "incomplete" and ci.outputs is None


def test_the_tool_call_limit(server, client):
    url, _ = server
    script(url, call("print(1)"), call("print(2)"), call("print(3)"))
    r = client.responses.create(model=MODEL, input="Go", extra_body={"max_tool_calls": 1})
    ci = [i for i in r.output if i.type == "code_interpreter_call"]
    assert [c.outputs and c.outputs[0].logs for c in ci][:2] == [
        "1\n", "[error: the limit of 1 tool calls for this request is reached; answer with what you have]"]  # fmt: skip
    assert ci[1].status == "failed" and ci[2].status == "incomplete"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"


# ----------------------------------------------------------------------------------- chat completions
def test_chat_completions_show_the_calls_in_reasoning(server, client):
    url, _ = server
    script(url, call("y = 7\nprint(y * 6)"), final("42."))
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "7*6?"}])
    msg = c.choices[0].message
    assert c.choices[0].finish_reason == "stop" and msg.content == "42." and not msg.tool_calls
    reasoning = msg.model_extra["reasoning"]
    assert reasoning == "Compute.\n\n[call python]\ny = 7\nprint(y * 6)\n\n[result python]\n42\n"
    assert c.usage.prompt_tokens_details.cached_tokens > 0
    # streamed: the same reasoning from the deltas; the conversation is the request's own (y is gone)
    script(url, call("print(y)"), final("?"))
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y?"}],
                                                 stream=True))  # fmt: skip
    text = "".join(getattr(ch.choices[0].delta, "reasoning", None) or "" for ch in chunks if ch.choices)
    assert text.startswith("Compute.\n\n[call python]\nprint(y)\n\n[result python]\n") and "NameError" in text


# ---------------------------------------------------------------------------------------- hosted types
def test_code_interpreter_is_the_python_tool_and_web_search_is_left_out(server, client):
    url, log = server
    script(url, final("ok"), final("ok"), final("ok"))
    plain = client.responses.create(model=MODEL, input="Hi")
    r = client.responses.create(model=MODEL, input="Hi", tools=[
        {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "web_search"}])  # fmt: skip
    assert r.usage.input_tokens == plain.usage.input_tokens  # python declared either way; web_search left out
    text = log.read_text()
    assert "'code_interpreter' is not available" not in text and "'web_search' is not available" in text
    # tool_choice "none": no tool is declared, python neither
    bare = client.responses.create(model=MODEL, input="Hi", tool_choice="none")
    assert bare.usage.input_tokens < plain.usage.input_tokens - 100


# ------------------------------------------------------------------------------------------ the sandbox
def test_python_is_refused_without_a_sandbox_unless_none_is_asked(serve_ckpt, tmp_path, caplog):
    env = cli_env(PATH=str(tmp_path))  # no bwrap on PATH: the tool's probe finds none
    r = subprocess.run([sys.executable, "-m", "gptoss_jax", "serve", str(serve_ckpt), "--builtin-tools", "python"],
                       check=False, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert (
        "--builtin-tools python: python tool: no sandbox can be set up here (bwrap is not installed)"
        in r.stderr
    )
    assert "--python-sandbox none" in r.stderr or "sandbox='none'" in r.stderr

    from gptoss_jax.api.cli import make_tools
    from gptoss_jax.cli import build_parser

    args = build_parser().parse_args(["serve", str(serve_ckpt), "--builtin-tools", "python",
                                      "--python-sandbox", "none", "--python-timeout", "20"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="gptoss_jax.tools.python"):
        tools = make_tools(args)
    try:
        assert tools["python"].sandbox == "none" and tools["python"].timeout_s == 20
        assert any("without isolation" in r.getMessage() for r in caplog.records)
    finally:
        tools["python"].shutdown()
    with pytest.raises(ValueError, match="--builtin-tools: unknown tool 'shell'"):
        make_tools(build_parser().parse_args(["serve", str(serve_ckpt), "--builtin-tools", "shell"]))


def test_a_function_the_client_offered_still_comes_back_to_it(server, client):
    """In one turn: python (run by the server), then the client's function (returned); the client answers
    it on the chain, where the kernel still holds the state."""
    url, _ = server
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    script(url, call("city = 'Paris'"), "<|channel|>commentary to=functions.get_weather <|constrain|>json"
           '<|message|>{"city":"Paris"}<|call|>', call("print(city)"), final("Sunny in Paris."))  # fmt: skip
    r = client.responses.create(model=MODEL, input="Weather?", tools=[weather])
    assert [i.type for i in r.output] == ["reasoning", "code_interpreter_call", "function_call"]
    assert r.status == "completed" and r.output[2].name == "get_weather"
    out = {"type": "function_call_output", "call_id": r.output[2].call_id, "output": "sunny"}
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input=[out], tools=[weather])
    ci = next(i for i in r2.output if i.type == "code_interpreter_call")
    assert ci.outputs[0].logs == "Paris\n" and r2.output_text == "Sunny in Paris."
