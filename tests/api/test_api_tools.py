"""Tools on the Responses API end to end, over real HTTP on 127.0.0.1: the Codex CLI (pinned, `.ci/run`
installs it) through its agent loop, the Agents SDK with a function tool and a hosted tool, with and without
`store` and with reasoning passed back only as encrypted content, namespace and custom tools through the
`openai` client, hosted tools left out (and refused with --strict-tools), and the built-in tools the model
calls unoffered.

One server per module, started with the flags every server test uses (tests/apitools.py) and nothing else;
the model's output is scripted through the test hook (see tests/api/test_api.py), except where a grammar
is enforced on a random model.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from apitools import (
    AUTH,
    KEY,
    MODEL,
    script,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
    start_server,
    stop_server,
)

REPO = Path(__file__).resolve().parents[2]
CODEX = REPO / ".ci" / "node" / "node_modules" / ".bin" / "codex"
CODEX_VERSION = (REPO / ".ci" / "codex-version").read_text().strip()
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database.",
    "tools": [
        {
            "type": "function",
            "name": "lookup",
            "description": "Find a customer",
            "parameters": {"type": "object", "properties": {"email": {"type": "string"}}},
        },
        {"type": "custom", "name": "note", "description": "Free-form note on the customer"},
    ],
}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}
CALL_WEATHER = (
    "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
)
FINAL = "<|channel|>final<|message|>It is sunny in Paris.<|return|>"


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc, url = start_server(serve_ckpt, log)
    yield url, log
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json={"model": MODEL, **body}, headers=AUTH, timeout=300)


# ------------------------------------------------------------------------------------------------ Codex
def codex(home: Path, work: Path, *argv: str) -> subprocess.CompletedProcess:
    """`codex exec ...` against the server named in home/config.toml. Anything but 127.0.0.1 goes to a
    closed local port (the proxy), so the test never reaches another address."""
    env = dict(
        os.environ,
        CODEX_HOME=str(home),
        GPTOSS_API_KEY=KEY,
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CODEX_API_KEY"):
        env.pop(k, None)
    cmd = [str(CODEX), "exec", *argv]
    return subprocess.run(
        cmd,
        check=False,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=400,
    )


def rollout(home: Path) -> list[dict]:
    """The response items Codex recorded in its session file (the newest session)."""
    (path,) = sorted((home / "sessions").rglob("rollout-*.jsonl"))[-1:]
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x["payload"] for x in lines if x.get("type") == "response_item"]


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)
def test_codex_exec_then_resume(server, tmp_path):
    """Codex's agent loop on `gptoss-jax serve`: a turn that runs `exec_command` and reads its output, calls
    into the multi_agent_v1 namespace, calls a built-in tool nobody offered (Codex answers it with an error,
    the loop goes on), and ends with a final answer; then a second user turn in the same session."""
    assert CODEX.exists(), (
        f"the pinned Codex CLI is missing: npm install --prefix .ci/node @openai/codex@{CODEX_VERSION}"
    )
    url, log = server
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "gptoss"\ncheck_for_update_on_startup = false\n\n'
        f'[model_providers.gptoss]\nname = "gptoss-jax"\nbase_url = "{url}/v1"\nwire_api = "responses"\n'
        'env_key = "GPTOSS_API_KEY"\n\n[analytics]\nenabled = false\n'
    )
    version = subprocess.run(
        [str(CODEX), "--version"], check=False, capture_output=True, text=True, timeout=60
    )
    assert version.stdout.split()[-1] == CODEX_VERSION
    uuid0 = "00000000-0000-0000-0000-000000000000"
    script(
        url,
        "<|channel|>analysis<|message|>Run it.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.exec_command <|constrain|>json<|message|>{"cmd":"echo hello-from-codex"}<|call|>',
        "<|channel|>analysis<|message|>Ask the agents.<|end|><|start|>assistant<|channel|>commentary "
        f'to=multi_agent_v1.close_agent <|constrain|>json<|message|>{{"target":"{uuid0}"}}<|call|>',
        '<|channel|>analysis to=container.exec<|message|>{"cmd":["ls"]}<|call|>',
        "<|channel|>analysis<|message|>Done.<|end|><|start|>assistant<|channel|>final<|message|>"
        "The command printed hello-from-codex.<|return|>",
    )
    flags = ["--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox"]
    r = codex(home, work, *flags, "Run echo hello-from-codex and report.")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("The command printed hello-from-codex."), r.stdout[-2000:]
    items = rollout(home)
    calls = {i["call_id"]: i for i in items if i["type"] == "function_call"}
    outputs = {i["call_id"]: i["output"] for i in items if i["type"] == "function_call_output"}
    by_name = {(c.get("namespace"), c["name"]): outputs[k] for k, c in calls.items()}
    assert "hello-from-codex" in by_name[(None, "exec_command")]  # Codex ran it and sent the output back
    assert f"agent with id {uuid0} not found" in by_name[("multi_agent_v1", "close_agent")]  # its handler ran
    assert "unsupported call" in by_name[("container", "exec")]  # an error for the model, not silence
    reasoning = [i for i in items if i["type"] == "reasoning"]
    assert len(reasoning) == 3 and all(i.get("encrypted_content") for i in reasoning)

    script(url, "<|channel|>final<|message|>Second answer.<|return|>")
    r = codex(home, work, "resume", "--last", *flags, "And now?")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("Second answer."), r.stdout[-2000:]
    users = [i for i in rollout(home) if i["type"] == "message" and i["role"] == "user"]
    assert users[-1]["content"][0]["text"] == "And now?"
    text = log.read_text()
    assert text.count("hosted tool type 'web_search' is not available") == 1  # Codex offers web_search
    assert " 500 " not in text and "internal error" not in text


# ------------------------------------------------------------------------------------------- Agents SDK
def test_agents_sdk_function_tool_and_web_search_with_and_without_store(server):
    """The Agents SDK's loop with a function tool and WebSearchTool (hosted: left out), with store on and
    off; with store off the reasoning goes back as encrypted content only (a filter strips its text) and
    the server restores it: the second call's prompt is as long as with the text sent in clear."""
    import agents
    from agents.run_config import ModelInputData

    url, _ = server
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    def strip_reasoning_text(data):
        items = []
        for it in data.model_data.input:
            if isinstance(it, dict) and it.get("type") == "reasoning":
                assert it.get("encrypted_content")
                it = {
                    "type": "reasoning",
                    "id": it["id"],
                    "summary": [],
                    "encrypted_content": it["encrypted_content"],
                }
            items.append(it)
        return ModelInputData(input=items, instructions=data.model_data.instructions)

    def drop_reasoning(data):
        items = [
            it for it in data.model_data.input if not (isinstance(it, dict) and it.get("type") == "reasoning")
        ]
        return ModelInputData(input=items, instructions=data.model_data.instructions)

    async def run(store: bool, filter_=None):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        agent = agents.Agent(
            name="weather",
            instructions="Answer with the tool.",
            tools=[get_weather, agents.WebSearchTool()],
            model=agents.OpenAIResponsesModel(MODEL, client),
            model_settings=agents.ModelSettings(
                max_tokens=100,
                temperature=0,
                store=store,
                response_include=["reasoning.encrypted_content"],
            ),
        )
        script(url, CALL_WEATHER, FINAL)
        config = agents.RunConfig(call_model_input_filter=filter_, tracing_disabled=True)
        return await agents.Runner.run(agent, "What is the weather in Paris?", run_config=config)

    prompts = {}
    for name, store, filter_ in (
        ("stored", True, None),
        ("clear", False, None),
        ("encrypted only", False, strip_reasoning_text),
        ("dropped", False, drop_reasoning),
    ):
        result = asyncio.run(run(store, filter_))
        assert result.final_output == "It is sunny in Paris.", name
        assert seen.pop() == "Paris" and not seen
        first, second = result.raw_responses
        assert any(getattr(i, "encrypted_content", None) for i in first.output if i.type == "reasoning")
        prompts[name] = second.usage.input_tokens
        if not store:
            r = httpx.get(f"{url}/v1/responses/{first.response_id}", headers=AUTH)
            assert r.status_code == 404  # nothing was stored
    assert prompts["encrypted only"] == prompts["clear"] == prompts["stored"] > prompts["dropped"]


# ------------------------------------------------------------------------------------ namespaces, custom
def test_namespace_call_comes_back_with_its_namespace_and_its_output_renders(server, client):
    url, _ = server
    script(
        url,
        '<|channel|>commentary to=crm.lookup <|constrain|>json<|message|>{"email":"a@b.c"}<|end|>'
        "<|start|>assistant<|channel|>commentary to=crm.note<|message|>VIP, call back<|call|>",
        "<|channel|>final<|message|>Found them.<|return|>",
    )
    r1 = client.responses.create(model=MODEL, input="Who is a@b.c?", tools=[WEATHER, CRM], store=False)
    fc, note = r1.output
    assert (fc.type, fc.namespace, fc.name, fc.arguments) == (
        "function_call",
        "crm",
        "lookup",
        '{"email":"a@b.c"}',
    )
    assert (note.type, note.namespace, note.name, note.input) == (
        "custom_tool_call",
        "crm",
        "note",
        "VIP, call back",
    )
    history = [
        {"role": "user", "content": "Who is a@b.c?"},
        fc.model_dump(exclude_none=True),
        note.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": fc.call_id, "output": "Ada"},
        {"type": "custom_tool_call_output", "call_id": note.call_id, "output": "noted"},
    ]
    r2 = client.responses.create(model=MODEL, input=history, tools=[WEATHER, CRM], store=False)
    assert r2.output_text == "Found them."

    from openai_harmony import Author, Message, Role

    from gptoss_jax.harmony import Chat, Namespace
    from gptoss_jax.harmony.conversation import tool_call_message

    # the prompt the server rendered: the calls to crm.*, the tools' answers from crm.* (counted here)
    tools = {"get_weather": WEATHER}
    ns = {"crm": Namespace(CRM["description"], {t["name"]: t for t in CRM["tools"]})}
    chat = Chat.from_responses_input(history, tools=tools, namespaces=ns)
    answer = lambda name, text: (
        Message.from_author_and_content(Author.new(Role.TOOL, name), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )
    assert chat.messages[1:] == [
        tool_call_message("lookup", '{"email":"a@b.c"}', namespace="crm"),
        tool_call_message("note", "VIP, call back", None, namespace="crm"),
        answer("crm.lookup", "Ada"),
        answer("crm.note", "noted"),
    ]
    import datetime as dt

    assert r2.usage.input_tokens == len(chat.prompt_tokens(dt.date.today().isoformat()))


def test_custom_tool_call_streams_and_its_output_is_accepted(server, client):
    url, _ = server
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    script(url, f"<|channel|>commentary to=functions.apply_patch<|message|>{patch}<|call|>", FINAL)
    events = list(
        client.responses.create(model=MODEL, input="Add a.txt", tools=[PATCH, WEATHER], stream=True)
    )
    kinds = [e.type for e in events]
    assert (
        "response.custom_tool_call_input.delta" in kinds and "response.custom_tool_call_input.done" in kinds
    )
    done = next(e for e in events if e.type == "response.custom_tool_call_input.done")
    final = events[-1].response
    (call,) = final.output
    assert (call.type, call.name, call.input, done.input) == ("custom_tool_call", "apply_patch", patch, patch)
    r = client.responses.create(
        model=MODEL,
        previous_response_id=final.id,
        tools=[PATCH, WEATHER],
        input=[{"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"}],
    )
    assert r.output_text == "It is sunny in Paris."


def test_custom_tool_grammar_is_enforced_on_a_random_model(server):
    """Unscripted: the random model must call the custom tool, and its input follows the regex."""
    url, _ = server
    tool = {
        "type": "custom",
        "name": "pick",
        "description": "Pick a code",
        "format": {"type": "grammar", "syntax": "regex", "definition": "[a-c]{3}-[0-9]{2}"},
    }
    for seed in range(3):
        r = post(
            url,
            {
                "input": "Pick.",
                "tools": [tool],
                "tool_choice": {"type": "custom", "name": "pick"},
                "max_output_tokens": 40,
                "seed": seed,
            },
        )
        assert r.status_code == 200, r.text
        (call,) = [i for i in r.json()["output"] if i["type"] == "custom_tool_call"]
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", call["input"]), call
    bad = dict(tool, format={"type": "grammar", "syntax": "lark", "definition": "start: undefined_rule"})
    r = post(url, {"input": "x", "tools": [WEATHER, bad]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].format.definition", r.text


# --------------------------------------------------------------------------------------- hosted tools
def test_hosted_tools_are_left_out_and_logged_once(server, client):
    url, log = server
    hosted = [{"type": t} for t in ("code_interpreter", "file_search", "image_generation")]
    hosted.append({"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:9"})
    script(url, FINAL, FINAL, FINAL)
    plain = client.responses.create(model=MODEL, input="Hi", tools=[WEATHER])
    for _ in range(2):
        r = client.responses.create(model=MODEL, input="Hi", tools=[WEATHER, *hosted])
        assert r.output_text == "It is sunny in Paris."
        assert r.usage.input_tokens == plain.usage.input_tokens  # the model saw the function tool only
    text = log.read_text()
    for t in ("code_interpreter", "file_search", "image_generation", "mcp"):
        assert text.count(f"hosted tool type {t!r} is not available") == 1, t
    r = post(url, {"input": "x", "tools": [WEATHER, {"type": "no_such_tool"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].type"


def test_strict_tools_refuses_a_hosted_tool(serve_ckpt, tmp_path):
    proc, url = start_server(serve_ckpt, tmp_path / "server.log", "--strict-tools")
    try:
        r = post(url, {"input": "x", "tools": [WEATHER, {"type": "web_search_preview"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "tools[1].type" and "web_search_preview" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    finally:
        assert stop_server(proc) == 0


# ---------------------------------------------------------------------------------- encrypted reasoning
def test_encrypted_reasoning_round_trip_and_tamper(server):
    url, _ = server
    body = {
        "input": "Weather in Paris?",
        "tools": [WEATHER],
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "max_output_tokens": 100,
    }
    script(url, CALL_WEATHER)
    r1 = post(url, body).json()
    rs, fc = r1["output"]
    assert (
        rs["type"] == "reasoning"
        and rs["encrypted_content"]
        and "Use the tool" not in rs["encrypted_content"]
    )
    script(url, CALL_WEATHER)
    with httpx.stream(
        "POST",
        f"{url}/v1/responses",
        json={"model": MODEL, **body, "stream": True},
        headers=AUTH,
        timeout=300,
    ) as s:
        done = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
    assert any(e["type"] == "response.output_item.done" and e["item"].get("encrypted_content") for e in done)

    def second(reasoning: dict) -> httpx.Response:
        script(url, FINAL)
        tool_out = {"type": "function_call_output", "call_id": fc["call_id"], "output": "sunny"}
        return post(
            url,
            {**body, "input": [{"role": "user", "content": "Weather in Paris?"}, reasoning, fc, tool_out]},
        )

    clear = second({"type": "reasoning", "summary": [], "content": rs["content"]})
    sealed = second(
        {"type": "reasoning", "id": rs["id"], "summary": [], "encrypted_content": rs["encrypted_content"]}
    )
    assert clear.status_code == sealed.status_code == 200, sealed.text
    assert sealed.json()["usage"]["input_tokens"] == clear.json()["usage"]["input_tokens"]
    blob = rs["encrypted_content"]
    tampered = blob[:-8] + ("A" if blob[-8] != "A" else "B") + blob[-7:]
    r = post(
        url,
        {
            **body,
            "input": [
                {"role": "user", "content": "x"},
                {"type": "reasoning", "summary": [], "encrypted_content": tampered},
            ],
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].encrypted_content", r.text


# ------------------------------------------------------------------------------- invented built-in tools
def test_a_built_in_tool_nobody_offered_is_a_tool_call_not_silence(server, client):
    url, _ = server
    call = '<|channel|>analysis<|message|>Search.<|end|><|start|>assistant<|channel|>analysis to=browser.search<|message|>{"query":"x"}<|call|>'
    script(url, call, call, "<|channel|>final<|message|>No browser here.<|return|>")
    r = client.responses.create(model=MODEL, input="Search x", store=False)
    fc = r.output[-1]
    assert (fc.type, fc.namespace, fc.name, fc.arguments) == (
        "function_call",
        "browser",
        "search",
        '{"query":"x"}',
    )
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Search x"}])
    assert c.choices[0].finish_reason == "tool_calls"
    assert c.choices[0].message.tool_calls[0].function.name == "browser.search"
    history = [
        {"role": "user", "content": "Search x"},
        fc.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": fc.call_id, "output": "error: no browser tool"},
    ]
    assert client.responses.create(model=MODEL, input=history).output_text == "No browser here."
