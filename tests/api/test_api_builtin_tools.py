"""Tools the server runs itself (gptoss_jax/api/toolloop.py), end to end over real HTTP on 127.0.0.1 with the
official `openai` client: `serve --builtin-tools python,browser` runs the model's python calls in the real
sandbox (bubblewrap) and its browser calls on a local index, within the request, and generation goes on with
the tool's answer; `--tool-server` runs an MCP server's tools over stdio, and a Responses `mcp` tool connects
one over streamable HTTP (the SDK-written test server, tests/tools/mcp_server.py, in a thread).

One server per module; each generation of the loop takes the next script of the test hook (tests/apitools.py).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from apitools import (
    AUTH,
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


MCP_SERVER = Path(__file__).resolve().parents[1] / "tools" / "mcp_server.py"
ROPE = """# Rotary embeddings

RoPE rotates queries and keys by angles that grow with the position.
YaRN scaling stretches the angles so that a model reads longer contexts.
gpt-oss uses YaRN scaling with a factor of 32.
"""


@pytest.fixture(scope="module")
def mcp_http():
    """The test MCP server over streamable HTTP on a free port of 127.0.0.1 -> its base URL."""
    spec = importlib.util.spec_from_file_location("mcp_test_server", MCP_SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.http_in_thread(module.build_server("Test Tools").streamable_http_app()) as url:
        yield url


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory, mcp_http):
    _sandbox_or_skip()
    tmp = tmp_path_factory.mktemp("tools")
    (tmp / "index").mkdir()
    (tmp / "index" / "rope.md").write_text(ROPE)
    (tmp / "index" / "cooking.txt").write_text("Pasta\n\nBoil water, add salt, cook the pasta.\n")
    log = tmp / "server.log"
    proc, url = start_server(
        serve_ckpt, log, "--builtin-tools", "python,browser", "--python-timeout", "30",
        "--browser-index", str(tmp / "index"), "--tool-server", f"tt={sys.executable} {MCP_SERVER}",
        "--allow-mcp-url", f"{mcp_http}/mcp",
    )  # fmt: skip
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
def test_hosted_code_interpreter_and_web_search_are_the_servers_tools(server, client):
    url, log = server
    script(url, final("ok"), final("ok"), final("ok"))
    plain = client.responses.create(model=MODEL, input="Hi")
    r = client.responses.create(model=MODEL, input="Hi", tools=[
        {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]}])  # fmt: skip
    assert r.usage.input_tokens == plain.usage.input_tokens  # declared either way; file_search left out
    text = log.read_text()
    assert "'code_interpreter' is not available" not in text and "'web_search' is not available" not in text
    assert "'file_search' is not available" in text
    # tool_choice "none": no tool is declared, the server's neither
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


# ------------------------------------------------------------------------------------------------ browser
def browse(fn: str, args: str, think: str = "Look it up.") -> str:
    return (f"<|channel|>analysis<|message|>{think}<|end|><|start|>assistant<|channel|>analysis "
            f"to=browser.{fn} <|constrain|>json<|message|>{args}<|call|>")  # fmt: skip


def test_browser_search_open_find_and_a_citation(server, client):
    url, _ = server
    answer = "gpt-oss scales RoPE with YaRN by 32 【1†L4-L5】."
    script(url, browse("search", '{"query": "yarn scaling"}'), browse("open", '{"id": 0}'),
           browse("find", '{"pattern": "factor"}'), final(answer))  # fmt: skip
    events = list(client.responses.create(model=MODEL, input="How does gpt-oss scale RoPE?", stream=True))
    r = events[-1].response
    assert r.status == "completed" and r.output_text == answer
    ws = [i for i in r.output if i.type == "web_search_call"]
    assert [(w.status, w.action.type) for w in ws] == [
        ("completed", "search"), ("completed", "open_page"), ("completed", "find_in_page")]  # fmt: skip
    doc = "local://index/rope.md"
    assert ws[0].action.query == "yarn scaling" and ws[0].action.sources[0].url == doc
    assert ws[1].action.url == doc and (ws[2].action.url, ws[2].action.pattern) == (doc, "factor")
    (ann,) = r.output[-1].content[0].annotations
    start = answer.index("【")
    assert (ann.type, ann.url, ann.start_index, ann.end_index) == (
        "url_citation",
        doc,
        start,
        len(answer) - 1,
    )
    # the events: each call's in order, and the annotation announced before the text is done
    for w in ws:
        mine = [e.type for e in events if getattr(e, "item_id", None) == w.id
                or (e.type.startswith("response.output_item") and e.item.id == w.id)]  # fmt: skip
        assert mine == ["response.output_item.added", "response.web_search_call.in_progress",
                        "response.web_search_call.searching", "response.web_search_call.completed",
                        "response.output_item.done"]  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds.index("response.output_text.annotation.added") < kinds.index("response.output_text.done")
    # the next turn on the chain keeps the browser's pages: the citation of cursor 1 still resolves
    script(url, final("Again: 【1†L4】"))
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input="Cite it again.")
    assert r2.output[-1].content[0].annotations[0].url == doc


def test_web_search_is_the_browser_and_a_bad_call_is_an_answer(server, client):
    url, _ = server
    script(url, browse("open", '{"id": 7}'), final("No such link."))
    r = client.responses.create(model=MODEL, input="x", tools=[{"type": "web_search_preview"}])
    ws = next(i for i in r.output if i.type == "web_search_call")
    assert ws.status == "completed" and r.output_text == "No such link."  # the model read the error


# ---------------------------------------------------------------------------------------------------- MCP
def test_an_mcp_tool_over_stdio_from_tool_server(server, client):
    url, _ = server
    call_add = ("<|channel|>analysis<|message|>Add.<|end|><|start|>assistant<|channel|>analysis to=tt.add "
                '<|constrain|>json<|message|>{"a": 2, "b": 3}<|call|>')  # fmt: skip
    script(url, call_add, final("5."))
    r = client.responses.create(model=MODEL, input="2+3?")
    mc = next(i for i in r.output if i.type == "mcp_call")
    assert (mc.server_label, mc.name, mc.arguments, mc.output, mc.status) == (
        "tt", "add", '{"a": 2, "b": 3}', "5", "completed")  # fmt: skip
    script(url, call_add, final("5."))
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+3?"}])
    assert (
        '[call tt.add]\n{"a": 2, "b": 3}\n\n[result tt.add]\n5'
        in c.choices[0].message.model_extra["reasoning"]
    )


def test_a_responses_mcp_tool_over_http_streams_its_events(server, client, mcp_http):
    url, _ = server
    tool = {"type": "mcp", "server_label": "docs", "server_url": f"{mcp_http}/mcp", "require_approval": "never",
            "allowed_tools": ["echo.v2", "fail"]}  # fmt: skip
    script(url, "<|channel|>analysis to=docs.echo_v2 <|constrain|>json<|message|>"
           '{"text": "hi", "times": 2}<|call|>', "<|channel|>analysis to=docs.fail <|constrain|>json<|message|>"
           '{"reason": "test"}<|call|>', final("Echoed."))  # fmt: skip
    events = list(client.responses.create(model=MODEL, input="Echo hi twice.", tools=[tool], stream=True))
    r = events[-1].response
    lt, ok, bad = r.output[0], r.output[1], r.output[2]
    assert lt.type == "mcp_list_tools" and sorted(t.name for t in lt.tools) == ["echo.v2", "fail"]
    assert (ok.type, ok.server_label, ok.name, ok.output, ok.status) == ("mcp_call", "docs", "echo.v2", "hi hi",
                                                                       "completed")  # fmt: skip
    assert bad.status == "failed" and bad.error and "failed on purpose: test" in str(bad.error)

    def of(item) -> list[str]:
        return [e.type for e in events if getattr(e, "item_id", None) == item.id
                or (e.type.startswith("response.output_item") and e.item.id == item.id)]  # fmt: skip

    added, done = "response.output_item.added", "response.output_item.done"
    assert of(lt) == [added, "response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed", done]
    for item, end in ((ok, "completed"), (bad, "failed")):
        seq = of(item)
        deltas = seq.count("response.mcp_call_arguments.delta")
        assert deltas >= 1 and seq == [added, "response.mcp_call.in_progress",
                                       *["response.mcp_call_arguments.delta"] * deltas,
                                       "response.mcp_call_arguments.done", f"response.mcp_call.{end}", done]  # fmt: skip
    # the response echoes the tool without its credentials
    script(url, final("ok"))
    secret = dict(tool, authorization="sk-secret", headers={"X-Key": "sk-secret"})
    r = client.responses.create(model=MODEL, input="x", tools=[secret])
    assert "sk-secret" not in r.model_dump_json()
    # a URL the operator did not allow, and an approval this server does not ask for: 400s naming them
    for bad_tool, param in (
        (dict(tool, server_url="http://127.0.0.1:9/mcp"), "tools[0].server_url"),
        (dict(tool, require_approval="always"), "tools[0].require_approval"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="x", tools=[bad_tool])
        assert e.value.body["param"] == param


def test_a_client_that_goes_away_interrupts_the_running_call(server, client):
    """The stream is closed while python runs a 30 s cell: the cell is interrupted (the next call in the
    same conversation runs at once) and the kernel keeps its state."""
    url, log = server
    script(url, call("x = 1"), final("ok"))
    r1 = client.responses.create(model=MODEL, input="Set x.")
    script(url, call("import time\ntime.sleep(30)"))
    body = {"model": MODEL, "previous_response_id": r1.id, "input": "Wait.", "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, headers=AUTH, timeout=60) as s:
        for line in s.iter_lines():
            if "response.code_interpreter_call.interpreting" in line:
                time.sleep(3)  # the cell is running (the kernel starts in about a second)
                break  # leaving the block closes the connection while the cell runs
    t0 = time.monotonic()
    script(url, call("print(x)"), final("1."))
    r3 = client.responses.create(model=MODEL, previous_response_id=r1.id, input="x?")
    took = time.monotonic() - t0
    ci = next(i for i in r3.output if i.type == "code_interpreter_call")
    assert ci.outputs[0].logs == "1\n" and took < 15, took
    assert " 499 " in log.read_text()  # the request was logged as the client's close


def test_tool_flags_are_checked_and_a_server_that_does_not_connect_stops_the_start(serve_ckpt, tmp_path):
    def serve(*flags) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "gptoss_jax",
            "serve",
            str(serve_ckpt),
            "--port",
            "0",
            "--no-warmup",
            *flags,
        ]
        return subprocess.run(cmd, check=False, env=cli_env(), capture_output=True, text=True, timeout=300)

    r = serve("--browser-index", str(tmp_path))
    assert r.returncode == 2 and "--browser-index: needs --builtin-tools browser" in r.stderr, r.stderr
    r = serve("--builtin-tools", "browser", "--browser-index", str(tmp_path))
    assert r.returncode == 2 and "holds no .txt, .md or .html file" in r.stderr, r.stderr[-2000:]
    r = serve("--tool-server", "tt=false")  # no MCP server: it exits at once
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: MCP server 'false': the process exited or closed its stdout" in r.stderr


def test_evicted_conversations_close_their_tools_state():
    from gptoss_jax.api.responses import ResponseStore

    closed = []
    store = ResponseStore(2, on_close=closed.append)
    store.put("r1", Chat(), {}, "conv-a")
    store.put("r2", Chat(), {}, "conv-a")  # the chain's second response
    store.put("r3", Chat(), {}, "conv-b")  # r1 evicted: conv-a still has r2
    assert closed == [] and store.conversation("r2") == "conv-a"
    store.put("r4", Chat(), {}, None)  # r2 evicted: conv-a has no stored response left
    assert closed == ["conv-a"] and store.conversation("r2") is None


def test_hostile_code_is_contained_and_the_server_keeps_serving(server, client):
    """Through the server: a call that reads the environment, looks for the network and prints 100 MB gets a
    clear answer (no key, only its own loopback, the output stopped), and another request is served while it
    runs."""
    url, _ = server
    code = (
        "import os, socket, time\n"
        "print(sorted(k for k in os.environ if 'KEY' in k or 'GPTOSS' in k))\n"
        "print(socket.if_nameindex())\n"
        "time.sleep(6)\n"
        "print('x' * 100_000_000)"
    )
    script(url, call(code))
    box: dict = {}
    worker = threading.Thread(
        target=lambda: box.setdefault("r", client.responses.create(model=MODEL, input="Go.", max_output_tokens=400))
    )  # fmt: skip
    worker.start()
    time.sleep(2.0)  # its script taken, the kernel starting or running the cell (it sleeps 6 s, then prints)
    script(url, final("Still here."))
    other = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert other.choices[0].message.content == "Still here." and worker.is_alive()
    script(url, final("Contained."))
    worker.join(120)
    r = box["r"]
    logs = next(i for i in r.output if i.type == "code_interpreter_call").outputs[0].logs
    assert r.output_text == "Contained."
    assert "[]" in logs and KEY not in logs  # no key, no server variable
    assert "(1, 'lo')" in logs and "eth" not in logs  # its own loopback only
    assert "characters printed: the rest was dropped" in logs and len(logs) < 30_000
