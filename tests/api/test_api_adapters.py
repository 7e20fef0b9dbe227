"""Many fine-tunes, one server: `gptoss-jax serve BASE --adapters NAME=DIR ...` over real HTTP with the
official `openai` client. Two PEFT adapters and the base, requested at once (one engine batch mixes them):
each model name gets exactly the tokens `generate` gives with its adapter applied alone. Then the runtime
endpoints (`--allow-runtime-adapters`): a third adapter loaded and served, a bad folder a 400, a full pool
a 409, unloading an adapter in use a 409, an unloaded adapter a 404 as any unknown model.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from adaptertools import adapted_model, write_adapters
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

import gptoss_jax
from gptoss_jax.api.completions import STOP_TOKENS
from gptoss_jax.config import Config
from gptoss_jax.tokenizer import get_encoding

PROMPT = [1000 + 37 * i for i in range(23)]
MAX_NEW = 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"), Config.tiny())


@pytest.fixture(scope="module")
def server(serve_ckpt, dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc, url = start_server(serve_ckpt, log, "--max-context", "1536", "--adapters", f"attn2={dirs['attn2']}",
                             "--adapters", f"all4={dirs['all4']}", "--max-adapters", "3",
                             "--allow-runtime-adapters")  # fmt: skip
    yield url, log
    assert stop_server(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def want_text(ckpt, folder) -> str:
    model = adapted_model(str(ckpt), None if folder is None else str(folder))
    toks = gptoss_jax.generate(model, PROMPT, max_new_tokens=MAX_NEW, stop_tokens=STOP_TOKENS)[0]
    return get_encoding().decode([t for t in toks if t not in STOP_TOKENS])


def completions(url, models) -> list[str]:
    """One greedy completion per model name, sent at once (the engine batches them together)."""

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            rs = await asyncio.gather(*[c.completions.create(model=m, prompt=PROMPT, max_tokens=MAX_NEW,
                                                             temperature=0) for m in models])  # fmt: skip
            assert [r.model for r in rs] == list(models)  # each answers under the name it was asked by
            return [r.choices[0].text for r in rs]

    return asyncio.run(run())


def test_models_lists_the_base_and_each_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    ids = list(cards)  # the base, then the adapters by name (runtime loads of other tests among them)
    assert ids[0] == MODEL and ids[1:] == sorted(ids[1:]) and {"all4", "attn2"} <= set(ids[1:])
    assert cards[MODEL].parent is None and all(cards[n].parent == MODEL for n in ids[1:])
    assert cards["attn2"].root.endswith("attn2")  # the folder it was loaded from
    assert client.models.retrieve("attn2").parent == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and "'all4'" in e.value.message
    hi = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="all4", messages=hi, max_tokens=2)
    assert chat.model == "all4"


def test_each_model_gets_its_own_tokens_in_one_batch(server, serve_ckpt, dirs):
    url, _ = server
    names = [MODEL, "attn2", "all4"]
    want = [want_text(serve_ckpt, None if n == MODEL else dirs[n]) for n in names]
    assert len(set(want)) == 3  # the adapters change the output
    assert completions(url, names * 2) == want * 2


def test_responses_answer_under_the_adapters_name(client):
    """The Responses API reports the model the request named (an adapter's), streamed and stored too."""
    r = client.responses.create(model="attn2", input="Hi", max_output_tokens=2)
    assert r.model == "attn2" and client.responses.retrieve(r.id).model == "attn2"
    with client.responses.create(model="all4", input="Hi", max_output_tokens=2, stream=True) as stream:
        models = {ev.response.model for ev in stream if hasattr(ev, "response")}
    assert models == {"all4"}
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).model == MODEL


def test_two_agents_on_two_adapters_at_once(server):
    """The Agents SDK runs two agents at once, one per adapter (one over the Responses API, one over chat
    completions), against the one server: each request reaches its own adapter (the server's per-adapter
    counters: one request each, and the scripted answer's tokens generated with that adapter's slot)."""
    import agents

    url, _ = server
    agents.set_tracing_disabled(True)  # no traces sent anywhere
    answer = "<|channel|>final<|message|>Done.<|return|>"
    n_tokens = len(get_encoding().encode(answer, allowed_special="all"))

    def counters(name) -> list[float]:  # an adapter's series appear with its first request
        out = []
        for what in ("requests", "tokens"):
            try:
                out.append(metric(url, f'gptoss_engine_adapter_{what}_total{{adapter="{name}"}}'))
            except KeyError:
                out.append(0.0)
        return out

    before = {n: counters(n) for n in ("attn2", "all4")}
    script(url, answer, answer)

    async def run():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        settings = agents.ModelSettings(max_tokens=50, temperature=0)
        sql = agents.Agent(name="sql", instructions="Write SQL.", model_settings=settings,
                           model=agents.OpenAIResponsesModel("attn2", c))  # fmt: skip
        chat = agents.Agent(name="chat", instructions="Chat.", model_settings=settings,
                            model=agents.OpenAIChatCompletionsModel("all4", c))  # fmt: skip
        async with c:
            return await asyncio.gather(agents.Runner.run(sql, "rows?"), agents.Runner.run(chat, "hi"))

    sql, chat = asyncio.run(run())
    assert sql.final_output == chat.final_output == "Done."
    rid = sql.raw_responses[0].response_id  # the stored response names its adapter
    assert httpx.get(f"{url}/v1/responses/{rid}", headers=AUTH).json()["model"] == "attn2"
    for name in ("attn2", "all4"):
        requests, tokens = counters(name)
        assert (requests - before[name][0], tokens - before[name][1]) == (1, n_tokens), name


def test_runtime_load_and_unload(server, client, serve_ckpt, dirs, tmp_path):
    url, _ = server
    try:
        runtime_load_and_unload(url, client, serve_ckpt, dirs, tmp_path)
    finally:  # the server as the other tests expect it, whatever failed
        httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "experts3"}, headers=AUTH)


def runtime_load_and_unload(url, client, serve_ckpt, dirs, tmp_path):
    load = f"{url}/v1/load_lora_adapter"
    unload = f"{url}/v1/unload_lora_adapter"
    body = {"lora_name": "experts3", "lora_path": str(dirs["experts3"])}
    assert httpx.post(load, json=body).status_code == 401  # behind the API key
    r = httpx.post(load, json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["rank"] == 3, r.text
    assert "experts3" in [m.id for m in client.models.list().data]
    assert completions(url, ["experts3", MODEL]) == [want_text(serve_ckpt, dirs["experts3"]),
                                                     want_text(serve_ckpt, None)]  # fmt: skip
    # a full pool (3 slots), a bad folder, a taken name: 4xx naming the problem; the server serves on
    r = httpx.post(load, json={"lora_name": "more", "lora_path": str(dirs["attn2"])}, headers=AUTH)
    assert r.status_code == 409 and "--max-adapters" in r.json()["error"]["message"]
    r = httpx.post(load, json={"lora_name": "attn2", "lora_path": str(dirs["attn2"])}, headers=AUTH)
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    r = httpx.post(unload, json={"lora_name": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # unloading an adapter with a request in flight: 409, nothing cut short
    script(url, [13] * 1000)  # forces a long generation
    with client.completions.create(model="experts3", prompt=PROMPT, max_tokens=1000, stream=True) as stream:
        next(iter(stream))
        r = httpx.post(unload, json={"lora_name": "experts3"}, headers=AUTH)
        assert r.status_code == 409 and "in flight" in r.json()["error"]["message"], r.text
    for _ in range(100):  # the closed stream cancels its request
        r = httpx.post(unload, json={"lora_name": "experts3"}, headers=AUTH)
        if r.status_code != 409:
            break
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="experts3", prompt=PROMPT, max_tokens=2)
    (tmp_path / "empty").mkdir()
    r = httpx.post(load, json={"lora_name": "bad", "lora_path": str(tmp_path / "empty")}, headers=AUTH)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert completions(url, ["attn2"]) == [want_text(serve_ckpt, dirs["attn2"])]
