"""The server's edges in time: a full queue (429), clients that disconnect (their requests are cancelled and
the engine's memory freed), and SIGTERM (requests in flight finish, then the process exits 0). One server
with one engine slot and one queue place, so two requests fill it."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from apitools import (
    AUTH,
    MODEL,
    metric,
    script,
    serve_ckpt_fixture,  # noqa: F401 - the session's checkpoint fixture
    start_server,
    stop_server,
)

LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 1500,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("lifecycle") / "server.log"
    proc, url = start_server(serve_ckpt, log, "--max-seqs", "1", "--max-queue", "1", "--max-context", "2048")
    yield proc, url, log
    stop_server(proc)


def wait_until(cond, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def idle(url: str) -> bool:
    return (
        metric(url, "gptoss_server_pending_sequences") == 0
        and metric(url, "gptoss_engine_running") == 0
        and metric(url, "gptoss_engine_waiting") == 0
    )


def test_full_queue_is_a_429_and_disconnects_cancel(server):
    _, url, log = server
    before = log.read_text().count("POST /v1/chat/completions 499")
    chat, stream = f"{url}/v1/chat/completions", LONG | {"stream": True}
    with httpx.Client(timeout=60) as a, a.stream("POST", chat, json=stream, headers=AUTH) as ra:
        la = ra.iter_lines()  # kept: a dropped line iterator closes the response
        next(la)  # admitted (its first chunk is out)
        with httpx.Client(timeout=60) as b, b.stream("POST", chat, json=stream, headers=AUTH) as rb:
            lb = rb.iter_lines()
            next(lb)
            assert metric(url, "gptoss_server_pending_sequences") == 2
            r = httpx.post(chat, json=LONG, headers=AUTH)
            assert r.status_code == 429 and "the server is busy" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # both clients went away mid-generation: their sequences are cancelled and freed at once
    assert wait_until(lambda: idle(url)), httpx.get(f"{url}/metrics").text
    generated = metric(url, "gptoss_engine_generated_tokens")
    assert generated < 2 * LONG["max_tokens"]
    time.sleep(1)
    assert metric(url, "gptoss_engine_generated_tokens") == generated  # nothing runs any more
    ok = httpx.post(f"{url}/v1/chat/completions", json=LONG | {"max_tokens": 4}, headers=AUTH, timeout=60)
    assert ok.status_code == 200
    assert wait_until(lambda: log.read_text().count("POST /v1/chat/completions 499") == before + 2)


def test_non_streamed_request_is_cancelled_when_the_client_leaves(server):
    _, url, log = server
    before = log.read_text().count("POST /v1/chat/completions 499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=LONG, headers=AUTH, timeout=3)
    assert wait_until(lambda: idle(url))
    assert wait_until(lambda: log.read_text().count("POST /v1/chat/completions 499") == before + 1)


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(server):
    proc, url, log = server
    script(url, "<|channel|>final<|message|>" + " one" * 40 + "<|return|>")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 100,
        "stream": True,
        "temperature": 0,
    }
    content, seen = [], []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        for line in lines:
            seen.append(line)
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    content.append(c["delta"].get("content") or "")
    assert "".join(content) == " one" * 40 and "data: [DONE]" in seen
    assert proc.wait(60) == 0
    assert "Finished server process" in log.read_text()
