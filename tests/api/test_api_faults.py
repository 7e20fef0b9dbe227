"""The server stays truthful under faults: a request past --request-timeout is dropped by the engine (its KV
pages go back to the pool) and answered with a 504, or an error event mid-stream; the engine thread dying
turns /health into a 503 at once and ends every request (streamed, in flight, queued, new) with an error in
OpenAI's shape; CORS with --allowed-origins. One server: two engine slots, a 5 s deadline; the engine fault
(the test hook's /v1/test/engine_fault) is the module's last test, since the server cannot serve after it.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from apitools import (
    AUTH,
    KEY,
    MODEL,
    metric,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
    start_server,
    stop_server,
)
from openai.types.responses import ResponseErrorEvent, ResponseFailedEvent

TIMEOUT = 5.0
ORIGIN = "http://allowed.example"
# 1900 tokens at ~200 tokens/s on the tiny model: far past the deadline
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1900,
        "temperature": 0}  # fmt: skip
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}


def wait_until(cond, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("faults") / "server.log"
    proc, url = start_server(serve_ckpt, log, "--max-seqs", "2", "--max-queue", "4", "--max-context", "2048",
                             "--request-timeout", str(TIMEOUT), "--allowed-origins", ORIGIN)  # fmt: skip
    # the first requests compile the engine's shapes (--no-warmup), which may take longer than the deadline
    deadline = time.time() + 240
    for body in (SHORT, SHORT | {"stream": True}, SHORT | {"n": 2}):
        while time.time() < deadline:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 504, r.text
    yield proc, url, log
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def idle(url: str) -> bool:
    """Nothing runs or waits, and no page is held by a sequence: every page is free or cached (evictable)."""
    return (
        metric(url, "gptoss_server_pending_sequences") == 0
        and metric(url, "gptoss_engine_running") == 0
        and metric(url, "gptoss_engine_waiting") == 0
        and metric(url, "gptoss_engine_pages_used") == 0
        and metric(url, "gptoss_engine_pages_free") + metric(url, "gptoss_engine_pages_cached")
        == metric(url, "gptoss_engine_pages_total")
    )


def test_cors_only_for_the_allowed_origins(server):
    _, url, _ = server
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(f"{url}/v1/chat/completions", headers=pre | {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{url}/v1/chat/completions", headers=pre | {"Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{url}/v1/models", headers=AUTH | {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{url}/v1/models", headers=AUTH | {"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_deadline_drops_the_request_and_frees_its_pages(server, client):
    _, url, log = server
    assert wait_until(lambda: idle(url))
    t0 = time.time()
    r = httpx.post(f"{url}/v1/chat/completions", json=LONG, headers=AUTH, timeout=60)
    took = time.time() - t0
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_timeout"
    assert "--request-timeout of 5 s" in err["message"] and TIMEOUT <= took < TIMEOUT + 5
    # the engine dropped the sequence: its pages are back in the pool, and it generates nothing more
    assert wait_until(lambda: idle(url), 10), httpx.get(f"{url}/metrics").text
    generated = metric(url, "gptoss_engine_generated_tokens")
    time.sleep(0.5)
    assert metric(url, "gptoss_engine_generated_tokens") == generated
    assert "POST /v1/chat/completions 504" in log.read_text()

    # mid-stream, chat completions: an error chunk, which the official client raises
    got: list = []
    before = metric(url, "gptoss_engine_generated_tokens")
    with pytest.raises(openai.APIError, match="request-timeout") as e:
        got.extend(client.chat.completions.create(**(LONG | {"stream": True})))
    assert got and e.value.body["code"] == "request_timeout"  # after the 200 and the first chunk
    assert metric(url, "gptoss_engine_generated_tokens") - before > 100  # it ran until the deadline
    assert wait_until(lambda: idle(url), 10)

    # mid-stream, Responses: an `error` event, then `response.failed` with the response so far
    events = list(client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=1900,
                                          temperature=0, stream=True))  # fmt: skip
    err_ev, failed = events[-2:]
    assert isinstance(err_ev, ResponseErrorEvent) and err_ev.code == "request_timeout"
    assert isinstance(failed, ResponseFailedEvent) and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and "request-timeout" in failed.response.error.message
    assert failed.response.usage.output_tokens > 10
    assert [ev.sequence_number for ev in events] == list(range(len(events)))
    assert wait_until(lambda: idle(url), 10)
    assert httpx.post(f"{url}/v1/chat/completions", json=SHORT, headers=AUTH, timeout=60).status_code == 200


def test_engine_death_is_a_503_everywhere_and_ends_every_request(server, client):
    """Last in this module: the server's engine is dead after it."""
    _, url, log = server
    assert wait_until(lambda: idle(url))
    outcomes: dict[str, object] = {}

    def run(name, fn):
        try:
            outcomes[name] = fn()
        except Exception as e:  # noqa: BLE001 - what the client raised is the outcome
            outcomes[name] = e

    first = {"chat": threading.Event(), "responses": threading.Event()}

    def chat_stream():
        for _ in client.chat.completions.create(**(LONG | {"stream": True})):
            first["chat"].set()

    def responses_stream():
        events = []
        for ev in client.responses.create(model=MODEL, input="story", max_output_tokens=1900, stream=True):
            events.append(ev)
            first["responses"].set()
        return events

    threads = [threading.Thread(target=run, args=("chat", chat_stream)),
               threading.Thread(target=run, args=("responses", responses_stream))]  # fmt: skip
    for t in threads:
        t.start()
    assert first["chat"].wait(4) and first["responses"].wait(4)  # both slots generate
    queued = [threading.Thread(target=run, args=(f"queued{i}", lambda: client.chat.completions.create(**LONG)))
              for i in range(2)]  # fmt: skip
    for t in queued:
        t.start()
    assert wait_until(lambda: metric(url, "gptoss_engine_waiting") == 2, 3)  # waiting for a slot

    r = httpx.post(f"{url}/v1/test/engine_fault", json={"message": "device lost (injected)"}, headers=AUTH)
    assert r.status_code == 200
    t0 = time.time()
    assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 1.0)
    assert time.time() - t0 < 1.0
    health = httpx.get(f"{url}/health").json()["error"]
    assert health["code"] == "engine_failed" and "device lost (injected)" in health["message"]
    for t in threads + queued:
        t.join(10)
        assert not t.is_alive()
    assert time.time() - t0 < 5  # all ended at once, not at their deadline

    assert isinstance(outcomes["chat"], openai.APIError) and "device lost" in str(outcomes["chat"])
    err_ev, failed = outcomes["responses"][-2:]
    assert isinstance(err_ev, ResponseErrorEvent) and err_ev.code == "engine_failed"
    assert isinstance(failed, ResponseFailedEvent) and failed.response.status == "failed"
    assert "device lost" in failed.response.error.message
    for name in ("queued0", "queued1"):
        e = outcomes[name]
        assert isinstance(e, openai.InternalServerError) and e.status_code == 503, e
        assert e.body["code"] == "engine_failed"
    # new requests: a 503 at once, on every generating endpoint
    for path, body in (("chat/completions", SHORT), ("responses", {"input": "x"}),
                       ("completions", {"prompt": "x", "max_tokens": 2})):  # fmt: skip
        t1 = time.time()
        r = httpx.post(f"{url}/v1/{path}", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed" and time.time() - t1 < 1
    text = log.read_text()
    assert text.count("the engine's thread stopped") == 1 and text.count("Traceback") == 1
    assert text.count("RuntimeError: device lost (injected)") >= 1
