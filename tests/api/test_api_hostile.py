"""Hostile request bodies and the request-field policy, over real HTTP on 127.0.0.1.

- Four bodies that once gave a 500 (deep nesting, a 5000-digit integer, a non-string `$schema`, a lone UTF-16
  surrogate) and the size limits are 400s naming the field.
- 200 bodies from a hypothesis strategy (JSON shapes, sizes, depths, strings; raw bytes to both chat
  completions and Responses): never a 5xx, always OpenAI's error shape, and the server serves after.
- Field policy: unknown fields are a 400 naming them, the documented ignored ones are admitted (what Codex
  CLI and the Agents SDK send), vLLM's sampling extensions work on every endpoint, "minimal" effort is low,
  and Responses log-probs come in the Responses shape.
"""

from __future__ import annotations

import asyncio
import json

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_jax.api.protocol import MAX_MESSAGES, MAX_SCHEMA_BYTES, MAX_TOOLS
from gptoss_jax.tokenizer import get_encoding

USER = [{"role": "user", "content": "x"}]
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    proc, url = start_server(serve_ckpt, log, "--max-seqs", "4", "--max-context", "2048")
    yield url, log
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, path: str, content: bytes | None = None, **kw) -> httpx.Response:
    headers = AUTH | {"Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=120, **kw)


def assert_error(r: httpx.Response, status: int, *needles: str, param: str | None = "-") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], err
    for n in needles:
        assert n in err["message"], err
    if param != "-":
        assert err["param"] == param, err


def serves(url: str) -> bool:
    r = post(url, "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ------------------------------------------------------------------------------ the four former 500s
CHAT = "/v1/chat/completions"
RESP = "/v1/responses"
FORMER_500S = {
    "100k nested lists": (CHAT, b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper", None),
    "nested within the limit of Python, past ours": (
        RESP, b'{"input": "x", "metadata": {"a": ' + b"[" * 500 + b"]" * 500 + b"}}", "nested deeper",
        "metadata.a" + "[0]" * 62,
    ),
    "5000-digit integer": (CHAT, b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "more than 4300 digits", None),
    "NaN": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN", None),
    "$schema not a string (chat)": (
        CHAT, json.dumps({"messages": USER, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "$schema": {"a": 1}}}}]}).encode(),
        "$schema must be a string", "tools[0].function.parameters",
    ),
    "$schema not a string (responses)": (
        RESP, json.dumps({"input": "x", "tools": [{"type": "function", "name": "f",
                                                   "parameters": {"$schema": [1]}}]}).encode(),
        "$schema must be a string", "tools[0].parameters",
    ),
    "lone surrogate (chat)": (
        CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone UTF-16 surrogate",
        "messages[0].content",
    ),
    "lone surrogate (responses)": (
        RESP, b'{"input": [{"role": "user", "content": [{"type": "input_text", "text": "\\udfff"}]}]}',
        "lone UTF-16 surrogate", "input[0].content[0].text",
    ),
    "lone surrogate in a key": (CHAT, b'{"messages": [], "\\ud800": 1}', "lone UTF-16 surrogate", None),
}  # fmt: skip


@pytest.mark.parametrize("name", FORMER_500S)
def test_bodies_that_were_500s_are_400s(name, server):
    url, _ = server
    path, body, needle, param = FORMER_500S[name]
    assert_error(post(url, path, body), 400, needle, param=param)
    assert serves(url)


def test_size_limits_name_the_field(server):
    url, _ = server
    r = post(url, CHAT, json={"messages": USER * (MAX_MESSAGES + 1), "max_tokens": 1})
    assert_error(r, 400, f"at most {MAX_MESSAGES} items", param="messages")
    r = post(url, RESP, json={"input": USER * (MAX_MESSAGES + 1), "max_output_tokens": 1})
    assert_error(r, 400, f"at most {MAX_MESSAGES} input items", param="input")
    tools = [FN | {"function": FN["function"] | {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]
    assert_error(post(url, CHAT, json={"messages": USER, "tools": tools}), 400, f"at most {MAX_TOOLS}",
                 param="tools")  # fmt: skip
    flat = [{"type": "function", "name": f"f{i}"} for i in range(MAX_TOOLS + 1)]
    assert_error(post(url, RESP, json={"input": "x", "tools": flat}), 400, param="tools")
    big = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_BYTES // 20)},
    }
    fn = {"type": "function", "function": {"name": "f", "parameters": big}}
    assert_error(post(url, CHAT, json={"messages": USER, "tools": [fn]}), 400, f"larger than {MAX_SCHEMA_BYTES}",
                 param="tools[0].function.parameters")  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": big}}
    assert_error(post(url, CHAT, json={"messages": USER, "response_format": fmt}), 400,
                 param="response_format.json_schema.schema")  # fmt: skip
    assert serves(url)


# ------------------------------------------------------------------------------------------ fuzzing
DEEP, BIG = "__DEEP_PLACEHOLDER__", "__BIGINT_PLACEHOLDER__"
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=8).map(lambda s: s + "\ud800"),
    st.sampled_from([DEEP, BIG, "", "\x00", "<|start|>assistant<|channel|>final<|message|>", "a" * 20_000]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=12), kids, max_size=6)
    ),
    max_leaves=30,
)
CHAT_FIELDS = [
    "messages",
    "model",
    "tools",
    "tool_choice",
    "response_format",
    "n",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "parallel_tool_calls",
    "stream_options",
    "user",
    "metadata",
    "logit_bias",
    "frequency_penalty",
]
RESP_FIELDS = [
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "include",
    "top_logprobs",
    "previous_response_id",
    "store",
    "metadata",
    "truncation",
    "temperature",
    "top_k",
    "conversation",
]
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
        "content": st.one_of(st.text(max_size=30), values),
    },
    optional={"tool_calls": values, "tool_call_id": values, "name": values},
)
ITEM = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "web_search_call"]
        )
    },
    optional={
        "role": st.sampled_from(["user", "assistant"]),
        "content": values,
        "call_id": values,
        "name": values,
        "arguments": values,
        "output": values,
    },
)
TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "custom"])}, optional={
    "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g h", ""])},
                                      optional={"parameters": values, "strict": values}),
    "name": st.sampled_from(["f", "g"]), "parameters": values})  # fmt: skip


@st.composite
def bodies(draw):
    """(path, raw bytes): a raw JSON shape, or a request that is valid but for some fields drawn at random
    (each valid one generates at most 2 tokens)."""
    kind = draw(st.sampled_from(["raw", "chat", "responses"]))
    if kind == "raw":
        body, path = draw(values), draw(st.sampled_from([CHAT, RESP]))
    elif kind == "chat":
        path = CHAT
        body = {"model": MODEL, "messages": draw(st.lists(MESSAGE, min_size=1, max_size=4))}
        if draw(st.booleans()):
            body["tools"] = draw(st.lists(TOOL, max_size=3))
        body |= draw(st.dictionaries(st.sampled_from(CHAT_FIELDS), values, max_size=3))
        body |= {"max_tokens": 2, "stream": False}
        body.pop("n", None)
    else:
        path = RESP
        body = {"model": MODEL, "input": draw(st.one_of(st.text(max_size=30), st.lists(ITEM, max_size=4)))}
        body |= draw(st.dictionaries(st.sampled_from(RESP_FIELDS), values, max_size=3))
        body |= {"max_output_tokens": 2, "stream": False}
    raw = json.dumps(body).replace(f'"{DEEP}"', "[" * 3000 + "]" * 3000).replace(f'"{BIG}"', "7" * 4400)
    return path, raw.encode()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(case=bodies())
def test_hostile_bodies_never_give_a_5xx(server, case):
    url, _ = server
    path, raw = case
    r = post(url, path, raw)
    assert r.status_code < 500, (raw[:300], r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
        assert "Traceback" not in err["message"] and "internal error" not in err["message"]


def test_the_server_serves_after_the_fuzzing(server):
    url, log = server
    assert serves(url)
    assert "Traceback" not in log.read_text()  # no handler failed on any of the bodies above


# ------------------------------------------------------------------------------------- field policy
@pytest.mark.parametrize("path, body", [
    (CHAT, {"messages": USER, "max_tokens": 1}),
    (RESP, {"input": "x", "max_output_tokens": 1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
])  # fmt: skip
def test_unknown_fields_are_refused_by_name(server, path, body):
    url, _ = server
    assert_error(post(url, path, json=body | {"guided_json": {"type": "object"}}), 400,
                 "guided_json: not supported", param="guided_json")  # fmt: skip
    assert post(url, path, json=body | {"user": "u", "service_tier": "auto", "safety_identifier": "s",
                                        "prompt_cache_key": "k", "client_metadata": {"a": "b"}}).status_code == 200  # fmt: skip


@pytest.mark.parametrize("path, body, field, value", [
    (CHAT, {"messages": USER}, "frequency_penalty", 0.5),
    (CHAT, {"messages": USER}, "functions", [{"name": "f"}]),
    (RESP, {"input": "x"}, "truncation", "auto"),
    (RESP, {"input": "x"}, "conversation", "conv_1"),
    (RESP, {"input": "x"}, "background", True),
    ("/v1/completions", {"prompt": "x"}, "best_of", 3),
])  # fmt: skip
def test_refused_fields_are_admitted_only_at_their_default(server, path, body, field, value):
    url, _ = server
    assert_error(post(url, path, json=body | {field: value}), 400, f"{field}: not supported", param=field)
    default = {"frequency_penalty": 0, "functions": None, "truncation": "disabled", "conversation": None,
               "background": False, "best_of": 1}[field]  # fmt: skip
    limit = {"max_output_tokens": 1} if path == RESP else {"max_tokens": 1}
    r = post(url, path, json=body | limit | {field: default})
    assert r.status_code == 200, r.text


def test_codex_cli_request_is_admitted(server):
    """The fields Codex CLI sends on /v1/responses (tool semantics aside): none is refused."""
    url, _ = server
    script(url, "<|channel|>final<|message|>ok<|return|>")
    body = {
        "model": MODEL, "instructions": "You are Codex.", "input": [{"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "hi"}]}], "tools": [FN["function"] | {"type": "function"}],
        "tool_choice": "auto", "parallel_tool_calls": False, "reasoning": {"effort": "minimal", "summary": "auto"},
        "store": False, "stream": False, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "conv-1",
        "text": {"verbosity": "low"}, "client_metadata": {"x-codex": "1"}, "max_output_tokens": 8,
    }  # fmt: skip
    r = post(url, RESP, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["output"][-1]["content"][0]["text"] == "ok" and r.json()["reasoning"]["effort"] == "low"


def test_agents_sdk_settings_are_admitted(server):
    """The Agents SDK's Responses model with every setting it passes through set: nothing is refused, and its
    top_logprobs (sent with include "message.output_text.logprobs") come back."""
    import agents
    from openai.types.shared import Reasoning

    url, _ = server
    agents.set_tracing_disabled(True)
    script(url, "<|channel|>final<|message|>Fine.<|return|>")
    model = agents.OpenAIResponsesModel(
        MODEL, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    )
    settings_ = agents.ModelSettings(temperature=0.5, top_p=0.9, max_tokens=20, truncation="disabled", store=False,
                                     metadata={"k": "v"}, top_logprobs=2, verbosity="low",
                                     reasoning=Reasoning(effort="minimal", summary="auto"), parallel_tool_calls=True,
                                     extra_body={"top_k": 40, "prompt_cache_key": "p"})  # fmt: skip
    agent = agents.Agent(name="a", instructions="Be brief.", model=model, model_settings=settings_)
    result = asyncio.run(agents.Runner.run(agent, "How are you?"))
    assert result.final_output == "Fine."
    part = result.raw_responses[-1].output[-1].content[0]
    assert "".join(lp.token for lp in part.logprobs) == "Fine."
    assert all(len(lp.top_logprobs) == 2 for lp in part.logprobs)


# --------------------------------------------------------------------------------- honoured fields
def test_sampling_extensions_on_every_endpoint(server, client):
    """top_k 1 (and min_p 1) keep only the most likely token: sampling at temperature 1 gives the greedy
    answer; a repetition_penalty below 1 makes a greedy answer repeat the prompt's tokens; bad values are a
    400 naming the field."""
    url, _ = server
    msgs = [{"role": "user", "content": "Count to ten."}]
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=1, seed=7,
                                           extra_body=extra)  # fmt: skip
        assert r.choices[0].message == greedy.choices[0].message, extra
    g = client.responses.create(model=MODEL, input="Count.", max_output_tokens=12, temperature=0, store=False)
    r = client.responses.create(model=MODEL, input="Count.", max_output_tokens=12, temperature=1, store=False,
                                extra_body={"top_k": 1})  # fmt: skip
    assert r.usage.output_tokens == g.usage.output_tokens and r.output_text == g.output_text
    prompt = list(range(1000, 1600))  # 600 distinct tokens
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=0)
    k1 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=1, seed=3, logprobs=0,
                                   extra_body={"top_k": 1})  # fmt: skip
    # a penalty below 1 favours what was seen: positive logits of the prompt's tokens x100, the rest stay
    pen = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=0,
                                    extra_body={"repetition_penalty": 0.01})  # fmt: skip
    assert k1.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
    seen = {get_encoding().decode_single_token_bytes(t).decode("utf-8", "replace") for t in prompt}
    assert not set(plain.choices[0].logprobs.tokens) & seen
    assert set(pen.choices[0].logprobs.tokens) <= seen
    for field, bad in (
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("repetition_penalty", 1e999),
    ):
        raw = json.dumps({"messages": USER, field: bad}).replace("Infinity", "1e999")
        assert_error(post(url, CHAT, raw.encode()), 400, field, param=field)


def test_minimal_reasoning_effort_is_low(server, client):
    url, _ = server
    msgs = [{"role": "user", "content": "Hi"}]
    got = {}
    for effort in ("minimal", "low", "high"):
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                           reasoning_effort=effort)  # fmt: skip
        got[effort] = (r.usage.prompt_tokens, r.choices[0].message.content, r.choices[0].logprobs)
    assert got["minimal"] == got["low"] and got["low"] != got["high"]
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, reasoning={"effort": "minimal"})
    assert r.reasoning.effort == "low"
    assert_error(post(url, CHAT, json={"messages": msgs, "reasoning_effort": "extreme"}), 400,
                 param="reasoning_effort")  # fmt: skip


def test_responses_logprobs_in_the_responses_shape(server, client):
    url, _ = server
    answer = (
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hello world"
    )
    script(url, answer + "<|return|>")
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=40, top_logprobs=3,
                                include=["message.output_text.logprobs"], store=False)  # fmt: skip
    text = r.output[-1].content[0]
    assert text.text == "Hello world" and "".join(lp.token for lp in text.logprobs) == "Hello world"
    assert all(len(lp.top_logprobs) == 3 and lp.logprob <= 0 for lp in text.logprobs)
    assert all(lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob for lp in text.logprobs)
    assert r.output[0].type == "reasoning"
    # streamed: the deltas carry the same log-probs, and the .done event and the final part all of them
    script(url, answer + "<|return|>")
    deltas, done = [], None
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=40, top_logprobs=3,
                                 include=["message.output_text.logprobs"], store=False) as s:  # fmt: skip
        for ev in s:
            if ev.type == "response.output_text.delta":
                deltas += ev.logprobs
            elif ev.type == "response.output_text.done":
                done = ev
        final = s.get_final_response()
    assert [(d.token, d.logprob) for d in deltas] == [(lp.token, lp.logprob) for lp in text.logprobs]
    assert [lp.token for lp in done.logprobs] == [lp.token for lp in text.logprobs]
    assert [lp.logprob for lp in final.output[-1].content[0].logprobs] == [lp.logprob for lp in text.logprobs]
    # without include (and top_logprobs), no log-probs
    script(url, answer + "<|return|>")
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=40, store=False)
    assert r.output[-1].content[0].logprobs == []


def test_no_cors_headers_by_default(server):
    url, _ = server
    r = httpx.get(f"{url}/v1/models", headers=AUTH | {"Origin": "http://a.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
